# Site set-up of the plain sbatch scripts (slurm/pretrain.sbatch, slurm/finetune_array.sh source this file):
# the same module/conda lines and exports as the jobs the launchers generate from slurm/sites/leonardo.yaml
# (tests/test_plain_sbatch.py keeps the two identical), then a refusal to train on the CPU of a GPU site.
#
#   PHILEO_SETUP=leonardo (default)  module load, conda activate, NCCL on InfiniBand; the job must have a GPU
#   PHILEO_SETUP=none                 your environment is already active (the dev cluster, another site): no
#                                     modules, no conda, no GPU required
#   PHILEO_CONDA, PHILEO_ENV          where conda and the env live (default $WORK/miniforge3, $WORK/envs/phileo)
#
# Sourced, not run (`source slurm/site_setup.sh NAME`): it sets the caller's environment. Exit status 2 (refused, phileo/exit_codes.py) names the fix.
_phileo_script=${1:-site_setup.sh}  # the calling script's name, for messages
case "${PHILEO_SETUP:-leonardo}" in
  leonardo)
    if ! command -v module >/dev/null 2>&1; then
      echo "$_phileo_script: PHILEO_SETUP=leonardo but there is no \`module\` command here; on another cluster" \
           "activate your environment and submit with --export=ALL,PHILEO_SETUP=none" >&2
      exit 2
    fi
    module load profile/deeplrn cineca-ai
    # shellcheck disable=SC1091
    source "${PHILEO_CONDA:-$WORK/miniforge3}/etc/profile.d/conda.sh"
    conda activate "${PHILEO_ENV:-$WORK/envs/phileo}"
    export NCCL_IB_HCA="mlx5" NCCL_SOCKET_IFNAME="ib" TORCH_NCCL_ASYNC_ERROR_HANDLING="1" OMP_NUM_THREADS="1"
    # SLURM sets SLURM_GPUS_ON_NODE (and CUDA_VISIBLE_DEVICES) only when the job asked for GPUs: without
    # --gres the task would silently train on the node's CPU, hours for what a GPU does in minutes.
    if [ "${SLURM_GPUS_ON_NODE:-0}" = 0 ] && [ -z "${CUDA_VISIBLE_DEVICES:-}" ]; then
      echo "$_phileo_script: this job has no GPU but leonardo trains on GPUs: submit with --gres=gpu:N" \
           "(N GPUs per node; PHILEO_SETUP=none to train on the CPU of a site without GPUs)" >&2
      exit 2
    fi
    ;;
  none) ;;
  *)
    echo "$_phileo_script: PHILEO_SETUP=${PHILEO_SETUP}: use leonardo or none" >&2
    exit 2
    ;;
esac
# Every site: compute nodes have no internet (fail fast instead of waiting on a download), and Lustre/GPFS
# mounts without flock make HDF5's file locks fail (our readers open chunks read-only without them anyway).
export HF_HUB_OFFLINE="1" HF_DATASETS_OFFLINE="1" TRANSFORMERS_OFFLINE="1" WANDB_MODE="offline"
export HDF5_USE_FILE_LOCKING="FALSE"
unset _phileo_script
