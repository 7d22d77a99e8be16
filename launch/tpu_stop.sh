#!/usr/bin/env bash
# Stop a detached run on every TPU worker (the slice stays up).
#
#   launch/tpu_stop.sh --zone us-east5-a --tpu-name qwen7b-lad --run-name qwen7b-lad [--signal KILL]
#
# SIGTERM (the default) is what a preemption sends: the trainer writes a final checkpoint and exits, and
# tpu_run.sh with the same arguments resumes from it. --signal KILL stops at once (resume from the last
# periodic checkpoint).
#
# Flags (besides the common ones in launch/common.sh):
#   --signal TERM|INT|KILL   signal to send (default TERM)
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

signal=TERM
while (($#)); do
  case $1 in
    --signal | --signal=*) lad_flag_value "$@"; signal=$LAD_VALUE; shift "$LAD_SHIFT" ;;
    -h | --help) lad_usage "$0"; exit 0 ;;
    *) lad_common_flag "$@" || lad_die "unknown flag '$1' (see --help)"; shift "$LAD_SHIFT" ;;
  esac
done
lad_tpu_settings --any-accelerator
[[ $signal == TERM || $signal == INT || $signal == KILL ]] || lad_die "--signal '$signal' must be TERM, INT or KILL"

pidfile=$LAD_REMOTE_LOGS/$LAD_RUN_NAME.pid
script="cd; if [ -f $pidfile ] && kill -0 \"\$(cat $pidfile)\" 2>/dev/null;"
script+=" then kill -$signal \"\$(cat $pidfile)\" && echo \"\$(hostname): sent SIG$signal to \$(cat $pidfile)\";"
script+=" else echo \"\$(hostname): run $LAD_RUN_NAME is not running\"; fi"
lad_run gcloud compute tpus tpu-vm ssh "$LAD_TPU_NAME" "${LAD_SCOPE[@]}" --worker=all --command="$script"
