#!/bin/bash
# Written by `python -m launch slurm` for run @{run_name}; to run it again: sbatch @{script}
#SBATCH --job-name=@{run_name}
#SBATCH --nodes=@{nodes}
#SBATCH --ntasks-per-node=@{tasks_per_node}
#SBATCH --cpus-per-task=@{cpus_per_task}
#SBATCH --time=@{time}
@{optional_directives}#SBATCH --chdir=@{workdir}
#SBATCH --output=@{run_dir}/slurm-%j.out
#SBATCH --error=@{run_dir}/slurm-%j.err
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=@{signal}
set -u

# Rendezvous on the first node, at the address SLURM itself reaches it by (its NodeAddr; the
# name when SLURM has none): a node's name need not resolve. The port follows from the job id,
# so two jobs sharing a node do not collide and every requeue of this job meets on the same one.
first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_ADDR=$(scontrol show node -o "$first_node" | sed -nE 's/.* NodeAddr=([^ ]+).*/\1/p')
MASTER_ADDR=${MASTER_ADDR:-$first_node}
export MASTER_ADDR
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
export OMP_NUM_THREADS=@{cpus_per_task}
export PYTHONPATH=@{repo}${PYTHONPATH:+:$PYTHONPATH}
@{env_exports}REQUEUE_EXIT_CODE=@{requeue_exit_code}  # the trainer saved a checkpoint and asks to go on
MAX_REQUEUES=@{max_requeues}  # cluster.max_requeues
restarts=${SLURM_RESTART_COUNT:-0}
echo "launch: job $SLURM_JOB_ID (restart $restarts) on $SLURM_JOB_NODELIST, $SLURM_NTASKS" \
     "tasks, rendezvous $MASTER_ADDR:$MASTER_PORT"

# SLURM sends USR1 to this shell alone (B:) @{signal_seconds} s before the time limit; srun
# passes it on to every task, whose trainer saves a checkpoint and exits $REQUEUE_EXIT_CODE.
# No --kill-on-bad-exit: ranks leave with that code one after another, and killing the late
# ones would cut their checkpoint writes short and turn the code into 143. A crashed rank's
# peers fail at their next collective (after parallel.timeout_s at worst), ending the step.
trap 'echo "launch: USR1: telling the tasks to stop"; kill -USR1 "$step" 2>/dev/null' USR1
# scancel and `scontrol requeue` send SIGTERM to this shell as well as to the tasks. Dying of it
# would end the batch step, and SLURM would then kill the tasks at once, in the middle of the
# checkpoint they are writing; so wait for them (SLURM sends SIGKILL after KillWait anyway).
trap 'echo "launch: TERM: waiting for the tasks to save and stop"' TERM
srun @{srun_options} \
  @{command} &
step=$!
wait "$step"; code=$?
while kill -0 "$step" 2>/dev/null; do  # a trapped signal ends `wait` early: wait again
  wait "$step"; code=$?
done

if [ "$code" -eq "$REQUEUE_EXIT_CODE" ]; then
  if [ "$restarts" -lt "$MAX_REQUEUES" ]; then
    echo "launch: the trainer asked to go on; requeue $((restarts + 1)) of $MAX_REQUEUES"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  echo "launch: not requeued: job $SLURM_JOB_ID was requeued $restarts time(s) already" \
       "(cluster.max_requeues=$MAX_REQUEUES); to go on, sbatch @{script}" >&2
fi
exit "$code"
