#!/usr/bin/env bash
# Per-task wrapper that gpu_slurm.sbatch runs under srun: gives each process its JAX identity, then execs
# the command. JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES come from the batch script.
#   JAX_PROCESS_ID        = SLURM_PROCID (global task rank)
#   JAX_LOCAL_DEVICE_IDS  = the GPUs this process drives: all of the node's GPUs (LAD_PROCESS_LAYOUT=per-node)
#                           or the single GPU SLURM_LOCALID (per-gpu). JAX's own SLURM detection assumes one GPU
#                           per process, so per-node runs must set this or each process would see only GPU 0.
set -euo pipefail

: "${SLURM_PROCID:?slurm_task.sh runs under srun (SLURM_PROCID is unset)}"
: "${SLURM_LOCALID:?slurm_task.sh runs under srun (SLURM_LOCALID is unset)}"
: "${LAD_GPUS_PER_NODE:?set by gpu_slurm.sbatch}"
layout=${LAD_PROCESS_LAYOUT:-per-node}

export JAX_PROCESS_ID=$SLURM_PROCID
case $layout in
  per-node)
    ids=0
    for ((i = 1; i < LAD_GPUS_PER_NODE; i++)); do ids+=",$i"; done
    export JAX_LOCAL_DEVICE_IDS=$ids
    ;;
  per-gpu) export JAX_LOCAL_DEVICE_IDS=$SLURM_LOCALID ;;
  *) echo "error: LAD_PROCESS_LAYOUT='$layout' must be per-node or per-gpu" >&2; exit 2 ;;
esac
exec "$@"
