"""OptimConfig validation, schedules, the weight-decay mask and the TensorBoard writer."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import train
from rlhf_jax.train import metrics as metrics_lib


@pytest.mark.parametrize("field,value,allowed", [
    ("lr", 0.0, "> 0"),
    ("schedule", "cosin", "cosine | linear | constant"),
    ("warmup_steps", -1, ">= 0"),
    ("end_lr_ratio", 1.5, "[0, 1]"),
    ("b2", 1.0, "[0, 1)"),
    ("clip_norm", -1.0, ">= 0"),
    ("grad_accum_steps", 0, ">= 1"),])
def test_optim_config_names_field_and_allowed_values(field, value, allowed):
  with pytest.raises(ValueError) as err:
    train.OptimConfig(**{field: value})
  assert f"OptimConfig.{field}" in str(err.value) and allowed in str(err.value)


@pytest.mark.parametrize("field,value", [("num_steps", 0), ("log_every", 0), ("eval_every", -1)])
def test_loop_config_names_field(field, value):
  with pytest.raises(ValueError, match=f"LoopConfig.{field}"):
    train.LoopConfig(**{field: value})


def test_cosine_schedule_warmup_and_end():
  cfg = train.OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine", end_lr_ratio=0.1)
  sched = train.make_schedule(cfg, total_steps=110)
  assert float(sched(0)) == 0.0
  assert float(sched(5)) == pytest.approx(0.5)
  assert float(sched(10)) == pytest.approx(1.0)
  # halfway through the decay: end + (lr - end) * 0.5 * (1 + cos(pi / 2)) = 0.55
  assert float(sched(60)) == pytest.approx(0.55, abs=1e-6)
  assert float(sched(110)) == pytest.approx(0.1, abs=1e-6)


def test_linear_and_constant_schedules():
  lin = train.make_schedule(train.OptimConfig(lr=2.0, schedule="linear", end_lr_ratio=0.0), 100)
  assert float(lin(50)) == pytest.approx(1.0)
  const = train.make_schedule(train.OptimConfig(lr=2.0, schedule="constant", warmup_steps=4), 100)
  assert float(const(2)) == pytest.approx(1.0) and float(const(80)) == pytest.approx(2.0)


def test_weight_decay_mask_by_path_not_rank():
  params = {
      "embed": {"embedding": jnp.zeros((10, 4))},
      "layers": {  # scanned: norm scale and bias get a leading layers axis (rank 2)
          "attn_norm": {"scale": jnp.zeros((2, 4))},
          "mlp": {"wi": {"kernel": jnp.zeros((2, 4, 8)), "bias": jnp.zeros((2, 8))}},
      },
      "final_norm": {"scale": jnp.zeros((4,))},
      "lm_head": {"kernel": jnp.zeros((4, 10))},
  }
  mask = train.weight_decay_mask(params)
  assert mask["layers"]["mlp"]["wi"]["kernel"] and mask["lm_head"]["kernel"]
  assert not mask["layers"]["attn_norm"]["scale"] and not mask["layers"]["mlp"]["wi"]["bias"]
  assert not mask["final_norm"]["scale"] and not mask["embed"]["embedding"]
  assert train.weight_decay_mask(params, decay_embeddings=True)["embed"]["embedding"]


def test_weight_decay_only_touches_masked_leaves():
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}}
  opt, _ = train.make_optimizer(
      train.OptimConfig(lr=0.1, weight_decay=0.5, schedule="constant", clip_norm=0.0), 10)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = opt.update(zero_grads, opt.init(params), params)
  # zero gradient: the only update is -lr * wd * theta on decayed leaves
  np.testing.assert_allclose(updates["dense"]["kernel"], -0.05 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_array_equal(updates["dense"]["bias"], np.zeros((2,)))


def test_clipping_bounds_the_first_update():
  params = {"w": jnp.zeros((3,))}
  cfg = train.OptimConfig(lr=1.0, schedule="constant", clip_norm=1.0, weight_decay=0.0, b1=0.0)
  opt, _ = train.make_optimizer(cfg, 10)
  state = opt.init(params)
  huge = {"w": jnp.array([300.0, 400.0, 0.0])}
  clipped = {"w": jnp.array([0.6, 0.8, 0.0])}
  u_huge, _ = opt.update(huge, state, params)
  u_clip, _ = opt.update(clipped, state, params)
  np.testing.assert_allclose(u_huge["w"], u_clip["w"], rtol=1e-6)


def test_tensorboard_events_roundtrip_purge_on_resume_samples_and_hparams(tmp_path):
  workdir = str(tmp_path)
  json.dump({"optim": {"lr": 1e-3, "betas": [0.9, 0.95]}, "seed": 3},
            open(tmp_path / "config.json", "w"))
  writer = metrics_lib.MetricsWriter(workdir)
  for step in (1, 2, 3, 4):  # the run checkpoints at 2, then dies after logging 3 and 4
    writer.write(step, {"loss": float(step)})
  with open(tmp_path / "samples.jsonl", "a") as f:
    f.write(json.dumps({"step": 4, "prompt": "a|b", "response": "c", "gold": 0.5}) + "\n")
  writer.write(4, {"gold_reward": 0.5}, split="eval")
  writer.write(2**40, {"nll": -0.25}, split="eval")
  writer.close()
  events = train.read_tensorboard(str(tmp_path / "tensorboard"))
  assert events.scalars[:2] == [(1, "train/loss", 1.0), (2, "train/loss", 2.0)]
  assert (2**40, "eval/nll", -0.25) in events.scalars
  assert events.texts[0][:2] == (4, "eval/samples") and "a\\|b" in events.texts[0][2]
  assert events.hparams == {
      "optim.lr": pytest.approx(1e-3), "optim.betas": "[0.9, 0.95]", "seed": 3}
  resumed = metrics_lib.MetricsWriter(workdir, resume_step=2)  # restarts from the step-2 checkpoint
  resumed.write(3, {"loss": 30.0})
  resumed.close()
  events = train.read_tensorboard(str(tmp_path / "tensorboard"))
  assert [(s, v) for s, t, v in events.scalars if t == "train/loss"] == [(1, 1.0), (2, 2.0),
                                                                         (3, 30.0)]
  assert events.texts == [] and not any(t.startswith("eval/") for _, t, _ in events.scalars)
  assert [r["step"] for r in train.read_metrics(workdir)] == [1, 2, 3]  # the JSONL agrees
  path = os.path.join(tmp_path, "tensorboard", sorted(os.listdir(tmp_path / "tensorboard"))[0])
  raw = bytearray(open(path, "rb").read())
  raw[-6] ^= 0xFF
  open(path, "wb").write(bytes(raw))
  with pytest.raises(ValueError, match="corrupt"):
    train.read_tensorboard(str(tmp_path / "tensorboard"))


def test_config_sections_roundtrip_and_name_bad_keys():
  from rlhf_jax.train import config_dicts
  section = config_dicts.dataclass_section(train.OptimConfig, lr=1e-3)
  assert config_dicts.to_dataclass(train.OptimConfig, section,
                                   "optim") == train.OptimConfig(lr=1e-3)
  section.lr = -1.0
  with pytest.raises(ValueError, match=r"config.optim: OptimConfig.lr=-1.0 is invalid"):
    config_dicts.to_dataclass(train.OptimConfig, section, "optim")
  with pytest.raises(ValueError, match=r"\['config.optim.lrr'\].*allowed keys of config.optim"):
    config_dicts.to_dataclass(train.OptimConfig, {"lrr": 1.0}, "optim")
  model = config_dicts.model_section("small")
  model.d_model = 96  # typed placeholder: accepted like a command-line override
  model.preset = "tiny"
  cfg = config_dicts.build_model_config(model)
  assert (cfg.d_model, cfg.n_layers) == (96, 2)  # the override on top of the *new* preset
  with pytest.raises(TypeError):
    model.n_layers = "four"
