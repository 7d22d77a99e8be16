#!/usr/bin/env bash
# Delete a TPU slice (and its queued resource). Checkpoints and logs in the bucket are kept.
#
#   launch/tpu_delete.sh --zone us-east5-a --tpu-name qwen7b-lad [--queued] [--async]
#
# Flags (besides the common ones in launch/common.sh):
#   --queued   the slice was created with tpu_create.sh --queued: delete the queued resource (--force also
#              deletes its TPU VM)
#   --async    return without waiting for the deletion
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

queued=0 async=0
while (($#)); do
  case $1 in
    --queued) queued=1; shift ;;
    --async) async=1; shift ;;
    -h | --help) lad_usage "$0"; exit 0 ;;
    *) lad_common_flag "$@" || lad_die "unknown flag '$1' (see --help)"; shift "$LAD_SHIFT" ;;
  esac
done
lad_tpu_settings --any-accelerator

extra=(--quiet)
((async)) && extra+=(--async)
if ((queued)); then
  lad_run gcloud compute tpus queued-resources delete "$LAD_TPU_NAME" "${LAD_SCOPE[@]}" --force "${extra[@]}"
else
  lad_run gcloud compute tpus tpu-vm delete "$LAD_TPU_NAME" "${LAD_SCOPE[@]}" "${extra[@]}"
fi
