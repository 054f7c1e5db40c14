"""Faults of a 2-process job (2 real ``jax.distributed`` processes on localhost, one CPU device
each, tiny SFT through ``experiments/run.py``):

* SIGTERM to process 1 only: both processes checkpoint the same step (jax's preemption sync
  point, ``signals.reached_stop_point``) and exit 0;
* kill -9 of process 1 on the resumed run: process 0 exits with an error within a bounded time
  (the gloo collective fails at once on the reset connection; the coordination service's
  heartbeat, here ``RLHF_JAX_HEARTBEAT_TIMEOUT_S=10``, is the bound when a collective would not
  notice), and a steps' checkpoint the kill cut short is never read;
* the rerun resumes and ends bit-identically to an uninterrupted 2-process run: the same train
  loss / grad norm at every step and the same final evaluation.

The child is this file run as a script: it slows each step a little (so the signal lands mid-run
whatever the machine's speed), sends itself the fault at a given step on process 1, and runs the
launcher in-process.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 40
HEARTBEAT_S = 10
OVERRIDES = {
    "model.preset": "tiny", "data.synthetic_num_prompts": 96, "data.synthetic_num_test_prompts": 16,
    "data.batch_size": 8, "data.eval_batch_size": 16, "limits.buckets": "(80,)",
    "eval.num_sample_prompts": 0, "loop.num_steps": NUM_STEPS, "loop.log_every": 1,
    "loop.checkpoint_every": 4, "mesh.data": 2}
COMPARED = ("loss", "grad_norm", "lr")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(workdir, log_dir, fault: str = "") -> list[subprocess.Popen]:
  """Two processes of one job (what launch/multiprocess_local.sh starts), pids kept."""
  port = _free_port()
  os.makedirs(log_dir, exist_ok=True)
  procs = []
  for i in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(i), RLHF_JAX_HEARTBEAT_TIMEOUT_S=str(HEARTBEAT_S),
               RLHF_TEST_FAULT=fault)
    cmd = [
        sys.executable, __file__, f"--workdir={workdir}",
        f"--config={os.path.join(REPO, 'experiments', 'configs', 'sft_synthetic.py')}"]
    cmd += [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    log = open(os.path.join(log_dir, f"process_{i}.log"), "w")
    procs.append(
        subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, text=True))
  return procs


def _wait(procs, timeout=240.0) -> list[tuple[int, float]]:
  """(exit status, seconds since the first process ended) of each process."""
  start, first_end = time.time(), None
  ends: dict[int, tuple[int, float]] = {}
  while len(ends) < len(procs):
    for i, p in enumerate(procs):
      if i not in ends and p.poll() is not None:
        first_end = first_end or time.time()
        ends[i] = (p.returncode, time.time() - first_end)
    if time.time() - start > timeout:
      for p in procs:
        p.kill()
      raise AssertionError(f"the job did not end within {timeout} s (a hang)")
    time.sleep(0.1)
  return [ends[i] for i in range(len(procs))]


def _log(log_dir, i) -> str:
  return open(os.path.join(log_dir, f"process_{i}.log")).read()


def _train_rows(workdir) -> dict[int, dict]:
  rows = {}
  for line in open(os.path.join(workdir, "metrics.jsonl")):
    row = json.loads(line)
    if row.get("split") == "train":
      rows[row["step"]] = {k: row[k] for k in COMPARED if k in row}
  return rows


def _committed(workdir) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def _final(workdir) -> dict:
  final = json.load(open(os.path.join(workdir, "final_metrics.json")))
  return {k: v for k, v in final.items() if k.startswith("eval_") or k == "step"}


@pytest.mark.slow
def test_sigterm_to_one_process_then_kill9_then_resume_equals_uninterrupted(tmp_path):
  reference, workdir = str(tmp_path / "uninterrupted"), str(tmp_path / "faulted")
  assert [rc for rc, _ in _wait(_start(reference, tmp_path / "logs_u"))] == [0, 0]

  # 1) SIGTERM to process 1 at its 4th step: both stop at the same (agreed) step, exit 0.
  logs = tmp_path / "logs_term"
  assert [rc for rc, _ in _wait(_start(workdir, logs, fault="term:4"))] == [0, 0], _log(logs, 0)
  stopped = _committed(workdir)[-1]
  assert 4 <= stopped < NUM_STEPS
  assert "SIGTERM caught" in _log(logs, 1)
  assert f"checkpointed step {stopped}, stopping" in _log(logs, 0)  # process 0 got no signal
  assert f"checkpointed step {stopped}, stopping" in _log(logs, 1)
  assert not os.path.exists(os.path.join(workdir, "final_metrics.json"))

  # 2) Resumed, then kill -9 of process 1 (its 7th step here): process 0 fails within the bound instead of hanging.
  logs = tmp_path / "logs_kill"
  (rc0, after0), (rc1, _) = _wait(_start(workdir, logs, fault="kill:7"))
  assert rc1 == -signal.SIGKILL
  assert rc0 != 0 and after0 < HEARTBEAT_S + 30, (rc0, after0, _log(logs, 0)[-3000:])
  assert f"resuming from checkpoint at step {stopped}" in _log(logs, 0)

  # 3) The rerun resumes from the last committed step and ends as the uninterrupted run did.
  logs = tmp_path / "logs_resume"
  assert [rc for rc, _ in _wait(_start(workdir, logs))] == [0, 0], _log(logs, 0)[-3000:]
  resumed = _log(logs, 0)
  assert "resuming from checkpoint at step" in resumed and "Traceback" not in resumed
  assert _train_rows(workdir) == _train_rows(reference)  # bit-identical, every step
  assert _final(workdir) == _final(reference)


if __name__ == "__main__":
  from rlhf_jax import parallel

  kind, _, at = os.environ.get("RLHF_TEST_FAULT", "").partition(":")
  real_shard_batch, calls = parallel.shard_batch, [0]

  def shard_batch(*args, **kwargs):
    calls[0] += 1
    time.sleep(0.05)  # a step long enough for the stop to land mid-run on any machine
    if kind and calls[0] == int(at) and parallel.process_index() == 1:
      os.kill(os.getpid(), signal.SIGTERM if kind == "term" else signal.SIGKILL)
    return real_shard_batch(*args, **kwargs)

  parallel.shard_batch = shard_batch
  sys.argv = [os.path.join(REPO, "experiments", "run.py"), *sys.argv[1:]]
  runpy.run_path(sys.argv[0], run_name="__main__")
