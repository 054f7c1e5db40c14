#!/usr/bin/env bash
# Run one command on every host of a Cloud TPU pod slice (one JAX process per host).
#
# Usage:
#   TPU_NAME=my-v5e-64 ZONE=us-west4-a [PROJECT=my-project] [REMOTE_DIR=~/rlhf_jax] [SYNC=1] \
#     [DRY_RUN=1] launch/tpu_pod.sh "python -m rlhf_jax.parallel.selfcheck"
#
# SYNC=1 first copies this checkout to REMOTE_DIR on every worker (gcloud ... scp --worker=all) and
# installs it there (pip install -e . gcsfs; jax[tpu] must already be installed on the VM image;
# gcsfs is the fsspec backend etils.epath uses for gs:// run paths when TensorFlow is absent).
# The command runs in REMOTE_DIR with RLHF_JAX_DISTRIBUTED=1, so
# rlhf_jax.parallel.initialize_distributed() calls jax.distributed.initialize() with no arguments:
# on TPU VMs JAX discovers the coordinator, the process count and this host's index from the TPU
# metadata server itself. DRY_RUN=1 prints the gcloud commands instead of running them, then what
# each worker runs (worker id, host, coordinator; the workers are TPU_WORKER_HOSTNAMES=h0,h1,...
# in a dry run); tests/test_launchers.py runs the examples here that way.
#
# Example (one training run over the whole pod):
#   TPU_NAME=pod ZONE=us-central2-b SYNC=1 launch/tpu_pod.sh \
#     "python experiments/run.py --config=experiments/configs/sft_synthetic.py --workdir=gs://bucket/sft"
set -euo pipefail

if [[ $# -ne 1 ]]; then
  sed -n '2,20p' "$0" >&2
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
    --command "cd $REMOTE_DIR && python3 -m pip install --quiet -e . gcsfs"
fi
remote_command="cd $REMOTE_DIR && RLHF_JAX_DISTRIBUTED=1 $COMMAND"
run gcloud "${gcloud_args[@]}" ssh "$TPU_NAME" "${common[@]}" --command "$remote_command"
if [[ -n "${DRY_RUN:-}" ]]; then
  # What each worker then runs. JAX reads the worker list from the TPU metadata server (or
  # TPU_WORKER_HOSTNAMES, which a dry run takes to stand for it): process id = TPU_WORKER_ID,
  # process count = the number of workers, coordinator = the first worker, port 8476.
  IFS=, read -r -a workers <<< "${TPU_WORKER_HOSTNAMES:-worker-0}"
  for i in "${!workers[@]}"; do
    printf '%q ' "worker=$i" "host=${workers[$i]}" "TPU_WORKER_ID=$i" \
      "coordinator=${workers[0]}:8476" "processes=${#workers[@]}" bash -c "$remote_command"
    echo
  done
fi
