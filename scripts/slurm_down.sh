#!/usr/bin/env bash
# Stop the cluster that scripts/slurm_up.sh started (same MEXT_SLURM_DIR), by the PIDs it
# recorded: the slurmd(s), slurmctld, and munged when slurm_up.sh was the one that started it
# and no other slurmctld still uses it. Whatever still runs in a node's UTS namespace (job
# steps, tasks) is killed with it, which ends the namespace. The logs stay in the state folder.
#
#   bash scripts/slurm_down.sh               the whole cluster
#   bash scripts/slurm_down.sh --node node2  a node loss: SIGKILL to node2's slurmd and to
#                                            everything in its namespace, nothing else
set -uo pipefail
state=${MEXT_SLURM_DIR:-/tmp/mext-slurm}
say() { echo "slurm_down: $*" >&2; }
stop() {  # stop <name> <pidfile>: TERM, then KILL after 10 s
  local pid
  pid=$(cat "$2" 2>/dev/null) || return 0
  kill -0 "$pid" 2>/dev/null || return 0
  kill "$pid"
  for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || { say "stopped $1 ($pid)"; return 0; }; sleep 0.5; done
  kill -9 "$pid" 2>/dev/null
  say "killed $1 ($pid)"
}
in_namespace() {  # in_namespace <node>: the PIDs in the UTS namespace slurm_up.sh made for it
  local ns pid
  ns=$(cat "$state/uts-$1" 2>/dev/null) || return 0
  [[ "$ns" =~ ^uts:\[[0-9]+\]$ ]] && [ "$ns" != "$(readlink /proc/self/ns/uts)" ] || return 0
  for pid in $(ls /proc | grep -E '^[0-9]+$'); do
    [ "$(readlink "/proc/$pid/ns/uts" 2>/dev/null)" = "$ns" ] && echo "$pid"
  done
}
kill_node() {  # kill_node <node>: SIGKILL to everything in its namespace, slurmd included
  local pids
  pids=$(in_namespace "$1" | tr '\n' ' ')
  [ -n "$pids" ] || return 0
  # shellcheck disable=SC2086
  kill -9 $pids 2>/dev/null
  say "killed node $1: pid(s) $pids"
}

if [ "${1:-}" = --node ]; then
  [ -n "${2:-}" ] && [ -f "$state/uts-$2" ] || { say "no node '${2:-}' in $state"; exit 2; }
  kill_node "$2"
  exit 0
fi
for pidfile in "$state"/slurmd*.pid; do
  [ -e "$pidfile" ] || continue
  name=$(basename "$pidfile" .pid)
  stop "$name" "$pidfile"
  node=${name#slurmd-}
  [ "$node" != slurmd ] && kill_node "$node"  # job steps left behind
  rm -f "$state/uts-$node"
done
stop slurmctld "$state/slurmctld.pid"
if [ -f "$state/munged.started" ]; then
  if pgrep -x slurmctld >/dev/null; then
    say "munged left running: another slurmctld uses it"
  else
    stop munged /run/munge/munged.pid
  fi
  rm -f "$state/munged.started"
fi
rm -f "$state/slurm.conf"  # a stopped cluster's config must not pass for a live one; logs stay
