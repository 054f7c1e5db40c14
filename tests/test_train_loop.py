"""The generic loop on a toy model: resume bit-for-bit, accumulation, sharding, metrics, refusal.

(SIGTERM and kill -9 of a real run are exercised through the SFT launcher in ``test_sft.py``.)
"""

import functools
import json
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
  return {"dense": {"kernel": jax.random.normal(k1, (4, 16)) * 0.5, "bias": jnp.zeros((16,))},
          "norm": {"scale": jnp.ones((16,))},
          "out": {"kernel": jax.random.normal(k2, (16, 2)) * 0.5}}


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
  params = jax.device_put(toy_params(), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  state = train.create_train_state(params, opt, jax.random.PRNGKey(1), mesh)
  loop_cfg = train.LoopConfig(num_steps=num_steps, log_every=2, checkpoint_every=checkpoint_every,
                              keep_checkpoints=2, stop_after_steps=stop_after, eval_every=4,
                              progress_every_secs=0.0)
  return train.train(workdir=workdir, config=loop_cfg, state=state, step_fn=step_fn,
                     data=data or ToyData(), fingerprint={"model": {"hidden": hidden_fingerprint}},
                     mesh=mesh, eval_fn=eval_fn, run_config={"toy": True, "num_steps": num_steps})


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
