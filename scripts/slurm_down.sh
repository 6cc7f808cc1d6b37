#!/usr/bin/env bash
# Stop the cluster that scripts/slurm_up.sh started (same MEXT_SLURM_DIR), by the PIDs it
# recorded: slurmd, slurmctld, and munged when slurm_up.sh was the one that started it. The
# logs stay in the state folder.
set -uo pipefail
state=${MEXT_SLURM_DIR:-/tmp/mext-slurm}
stop() {  # stop <name> <pidfile>: TERM, then KILL after 10 s
  local pid
  pid=$(cat "$2" 2>/dev/null) || return 0
  kill -0 "$pid" 2>/dev/null || return 0
  kill "$pid"
  for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || { echo "slurm_down: stopped $1 ($pid)" >&2; return 0; }; sleep 0.5; done
  kill -9 "$pid" 2>/dev/null
  echo "slurm_down: killed $1 ($pid)" >&2
}
stop slurmd "$state/slurmd.pid"
stop slurmctld "$state/slurmctld.pid"
if [ -f "$state/munged.started" ]; then
  stop munged /run/munge/munged.pid
  rm -f "$state/munged.started"
fi
rm -f "$state/slurm.conf"  # a stopped cluster's config must not pass for a live one; logs stay
