#!/usr/bin/env bash
# Start `python -m lad_jax.train` on every worker of a TPU slice at once (one process per host).
#
#   launch/tpu_run.sh --zone us-east5-a --accelerator v5p-64 --run-name qwen7b-lad --bucket gs://my-bucket \
#       --config configs/qwen2.5-7b_dapo_lad.yaml data.train_files=[gs://my-bucket/data/dapo_math.jsonl]
#
# Flags (besides the common ones in launch/common.sh):
#   --config PATH     trainer config, relative to the project directory on the workers (default configs/default.yaml)
#   --env KEY=VALUE   extra environment variable for the trainer (repeatable), e.g. --env LIBTPU_INIT_ARGS=...
#   --foreground      stay attached and stream all workers' output (Ctrl-C detaches only the ssh sessions)
#   --skip-check      do not validate the config locally before launching
#   --skip-plan       do not compile the run for --accelerator first (python -m lad_jax.plan, needs libtpu locally:
#                     pip install -e .[plan]); by default a config that does not fit the chips' HBM stops here
#   key.sub=value     any other argument is a trainer config override, passed through in order
#
# Every worker runs the same command; the trainer calls jax.distributed.initialize(), which finds the other
# workers from the TPU VM metadata (no addresses needed), and each host loads its own data shard.
# The run writes to <bucket>/runs/<run name> (output_dir=<bucket>/runs run_name=<run name>), so re-running the
# same command after a preemption resumes from the latest checkpoint there.
# By default the trainer runs detached (nohup) with its output in ~/lad_logs/<run name>.log on each worker and
# its pid in ~/lad_logs/<run name>.pid; follow it with tpu_logs.sh and stop it with tpu_stop.sh.
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

config=configs/default.yaml foreground=0 check=1 plan=1
envs=(PYTHONUNBUFFERED=1)
overrides=()
while (($#)); do
  case $1 in
    --config | --config=*) lad_flag_value "$@"; config=$LAD_VALUE; shift "$LAD_SHIFT" ;;
    --env | --env=*) lad_flag_value "$@"; envs+=("$LAD_VALUE"); shift "$LAD_SHIFT" ;;
    --foreground) foreground=1; shift ;;
    --skip-check) check=0; shift ;;
    --skip-plan) plan=0; shift ;;
    -h | --help) lad_usage "$0"; exit 0 ;;
    --*) lad_common_flag "$@" || lad_die "unknown flag '$1' (see --help)"; shift "$LAD_SHIFT" ;;
    *=*) overrides+=("$1"); shift ;;
    *) lad_die "unexpected argument '$1': trainer overrides look like key.sub=value" ;;
  esac
done
lad_tpu_settings --accelerator

for kv in "${envs[@]}"; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || lad_die "--env '$kv' must look like NAME=value"
done

workers=$(lad_num_workers)
output_dir=$(lad_output_dir)
if ((workers > 1)) && [[ -z $LAD_BUCKET ]]; then
  lad_die "$LAD_ACCELERATOR has $workers hosts, which must share one checkpoint directory: pass --bucket gs://... (or LAD_BUCKET)"
fi
# Multi-host slices need jax.distributed.initialize(); later overrides (the user's) still win. The value is
# quoted because YAML reads a bare `on` as true.
train_args=(--config "$config" "output_dir=$output_dir" "run_name=$LAD_RUN_NAME")
((workers > 1)) && train_args+=("mesh.distributed='on'")
train_args+=("${overrides[@]}")

if ((check)); then
  # Catch typos here rather than after the slice has spent minutes starting up.
  local_python=${LAD_LOCAL_PYTHON:-python3}
  if (cd "$LAD_REPO_DIR" && "$local_python" -c 'import lad_jax.config' 2>/dev/null); then
    (cd "$LAD_REPO_DIR" && "$local_python" - "${train_args[@]:1}" <<'EOF'
import sys
from lad_jax.config import ConfigError, load_config
try:
    load_config(sys.argv[1], sys.argv[2:])
except ConfigError as e:
    sys.exit(f"error: config check failed: {e}")
EOF
    ) || exit 2
    lad_note "config $config with $((${#train_args[@]} - 2)) override(s): valid"
  else
    lad_note "note: lad_jax is not importable with $local_python here; skipping the local config check"
  fi
fi

if ((plan)); then
  # Compile every phase for the slice (compile-only, no TPU needed) so an out-of-memory config fails here, not
  # after the slice has started: lad_jax.plan exits 3 when a phase does not fit the chips' HBM.
  local_python=${LAD_LOCAL_PYTHON:-python3}
  if (cd "$LAD_REPO_DIR" && "$local_python" -c 'import libtpu, lad_jax.plan' 2>/dev/null); then
    lad_note "plan: compiling $config for $LAD_ACCELERATOR (python -m lad_jax.plan; --skip-plan skips this)"
    rc=0
    (cd "$LAD_REPO_DIR" && "$local_python" -m lad_jax.plan --topology "$LAD_ACCELERATOR" "${train_args[@]}" >&2) || rc=$?
    ((rc == 3)) && lad_die "the plan above says this config does not fit $LAD_ACCELERATOR (see DOES NOT FIT); change the mesh or batch sizes, or pass --skip-plan"
    ((rc == 0)) || lad_die "python -m lad_jax.plan failed (exit $rc); fix the error above or pass --skip-plan"
  else
    lad_note "note: libtpu or lad_jax is not importable with $local_python here (pip install -e .[plan]); skipping the memory plan"
  fi
fi

remote_log=$LAD_REMOTE_LOGS/$LAD_RUN_NAME.log
remote_pid=$LAD_REMOTE_LOGS/$LAD_RUN_NAME.pid
train="env $(lad_join "${envs[@]}") ../$LAD_REMOTE_VENV/bin/python -m lad_jax.train $(lad_join "${train_args[@]}")"
script="set -euo pipefail; cd; mkdir -p $LAD_REMOTE_LOGS"
script+="; if [ -f $remote_pid ] && kill -0 \"\$(cat $remote_pid)\" 2>/dev/null; then"
script+=" echo \"\$(hostname): run $LAD_RUN_NAME is already running (pid \$(cat $remote_pid))\" >&2; exit 1; fi"
script+="; cd $LAD_REMOTE_DIR"
if ((foreground)); then
  script+="; $train 2>&1 | tee ../$remote_log"
else
  script+="; nohup setsid $train > ../$remote_log 2>&1 < /dev/null & echo \$! > ../$remote_pid"
  script+="; echo \"\$(hostname): started $LAD_RUN_NAME (pid \$!), log ~/$remote_log\""
fi

lad_note "run $LAD_RUN_NAME on $LAD_TPU_NAME ($workers worker(s)), output $output_dir/$LAD_RUN_NAME"
lad_run gcloud compute tpus tpu-vm ssh "$LAD_TPU_NAME" "${LAD_SCOPE[@]}" --worker=all --command="$script"
