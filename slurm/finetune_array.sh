#!/bin/bash
# PhilEO Bench sweep as one SLURM job array: array task i fine-tunes the sweep's task i into its own folder.
#
#   sbatch $(python jobs/launch_sweep.py SWEEP --site leonardo --account P --sbatch-args) slurm/finetune_array.sh
#   sbatch $(python jobs/launch_sweep.py SWEEP ... --indices 17 --sbatch-args) slurm/finetune_array.sh  # one task
#   python jobs/status.py DIR                                                        # tasks by state
#   python jobs/collect_results.py DIR                                               # table + plots
#
# One sweep path: `--sbatch-args` prints the options jobs/launch_sweep.py itself would submit with, from the same
# place (walltime: the sweep file's time_per_task; pre-timeout signal: the site's signal_delay_s; the sweep
# folder: <site run_root>/sweeps/<name>; partition, account, QOS, GPUs: the site profile and the flags), and
# leaves out the tasks that finished or that SLURM still runs or queues. The #SBATCH lines below are the same
# values for slurm/sweeps/phileo_bench.yaml on Leonardo (tests/test_sweep.py checks), for a bare
# `sbatch -A P -p boost_usr_prod --gres=gpu:1 slurm/finetune_array.sh`.
#
# Environment (all optional):
#   PHILEO_SWEEP      sweep file, relative to the submit folder (default slurm/sweeps/phileo_bench.yaml)
#   PHILEO_SWEEP_DIR  sweep folder: results of task i in $PHILEO_SWEEP_DIR/tasks/0000i
#                     (default Leonardo's run_root: $CINECA_SCRATCH/phileo/runs/sweeps/<sweep file name>)
#   PHILEO_PYTHON     python with phileo importable (default: python on PATH)
#   PHILEO_REPO       checkout put on PYTHONPATH (default: the submit folder)
#   PHILEO_MAX_REQUEUES  requeues after the pre-timeout signal (default 3)
#   PHILEO_MAX_FAILURES  retries of a failed task (a dead or hung rank, an exception) in a row (default 3)
#   PHILEO_BENCH_DATA, PHILEO_WEIGHTS  read by the sweep file's ${VAR}s
#   PHILEO_SETUP, PHILEO_CONDA, PHILEO_ENV  site set-up (slurm/site_setup.sh; PHILEO_SETUP=none off Leonardo)
#
# A task that already finished exits at once, an interrupted one resumes from its newest checkpoint, so re-running
# any index (or the whole array) is safe. Before the time limit the tasks get USR2, save a checkpoint and exit 75
# (PREEMPTED in phileo/exit_codes.py); this script then requeues its own array task (bounded by PHILEO_MAX_REQUEUES).
#SBATCH --job-name=phileo-bench
#SBATCH --array=0-359%32
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --signal=USR2@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%A_%a.out
set -euo pipefail

SUBMIT_DIR=${SLURM_SUBMIT_DIR:-$PWD}
cd "$SUBMIT_DIR"
# Site set-up, the same as the generated jobs': modules, conda, NCCL, offline flags; refuses a task without a GPU
# on Leonardo (a forgotten --gres=gpu:1). PHILEO_SETUP=none when your environment is already active.
# shellcheck source=slurm/site_setup.sh
source "${PHILEO_REPO:-$SUBMIT_DIR}/slurm/site_setup.sh" finetune_array.sh
SWEEP=${PHILEO_SWEEP:-slurm/sweeps/phileo_bench.yaml}
SWEEP_NAME=$(basename "$SWEEP" .yaml)
SWEEP_DIR=${PHILEO_SWEEP_DIR:-${CINECA_SCRATCH:-$SUBMIT_DIR/runs}/phileo/runs/sweeps/$SWEEP_NAME}
PYTHON=${PHILEO_PYTHON:-python}
MAX_REQUEUES=${PHILEO_MAX_REQUEUES:-3}
export PYTHONPATH=${PHILEO_REPO:-$SUBMIT_DIR}${PYTHONPATH:+:$PYTHONPATH}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# Rank variables exported from the submitting shell would override srun's (and clash on MASTER_PORT).
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK GROUP_WORLD_SIZE NODE_RANK MASTER_ADDR MASTER_PORT
# Without it srun gives each task one CPU and the DataLoader workers share it.
export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}
# A failed step is retried by phileo.launch.failover below, after srun: the ranks leave it to it.
export PHILEO_FAILOVER=1
export HF_HUB_OFFLINE=1
# The first task records this array in the sweep folder (arrays/<id>.json) for phileo-status and re-submission.
export PHILEO_SWEEP_LAUNCHER=finetune_array.sh
export HDF5_USE_FILE_LOCKING=FALSE  # shared file systems without flock

if [ -z "${SLURM_ARRAY_TASK_ID:-}" ]; then
  echo "finetune_array.sh: not inside a job array (submit it with sbatch; --array picks the tasks)" >&2
  exit 2
fi
echo "[$(date -Is)] array task $SLURM_ARRAY_TASK_ID of ${SLURM_ARRAY_JOB_ID:-?} on ${SLURMD_NODENAME:-$(hostname)}:" \
     "sweep $SWEEP -> $SWEEP_DIR (restart ${SLURM_RESTART_COUNT:-0})"

status=0
srun --kill-on-bad-exit=1 "$PYTHON" -m phileo.bench.sweep run "$SWEEP" \
  --index "$SLURM_ARRAY_TASK_ID" --out "$SWEEP_DIR" || status=$?

if [ "$status" -eq 75 ]; then
  if [ "${SLURM_RESTART_COUNT:-0}" -lt "$MAX_REQUEUES" ]; then
    echo "[$(date -Is)] checkpoint saved before the time limit: requeueing ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    exit 0
  fi
  echo "[$(date -Is)] preempted after $MAX_REQUEUES requeues: giving up (re-submit --array=$SLURM_ARRAY_TASK_ID to go on)" >&2
elif [ "$status" -ne 0 ]; then
  # A dead or hung rank, an exception: retried from the task's last good checkpoint up to PHILEO_MAX_FAILURES times
  # in a row (phileo/launch/failover.py), then the task's state.json says "failed".
  "$PYTHON" -m phileo.launch.failover --exit-code "$status" --max-failures "${PHILEO_MAX_FAILURES:-3}" \
    --run-dir "$(printf '%s/tasks/%05d' "$SWEEP_DIR" "$SLURM_ARRAY_TASK_ID")" || true
fi
exit "$status"
