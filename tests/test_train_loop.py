"""The generic loop on a toy model: resume bit-for-bit, accumulation, sharding, metrics, refusal.

(SIGTERM and kill -9 of a real run are exercised through the SFT launcher in ``test_sft.py``.)
"""

import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import parallel, train


class ToyData:
  """Batch i is a pure function of (seed, i): the position is just the next index."""

  def __init__(self, batch_size=8, seed=0):
    self.batch_size, self.seed, self.index = batch_size, seed, 0

  def __next__(self):
    rng = np.random.default_rng([self.seed, self.index])
    self.index += 1
    x = rng.normal(size=(self.batch_size, 4)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5, 3.0], np.float32) > 0).astype(np.int32)
    return {"x": x, "y": y, "mask": np.ones((self.batch_size, 4), np.int32)}

  def get_state(self):
    return {"index": self.index}

  def set_state(self, state):
    self.index = int(state["index"])


def toy_loss(params, batch, rng):
  h = jnp.tanh(batch["x"] @ params["dense"]["kernel"] + params["dense"]["bias"])
  h = h * params["norm"]["scale"]
  # dropout-like noise so that the rng stream matters for bit-exactness
  h = h * jax.random.bernoulli(rng, 0.9, h.shape) / 0.9
  logits = h @ params["out"]["kernel"]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  nll = -jnp.take_along_axis(logp, batch["y"][:, None], axis=1)[:, 0]
  acc = jnp.mean((jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32))
  return jnp.mean(nll), {"accuracy": acc}


def toy_params(seed=0):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return {
      "dense": {"kernel": jax.random.normal(k1, (4, 16)) * 0.5, "bias": jnp.zeros((16,))},
      "norm": {"scale": jnp.ones((16,))}, "out": {"kernel": jax.random.normal(k2, (16, 2)) * 0.5}}


@functools.lru_cache(maxsize=None)
def _toy_step(num_steps, accum):
  # One step function per shape of run, so that jit's caches are shared between runs in a test.
  ocfg = train.OptimConfig(lr=1e-2, warmup_steps=2, grad_accum_steps=accum)
  opt, sched = train.make_optimizer(ocfg, num_steps)
  return opt, train.make_train_step(toy_loss, opt, sched, grad_accum_steps=accum)


def run_toy(workdir, num_steps, stop_after=0, accum=1, mesh=None, checkpoint_every=4, eval_fn=None,
            hidden_fingerprint=16, data=None):
  mesh = mesh or parallel.make_mesh(parallel.MeshConfig(data=1), devices=jax.devices()[:1])
  opt, step_fn = _toy_step(num_steps, accum)
  params = jax.device_put(toy_params(),
                          jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  state = train.create_train_state(params, opt, jax.random.PRNGKey(1), mesh)
  loop_cfg = train.LoopConfig(num_steps=num_steps, log_every=2, checkpoint_every=checkpoint_every,
                              keep_checkpoints=2, stop_after_steps=stop_after, eval_every=4,
                              progress_every_secs=0.0)
  return train.train(workdir=workdir, config=loop_cfg, state=state, step_fn=step_fn, data=data or
                     ToyData(), fingerprint={"model": {"hidden": hidden_fingerprint}}, mesh=mesh,
                     eval_fn=eval_fn, run_config={"toy": True, "num_steps": num_steps})


def _leaves(state):
  return jax.tree_util.tree_leaves_with_path(jax.device_get(state))


def test_resume_is_bit_for_bit(tmp_path):
  full = run_toy(str(tmp_path / "full"), 12)
  part = run_toy(str(tmp_path / "split"), 12, stop_after=6)
  assert part.preempted and part.step == 6
  resumed = run_toy(str(tmp_path / "split"), 12)
  assert not resumed.preempted and resumed.step == 12
  for (path, a), (_, b) in zip(_leaves(full.state), _leaves(resumed.state), strict=True):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  # the resumed run's metrics read as one run: every train step logged once, in order
  steps = [r["step"] for r in train.read_metrics(str(tmp_path / "split"), "train")]
  assert steps == [2, 4, 6, 8, 10, 12]
  full_loss = [r["loss"] for r in train.read_metrics(str(tmp_path / "full"), "train")]
  split_loss = [r["loss"] for r in train.read_metrics(str(tmp_path / "split"), "train")]
  assert full_loss == split_loss
  assert sorted(os.listdir(tmp_path / "split" / "checkpoints")) == ["12", "8"]  # keep=2
  assert json.load(open(tmp_path / "split" / "config.json"))["num_steps"] == 12


def test_training_reduces_loss_and_writes_eval(tmp_path):
  calls = []

  def eval_fn(state, step):
    calls.append(step)
    loss, m = toy_loss(state.params, next(ToyData(64, seed=99)), jax.random.PRNGKey(0))
    return {"loss": float(loss), "accuracy": float(m["accuracy"])}

  result = run_toy(str(tmp_path), 40, eval_fn=eval_fn)
  assert calls == [4, 8, 12, 16, 20, 24, 28, 32, 36, 40]
  rows = train.read_metrics(str(tmp_path), "train")
  assert rows[-1]["loss"] < 0.6 * rows[0]["loss"]
  assert result.eval_metrics["accuracy"] > 0.8
  assert {"lr", "grad_norm", "accuracy"} <= set(rows[0])
  events = train.read_tensorboard(str(tmp_path / "tensorboard"))
  assert (40, "eval/accuracy") in {(s, t) for s, t, _ in events.scalars}
  assert events.hparams["num_steps"] == 40  # the run config (config.json) as hparams


def test_grad_accumulation_matches_full_batch():
  # micro-batches get their own rngs (fold_in), so compare on a loss without dropout noise
  opt, _ = train.make_optimizer(train.OptimConfig(lr=1e-2), 3)
  det_loss = lambda p, batch, rng: _det_loss(p, batch)
  mesh = parallel.make_mesh(parallel.MeshConfig(data=1), devices=jax.devices()[:1])
  batch = next(ToyData(8))
  outs = []
  for accum in (1, 4):
    state = train.create_train_state(toy_params(), opt, jax.random.PRNGKey(1), mesh)
    step = jax.jit(train.make_train_step(det_loss, opt, grad_accum_steps=accum))
    state, metrics = step(state, batch)
    outs.append((state.params, metrics["loss"]))
  for params, loss in outs[1:]:
    np.testing.assert_allclose(loss, outs[0][1], rtol=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), params,
                 outs[0][0])


