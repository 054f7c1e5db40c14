#!/usr/bin/env bash
# N JAX processes on localhost joined by jax.distributed: a multi-host job on one machine, for
# testing multi-host code paths (per-host data slicing, global batches, checkpoints) without a
# cluster. Every process runs the same command; rlhf_jax.parallel.initialize_distributed() reads
# JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, which this script exports.
#
# Usage:
#   [NUM_PROCESSES=2] [DEVICES_PER_PROCESS=2] [PORT=free] [LOG_DIR=/tmp/rlhf_jax_mp] \
#     launch/multiprocess_local.sh (SCRIPT.py | -m MODULE) [ARGS...]
#
# Processes run on CPU with DEVICES_PER_PROCESS simulated devices each, so the global mesh has
# NUM_PROCESSES * DEVICES_PER_PROCESS devices. Output of process i goes to LOG_DIR/process_i.log;
# process 0's log is also streamed to the terminal. If any process fails, the others are killed and
# the script exits with the first non-zero status.
#
# Example:
#   NUM_PROCESSES=2 launch/multiprocess_local.sh -m rlhf_jax.parallel.selfcheck --fsdp=2
set -euo pipefail

if [[ $# -eq 0 ]]; then
  sed -n '2,18p' "$0" >&2
  exit 2
fi
cd "$(dirname "$0")/.."

NUM_PROCESSES="${NUM_PROCESSES:-2}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-2}"
LOG_DIR="${LOG_DIR:-/tmp/rlhf_jax_mp}"
PYTHON="${PYTHON:-python}"
if [[ -z "${PORT:-}" ]]; then
  PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
mkdir -p "$LOG_DIR"

pids=()
cleanup() {
  # jax's preemption notifier catches SIGTERM (to checkpoint, then exit), so follow it with SIGKILL
  # for processes that are still alive after a grace period.
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || return 0
    sleep 0.5
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM

for ((i = 0; i < NUM_PROCESSES; i++)); do
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS}" \
  JAX_COORDINATOR_ADDRESS="127.0.0.1:${PORT}" \
  JAX_NUM_PROCESSES="$NUM_PROCESSES" \
  JAX_PROCESS_ID="$i" \
  RLHF_JAX_DISTRIBUTED=auto \
    "$PYTHON" "$@" >"$LOG_DIR/process_$i.log" 2>&1 &
  pids+=("$!")
done
echo "launched $NUM_PROCESSES processes (coordinator 127.0.0.1:$PORT), logs in $LOG_DIR" >&2
tail -n +1 -f "$LOG_DIR/process_0.log" --pid "${pids[0]}" &
tail_pid=$!

# Reap processes in completion order so the first failure stops the rest at once (a survivor would
# otherwise block in a collective until jax's timeout).
declare -A running  # pid -> process index
for ((i = 0; i < NUM_PROCESSES; i++)); do running[${pids[$i]}]=$i; done
status=0
while ((${#running[@]} > 0)); do
  rc=0
  finished=""
  wait -n -p finished "${!running[@]}" || rc=$?
  if [[ -z "${finished:-}" ]]; then break; fi  # the rest were killed by cleanup and already reaped
  i="${running[$finished]}"
  unset "running[$finished]"
  if [[ $rc -ne 0 && $status -eq 0 ]]; then
    echo "process $i failed with status $rc (log: $LOG_DIR/process_$i.log):" >&2
    tail -n 20 "$LOG_DIR/process_$i.log" >&2 || true
    status=$rc
    cleanup
  fi
done
wait "$tail_pid" 2>/dev/null || true
trap - EXIT
exit "$status"
