"""Issue 14, "nothing lost": each fault a user can cause, on the toy loop (tiny, a few s each).

Corrupted / NaN / unverified checkpoints fall back to the previous good step and end bit-identical
to an uninterrupted run; rotation keeps the newest verified step; the divergence guard stops before
saving; a refused run leaves its workdir as it was; a finished rerun adds no row; temp files are
cleaned; TensorBoard event files are rewritten on resume; decoding errors name file and line; the RM
skips records without a preference; SIGTERM / SIGINT are clean stops; the launcher's errors are one
line. (``experiments/fault_injection.py`` runs the same faults against real SFT / RM / DPO / PPO.)
"""

import functools
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

from rlhf_jax import cli, parallel, train
from rlhf_jax.algorithms import sections
from rlhf_jax.algorithms.reward import data as reward_data
from rlhf_jax.algorithms.reward import trainer as reward_model
from rlhf_jax.data import records
from rlhf_jax.data import tokenizers as tok_lib
from rlhf_jax.train import checkpoint as ckpt_lib
from rlhf_jax.train import metrics as metrics_lib
from rlhf_jax.train import signals
from test_train_loop import ToyData, _toy_step, toy_loss, toy_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _loop(num_steps, **kwargs):
  values = dict(num_steps=num_steps, log_every=2, checkpoint_every=4, keep_checkpoints=2,
                eval_every=0, progress_every_secs=0.0)
  values.update(kwargs)
  return train.LoopConfig(**values)


def run(workdir, num_steps=12, data=None, eval_fn=None, fingerprint=None, run_config=None,
        sgd=False, **loop_kwargs):
  mesh = parallel.make_mesh(parallel.MeshConfig(data=1), devices=jax.devices()[:1])
  opt, step_fn = _sgd_step() if sgd else _toy_step(num_steps, 1)
  state = train.create_train_state(toy_params(), opt, jax.random.PRNGKey(1), mesh)
  return train.train(workdir=str(workdir), config=_loop(num_steps, **loop_kwargs), state=state,
                     step_fn=step_fn, data=data or ToyData(), mesh=mesh, eval_fn=eval_fn,
                     fingerprint=fingerprint or {"model": {"hidden": 16}}, run_config=run_config or
                     {"toy": True})


