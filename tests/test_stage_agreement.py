"""A step that fails on one process fails on every process (issue 19).

``rlhf_jax.parallel.agree_outcome`` and the pipeline's stage use of it
(``experiments/pipeline.agree_stage_outcome``: a failed stage's ``final_metrics.json`` moved
aside) through a fake of jax's coordination-service client (the key-value store
``jax.distributed`` gives every process): processes are threads here, so the test is
milliseconds; tests/test_multihost.py covers the real two-process pipeline. The multi-stage
launchers' runner ``train.run_or_reuse`` as one process of a faked 2-process job.
"""

import importlib.util
import json
import os
import threading
import time

import pytest

from offline_fixtures import REPO
from rlhf_jax import parallel

_spec = importlib.util.spec_from_file_location("pipeline",
                                               os.path.join(REPO, "experiments", "pipeline.py"))
pipeline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pipeline)


class FakeKV:
  """``key_value_set`` / ``blocking_key_value_get`` as jax's DistributedRuntimeClient has them."""

  def __init__(self):
    self.values, self.cond = {}, threading.Condition()

  def key_value_set(self, key: str, value: str, allow_overwrite: bool = False) -> None:
    with self.cond:
      if key in self.values and not allow_overwrite:
        raise RuntimeError(f"ALREADY_EXISTS: {key}")
      self.values[key] = value
      self.cond.notify_all()

  def blocking_key_value_get(self, key: str, timeout_in_ms: int) -> str:
    with self.cond:
      if not self.cond.wait_for(lambda: key in self.values, timeout_in_ms / 1e3):
        raise RuntimeError(f"DEADLINE_EXCEEDED: {key}")
      return self.values[key]


def _run(outcomes, final_path, **kw):
  """Every process's agreement, each in its own thread; ``None`` in ``outcomes``: finished."""
  kv, results = FakeKV(), {}

  def one(p):
    try:
      results[p] = pipeline.agree_stage_outcome("sft", outcomes[p], final_path=final_path,
                                                client=kv, process_index=p,
                                                process_count=len(outcomes), **kw)
    except parallel.AgreementTimeout as err:
      results[p] = err

  threads = [threading.Thread(target=one, args=(p,)) for p in range(len(outcomes))]
  for t in threads:
    t.start()
  for t in threads:
    t.join(10)
  return results


def test_a_failure_on_one_process_is_the_same_failure_on_every_process(tmp_path):
  final = tmp_path / "sft" / "final_metrics.json"
  final.parent.mkdir()
  final.write_text(json.dumps({"step": 2}))  # process 0 finished and wrote it; process 1 failed
  results = _run([None, "failed: ValueError: bad record"], str(final))
  assert results[0] == results[1] == "failed: ValueError: bad record (process 1 of 2)"
  # The stage is not left marked finished: the rerun runs it again.
  assert not final.exists()
  assert json.loads((final.parent / pipeline.FAILED_FINAL_FILE).read_text()) == {"step": 2}


def test_every_process_finished_is_no_failure_and_keeps_the_final_metrics(tmp_path):
  final = tmp_path / "final_metrics.json"
  final.write_text("{}")
  assert _run([None, None, None], str(final)) == {0: None, 1: None, 2: None}
  assert final.exists()


def test_the_first_failing_process_names_the_failure(tmp_path):
  results = _run(["failed: A", None, "failed: B"], str(tmp_path / "final_metrics.json"))
  assert set(results.values()) == {"failed: A (process 0 of 3)"}


def test_a_failed_process_whose_peer_never_reports_gives_up_in_bounded_time(tmp_path):
  # Process 1 is blocked in a collective that waits for process 0 (it never reaches the
  # agreement): process 0 must not wait for it long; its caller then ends the process.
  kv = FakeKV()
  t0 = time.monotonic()
  with pytest.raises(parallel.AgreementTimeout, match="process 1 did not report"):
    pipeline.agree_stage_outcome("rm", "failed: OSError: disk", client=kv, process_index=0,
                                 process_count=2, final_path=str(tmp_path / "f.json"),
                                 failed_wait_s=0.2, ok_wait_s=60)
  assert time.monotonic() - t0 < 5
  # Its failure stays published: the peer, once its collective fails, finds it and agrees.
  assert pipeline.agree_stage_outcome(
      "rm", "failed: RuntimeError: peer gone", client=kv, process_index=1, process_count=2,
      final_path=str(tmp_path / "f.json")) == "failed: OSError: disk (process 0 of 2)"


