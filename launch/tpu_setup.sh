#!/usr/bin/env bash
# Put lad_jax on every worker of a TPU slice and install it (with jax[tpu]) into a Python 3.11 venv.
#
#   launch/tpu_setup.sh --zone us-east5-a --tpu-name qwen7b-lad                  # copy this checkout
#   launch/tpu_setup.sh --zone us-east5-a --tpu-name qwen7b-lad --git URL --ref main
#
# Flags (besides the common ones in launch/common.sh):
#   --git URL       clone URL on each worker instead of copying this checkout
#   --ref REF       branch, tag or commit to check out with --git (default: main)
#   --python VER    Python version of the worker venv (default 3.11; the TPU images ship 3.10, so uv installs it)
#   --extra LIST    pip extras to install (default: tpu,gcs = jax[tpu] plus gs:// support)
#
# Copy mode packs this checkout (without .git, .venv, runs/ and caches) into a tarball, scp's it to all workers
# and unpacks it to ~/lad_jax; the venv is ~/lad_venv. Re-running replaces the code and reuses the venv.
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

git_url="" git_ref=main python_version=${LAD_PYTHON_VERSION:-3.11} extra=tpu,gcs
while (($#)); do
  case $1 in
    --git | --git=*) lad_flag_value "$@"; git_url=$LAD_VALUE; shift "$LAD_SHIFT" ;;
    --ref | --ref=*) lad_flag_value "$@"; git_ref=$LAD_VALUE; shift "$LAD_SHIFT" ;;
    --python | --python=*) lad_flag_value "$@"; python_version=$LAD_VALUE; shift "$LAD_SHIFT" ;;
    --extra | --extra=*) lad_flag_value "$@"; extra=$LAD_VALUE; shift "$LAD_SHIFT" ;;
    -h | --help) lad_usage "$0"; exit 0 ;;
    *) lad_common_flag "$@" || lad_die "unknown flag '$1' (see --help)"; shift "$LAD_SHIFT" ;;
  esac
done
lad_tpu_settings --any-accelerator
[[ $python_version =~ ^3\.[0-9]+$ ]] || lad_die "--python '$python_version' must look like 3.11"
[[ $extra =~ ^[a-z0-9_]+(,[a-z0-9_]+)*$ ]] || lad_die "--extra '$extra' must be pip extra names such as tpu,gcs"

ssh_all=(gcloud compute tpus tpu-vm ssh "$LAD_TPU_NAME" "${LAD_SCOPE[@]}" --worker=all)
tarball=lad_jax_src.tar.gz

# Remote commands run from the worker's home directory, so paths stay relative.
if [[ -n $git_url ]]; then
  fetch="rm -rf $LAD_REMOTE_DIR && git clone --quiet $(lad_quote "$git_url") $LAD_REMOTE_DIR"
  fetch+=" && git -C $LAD_REMOTE_DIR checkout --quiet $(lad_quote "$git_ref")"
else
  local_tar="${TMPDIR:-/tmp}/$tarball"
  lad_run tar -czf "$local_tar" -C "$LAD_REPO_DIR" --exclude=./.git --exclude=./.venv --exclude=./.venv-ci --exclude=./runs \
    --exclude=__pycache__ --exclude=.pytest_cache --exclude='*.egg-info' .
  lad_run gcloud compute tpus tpu-vm scp "$local_tar" "$LAD_TPU_NAME:$tarball" "${LAD_SCOPE[@]}" --worker=all
  fetch="rm -rf $LAD_REMOTE_DIR && mkdir -p $LAD_REMOTE_DIR && tar -xzf $tarball -C $LAD_REMOTE_DIR"
fi

# uv fetches a standalone CPython when the image's python3 is older than the project needs.
install="python3 -m pip install --quiet --user --upgrade uv"
install+=" && .local/bin/uv venv --allow-existing --python $python_version $LAD_REMOTE_VENV"
install+=" && .local/bin/uv pip install --python $LAD_REMOTE_VENV/bin/python -e './${LAD_REMOTE_DIR}[$extra]'"
check="$LAD_REMOTE_VENV/bin/python -c 'import jax, lad_jax; print(\"lad_jax installed; jax\", jax.__version__)'"

lad_run "${ssh_all[@]}" --command="set -euo pipefail; cd; $fetch && $install && $check"
