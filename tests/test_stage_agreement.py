"""A step that fails on one process fails on every process (issue 19).

``rlhf_jax.parallel.agree_outcome`` and the pipeline's stage use of it
(``experiments/pipeline.agree_stage_outcome``: a failed stage's ``final_metrics.json`` moved
aside) through a fake of jax's coordination-service client (the key-value store
``jax.distributed`` gives every process): processes are threads here, so the test is
milliseconds; tests/test_multihost.py covers the real two-process pipeline.
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
