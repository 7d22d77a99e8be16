# shellcheck shell=bash disable=SC2034  # variables here are read by the scripts that source this file
# Shared settings and argument parsing for the launch/ scripts. Sourced, never executed.
#
# Every setting has a flag and an environment variable (the flag wins):
#   --project / LAD_PROJECT              GCP project (empty: gcloud's configured project)
#   --zone / LAD_ZONE                    TPU zone, e.g. us-east5-a (required by the tpu_* scripts)
#   --accelerator / LAD_ACCELERATOR      TPU slice type: v4-N, v5litepod-N (alias v5e-N), v5p-N, v6e-N
#   --tpu-name / LAD_TPU_NAME            TPU VM (and queued resource) name; default: the run name
#   --run-name / LAD_RUN_NAME            run name; names the output directory and worker log file
#   --bucket / LAD_BUCKET                gs:// bucket (or gs://bucket/prefix) for checkpoints, metrics, TensorBoard
#   --runtime-version / LAD_RUNTIME_VERSION  TPU software version; default by accelerator family
#   --dry-run / LAD_DRY_RUN=1            print the commands (one per line, shell-quoted) instead of running them
#
# Dry-run output goes to stdout, one command per line, quoted so that it can be pasted into a shell;
# everything else (notes, progress) goes to stderr.

LAD_PROJECT=${LAD_PROJECT:-}
LAD_ZONE=${LAD_ZONE:-}
LAD_ACCELERATOR=${LAD_ACCELERATOR:-v5p-8}
LAD_TPU_NAME=${LAD_TPU_NAME:-}
LAD_RUN_NAME=${LAD_RUN_NAME:-lad}
LAD_BUCKET=${LAD_BUCKET:-}
LAD_RUNTIME_VERSION=${LAD_RUNTIME_VERSION:-}
LAD_DRY_RUN=${LAD_DRY_RUN:-0}
# Where the project lives on each TPU worker, and the venv setup creates there.
LAD_REMOTE_DIR=${LAD_REMOTE_DIR:-lad_jax}
LAD_REMOTE_VENV=${LAD_REMOTE_VENV:-lad_venv}
LAD_REMOTE_LOGS=${LAD_REMOTE_LOGS:-lad_logs}

LAD_LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LAD_REPO_DIR=$(dirname "$LAD_LAUNCH_DIR")

lad_die() {
  echo "error: $*" >&2
  exit 2
}

lad_note() {
  echo "$*" >&2
}

# Quote one word for a POSIX shell, leaving plain words readable.
lad_quote() {
  local word=$1
  if [[ -n $word && $word =~ ^[A-Za-z0-9_@%+=:,./~-]+$ && $word != "~"* ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

# Quote a whole argv as one command line.
lad_join() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(lad_quote "$word")"
  done
  printf '%s' "$out"
}

# Run a command, or print it under --dry-run.
lad_run() {
  if [[ $LAD_DRY_RUN == 1 ]]; then
    lad_join "$@"
    printf '\n'
  else
    lad_note "+ $(lad_join "$@")"
    "$@"
  fi
}

# Flag value helper for "--flag value" and "--flag=value". Sets LAD_VALUE and LAD_SHIFT.
lad_flag_value() {
  if [[ $1 == --*=* ]]; then
    LAD_VALUE=${1#*=}
    LAD_SHIFT=1
  else
    (($# >= 2)) || lad_die "$1 needs a value"
    LAD_VALUE=$2
    LAD_SHIFT=2
  fi
}

# Parse one common flag at the front of "$@". Returns 1 when the flag is not a common one.
lad_common_flag() {
  LAD_SHIFT=1
  case $1 in
    --dry-run) LAD_DRY_RUN=1 ;;
    --project | --project=*) lad_flag_value "$@" && LAD_PROJECT=$LAD_VALUE ;;
    --zone | --zone=*) lad_flag_value "$@" && LAD_ZONE=$LAD_VALUE ;;
    --accelerator | --accelerator=* | --accelerator-type | --accelerator-type=*)
      lad_flag_value "$@" && LAD_ACCELERATOR=$LAD_VALUE ;;
    --tpu-name | --tpu-name=*) lad_flag_value "$@" && LAD_TPU_NAME=$LAD_VALUE ;;
    --run-name | --run-name=*) lad_flag_value "$@" && LAD_RUN_NAME=$LAD_VALUE ;;
    --bucket | --bucket=*) lad_flag_value "$@" && LAD_BUCKET=$LAD_VALUE ;;
    --runtime-version | --runtime-version=*) lad_flag_value "$@" && LAD_RUNTIME_VERSION=$LAD_VALUE ;;
    *) return 1 ;;
  esac
}