def _same(a, b):
  for (path, x), (_, y) in zip(jax.tree_util.tree_leaves_with_path(jax.device_get(a)),
                               jax.tree_util.tree_leaves_with_path(jax.device_get(b)), strict=True):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted 12-step toy run: what every recovered run must end bit-identical to."""
  return run(tmp_path_factory.mktemp("reference"), 12).state


def _steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def _data_files(step_dir):
  return sorted(
      os.path.join(root, n)
      for root, _, names in os.walk(os.path.join(step_dir, "state"))
      for n in names
      if os.path.basename(root) == "d")


def _truncate(step_dir):
  path = _data_files(step_dir)[0]
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _delete_data(step_dir):
  os.remove(_data_files(step_dir)[0])


def _flip(step_dir):
  path = max(_data_files(step_dir), key=os.path.getsize)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 0xFF]))


def _delete_metadata(step_dir):
  os.remove(os.path.join(step_dir, "_CHECKPOINT_METADATA"))
  os.remove(os.path.join(step_dir, "state", "_METADATA"))


def _empty_manifest(step_dir):
  open(os.path.join(step_dir, ckpt_lib.MANIFEST_FILE), "w").close()


def _empty_ocdbt_manifest(step_dir):
  open(os.path.join(step_dir, "state", "manifest.ocdbt"), "w").close()


def _empty_step(step_dir):
  for name in os.listdir(step_dir):
    path = os.path.join(step_dir, name)
    if os.path.isdir(path):
      import shutil  # pylint: disable=import-outside-toplevel
      shutil.rmtree(path)
    else:
      os.remove(path)


CORRUPTIONS = {
    "truncated data file": _truncate, "deleted data file": _delete_data, "flipped bytes": _flip,
    "missing metadata": _delete_metadata, "empty manifest": _empty_manifest,
    "empty orbax manifest": _empty_ocdbt_manifest, "empty step folder": _empty_step}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_step(name, tmp_path, reference,
                                                                     caplog):
  """Before: a raw orbax / tensorstore traceback (or, flipped bytes, silently wrong params)."""
  run(tmp_path, 12, stop_after_steps=8)
  assert _steps(tmp_path) == [4, 8]
  CORRUPTIONS[name](os.path.join(tmp_path, "checkpoints", "8"))
  with caplog.at_level("WARNING"):
    result = run(tmp_path, 12)
  lines = [r.getMessage() for r in caplog.records if "is unusable" in r.getMessage()]
  assert len(lines) == 1 and "checkpoints/8 is unusable" in lines[0], lines
  assert "resuming from step 4" in lines[0]
  assert result.step == 12
  _same(result.state, reference)
  assert os.listdir(tmp_path / ckpt_lib.QUARANTINE_DIR)  # kept for inspection, out of the way
  assert [r["step"] for r in train.read_metrics(str(tmp_path), "train")] == [2, 4, 6, 8, 10, 12]


def test_restore_params_and_latest_step_skip_a_corrupt_step(tmp_path):
  run(tmp_path, 12, stop_after_steps=8)
  _flip(os.path.join(tmp_path, "checkpoints", "8"))
  assert train.latest_step(str(tmp_path)) == 4
  with pytest.raises(
      ckpt_lib.CheckpointCorruptError, match=r"checkpoints/8 is unusable: file "
      r"state/.* does not match its SHA-256"):
    train.restore_params(str(tmp_path), 8)


def test_nan_params_in_a_checkpoint_fall_back(tmp_path, reference, caplog):
  """Before: a rerun with a sane lr resumed the NaN state of a diverged run."""
  run(tmp_path, 12, stop_after_steps=8)
  c = train.Checkpointer(str(tmp_path), fingerprint={"model": {"hidden": 16}}, keep=3)
  state, data_state = c.restore(train.abstract_state(run_state()), 8)
  bad = state.replace(params=jax.tree.map(lambda x: x * np.nan, state.params), step=state.step + 1)
  c.save(9, bad, data_state)
  c.close()
  with caplog.at_level("WARNING"):
    result = run(tmp_path, 12)
  assert any("checkpoints/9 is unusable: it holds NaN/inf in" in r.getMessage() and
             "resuming from step 8" in r.getMessage() for r in caplog.records)
  _same(result.state, reference)


def run_state():
  mesh = parallel.make_mesh(parallel.MeshConfig(data=1), devices=jax.devices()[:1])
  opt, _ = _toy_step(12, 1)
  return train.create_train_state(toy_params(), opt, jax.random.PRNGKey(1), mesh)


def test_an_unverified_latest_step_is_used_when_it_loads_and_is_finite(tmp_path, reference):
  """A run killed between orbax's commit and the manifest: the step is good, so it is used."""
  run(tmp_path, 12, stop_after_steps=8)
  os.remove(os.path.join(tmp_path, "checkpoints", "8", ckpt_lib.MANIFEST_FILE))
  assert ckpt_lib.verify_step(os.path.join(tmp_path, "checkpoints", "8"))[0] == "unverified"
  result = run(tmp_path, 12, stop_after_steps=1)
  assert result.step == 9  # resumed from 8
  assert ckpt_lib.verify_step(os.path.join(tmp_path, "checkpoints", "8"))[0] == "ok"
  _same(run(tmp_path, 12).state, reference)


def test_every_checkpoint_corrupt_starts_from_zero_in_one_line(tmp_path, reference, caplog):
  run(tmp_path, 12, stop_after_steps=8)
  for step in (4, 8):
    _truncate(os.path.join(tmp_path, "checkpoints", str(step)))
  with caplog.at_level("WARNING"):
    result = run(tmp_path, 12)
  assert any("no usable checkpoint left" in r.getMessage() for r in caplog.records)
  _same(result.state, reference)


