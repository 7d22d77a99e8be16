#!/usr/bin/env bash
# Stream a run's log from the TPU workers (the trainer's console output: progress, metrics, errors).
#
#   launch/tpu_logs.sh --zone us-east5-a --tpu-name qwen7b-lad --run-name qwen7b-lad [--worker all]
#
# Flags (besides the common ones in launch/common.sh):
#   --worker N|all   which worker's log (default 0: process 0 prints the progress bar and summaries)
#   --lines N        lines of history to show first (default 100)
#   --no-follow      print and exit instead of following the file
# Metrics also land in <bucket>/runs/<run name>/metrics.jsonl and TensorBoard events beside it:
#   tensorboard --logdir gs://my-bucket/runs
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

worker=0 lines=100 follow=1
while (($#)); do
  case $1 in
    --worker | --worker=*) lad_flag_value "$@"; worker=$LAD_VALUE; shift "$LAD_SHIFT" ;;
    --lines | --lines=*) lad_flag_value "$@"; lines=$LAD_VALUE; shift "$LAD_SHIFT" ;;
    --no-follow) follow=0; shift ;;
    -h | --help) lad_usage "$0"; exit 0 ;;
    *) lad_common_flag "$@" || lad_die "unknown flag '$1' (see --help)"; shift "$LAD_SHIFT" ;;
  esac
done
lad_tpu_settings --any-accelerator
[[ $worker == all || $worker =~ ^[0-9]+$ ]] || lad_die "--worker '$worker' must be a worker number or 'all'"
[[ $lines =~ ^[0-9]+$ ]] || lad_die "--lines '$lines' must be a number"

tail_cmd="tail -n $lines"
((follow)) && tail_cmd+=" -F"
lad_run gcloud compute tpus tpu-vm ssh "$LAD_TPU_NAME" "${LAD_SCOPE[@]}" --worker="$worker" \
  --command="cd; $tail_cmd $LAD_REMOTE_LOGS/$LAD_RUN_NAME.log"
