#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the SLURM end-to-end tests (needs root).
#
# Installs slurmctld/slurmd/munge when missing, writes slurm.conf into a state folder, starts
# munged, slurmctld and slurmd, and waits until the node is idle. The config lives only in the
# state folder, so clients need SLURM_CONF: the last line printed is `export SLURM_CONF=...`,
# hence `eval "$(bash scripts/slurm_up.sh)"`. Progress goes to stderr. Every start is cold
# (`slurmctld -i`, a fresh state folder): job ids begin at 1 again.
# Stop it with scripts/slurm_down.sh (same MEXT_SLURM_DIR).
set -euo pipefail
state=${MEXT_SLURM_DIR:-/tmp/mext-slurm}
wait_s=${MEXT_SLURM_WAIT_S:-30}
say() { echo "slurm_up: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
  say "needs root (it starts munged as the munge user and slurmd as root); run it with sudo"
  exit 1
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

# This machine's NodeName/CPUs line, with a low RealMemory: jobs ask for no memory.
node=$(slurmd -C | head -n 1 | sed -E 's/ RealMemory=[0-9]+//')
name=$(echo "$node" | sed -E 's/^NodeName=([^ ]+).*/\1/')
cat > "$state/slurm.conf" <<EOF
ClusterName=mext
SlurmctldHost=localhost
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
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
$node NodeAddr=127.0.0.1 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=$name Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$state/slurm.conf
slurmctld -i
slurmd
for _ in $(seq $((wait_s * 2))); do
  if [ "$(sinfo -h -n "$name" -o %t 2>/dev/null)" = idle ]; then
    say "up: node $name idle; slurmctld pid $(cat "$state/slurmctld.pid"), slurmd pid" \
        "$(cat "$state/slurmd.pid"); state and logs in $state"
    echo "export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 0.5
done
say "node $name not idle after ${wait_s}s: $(sinfo -h -o '%t %E' 2>&1 | head -n 1)"
tail -n 5 "$state/log/slurmctld.log" "$state/log/slurmd.log" >&2 || true
exit 1
