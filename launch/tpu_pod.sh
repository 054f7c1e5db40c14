#!/usr/bin/env bash
# Run one command on every host of a Cloud TPU pod slice (one JAX process per host).
#
# Usage:
#   TPU_NAME=my-v5e-64 ZONE=us-west4-a [PROJECT=my-project] [REMOTE_DIR=~/rlhf_jax] [SYNC=1] \
#     [DRY_RUN=1] launch/tpu_pod.sh "python -m rlhf_jax.parallel.selfcheck"
#
# SYNC=1 first copies this checkout to REMOTE_DIR on every worker (gcloud ... scp --worker=all) and
# installs it there (pip install -e .; jax[tpu] must already be installed on the VM image).
# The command runs in REMOTE_DIR with RLHF_JAX_DISTRIBUTED=1, so
# rlhf_jax.parallel.initialize_distributed() calls jax.distributed.initialize() with no arguments:
# on TPU VMs JAX discovers the coordinator, the process count and this host's index from the TPU
# metadata server itself. DRY_RUN=1 prints the gcloud commands instead of running them.
#
# Example (one training run over the whole pod):
#   TPU_NAME=pod ZONE=us-central2-b SYNC=1 launch/tpu_pod.sh \
#     "python experiments/run.py --config=experiments/configs/sft_synthetic.py --workdir=gs://bucket/sft"
set -euo pipefail

if [[ $# -ne 1 ]]; then
  sed -n '2,18p' "$0" >&2
  exit 2
fi
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
REMOTE_DIR="${REMOTE_DIR:-~/rlhf_jax}"
COMMAND="$1"
cd "$(dirname "$0")/.."

gcloud_args=(compute tpus tpu-vm)
common=(--zone "$ZONE" --worker=all)
[[ -n "${PROJECT:-}" ]] && common+=(--project "$PROJECT")

run() {
  if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

if [[ -n "${SYNC:-}" ]]; then
  run gcloud "${gcloud_args[@]}" ssh "$TPU_NAME" "${common[@]}" --command "mkdir -p $REMOTE_DIR"
  run gcloud "${gcloud_args[@]}" scp --recurse ./rlhf_jax ./experiments ./launch ./setup.cfg \
    ./pyproject.toml ./README.md "$TPU_NAME:$REMOTE_DIR" "${common[@]}"
  run gcloud "${gcloud_args[@]}" ssh "$TPU_NAME" "${common[@]}" \
    --command "cd $REMOTE_DIR && python3 -m pip install --quiet -e ."
fi
run gcloud "${gcloud_args[@]}" ssh "$TPU_NAME" "${common[@]}" \
  --command "cd $REMOTE_DIR && RLHF_JAX_DISTRIBUTED=1 $COMMAND"
