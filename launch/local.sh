#!/usr/bin/env bash
# One process on this machine: all local devices (CPU, GPUs or one TPU VM host) in one mesh.
#
# Usage:
#   launch/local.sh SCRIPT.py [ARGS...]
#   launch/local.sh -m MODULE [ARGS...]
# Environment:
#   NUM_CPU_DEVICES=N   simulate N CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N)
#                       to try a sharded mesh on a laptop; implies JAX_PLATFORMS=cpu.
#
# Example:
#   NUM_CPU_DEVICES=8 launch/local.sh -m rlhf_jax.parallel.selfcheck --fsdp=2 --tensor=2
set -euo pipefail

if [[ $# -eq 0 ]]; then
  sed -n '2,13p' "$0" >&2
  exit 2
fi
cd "$(dirname "$0")/.."

if [[ -n "${NUM_CPU_DEVICES:-}" ]]; then
  export JAX_PLATFORMS=cpu
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${NUM_CPU_DEVICES}"
fi
# A single process never needs the distributed runtime, even inside a SLURM allocation.
export RLHF_JAX_DISTRIBUTED=0
exec "${PYTHON:-python}" "$@"
