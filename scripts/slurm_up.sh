#!/usr/bin/env bash
# A SLURM cluster on this machine, for the SLURM end-to-end tests (needs root).
#
#   bash scripts/slurm_up.sh              one node: this machine as it is (slurmd -C)
#   bash scripts/slurm_up.sh --nodes 2    node1, node2, ...: each slurmd in its own UTS namespace
#                                         (its own hostname), on its own port, with 2 CPUs
#   bash scripts/slurm_up.sh --node node2 start that node's slurmd again (after a node loss:
#                                         scripts/slurm_down.sh --node node2)
#
# Installs slurmctld/slurmd/munge when missing, writes slurm.conf into a state folder, starts
# munged, slurmctld and the slurmd(s), and waits until every node is idle. Every address is
# 127.0.0.1: the nodes share the loopback, NodeAddr=127.0.0.1 is how clients and the launcher
# reach them, and their names need not resolve. The config lives only in the state folder, so
# clients need SLURM_CONF: the last line printed is `export SLURM_CONF=...`, hence
# `eval "$(bash scripts/slurm_up.sh)"`. Progress goes to stderr. Every start is cold
# (`slurmctld -i`, a fresh state folder): job ids begin at 1 again.
# MEXT_SLURM_DIR (state folder), MEXT_SLURM_PORT (slurmctld's port) and MEXT_SLURM_NODE_PORT
# (node1's port; node i gets it + i - 1) let a second cluster run beside a first one.
# Stop it with scripts/slurm_down.sh (same MEXT_SLURM_DIR).
set -euo pipefail
state=${MEXT_SLURM_DIR:-/tmp/mext-slurm}
wait_s=${MEXT_SLURM_WAIT_S:-30}
ctld_port=${MEXT_SLURM_PORT:-6817}
node_port=${MEXT_SLURM_NODE_PORT:-6921}
say() { echo "slurm_up: $*" >&2; }
usage() { say "usage: slurm_up.sh [--nodes N] | --node NAME"; exit 2; }

nodes=1 restart=""
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || { say "--nodes wants a count >= 1, got '${2:-}'"; exit 2; }
             nodes=$2; shift 2 ;;
    --node) [ -n "${2:-}" ] || usage; restart=$2; shift 2 ;;
    *) usage ;;
  esac
done

if [ "$(id -u)" != 0 ]; then
  say "needs root (it starts munged as the munge user and slurmd as root); run it with sudo"
  exit 1
fi

# start_slurmd <node>: node<i> runs in a UTS namespace of its own, named like the node, so that
# its tasks see that hostname; the one-node cluster's slurmd is this machine's.
start_slurmd() {
  if [ "$1" = "-" ]; then
    slurmd
  else
    rm -f "$state/slurmd-$1.pid"
    unshare --uts bash -c "hostname $1 && exec slurmd -N $1"
    local pid="" ns=""
    for _ in $(seq 20); do  # the daemon writes its pidfile after its parent has returned
      pid=$(cat "$state/slurmd-$1.pid" 2>/dev/null) && ns=$(readlink "/proc/$pid/ns/uts") \
        && [ "$ns" != "$(readlink /proc/self/ns/uts)" ] && break
      ns=""; sleep 0.25
    done
    [ -n "$ns" ] || { say "slurmd of $1 did not start: $(tail -n 3 "$state/log/slurmd-$1.log")"; return 1; }
    echo "$ns" > "$state/uts-$1"  # slurm_down.sh ends what runs in it
  fi
}

