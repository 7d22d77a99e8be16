#!/usr/bin/env bash
# Train on the GPUs of one machine: one process drives all visible GPUs (the mesh spans them).
#
#   launch/gpu_run.sh --run-name qwen1p5b-lad --bucket gs://my-bucket \
#       --config configs/qwen2.5-math-1.5b_dapo_lad.yaml data.train_files=[/data/dapo_math.jsonl]
#
# Flags (besides --run-name, --bucket and --dry-run from launch/common.sh):
#   --config PATH     trainer config (default configs/default.yaml)
#   --gpus LIST       GPUs to use, e.g. 0,1,2,3 (default: all; sets CUDA_VISIBLE_DEVICES)
#   --env KEY=VALUE   extra environment variable for the trainer (repeatable)
#   key.sub=value     trainer config overrides, passed through in order
# Environment: LAD_PYTHON (default python3: run from the venv that has `pip install -e .[cuda]`),
# XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.90: rollouts need room for the KV cache next to the training state).
# Without --bucket the run writes to runs/<run name> here; re-running the same command resumes it.
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

config=configs/default.yaml gpus=""
envs=(PYTHONUNBUFFERED=1 "XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}")
overrides=()
while (($#)); do
  case $1 in
    --config | --config=*) lad_flag_value "$@"; config=$LAD_VALUE; shift "$LAD_SHIFT" ;;
    --gpus | --gpus=*) lad_flag_value "$@"; gpus=$LAD_VALUE; shift "$LAD_SHIFT" ;;
    --env | --env=*) lad_flag_value "$@"; envs+=("$LAD_VALUE"); shift "$LAD_SHIFT" ;;
    -h | --help) lad_usage "$0"; exit 0 ;;
    --*) lad_common_flag "$@" || lad_die "unknown flag '$1' (see --help)"; shift "$LAD_SHIFT" ;;
    *=*) overrides+=("$1"); shift ;;
    *) lad_die "unexpected argument '$1': trainer overrides look like key.sub=value" ;;
  esac
done
lad_finalize
for kv in "${envs[@]}"; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || lad_die "--env '$kv' must look like NAME=value"
done
if [[ -n $gpus ]]; then
  [[ $gpus =~ ^[0-9]+(,[0-9]+)*$ ]] || lad_die "--gpus '$gpus' must be a comma-separated list of GPU indices, e.g. 0,1"
  envs+=("CUDA_VISIBLE_DEVICES=$gpus")
fi

# One process: never try jax.distributed, even inside a SLURM allocation (quoted: YAML reads bare off as false).
# Runs from the current directory, like `python -m lad_jax.train` (configs/ names also resolve in the repository).
lad_run env "${envs[@]}" "${LAD_PYTHON:-python3}" -m lad_jax.train --config "$config" \
  "output_dir=$(lad_output_dir)" "run_name=$LAD_RUN_NAME" "mesh.distributed='off'" "${overrides[@]}"