def test_rotation_never_deletes_the_newest_verified_step_for_an_unverified_one(tmp_path):
  """keep=1: before, orbax deleted step 1 as soon as step 2 was committed, before anything had
  checked step 2 (DPO's default keep_checkpoints=1 then had only a bad step left)."""
  state = run_state()
  c = train.Checkpointer(str(tmp_path), fingerprint={"model": {}}, keep=1)
  c.save(1, state, {"index": 1})
  c.wait()
  c.save(2, state, {"index": 2})
  c._manager.wait_until_finished()  # committed, not yet verified
  assert _steps(tmp_path) == [1, 2]
  c.close()  # step 2 verified: step 1 goes
  assert _steps(tmp_path) == [2]
  assert ckpt_lib.verify_step(os.path.join(tmp_path, "checkpoints", "2"))[0] == "ok"


@functools.lru_cache(maxsize=None)
def _sgd_step():
  """Plain SGD on ``w * toy_loss``: a batch with a large weight is a finite, diverging step."""

  def weighted(params, batch, rng):
    loss, metrics = toy_loss(params, batch, rng)
    return loss * batch["w"][0], metrics

  opt = optax.sgd(0.05)
  return opt, train.make_train_step(weighted, opt)


class _ExplodingData(ToyData):
  """Batch ``at`` (0-based) weighs its loss by 1e3 (every other batch by 1)."""

  def __init__(self, at, **kwargs):
    super().__init__(**kwargs)
    self.at = at

  def __next__(self):
    index = self.index
    batch = super().__next__()
    batch["w"] = np.full((self.batch_size,), 1e3 if index == self.at else 1.0, np.float32)
    return batch


def test_divergence_guard_stops_before_saving_the_jump(tmp_path):
  with pytest.raises(
      train.loop.DivergenceError,
      match=r"divergence at step 8 .*: \(loss=.* is .*x the mean \|loss\| .* of the "
      r"previous 7 steps; LoopConfig.divergence_factor=5\).* latest checkpoint "
      r"\(step 7\)") as err:
    run(tmp_path, 12, data=_ExplodingData(7), checkpoint_every=1, divergence_factor=5.0, sgd=True)
  assert err.value.step == 8 and err.value.quantity == "loss"
  assert _steps(tmp_path)[-1] == 7
  # the same run without the guard trains through the jump (what the issue saw: finite, |p| huge)
  assert run(tmp_path / "off", 12, data=_ExplodingData(7), sgd=True).step == 12


def test_divergence_guard_watches_the_param_norm(tmp_path):
  with pytest.raises(train.loop.DivergenceError, match=r"param_norm=") as err:
    run(tmp_path, 12, data=_ExplodingData(7), checkpoint_every=1, divergence_factor=3.0,
        divergence_keys=("param_norm",), sgd=True)
  assert err.value.quantity == "param_norm" and err.value.step == 8
  assert "param_norm" in train.read_metrics(str(tmp_path), "train")[0]


def test_divergence_config_is_validated():
  with pytest.raises(ValueError, match=r"LoopConfig.divergence_factor=0.5 is invalid; allowed: 0"):
    train.LoopConfig(divergence_factor=0.5)
  with pytest.raises(ValueError, match=r"LoopConfig.divergence_keys=\('grad',\) is invalid"):
    train.LoopConfig(divergence_keys=("grad",))


def test_a_refused_run_changes_nothing_in_its_workdir(tmp_path):
  run(tmp_path, 4, run_config={"name": "first"})
  before = {
      n: open(os.path.join(tmp_path, n), "rb").read() for n in ("config.json", "metrics.jsonl")}
  with pytest.raises(train.WorkdirMismatchError):
    run(tmp_path, 4, fingerprint={"model": {"hidden": 32}}, run_config={"name": "second"})
  after = {n: open(os.path.join(tmp_path, n), "rb").read() for n in before}
  assert after == before


def test_rerunning_a_finished_run_adds_no_row(tmp_path, caplog):
  calls = []

  def eval_fn(state, step):
    calls.append(step)
    return {"score": float(step)}

  first = run(tmp_path, 4, eval_fn=eval_fn)
  rows = open(tmp_path / "metrics.jsonl").read()
  with caplog.at_level("INFO"):
    again = run(tmp_path, 4, eval_fn=eval_fn)
  assert open(tmp_path / "metrics.jsonl").read() == rows and calls == [4]
  assert again.eval_metrics == first.eval_metrics == {"score": 4.0} and again.step == 4
  assert any("already finished at step 4" in r.getMessage() for r in caplog.records)