def _det_loss(params, batch):
  h = jnp.tanh(batch["x"] @ params["dense"]["kernel"] + params["dense"]["bias"])
  logits = (h * params["norm"]["scale"]) @ params["out"]["kernel"]
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=1)), {}


def test_sharded_mesh_matches_single_device(tmp_path):
  if jax.device_count() < 4:
    pytest.fail("conftest should provide 8 simulated CPU devices")
  mesh4 = parallel.make_mesh(parallel.MeshConfig(data=4), devices=jax.devices()[:4])
  one = run_toy(str(tmp_path / "one"), 4)
  four = run_toy(str(tmp_path / "four"), 4, mesh=mesh4)
  assert four.state.params["dense"]["kernel"].sharding.mesh.shape["data"] == 4
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
               jax.device_get(one.state), jax.device_get(four.state))


def test_workdir_with_other_model_is_refused(tmp_path):
  run_toy(str(tmp_path), 4)
  with pytest.raises(train.WorkdirMismatchError) as err:
    run_toy(str(tmp_path), 4, hidden_fingerprint=32)
  assert "model.hidden: workdir has 16, this run has 32" in str(err.value)


def test_restore_params_reads_latest_checkpoint(tmp_path):
  result = run_toy(str(tmp_path), 4)
  params = train.restore_params(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(result.state.params), params)


class _FiniteToyData(ToyData):

  def __next__(self):
    if self.index >= 5:
      raise StopIteration
    return super().__next__()


def test_finite_data_stops_checkpoints_and_evaluates(tmp_path):
  evaluated = []
  result = run_toy(str(tmp_path), 12, data=_FiniteToyData(),
                   eval_fn=lambda state, step: evaluated.append(step) or {"x": 1.0})
  assert result.step == 5 and train.latest_step(str(tmp_path)) == 5
  assert evaluated == [4, 5]
  assert [r["step"] for r in train.read_metrics(str(tmp_path), "train")] == [2, 4, 5]


# -- NaN guard, should_stop, host iterations, SIGTERM helper ----------------------------------------


class _PoisonedToyData(ToyData):
  """Batch ``nan_at`` (0-based) has NaN features: that step's loss is NaN."""

  def __init__(self, nan_at, **kwargs):
    super().__init__(**kwargs)
    self.nan_at = nan_at

  def __next__(self):
    index = self.index
    batch = super().__next__()
    if index == self.nan_at:
      batch["x"] = np.full_like(batch["x"], np.nan)
    return batch


