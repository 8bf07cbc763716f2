#!/bin/bash
# sweeps/slurm_agent.sh: one sweep agent per Slurm job; submit as many jobs as you want trials running.
#
#   mkdir -p logs                                   # Slurm does not create the --output directory
#   # With W&B: one run per job (`wandb agent --count 1`)
#   wandb sweep sweeps/grok_lr.yaml                 # prints the sweep's ENTITY/PROJECT/ID
#   for i in $(seq 8); do sbatch sweeps/slurm_agent.sh ENTITY/PROJECT/ID; done
#   # Without W&B: an array of agents on one Optuna study (sweep.py), on any number of nodes
#   sbatch --array=0-7 sweeps/slurm_agent.sh sweeps/grok_lr.yaml --storage /shared/grok_lr.journal
#
# With a sweep file the job runs `python sweep.py FILE --agent_name <job id> [FLAGS]`: the agent takes
# trials from the study until there are none left (add --count N for at most N). Every node must see
# the study's file and the trials' directories (--dir, default runs/sweep-<name>/) on a shared file
# system. With anything else as the first argument (a W&B sweep id) the job runs
# `wandb agent --count 1 ID`; W&B hands out the runs.
#
# Preemption and time limits: Slurm sends USR1 to this script two minutes before the end
# (--signal=B:USR1@120). The trap passes it on: to sweep.py's agent, which asks its trial to save a
# checkpoint, queues the trial again and exits; or, under W&B, to the training process itself
# (train.py saves, and W&B marks the run preempted and hands it out again; train.py resumes it from
# runs/sweep-<sweep id>-<run id>/). Then the job requeues itself (`scontrol requeue`), and its next
# attempt takes up the queued work. A job that finishes, or fails, is not requeued. Under W&B, a
# preemption that sends SIGTERM to every process instead (no --signal warning) ends the run as
# stopped, not preempted, because that is also how `wandb agent` stops a run; W&B does not hand it
# out again. $TINYLAB_PYTHON must exec Python itself (not `conda run`): the signals go to its pid.
#
# Python: `python` from PATH (activate your venv before sbatch; sbatch passes the environment on), or
# $TINYLAB_PYTHON. sweep.py is looked up in TINYLAB_DIR (default: the directory you ran sbatch from,
# which is also the job's working directory). Add --partition, --account, --mem as your cluster wants.
#
#SBATCH --job-name=sweep
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@120

set -uo pipefail  # no -e: the agent's exit status is inspected, not fatal

log() { echo "[slurm_agent.sh $(date '+%F %T')] $*"; }

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    echo "slurm_agent.sh is a batch script: mkdir -p logs && sbatch sweeps/slurm_agent.sh SWEEP_FILE_OR_ID" >&2
    exit 2
fi
if (($# < 1)); then
    echo "usage: sbatch sweeps/slurm_agent.sh sweeps/x.yaml [sweep.py flags]  |  sbatch sweeps/slurm_agent.sh ENTITY/PROJECT/ID" >&2
    exit 2
fi

if [[ ! -f "$1" && "$1" =~ \.(yaml|yml)$ ]]; then
    echo "slurm_agent.sh: sweep file $1 not found (relative paths start from $(pwd))" >&2
    exit 2
fi
python="${TINYLAB_PYTHON:-python}"
restarts="${SLURM_RESTART_COUNT:-0}"
if [[ -f "$1" ]]; then
    kind="sweep.py"
    sweep_py="${TINYLAB_DIR:-${SLURM_SUBMIT_DIR:-.}}/sweep.py"
    command=("$python" "$sweep_py" "$1" --agent_name "job ${SLURM_JOB_ID}" "${@:2}")
else
    kind="wandb"
    command=("$python" -m wandb agent --count 1 "$@")
fi
export PYTHONUNBUFFERED=1

stop_requested=0
agent_pid=""
# shellcheck disable=SC2317  # called by the trap
on_warning() {
    ((stop_requested)) && return
    stop_requested=1
    log "got SIGUSR1: asking the trial to save a checkpoint and stop"
    [[ -z "$agent_pid" ]] && return
    if [[ "$kind" == "sweep.py" ]]; then
        kill -USR1 "$agent_pid"
    else
        pkill -USR1 -P "$agent_pid"  # the training process wandb agent started, not the agent itself
    fi
}
trap on_warning USR1
trap 'log "got SIGTERM: Slurm is ending the job"' TERM

log "job $SLURM_JOB_ID${SLURM_ARRAY_TASK_ID:+ (array task $SLURM_ARRAY_TASK_ID)} restart $restarts on $(hostname -s): ${command[*]}"
"${command[@]}" &
agent_pid=$!
((stop_requested)) && { stop_requested=0; on_warning; }

# `wait` returns early (status > 128) when a trap runs: wait again while the process is still there
# (bash answers a second wait on a collected process with its status again, so that cannot tell).
wait "$agent_pid"
status=$?
while kill -0 "$agent_pid" 2>/dev/null; do
    wait "$agent_pid"
    status=$?
done

if ((stop_requested)); then
    log "agent stopped with status $status after the warning signal; requeueing job $SLURM_JOB_ID"
    if scontrol requeue "$SLURM_JOB_ID"; then
        exit 0
    fi
    log "requeue failed; submit another agent to take up the queued trial"
fi
if ((status == 0)); then
    log "agent finished (restart $restarts)"
else
    log "agent failed with status $status"
fi
exit "$status"