# wait_idle <node>...: until sinfo says idle for every one
wait_idle() {
  for _ in $(seq $((wait_s * 2))); do
    local busy=0 n
    for n in "$@"; do
      [ "$(sinfo -h -n "$n" -o %t 2>/dev/null)" = idle ] || busy=1
    done
    [ $busy = 0 ] && return 0
    sleep 0.5
  done
  say "not idle after ${wait_s}s: $(sinfo -h -N -o '%N %t %E' 2>&1 | tr '\n' ';')"
  tail -n 5 "$state"/log/*.log >&2 || true
  return 1
}

if [ -n "$restart" ]; then  # one node of a running multi-node cluster
  export SLURM_CONF=$state/slurm.conf
  grep -q "^NodeName=$restart " "$SLURM_CONF" 2>/dev/null \
    || { say "no node $restart in $SLURM_CONF (is a --nodes cluster up?)"; exit 1; }
  if [ -f "$state/slurmd-$restart.pid" ] && kill -0 "$(cat "$state/slurmd-$restart.pid")" 2>/dev/null; then
    say "slurmd of $restart is running already"; exit 1
  fi
  start_slurmd "$restart"
  wait_idle "$restart"
  say "up again: node $restart idle"
  exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  say "installing slurmctld slurmd slurm-client munge"
  pkgs=(slurmctld slurmd slurm-client munge)
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >&2 \
    || { apt-get update -qq >&2 && apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >&2; }
fi
if [ -f "$state/slurmctld.pid" ] && kill -0 "$(cat "$state/slurmctld.pid")" 2>/dev/null; then
  say "a cluster from $state is still running; stop it first: bash scripts/slurm_down.sh"
  exit 1
fi
rm -rf "$state"
mkdir -p "$state/spool" "$state/ctld" "$state/log"

# munge: the key comes with the package (created when missing); the socket folder does not.
if [ ! -s /etc/munge/munge.key ]; then
  runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key >&2
fi
mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged
  touch "$state/munged.started"  # slurm_down.sh stops munged only when we started it
fi

if [ "$nodes" = 1 ]; then
  # This machine's NodeName/CPUs line, with a low RealMemory: jobs ask for no memory.
  node=$(slurmd -C | head -n 1 | sed -E 's/ RealMemory=[0-9]+//')
  names=$(echo "$node" | sed -E 's/^NodeName=([^ ]+).*/\1/')
  node_lines="$node NodeAddr=127.0.0.1 RealMemory=1000 State=UNKNOWN"
  per_node="SlurmdSpoolDir=$state/spool
SlurmdPidFile=$state/slurmd.pid
SlurmdLogFile=$state/log/slurmd.log"
else
  # node<i>: 2 CPUs each whatever the machine has (config_overrides: slurmd takes the config's
  # word for it), its own port; %n in the paths is the node's name.
  names=$(seq -f 'node%g' "$nodes" | tr '\n' ' ')
  node_lines=$(for i in $(seq "$nodes"); do
    echo "NodeName=node$i NodeAddr=127.0.0.1 NodeHostname=node$i Port=$((node_port + i - 1))" \
         "CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1" \
         "RealMemory=1000 State=UNKNOWN"
  done)
  # a lost node is DOWN after SlurmdTimeout (SLURM's default 300 s); its job is requeued
  per_node="SlurmdSpoolDir=$state/spool/%n
SlurmdPidFile=$state/slurmd-%n.pid
SlurmdLogFile=$state/log/slurmd-%n.log
SlurmdParameters=config_overrides
SlurmdTimeout=${MEXT_SLURMD_TIMEOUT_S:-15}"
fi
cat > "$state/slurm.conf" <<EOF
ClusterName=mext
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$state/log/jobcomp.txt
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SchedulerParameters=bf_interval=5,sched_interval=5
KillWait=60
StateSaveLocation=$state/ctld
SlurmctldPidFile=$state/slurmctld.pid
SlurmctldLogFile=$state/log/slurmctld.log
$per_node
$node_lines
PartitionName=debug Nodes=$(echo $names | tr ' ' ',') Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$state/slurm.conf
slurmctld -i
if [ "$nodes" = 1 ]; then
  start_slurmd -
else
  for n in $names; do start_slurmd "$n"; done
fi
# shellcheck disable=SC2086
wait_idle $names || exit 1
say "up: $nodes node(s) idle ($names); slurmctld pid $(cat "$state/slurmctld.pid") on port" \
    "$ctld_port; state and logs in $state"
echo "export SLURM_CONF=$SLURM_CONF"