def test_non_finite_step_is_never_applied_nor_checkpointed(tmp_path):
  """Step 6 is NaN with checkpoint_every=1: the run stops naming step 6 and its cause, and the
  latest checkpoint is step 5 (before the fix DPO's loop saved a checkpoint after the bad step)."""
  run_toy(str(tmp_path / "good"), 12, stop_after=5, checkpoint_every=1)  # the reference run
  with pytest.raises(
      train.NonFiniteLossError,
      match=r"non-finite loss or gradient at step 6 \(loss=nan.*\) .*latest "
      r"checkpoint \(step 5\)") as err:
    run_toy(str(tmp_path / "bad"), 12, checkpoint_every=1, data=_PoisonedToyData(5))
  assert err.value.step == 6 and err.value.last_good == 5
  assert train.latest_step(str(tmp_path / "bad")) == 5
  jax.tree.map(np.testing.assert_array_equal, train.restore_params(str(tmp_path / "bad")),
               train.restore_params(str(tmp_path / "good")))
  assert all(r["step"] <= 5 for r in train.read_metrics(str(tmp_path / "bad"), "train"))


def test_guard_step_keeps_params_on_a_non_finite_step():
  opt, step_fn = _toy_step(4, 1)
  mesh = parallel.make_mesh(parallel.MeshConfig(data=1), devices=jax.devices()[:1])
  state = train.create_train_state(toy_params(), opt, jax.random.PRNGKey(1), mesh)
  guarded = jax.jit(train.guard_step(step_fn))
  new, metrics = guarded(state, _PoisonedToyData(0).__next__())
  assert float(metrics["nonfinite"]) == 1.0 and int(new.step) == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(new.params),
               jax.device_get(state.params))
  new, metrics = guarded(new, next(ToyData()))
  assert float(metrics["nonfinite"]) == 0.0


def test_should_stop_ends_the_run_records_the_reason_and_a_rerun_returns_it(tmp_path):
  seen = []

  def should_stop(step, metrics):
    seen.append((step, sorted(metrics)))
    return "eval accuracy reached" if metrics.get("eval/accuracy", 0) >= 1.0 else None

  eval_fn = lambda state, step: {"accuracy": 1.0 if step >= 8 else 0.5}  # noqa: E731
  result = _run_toy_with(str(tmp_path), 40, eval_fn=eval_fn, should_stop=should_stop)
  assert result.stop_reason == "eval accuracy reached" and not result.preempted
  assert result.step == 8 and result.eval_metrics == {"accuracy": 1.0}
  assert (2, [
      "train/accuracy", "train/grad_norm", "train/loss", "train/lr", "train/steps_per_s",
      "train/tokens_per_s"]) in seen
  assert (4, ["eval/accuracy"]) in seen
  assert train.latest_step(str(tmp_path)) == 8
  evals = [r["step"] for r in train.read_metrics(str(tmp_path), "eval")]
  assert evals == [4, 8]  # no second "final" evaluation of the same step
  again = _run_toy_with(str(tmp_path), 40, eval_fn=eval_fn, should_stop=should_stop)
  assert again.stop_reason == "eval accuracy reached" and again.step == 8
  assert again.eval_metrics == {"accuracy": 1.0}


def _run_toy_with(workdir, num_steps, **kwargs):
  mesh = parallel.make_mesh(parallel.MeshConfig(data=1), devices=jax.devices()[:1])
  opt, step_fn = _toy_step(num_steps, 1)
  state = train.create_train_state(toy_params(), opt, jax.random.PRNGKey(1), mesh)
  loop_cfg = train.LoopConfig(num_steps=num_steps, log_every=2, checkpoint_every=4,
                              keep_checkpoints=2, eval_every=4, progress_every_secs=0.0)
  return train.train(workdir=workdir, config=loop_cfg, state=state, step_fn=step_fn, data=ToyData(),
                     fingerprint={"model": {"hidden": 16}}, mesh=mesh, **kwargs)


def _host_iteration(num_steps):
  """The toy step as a non-jitted iteration (host metrics), like PPO's rollout + update."""
  _, step_fn = _toy_step(num_steps, 1)
  jitted = jax.jit(step_fn)

  def iteration(state, batch):
    state, metrics = jitted(state, batch)
    return state, {k: float(v) for k, v in jax.device_get(metrics).items()}

  return iteration