def test_temp_files_of_an_interrupted_run_are_cleaned(tmp_path):
  old = time.time() - 3600
  left = [
      tmp_path / "config.json.tmp.999999", tmp_path / "data" / "x.jsonl.tmp-999999",
      tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-17"]
  for path in left:
    path.parent.mkdir(parents=True, exist_ok=True)
    if "orbax" in path.name:
      path.mkdir()
      (path / "junk").write_text("x")
    else:
      path.write_text("x")
    os.utime(path, (old, old))
  mine = tmp_path / f"y.tmp-{os.getpid()}"  # a live writer's file stays
  mine.write_text("x")
  os.utime(mine, (old, old))
  run(tmp_path, 4)
  assert not any(p.exists() for p in left) and mine.exists()


def _raw_scalars(logdir):
  """(step, tag) of every scalar in the event files as written (no purge applied)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  out = []
  for name in os.listdir(logdir):
    for record in metrics_lib._records(os.path.join(logdir, name)):
      event = event_pb2.Event.FromString(record)
      out += [(event.step, v.tag) for v in event.summary.value if v.HasField("simple_value")]
  return out


def test_tensorboard_events_after_the_resume_step_are_removed_from_the_files(tmp_path):
  """Before: appended (only hidden by purge_step), so a raw reader saw steps 10, 12 twice."""
  run(tmp_path, 12)
  import shutil  # pylint: disable=import-outside-toplevel
  shutil.rmtree(tmp_path / "checkpoints" / "12")  # as if killed after logging 10 and 12
  run(tmp_path, 12)
  losses = [s for s, tag in _raw_scalars(tmp_path / "tensorboard") if tag == "train/loss"]
  assert sorted(losses) == [2, 4, 6, 8, 10, 12]
  events = train.read_tensorboard(str(tmp_path / "tensorboard"))
  assert [s for s, t, _ in events.scalars if t == "train/loss"] == [2, 4, 6, 8, 10, 12]


@pytest.mark.parametrize("content,match", [
    (b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n', r"bad.jsonl:2: expected UTF-8 text \(re-save the"
     r" file as UTF-8.*got byte 0xe9 at column 16"),
    ('{"prompt": "a"}\n'.encode("utf-16"), r"bad.jsonl:1: expected UTF-8 text \(the file looks "
     r"UTF-16"),
    (b'{"prompt": "a"}\n\n{"prompt": "x\\ud800y"}\n', r"bad.jsonl:3: expected text without lone "
     r"UTF-16 surrogates"),])
def test_decoding_errors_name_file_and_line(tmp_path, content, match):
  path = tmp_path / "bad.jsonl"
  path.write_bytes(content)
  with pytest.raises(records.RecordError, match=match):
    records.read_records(str(path), "prompt")


def test_a_utf8_bom_is_accepted(tmp_path):
  path = tmp_path / "bom.jsonl"
  path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\n{"prompt": "b"}\n')
  assert [r.prompt for r in records.read_records(str(path), "prompt")] == ["a", "b"]


def _rm_prepare(tmp_path, objective, rows):
  tmp_path.mkdir()
  path = tmp_path / "train.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  cfg = reward_model.RMDataConfig(source="jsonl", train_jsonl=str(path), eval_jsonl=str(path),
                                  batch_size=2, eval_batch_size=8)
  return reward_data.prepare(cfg, sections.Limits(max_prompt_len=12,
                                                  max_response_len=20), objective,
                             tok_lib.ByteTokenizer(), str(tmp_path / "work"), vocab_size=259)


def test_the_rm_refuses_data_without_a_preference(tmp_path):
  """Before: exit 0 with an RM that learned nothing (DPO and PRO refuse these)."""
  same = [{"prompt": "p", "chosen": "a", "rejected": "a"}] * 3
  with pytest.raises(
      ValueError, match=r"train.jsonl: every one of its 3 pairwise records has "
      r"chosen == rejected"):
    _rm_prepare(tmp_path / "a", "bradley_terry", same)
  tied = [{"prompt": "p", "responses": ["a", "b"], "scores": [1, 1]}] * 2
  with pytest.raises(ValueError, match=r"every one of its 2 ranked records has all-equal scores"):
    _rm_prepare(tmp_path / "b", "plackett_luce", tied)
  mixed = same[:1] + [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 2
  data = _rm_prepare(tmp_path / "c", "bradley_terry", mixed)
  assert data.stats["data/dropped_uninformative"] == 1 and data.stats["data/train_examples"] == 2


def test_sigint_is_a_clean_stop_and_a_second_one_interrupts(tmp_path):
  previous = signal.getsignal(signal.SIGINT)
  with signals.SigtermWatch(handles=True) as watch:
    os.kill(os.getpid(), signal.SIGINT)
    assert watch.received and watch.signum == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is previous


def test_sigint_in_the_loop_checkpoints_and_returns_preempted(tmp_path):

  class Interrupting(ToyData):

    def __next__(self):
      if self.index == 5:
        os.kill(os.getpid(), signal.SIGINT)
      return super().__next__()

  result = run(tmp_path, 12, data=Interrupting())
  assert result.preempted and result.step == 6 and _steps(tmp_path)[-1] == 6


def test_unknown_config_keys_list_the_allowed_keys_of_their_section():
  cfg = "--config=" + os.path.join(REPO, "experiments", "configs", "sft_synthetic.py")
  assert cli.unknown_key_message(["x", cfg, "--config.optim.lrr=1"]) == (
      "config.optim has no key 'lrr' (did you mean 'lr'?); allowed keys of config.optim: b1, b2, "
      "clip_norm, decay_embeddings, end_lr_ratio, eps, grad_accum_steps, lr, schedule, "
      "warmup_steps, weight_decay")
  message = cli.unknown_key_message(["x", cfg, "--config.optimizer.lr=1"])
  assert message.startswith("config has no key 'optimizer' (did you mean 'optim'?); allowed keys "
                            "of config: ") and "loop, " in message
  assert cli.unknown_key_message(["x", cfg, "--config.optim.lr=1"]) is None


def test_a_full_disk_is_one_line_naming_the_path_and_the_free_space(tmp_path):
  err = OSError(28, "No space left on device", str(tmp_path / "checkpoints" / "4"))
  line, status = cli.describe_failure(err, str(tmp_path))
  assert status == 1 and "\n" not in line
  assert line.startswith(f"error: no space left on device writing {tmp_path}/checkpoints/4 (")
  assert " free of " in line and line.endswith("rerun the same command to resume")
  wrapped = RuntimeError("tensorstore: [OS error: No space left on device]")  # orbax's thread
  assert cli.describe_failure(wrapped, str(tmp_path))[0].startswith("error: no space left")
  nan = train.NonFiniteLossError("loss or gradient", "(loss=nan)", step=3, last_good=2)
  assert cli.describe_failure(nan, str(tmp_path))[1] == 1
  assert cli.describe_failure(ZeroDivisionError(), str(tmp_path)) is None  # a bug: traceback


def test_debug_env_var(monkeypatch):
  monkeypatch.setenv("RLHF_JAX_DEBUG", "1")
  assert cli.debug_requested()
  monkeypatch.setenv("RLHF_JAX_DEBUG", "0")
  assert not cli.debug_requested() and cli.debug_requested(["x", "--debug"])


@pytest.mark.slow
def test_sigterm_before_the_loop_exits_0_and_a_finished_rerun_is_a_noop(tmp_path):
  """Before: SIGTERM while the run prepared its data exited -15."""
  workdir = tmp_path / "sft"
  cmd = [
      sys.executable,
      os.path.join(REPO, "experiments", "run.py"),
      "--config=" + os.path.join(REPO, "experiments", "configs", "sft_synthetic.py"),
      f"--workdir={workdir}", "--config.model.preset=tiny", "--config.loop.num_steps=2",
      "--config.loop.checkpoint_every=2", "--config.data.synthetic_num_prompts=64",
      "--config.data.synthetic_num_test_prompts=8", "--config.data.batch_size=4",
      "--config.limits.buckets=(80,)", "--config.eval.num_sample_prompts=2",
      "--config.eval.print_samples=0"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
  deadline = time.time() + 120
  while not workdir.exists() and time.time() < deadline and proc.poll() is None:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  assert "stopped by SIGTERM" in out
  done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
  assert done.returncode == 0 and "finished:" in done.stdout, done.stdout + done.stderr
  rows = open(workdir / "metrics.jsonl").read()
  again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
  assert again.returncode == 0 and "finished: nothing to do" in again.stdout, again.stdout
  assert open(workdir / "metrics.jsonl").read() == rows


def test_stage_launchers_report_errors_in_one_line(tmp_path, monkeypatch, capsys):
  """``cli.stage_launcher_main`` (pipeline / rlaif / cai): a failing stage is one line with exit 2."""
  monkeypatch.setattr(parallel, "initialize_distributed", lambda: False)
  monkeypatch.delenv("RLHF_JAX_DEBUG", raising=False)

  def exit_now(status):  # cli.quiet_exit is os._exit, which would end pytest too
    raise SystemExit(status)

  monkeypatch.setattr(cli, "quiet_exit", exit_now)
  # Process-wide hooks a launcher installs, kept out of this pytest worker.
  monkeypatch.setattr(cli, "quiet_background_errors", lambda: None)
  monkeypatch.setattr(signals, "install_process_handler", lambda: None)
  config = {"stages": "sft"}

  def bad_stage(config, workdir):
    raise FileNotFoundError(f"{workdir}/prompts.jsonl: no such file")

  with pytest.raises(SystemExit) as exit_info:
    cli.stage_launcher_main(["rlaif.py"], bad_stage, config, str(tmp_path), what="rlaif.py")
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert "prompts.jsonl: no such file" in err and "Traceback" not in err


def test_a_stage_stopped_by_a_signal_is_not_marked_finished(tmp_path, monkeypatch):
  """``train.run_or_reuse`` (the multi-stage launchers' stage runner): a stage whose loop was
  stopped (``preempted``) or that returned after a stop signal gets no ``final_metrics.json``
  and raises ``Interrupted``, so the rerun resumes it instead of reusing a partial run."""

  def stage(metrics):
    return lambda workdir: (os.makedirs(workdir, exist_ok=True), metrics)[1]

  with pytest.raises(signals.Interrupted):
    train.run_or_reuse("sft", str(tmp_path), stage({"step": 47, "preempted": True}))
  assert not (tmp_path / "sft" / "final_metrics.json").exists()
  monkeypatch.setattr(signals, "stop_requested", lambda: signal.SIGTERM)
  with pytest.raises(signals.Interrupted, match="SIGTERM"):
    train.run_or_reuse("label", str(tmp_path), stage({"pairs": 8}))
  assert not (tmp_path / "label" / "final_metrics.json").exists()
  monkeypatch.setattr(signals, "stop_requested", lambda: None)
  assert train.run_or_reuse("label", str(tmp_path), stage({"pairs": 8}))["pairs"] == 8
  reused = train.run_or_reuse("label", str(tmp_path), lambda workdir: 1 / 0)  # not rerun
  assert reused["pairs"] == 8 and "_seconds" in reused


def test_multi_stage_launchers_report_a_mistyped_override_in_one_line():
  """``experiments/{pipeline,rlaif,cai}.py`` load their default config file at parse time, so a
  ``--config.<key>`` the config lacks is a one-line flag error (exit 2), not a traceback."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for launcher in ("pipeline.py", "rlaif.py", "cai.py"):
    result = subprocess.run([
        sys.executable,
        os.path.join(repo, "experiments", launcher), "--workdir=/nonexistent",
        "--config.sft.loop.num_stepz=1"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 2, (launcher, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, launcher
    assert "has no key 'num_stepz' (did you mean 'num_steps'?)" in result.stderr, launcher