def test_agree_outcome_is_generic_and_keys_are_namespaced():
  # The parallel helper alone (no files): the verdict, and each caller's keys under its namespace.
  kv, results = FakeKV(), {}

  def one(p):
    results[p] = parallel.agree_outcome("round_0/labels", "failed: X" if p == 2 else None,
                                        namespace="test", client=kv, process_index=p,
                                        process_count=3)

  threads = [threading.Thread(target=one, args=(p,)) for p in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(10)
  assert results == {p: "failed: X (process 2 of 3)" for p in range(3)}
  assert sorted(kv.values) == [f"test/round_0/labels/{p}" for p in range(3)]
  assert kv.values["test/round_0/labels/0"] == parallel.agreement.OK
  # The pipeline's stages use their own namespace: the same key there does not collide.
  assert pipeline.agree_stage_outcome("round_0/labels", None, final_path="/nonexistent/f.json",
                                      client=kv, process_index=0, process_count=1) is None
  assert "rlhf_jax/pipeline/round_0/labels/0" in kv.values


# --------------------------------------------------------------------------- train.run_or_reuse
# The multi-stage launchers' stage runner (experiments/rlaif.py, cai.py) as one process of a
# 2-process job: the job's collectives are faked (process 0's answers, the peers' outcomes), the
# files are real; tests/test_multihost.py runs rlaif.py as a real 2-process job.


@pytest.fixture
def job(monkeypatch):
  """This process as process ``job.me`` of 2; ``job.verdict``: the agreed outcome; ``job.on_sync``:
  what process 0 does while this process waits at a barrier (name -> action)."""
  from rlhf_jax.train import runs

  class Job:
    me, verdict, published, on_sync = 0, None, [], {}

  monkeypatch.setattr(runs.parallel, "process_count", lambda: 2)
  monkeypatch.setattr(runs.parallel, "is_coordinator", lambda: Job.me == 0)
  monkeypatch.setattr(runs.parallel, "agree", lambda value: value if Job.me == 0 else False)

  def sync(name):
    for suffix, action in Job.on_sync.items():
      if name.endswith(suffix):
        action()

  def agree_outcome(key, failed, *, namespace):
    Job.published.append((namespace, key.split("/", 1)[1], failed))
    return Job.verdict if Job.verdict is not None else failed

  monkeypatch.setattr(runs.parallel, "sync", sync)
  monkeypatch.setattr(runs.parallel, "agree_outcome", agree_outcome)
  Job.published = []
  return Job


def test_run_or_reuse_a_failure_on_a_peer_fails_the_stage_here_and_unmarks_it(tmp_path, job):
  from rlhf_jax import train

  def stage(workdir):  # a training stage: its loop wrote final_metrics.json on process 0
    os.makedirs(workdir, exist_ok=True)
    train.write_final_metrics(workdir, {"step": 2})
    return {"step": 2}

  job.verdict = "failed: ValueError: bad record (process 1 of 2)"
  with pytest.raises(train.runs.StageFailed, match="stage rm: failed: ValueError: bad record"):
    train.run_or_reuse("rm", str(tmp_path), stage)
  assert job.published == [("rlhf_jax/stages", "rm", None)]  # this process finished
  assert not (tmp_path / "rm" / "final_metrics.json").exists()  # the rerun runs it again
  assert json.loads((tmp_path / "rm" / train.runs.FAILED_FINAL_FILE).read_text()) == {"step": 2}
  job.verdict = None
  assert train.run_or_reuse("rm", str(tmp_path), stage)["step"] == 2
  assert (tmp_path / "rm" / "final_metrics.json").exists()


def test_run_or_reuse_this_process_failing_publishes_and_raises_its_own_error(tmp_path, job):
  from rlhf_jax import train

  def stage(workdir):
    raise OSError("disk full")

  job.me = 1
  with pytest.raises(OSError, match="disk full"):
    train.run_or_reuse("label", str(tmp_path), stage)
  assert job.published == [("rlhf_jax/stages", "label", "failed: OSError: disk full")]


def test_run_or_reuse_every_process_returns_process_0s_metrics(tmp_path, job):
  """A process-0 stage (labelling): the peer's function returns None; after the barrier it
  returns the final_metrics.json process 0 wrote, and never writes one itself."""
  from rlhf_jax import train
  final = tmp_path / "label" / "final_metrics.json"

  def process_0_writes():
    final.parent.mkdir(exist_ok=True)
    final.write_text(json.dumps({"num_pairs": 16, "_seconds": 1.5}))

  job.me, job.on_sync = 1, {"label_written": process_0_writes}
  ran = []
  got = train.run_or_reuse("label", str(tmp_path), lambda w: ran.append(w))
  assert ran == [str(tmp_path / "label")] and got == {"num_pairs": 16, "_seconds": 1.5}
  # finished now: process 0's "finished earlier?" is the answer everywhere, nothing reruns
  job.me = 0
  assert train.run_or_reuse("label", str(tmp_path), lambda w: 1 / 0)["num_pairs"] == 16