# Validate and derive settings once all flags are parsed.
lad_finalize() {
  [[ $LAD_DRY_RUN == 0 || $LAD_DRY_RUN == 1 ]] || lad_die "LAD_DRY_RUN must be 0 or 1, got '$LAD_DRY_RUN'"
  [[ $LAD_RUN_NAME =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ ]] ||
    lad_die "run name '$LAD_RUN_NAME' must be lowercase letters, digits and '-' (it names a TPU VM and a directory); set --run-name or LAD_RUN_NAME"
  local path
  for path in "$LAD_REMOTE_DIR" "$LAD_REMOTE_VENV" "$LAD_REMOTE_LOGS"; do
    [[ $path =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]*$ ]] ||
      lad_die "remote directory '$path' (LAD_REMOTE_DIR / LAD_REMOTE_VENV / LAD_REMOTE_LOGS) must be one plain name in the worker's home"
  done
  LAD_TPU_NAME=${LAD_TPU_NAME:-$LAD_RUN_NAME}
  [[ $LAD_TPU_NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    lad_die "TPU name '$LAD_TPU_NAME' must start with a letter and use lowercase letters, digits and '-'; set --tpu-name or LAD_TPU_NAME"
  if [[ -n $LAD_BUCKET ]]; then
    [[ $LAD_BUCKET == gs://?* ]] || lad_die "bucket '$LAD_BUCKET' must be a gs:// URL, e.g. --bucket gs://my-bucket"
    LAD_BUCKET=${LAD_BUCKET%/}
  fi
}

# Validate the accelerator type and pick the default runtime version for its family.
lad_finalize_accelerator() {
  if [[ $LAD_ACCELERATOR =~ ^v5e-([0-9]+)$ ]]; then
    LAD_ACCELERATOR="v5litepod-${BASH_REMATCH[1]}"
  fi
  local default_runtime
  case $LAD_ACCELERATOR in
    v4-[0-9]*) default_runtime=tpu-ubuntu2204-base ;;
    v5litepod-[0-9]*) default_runtime=v2-alpha-tpuv5-lite ;;
    v5p-[0-9]*) default_runtime=v2-alpha-tpuv5 ;;
    v6e-[0-9]*) default_runtime=v2-alpha-tpuv6e ;;
    *) lad_die "accelerator type '$LAD_ACCELERATOR' is not one of v4-N, v5litepod-N (or v5e-N), v5p-N, v6e-N; set --accelerator or LAD_ACCELERATOR" ;;
  esac
  [[ $LAD_ACCELERATOR =~ ^[a-z0-9]+-[0-9]+$ ]] ||
    lad_die "accelerator type '$LAD_ACCELERATOR' must end in a chip/core count, e.g. v5p-64"
  LAD_RUNTIME_VERSION=${LAD_RUNTIME_VERSION:-$default_runtime}
}

# Print a script's header comment: its --help.
lad_usage() {
  sed -n '2,/^set -euo/p' "$1" | sed '$d'
}

# After a gcloud TPU script's flag loop: validate the settings and build LAD_SCOPE. `--accelerator` also
# validates the accelerator type (the scripts that create or size a slice); the others pass `--any-accelerator`.
lad_tpu_settings() {
  lad_finalize
  case $1 in
    --accelerator) lad_finalize_accelerator ;;
    --any-accelerator) ;;
    *) lad_die "lad_tpu_settings: expected --accelerator or --any-accelerator, got '$1'" ;;
  esac
  lad_require_zone
  lad_gcloud_scope
}

lad_require_zone() {
  [[ -n $LAD_ZONE ]] || lad_die "no zone: pass --zone ZONE or set LAD_ZONE (e.g. us-east5-a)"
}

# The flags every gcloud TPU command takes: zone and, when given, project.
lad_gcloud_scope() {
  LAD_SCOPE=(--zone="$LAD_ZONE")
  if [[ -n $LAD_PROJECT ]]; then
    LAD_SCOPE+=(--project="$LAD_PROJECT")
  fi
}

# The trainer's output_dir (the run directory is <output_dir>/<run_name>): <bucket>/runs when a bucket is
# given, else runs/ under the project directory on each worker.
lad_output_dir() {
  if [[ -n $LAD_BUCKET ]]; then
    printf '%s/runs' "$LAD_BUCKET"
  else
    printf 'runs'
  fi
}

# Hosts (TPU VM workers) in a slice: v4/v5p count TensorCores (8 per 4-chip host); v5e/v6e count chips
# (up to 8 on one host, 4 per host beyond that).
lad_num_workers() {
  local family=${LAD_ACCELERATOR%-*} count=${LAD_ACCELERATOR##*-}
  case $family in
    v4 | v5p) echo $(((count + 7) / 8)) ;;
    v5litepod | v6e) if ((count <= 8)); then echo 1; else echo $((count / 4)); fi ;;
    *) lad_die "unknown accelerator family '$family'" ;;
  esac
}
