#!/usr/bin/env bash
# Create a Cloud TPU VM slice for lad_jax: directly (tpu-vm create) or through a queued resource.
#
#   launch/tpu_create.sh --project P --zone us-east5-a --accelerator v5p-64 --run-name qwen7b-lad [--queued] [--spot]
#
# Flags (besides the common ones in launch/common.sh):
#   --queued              request the slice as a queued resource (waits in line for capacity; the usual way to
#                         get large slices and spot capacity); delete it with tpu_delete.sh --queued
#   --spot                spot capacity (cheaper, can be preempted at any time; resume by re-running)
#   --preemptible         legacy preemptible TPU VM (not with --queued; prefer --spot)
#   --reserved            use the project's reserved capacity
#   --valid-until DUR     queued only: give up if not provisioned within DUR (e.g. 6h)
#   --wait                queued only: poll until the queued resource is ACTIVE
#   --network NET         VPC network (default: gcloud's default network)
#   --service-account SA  service account of the workers (needs write access to the bucket)
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

queued=0 spot=0 preemptible=0 reserved=0 wait=0 valid_until="" network="" service_account=""
while (($#)); do
  case $1 in
    --queued) queued=1; shift ;;
    --spot) spot=1; shift ;;
    --preemptible) preemptible=1; shift ;;
    --reserved) reserved=1; shift ;;
    --wait) wait=1; shift ;;
    --valid-until | --valid-until=*) lad_flag_value "$@"; valid_until=$LAD_VALUE; shift "$LAD_SHIFT" ;;
    --network | --network=*) lad_flag_value "$@"; network=$LAD_VALUE; shift "$LAD_SHIFT" ;;
    --service-account | --service-account=*) lad_flag_value "$@"; service_account=$LAD_VALUE; shift "$LAD_SHIFT" ;;
    -h | --help) lad_usage "$0"; exit 0 ;;
    *) lad_common_flag "$@" || lad_die "unknown flag '$1' (see --help)"; shift "$LAD_SHIFT" ;;
  esac
done
lad_tpu_settings --accelerator

((spot + preemptible + reserved <= 1)) || lad_die "choose at most one of --spot, --preemptible, --reserved"
if ((queued)); then
  ((preemptible == 0)) || lad_die "--preemptible does not exist for queued resources; use --spot"
else
  [[ -z $valid_until ]] || lad_die "--valid-until needs --queued"
  ((wait == 0)) || lad_die "--wait needs --queued (tpu-vm create already waits)"
fi

common=(--accelerator-type="$LAD_ACCELERATOR" "${LAD_SCOPE[@]}")
[[ -n $network ]] && common+=(--network="$network")
[[ -n $service_account ]] && common+=(--service-account="$service_account" --scopes=cloud-platform)
((spot)) && common+=(--spot)
((reserved)) && common+=(--reserved)
common+=(--labels="lad-run=$LAD_RUN_NAME")

lad_note "slice $LAD_TPU_NAME: $LAD_ACCELERATOR ($(lad_num_workers) worker(s)), runtime $LAD_RUNTIME_VERSION"
if ((queued)); then
  args=(gcloud compute tpus queued-resources create "$LAD_TPU_NAME" --node-id="$LAD_TPU_NAME"
    --runtime-version="$LAD_RUNTIME_VERSION" "${common[@]}")
  [[ -n $valid_until ]] && args+=(--valid-until-duration="$valid_until")
  lad_run "${args[@]}"
  if ((wait)); then
    describe=(gcloud compute tpus queued-resources describe "$LAD_TPU_NAME" "${LAD_SCOPE[@]}"
      --format='value(state.state)')
    if [[ $LAD_DRY_RUN == 1 ]]; then
      lad_run "${describe[@]}"
    else
      while true; do
        state=$("${describe[@]}")
        lad_note "queued resource $LAD_TPU_NAME: $state"
        case $state in
          ACTIVE) break ;;
          FAILED | SUSPENDED) lad_die "queued resource $LAD_TPU_NAME is $state; delete it with tpu_delete.sh --queued" ;;
        esac
        sleep 60
      done
    fi
  fi
else
  ((preemptible)) && common+=(--preemptible)
  lad_run gcloud compute tpus tpu-vm create "$LAD_TPU_NAME" --version="$LAD_RUNTIME_VERSION" "${common[@]}"
fi