def run_toy_iterations(workdir, num_steps, stop_after=0, data=None, eval_fn=None, **kwargs):
  mesh = parallel.make_mesh(parallel.MeshConfig(data=1), devices=jax.devices()[:1])
  opt, _ = _toy_step(num_steps, 1)
  state = train.create_train_state(toy_params(), opt, jax.random.PRNGKey(1), mesh)
  loop_cfg = train.LoopConfig(num_steps=num_steps, log_every=1, checkpoint_every=2,
                              keep_checkpoints=2, stop_after_steps=stop_after, eval_every=3,
                              progress_every_secs=0.0)
  return train.train(workdir=workdir, config=loop_cfg, state=state,
                     iteration=_host_iteration(num_steps), data=data or ToyData(),
                     fingerprint={"model": {"hidden": 16}}, eval_fn=eval_fn, **kwargs)


def test_host_iterations_get_the_same_shell_resume_eval_and_initial_eval(tmp_path):
  evals = []
  eval_fn = lambda state, step: evals.append(step) or {"x": float(step)}  # noqa: E731
  full = run_toy_iterations(str(tmp_path / "full"), 7, eval_fn=eval_fn, initial_eval=True)
  assert evals == [0, 3, 6, 7] and full.initial_eval_metrics == {"x": 0.0}
  part = run_toy_iterations(str(tmp_path / "split"), 7, stop_after=3, eval_fn=eval_fn,
                            initial_eval=True)
  assert part.preempted and part.step == 3 and train.latest_step(str(tmp_path / "split")) == 3
  evals.clear()
  resumed = run_toy_iterations(str(tmp_path / "split"), 7, eval_fn=eval_fn, initial_eval=True)
  assert evals == [6, 7] and resumed.initial_eval_metrics == {"x": 0.0}  # the baseline is kept
  for (path, a), (_, b) in zip(_leaves(full.state), _leaves(resumed.state), strict=True):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  rows = train.read_metrics(str(tmp_path / "split"), "train")
  assert [r["step"] for r in rows] == list(range(1, 8))  # log_every=1: one row per iteration
  assert [r["loss"] for r in rows
         ] == [r["loss"] for r in train.read_metrics(str(tmp_path / "full"), "train")]
  # the jitted path computes the same updates
  jitted = run_toy(str(tmp_path / "jitted"), 7)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(jitted.state.params),
               jax.device_get(full.state.params))


def test_host_iteration_non_finite_metrics_or_rollout_stop_before_saving(tmp_path):
  with pytest.raises(train.NonFiniteLossError, match=r"non-finite loss at step 4 \(nan\) .*"
                     r"latest checkpoint \(step 2\)"):
    run_toy_iterations(str(tmp_path / "a"), 7, data=_PoisonedToyData(3))
  assert train.latest_step(str(tmp_path / "a")) == 2

  def bad_rollout(state, batch):
    train.check_finite(rewards=np.array([0.0, np.inf, 1.0]))

  opt, _ = _toy_step(7, 1)
  mesh = parallel.make_mesh(parallel.MeshConfig(data=1), devices=jax.devices()[:1])
  state = train.create_train_state(toy_params(), opt, jax.random.PRNGKey(1), mesh)
  with pytest.raises(
      train.NonFiniteLossError,
      match=r"non-finite rewards at step 1 \(NaN/inf in rows \[1\]\) .*\(none yet\)"):
    train.train(workdir=str(tmp_path / "b"), config=train.LoopConfig(num_steps=2), state=state,
                iteration=bad_rollout, data=ToyData(), fingerprint={"model": {}})
  assert train.latest_step(str(tmp_path / "b")) is None


def test_sigterm_watch_chains_and_handles():
  import signal  # pylint: disable=import-outside-toplevel
  seen = []
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append("outer"))
  try:
    with train.SigtermWatch(handles=True) as loop_watch:
      with train.SigtermWatch() as eval_watch:
        os.kill(os.getpid(), signal.SIGTERM)
      assert eval_watch.received and loop_watch.received and seen == ["outer"]
      assert loop_watch.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is not loop_watch._handle  # restored
  finally:
    signal.signal(signal.SIGTERM, previous)


def test_progress_line_shows_the_requested_metrics(caplog):
  progress = train.Progress(10, 0, every_secs=0.0, keys=("gold_reward", "kl", "absent"))
  with caplog.at_level(logging.INFO, logger="rlhf_jax.train.metrics"):
    progress.maybe_report(2, {"loss": 0.5, "gold_reward": 0.25, "kl": 1.5}, force=True)
  line = caplog.records[-1].getMessage()
  assert "step 2/10 | loss 0.5000 | gold_reward 0.25 | kl 1.5 |" in line and "absent" not in line
