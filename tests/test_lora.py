"""LoRA (models/lora.py): exact step-0 base, adapters-only training, merge, shared frozen base,
sharding, resume, and DPO / PPO runs with adapters."""

import dataclasses
import os
import re
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from offline_fixtures import TINY_RUN, load_config, override, tiny_sft_workdir
from rlhf_jax import models, parallel, train
from rlhf_jax.algorithms import common, sections
from rlhf_jax.models import lora
from rlhf_jax.train import config_dicts

TINY = models.get_model_config("tiny")
MESHED = dataclasses.replace(TINY, vocab_size=264)  # the vocabulary divides over tensor=2
LORA = lora.LoraConfig(rank=4, alpha=8.0)


def _model(scan=False, **overrides):
  cfg = dataclasses.replace(TINY, scan_layers=scan, **overrides)
  model = models.Transformer(cfg)
  dummy = jnp.ones((1, 8), jnp.int32)
  base = nn.meta.unbox(model.init(jax.random.PRNGKey(0), dummy, dummy))["params"]
  return model, base


def _batch(b=2, t=12, seed=1):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, 250, size=(b, t)).astype(np.int32)
  mask = np.ones((b, t), np.int32)
  mask[0, :3] = 0  # left padding
  mask[1, -2:] = 0  # right padding
  loss_mask = mask.copy()
  loss_mask[:, :5] = 0
  return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}


def _perturbed(params: lora.LoraParams, scale=0.05, seed=3) -> lora.LoraParams:
  """Adapters with B != 0 (what training produces), so the adapted model differs from the base."""
  leaves, treedef = jax.tree_util.tree_flatten(params.lora)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  leaves = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  return params.replace(lora=jax.tree_util.tree_unflatten(treedef, leaves))


@pytest.mark.parametrize("scan", [False, True])
def test_step_zero_output_equals_the_base_exactly(scan):
  model, base = _model(scan)
  lm = lora.LoraModel(model, LORA)
  params = lora.make_params(lm, base, LORA)
  batch = _batch()
  want = model.apply({"params": base}, batch["tokens"], batch["mask"]).logits_BxTxV
  got = lm.apply({"params": params}, batch["tokens"], batch["mask"]).logits_BxTxV
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # A is random (Hu et al.: only B starts at 0), so the adapters do train from step 0.
  a_leaves = [v["a"] for v in jax.tree.leaves(params.lora, is_leaf=lora._is_adapter)]
  assert all(float(jnp.std(a)) > 0 for a in a_leaves)
  b_leaves = [v["b"] for v in jax.tree.leaves(params.lora, is_leaf=lora._is_adapter)]
  assert all(not np.any(np.asarray(b)) for b in b_leaves)


def test_kaiming_init_matches_peft_bound():
  model, base = _model()
  adapters = lora.init_adapters(lora.LoraModel(model, LORA), LORA)
  a_q = np.asarray(adapters["layers_0"]["attn"]["q_kernel"]["a"])  # [D, r]
  a_o = np.asarray(adapters["layers_0"]["attn"]["o_kernel"]["a"])  # [N, H, r]: fan_in = N * H
  # PEFT: kaiming_uniform_(a=sqrt(5)) on [r, fan_in] -> U(-1/sqrt(fan_in), 1/sqrt(fan_in))
  assert np.abs(a_q).max() <= 1 / np.sqrt(TINY.d_model) and a_q.std() > 0.3 / np.sqrt(TINY.d_model)
  fan_o = TINY.n_heads * TINY.head_size
  assert np.abs(a_o).max() <= 1 / np.sqrt(fan_o) and a_o.std() > 0.3 / np.sqrt(fan_o)


def test_reference_with_adapters_off_is_the_base_bit_for_bit():
  model, base = _model()
  lm = lora.LoraModel(model, LORA)
  params = _perturbed(lora.make_params(lm, base, LORA))
  batch = _batch()
  want = model.apply({"params": base}, batch["tokens"], batch["mask"]).logits_BxTxV
  ref = lm.apply({"params": params.base}, batch["tokens"], batch["mask"]).logits_BxTxV
  np.testing.assert_array_equal(np.asarray(ref), np.asarray(want))
  adapted = lm.apply({"params": params}, batch["tokens"], batch["mask"]).logits_BxTxV
  assert float(jnp.max(jnp.abs(adapted - want))) > 1e-2  # the adapters do change the policy
  # Through the methods' loader: the reference *is* the policy's base (the same arrays, no copy).
  mesh = parallel.mesh_from_config({"data": 1, "fsdp": 1, "tensor": 1})
  loaded = common.load_models(sections.Sources(), mesh,
                              model_section=config_dicts.model_section("tiny"),
                              lora=sections.Lora(enabled=True, rank=4))
  assert isinstance(loaded.model, lora.LoraModel) and lora.is_lora(loaded.policy_params)
  for ref_leaf, base_leaf in zip(jax.tree.leaves(loaded.ref_params),
                                 jax.tree.leaves(loaded.policy_params.base)):
    assert ref_leaf is base_leaf
  ref_logps = models.response_logps(loaded.model, loaded.ref_params, batch["tokens"], batch["mask"],
                                    batch["loss_mask"])
  plain_logps = models.response_logps(models.Transformer(loaded.model_config), loaded.ref_params,
                                      batch["tokens"], batch["mask"], batch["loss_mask"])
  np.testing.assert_array_equal(np.asarray(ref_logps), np.asarray(plain_logps))


@pytest.mark.parametrize("scan", [False, True])
def test_merged_logits_equal_adapter_logits(scan):
  model, base = _model(scan)
  lm = lora.LoraModel(model, LORA)
  params = _perturbed(lora.make_params(lm, base, LORA))
  batch = _batch()
  adapted = lm.apply({"params": params}, batch["tokens"], batch["mask"]).logits_BxTxV
  merged = lora.merge(params, LORA)
  assert jax.tree.structure(merged) == jax.tree.structure(base)
  got = model.apply({"params": merged}, batch["tokens"], batch["mask"]).logits_BxTxV
  np.testing.assert_allclose(np.asarray(got), np.asarray(adapted), atol=1e-5, rtol=1e-5)
  # The merge is W + A.B.alpha/r, written out for one kernel in NumPy float64.
  w = np.asarray(base["layers" if scan else "layers_0"]["attn"]["o_kernel"], np.float64)
  node = params.lora["layers" if scan else "layers_0"]["attn"]["o_kernel"]
  a, b = np.asarray(node["a"], np.float64), np.asarray(node["b"], np.float64)
  spec = "lnhr,lrd->lnhd" if scan else "nhr,rd->nhd"
  want = w + np.einsum(spec, a, b) * LORA.alpha / LORA.rank
  got_w = np.asarray(merged["layers" if scan else "layers_0"]["attn"]["o_kernel"])
  np.testing.assert_allclose(got_w, want, atol=1e-6)


def _nll(model):
  return common.nll_loss_fn(model)


def test_merged_and_factorised_modes_give_the_same_loss_and_gradients():
  model, base = _model(scan=True)  # the mode marker is sliced per layer by the scan
  batch = _batch()
  out = {}
  for mode in ("factorised", "merged"):
    cfg = dataclasses.replace(LORA, mode=mode)
    lm = lora.LoraModel(model, cfg)
    params = _perturbed(lora.make_params(lm, base, cfg))
    out[mode] = jax.jit(jax.value_and_grad(lambda p, lm=lm: _nll(lm)(p, batch, None)[0]))(params)
  (loss_f, g_f), (loss_m, g_m) = out["factorised"], out["merged"]
  np.testing.assert_allclose(float(loss_m), float(loss_f), rtol=1e-6)
  assert any(np.any(np.asarray(g)) for g in jax.tree.leaves(g_f.lora))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), g_m.lora,
               g_f.lora)
  assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(g_m.base))


def test_auto_mode_cost_model_picks_merged_for_small_kernels_and_factorised_for_large():
  # The small preset's DPO bench step (16 rows x 128 tokens, width 192, d_ff 512), rank 16: every
  # kernel merged (the faster whole step, bench_lora.py).
  assert lora.choose_mode(2048, 192, 192, 16, 4) == "merged"
  assert lora.choose_mode(2048, 192, 64, 16, 4) == "merged"
  assert lora.choose_mode(2048, 192, 512, 16, 4) == "merged"
  assert lora.choose_mode(2048, 512, 192, 16, 4) == "merged"
  # gpt2's (4 rows x 128 tokens, width 768, d_ff 3072): factorised, as is any one-token decode.
  assert lora.choose_mode(512, 768, 768, 16, 4) == "factorised"
  assert lora.choose_mode(512, 768, 3072, 16, 4) == "factorised"
  assert lora.choose_mode(4, 192, 192, 16, 4) == "factorised"
  # The cost itself, written out for one shape (flops + FLOPS_PER_BYTE * bytes).
  n, i, o, r = 100, 10, 20, 2
  assert lora.mode_cost("factorised", n, i, o, r,
                        4) == pytest.approx(6 * n * r * (i + o) + lora.FLOPS_PER_BYTE * 4 * n *
                                            (6 * i + 6 * r + 7 * o))
  assert lora.mode_cost("merged", n, i, o, r,
                        4) == pytest.approx(2 * n * i * o + 6 * i * o * r + lora.FLOPS_PER_BYTE *
                                            (4 * n * (i + o) + 24 * i * o))
  with pytest.raises(ValueError, match="LoraConfig.mode='fused'.*auto | factorised | merged"):
    lora.LoraConfig(mode="fused")
  with pytest.raises(ValueError, match="LoraConfig.mode='merged'.*dropout > 0"):
    lora.LoraConfig(mode="merged", dropout=0.1)


def test_only_adapters_receive_gradients_and_optimizer_state():
  model, base = _model()
  lm = lora.LoraModel(model, LORA)
  params = lora.make_params(lm, base, LORA)
  batch = _batch()
  grads = jax.grad(lambda p: _nll(lm)(p, batch, None)[0])(params)
  assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads.base))
  assert any(np.any(np.asarray(g)) for g in jax.tree.leaves(grads.lora))

  mesh = parallel.mesh_from_config({"data": 1, "fsdp": 1, "tensor": 1})
  optimizer, schedule = train.make_optimizer(train.OptimConfig(lr=1e-2, warmup_steps=0), 10)
  state = train.create_train_state(params, optimizer, jax.random.PRNGKey(0), mesh)
  moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
  assert sum(x.size for x in moments) == 2 * lora.count_params(params.lora)  # Adam's mu and nu
  step = train.jit_train_step(train.make_train_step(_nll(lm), optimizer, schedule), state, mesh)
  base_before, lora_before = jax.device_get(params.base), jax.device_get(params.lora)
  new_state, metrics = step(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  # The base is not donated: the same buffers, still alive (the reference keeps reading them).
  for old, new in zip(jax.tree.leaves(params.base), jax.tree.leaves(new_state.params.base)):
    assert old is new and not old.is_deleted()
  jax.tree.map(np.testing.assert_array_equal, base_before, jax.device_get(new_state.params.base))
  # Every B moved off 0 (A's gradient is x^T (g B^T), zero while B = 0, as in Hu et al.).
  new_lora = jax.device_get(new_state.params.lora)
  for path, node in jax.tree_util.tree_flatten_with_path(new_lora, is_leaf=lora._is_adapter)[0]:
    assert np.any(node["b"] != 0), lora.path_str(path)
  assert jax.tree.structure(new_lora) == jax.tree.structure(lora_before)


def test_targets_that_match_nothing_or_a_non_kernel_are_errors_naming_the_pattern():
  model, _ = _model()
  cfg = lora.LoraConfig(targets=r"attn/nothing_here")
  with pytest.raises(ValueError, match=re.escape("targets='attn/nothing_here' matches no param")):
    lora.init_adapters(lora.LoraModel(model, cfg), cfg)
  cfg = lora.LoraConfig(targets=r"final_norm")
  with pytest.raises(ValueError, match="final_norm/scale.*not a matmul kernel"):
    lora.init_adapters(lora.LoraModel(model, cfg), cfg)
  with pytest.raises(ValueError, match=re.escape("Lora.rank=0 is invalid")):
    sections.Lora(enabled=True, rank=0)
  with pytest.raises(ValueError, match=re.escape("Lora.targets='(' is invalid")):
    sections.Lora(targets="(")
  with pytest.raises(ValueError, match=re.escape("config.lora.rnk")):
    sections.lora_section(ml_collections.ConfigDict({"lora": {"rnk": 4}}))


class _Batches:
  """A resumable iterator over fixed batches (the loop's CheckpointableIterator)."""

  def __init__(self, n=6):
    self.batches = [_batch(b=4, seed=i) for i in range(n)]
    self.pos = 0

  def __next__(self):
    batch = self.batches[self.pos % len(self.batches)]
    self.pos += 1
    return batch

  def get_state(self):
    return {"pos": self.pos}

  def set_state(self, state):
    self.pos = int(state["pos"])


def _run(workdir, base, num_steps=4, stop_after=0, lora_cfg=LORA):
  model = models.Transformer(TINY)
  lm = lora.LoraModel(model, lora_cfg)
  mesh = parallel.mesh_from_config({"data": 1, "fsdp": 1, "tensor": 1})
  params = lora.make_params(lm, base, lora_cfg)
  optimizer, schedule = train.make_optimizer(train.OptimConfig(lr=1e-2, warmup_steps=1), num_steps)
  state = train.create_train_state(params, optimizer, jax.random.PRNGKey(0), mesh)
  fingerprint = {"model": dataclasses.asdict(TINY), **common.lora_fingerprint(lora_cfg, params)}
  loop = train.LoopConfig(num_steps=num_steps, log_every=1, checkpoint_every=2,
                          stop_after_steps=stop_after, progress_every_secs=0.0)
  return train.train(workdir=workdir, config=loop, state=state, data=_Batches(),
                     fingerprint=fingerprint, mesh=mesh,
                     step_fn=train.make_train_step(_nll(lm), optimizer,
                                                   schedule), tensorboard_events=False)


def test_resume_is_bit_identical_checkpoints_hold_adapters_only_and_refuse_another_base(tmp_path):
  _, base = _model()
  full = _run(str(tmp_path / "full"), base)
  first = _run(str(tmp_path / "cut"), base, stop_after=2)
  assert first.preempted and first.step == 2
  resumed = _run(str(tmp_path / "cut"), base)
  assert resumed.step == 4
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(full.state.params.lora),
               jax.device_get(resumed.state.params.lora))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(full.state.opt_state),
               jax.device_get(resumed.state.opt_state))
  assert [r["loss"] for r in train.read_metrics(str(tmp_path / "full"), "train")] == \
      [r["loss"] for r in train.read_metrics(str(tmp_path / "cut"), "train")]
  # The checkpoint holds the adapters, not the base.
  saved = train.restore_params(str(tmp_path / "full"), 4)
  names = [lora.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(saved)[0]]
  assert names and all(n.startswith("lora/") for n in names), names[:5]
  assert sum(x.size for x in jax.tree.leaves(saved)) == lora.count_params(full.state.params.lora)
  # Another base (one weight changed) is refused, naming the LoRA base fingerprint.
  other = jax.tree.map(lambda x: x, base)
  other["final_norm"]["scale"] = other["final_norm"]["scale"].at[0].add(1e-3)
  with pytest.raises(train.WorkdirMismatchError, match="lora"):
    _run(str(tmp_path / "cut"), other)


def test_base_fingerprint_is_exact_and_independent_of_the_mesh():
  _, base = _model(vocab_size=MESHED.vocab_size)
  fp = lora.base_fingerprint(base)
  assert fp == lora.base_fingerprint(jax.tree.map(jnp.copy, base))
  changed = dict(base, embedding=base["embedding"].at[5, 7].set(base["embedding"][5, 7] + 1e-7))
  assert lora.base_fingerprint(changed) != fp
  mesh = parallel.mesh_from_config({"data": 2, "fsdp": 2, "tensor": 2})
  sharded = common.place_params(base, models.Transformer(MESHED), mesh)
  assert lora.base_fingerprint(sharded) == fp


def _kernel_specs(spec, ndim):
  return tuple(spec) + (None,) * (ndim - len(spec))


def test_adapters_are_sharded_like_their_base_kernels_on_a_2x2x2_mesh():
  mesh = parallel.mesh_from_config({"data": 2, "fsdp": 2, "tensor": 2})
  for scan in (False, True):
    cfg = dataclasses.replace(MESHED, scan_layers=scan)
    model = models.Transformer(cfg)
    lm = lora.LoraModel(model, LORA)
    dummy = jnp.ones((1, 8), jnp.int32)
    base = parallel.create_sharded(lambda: model.init(jax.random.PRNGKey(0), dummy, dummy),
                                   mesh)["params"]
    adapters = lora.init_adapters(lm, LORA, mesh)
    flat_base = {lora.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(base)[0]}
    checked = 0
    for path, node in jax.tree_util.tree_flatten_with_path(adapters, is_leaf=lora._is_adapter)[0]:
      name = lora.path_str(path)
      w = flat_base[name]
      w_spec = _kernel_specs(w.sharding.spec, w.ndim)
      stack = 1 if scan else 0
      k = 2 if name.endswith("o_kernel") else 1
      a_spec = _kernel_specs(node["a"].sharding.spec, node["a"].ndim)
      b_spec = _kernel_specs(node["b"].sharding.spec, node["b"].ndim)
      assert a_spec == w_spec[:stack + k] + (None,), (name, a_spec, w_spec)
      assert b_spec == w_spec[:stack] + (None,) + w_spec[stack + k:], (name, b_spec, w_spec)
      assert any(ax is not None for ax in a_spec + b_spec), name  # really sharded somewhere
      checked += 1
    assert checked == 7 * (1 if scan else cfg.n_layers)
    # The sharded LoRA forward equals the single-device one.
    params = _perturbed(lora.LoraParams(base=base, lora=adapters))
    batch = _batch(b=4)
    with parallel.use_mesh(mesh, parallel.DEFAULT_RULES):
      got = jax.jit(lambda p, t, m: lm.apply({"params": p}, t, m).logits_BxTxV)(params,
                                                                                batch["tokens"],
                                                                                batch["mask"])
    host = jax.device_get(params)
    want = lm.apply({"params": host}, batch["tokens"], batch["mask"]).logits_BxTxV
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)


def test_adapter_dropout_only_in_training_mode():
  cfg = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.5)
  model, base = _model()
  lm = lora.LoraModel(model, cfg)
  params = _perturbed(lora.make_params(lm, base, cfg))
  batch = _batch()
  loss = common.nll_loss_fn(lm)
  eval1, eval2 = loss(params, batch, None)[0], loss(params, batch, None)[0]
  assert float(eval1) == float(eval2)
  train1 = loss(params, batch, jax.random.PRNGKey(1))[0]
  train2 = loss(params, batch, jax.random.PRNGKey(2))[0]
  assert float(train1) != float(train2) and float(train1) != float(eval1)
  # The reference (base, adapters off) ignores the LoRA dropout entirely.
  ref1 = loss(params.base, batch, jax.random.PRNGKey(1))[0]
  assert float(ref1) == float(loss(params.base, batch, None)[0])


def _lora_section(**kw):
  return ml_collections.ConfigDict({
      "enabled": True, "rank": 8, "alpha": 16.0, "dropout": 0.0, "targets": lora.DEFAULT_TARGETS,
      "init": "kaiming", "seed": 0, **kw})


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
  return tiny_sft_workdir(tmp_path_factory)


@pytest.mark.slow
def test_dpo_with_lora_trains_and_improves_its_loss(sft_dir, tmp_path):
  from rlhf_jax.algorithms.offline import dpo  # pylint: disable=import-outside-toplevel
  config = override(
      load_config("dpo_synthetic"), {
          **TINY_RUN, "data.batch_size": 8, "limits.buckets":
              (80,), "data.num_eval_pairs": 8, "sources.sft_workdir": sft_dir, "loop.num_steps": 12,
          "loop.log_every": 4, "loop.checkpoint_every": 12, "optim.lr": 3e-3})
  config.lora = _lora_section()
  workdir = str(tmp_path / "dpo_lora")
  final = dpo.train_and_evaluate(config, workdir)
  assert final["step"] == 12 and np.isfinite(final["pairs/loss"])
  rows = train.read_metrics(workdir, "train")
  # Step 0 is the reference itself (loss log 2); the held-out DPO loss and the last train
  # window end below it.
  assert final["pairs/loss"] < np.log(2.0) - 0.005, final["pairs/loss"]
  assert rows[-1]["loss"] < np.log(2.0), [r["loss"] for r in rows]
  stored = train.read_json(os.path.join(workdir, "run_fingerprint.json"))
  assert stored["lora"]["rank"] == 8 and len(stored["lora"]["base"]) == 16
  # A later stage reads the run like an SFT run: the adapters merged into the SFT base.
  merged, sft = train.load_sft_params(workdir), train.load_sft_params(sft_dir)
  saved = train.restore_params(workdir)
  lm = lora.LoraModel(models.Transformer(sft.model_config), lora.LoraConfig(rank=8, alpha=16.0))
  batch = _batch()
  want = lm.apply({"params": lora.LoraParams(base=sft.params, lora=saved["lora"])}, batch["tokens"],
                  batch["mask"]).logits_BxTxV
  got = models.Transformer(merged.model_config).apply({"params": merged.params}, batch["tokens"],
                                                      batch["mask"]).logits_BxTxV
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
  base_logits = lm.apply({"params": sft.params}, batch["tokens"], batch["mask"]).logits_BxTxV
  assert float(jnp.max(jnp.abs(got - base_logits))) > 1e-3
  # `python -m rlhf_jax.models.hf export` of the LoRA run writes that merged model (f32: exactly).
  from rlhf_jax.models import hf  # pylint: disable=import-outside-toplevel
  from rlhf_jax.models.hf import export as hf_export  # pylint: disable=import-outside-toplevel
  summary = hf_export.export_run(workdir, str(tmp_path / "merged_hf"))
  assert summary["kind"] == "policy" and summary["step"] == 12
  config_hf, params_hf = hf.load_pretrained(str(tmp_path / "merged_hf"))
  assert config_hf.n_layers == merged.model_config.n_layers
  jax.tree.map(np.testing.assert_array_equal, params_hf, jax.device_get(merged.params))


def _lora_ppo_models(tp, ppo_cfg):
  """test_ppo's tiny models with a LoRA policy and a LoRA critic (adapters + a trained head) over
  the policy's base; rebuilt per run, since a run donates its adapters' buffers."""
  from rlhf_jax.algorithms.online import models as ppo_models  # pylint: disable=import-outside-toplevel
  models_ = tp.tiny_models(ppo_cfg)
  policy = lora.LoraModel(models_.policy, LORA)
  params = lora.make_params(policy, models_.policy_params, LORA)
  value_model, value_params = ppo_models.init_value_params(ppo_cfg, tp.MODEL_CFG,
                                                           params.base, models_.reward,
                                                           jax.random.PRNGKey(2), LORA)
  return models_._replace(policy=policy, policy_params=params, ref_params=params.base,
                          value_model=value_model, value_params=value_params)


@pytest.mark.slow
def test_ppo_with_lora_policy_and_critic_over_one_base_trains_and_resumes_bit_identically(tmp_path):
  import test_ppo as tp  # pylint: disable=import-outside-toplevel  (its tiny PPO set-up)
  from rlhf_jax.algorithms.online import models as ppo_models  # pylint: disable=import-outside-toplevel
  from rlhf_jax.algorithms.online import ppo  # pylint: disable=import-outside-toplevel
  overrides = {"loop.num_steps": 4, "optim.lr": 1e-2, "ppo.critic_init": "sft"}
  config = tp.tiny_config(**overrides)
  ppo_cfg = ppo.parse_config(config).ppo
  models_ = _lora_ppo_models(tp, ppo_cfg)
  params, value_model, value_params = models_.policy_params, models_.value_model, \
      models_.value_params
  # One copy of the base: the critic's frozen backbone is the policy's base, array for array.
  assert isinstance(value_model, lora.LoraModel) and set(value_params.trained) == {"head"}
  for name, leaf in value_params.base["backbone"].items():
    assert all(a is b for a, b in zip(jax.tree.leaves(leaf), jax.tree.leaves(params.base[name])))
  base_before = jax.device_get(params.base)
  head_before = jax.device_get(value_params.trained)
  full_dir = tmp_path / "full"
  final = ppo.train_and_evaluate(config, str(full_dir), models_=models_)
  assert final["iteration"] == 4
  rows = train.read_metrics(str(full_dir), "train")
  assert rows[-1]["loss"] < rows[0]["loss"], [r["loss"] for r in rows]
  assert rows[-1]["vf_loss"] < rows[0]["vf_loss"], [r["vf_loss"] for r in rows]
  assert rows[0]["kl"] == 0.0 and any(abs(r["kl"]) > 0 for r in rows[1:])  # the policy moved
  saved = train.restore_params(str(full_dir))
  for part in ("policy", "value"):  # adapters (+ the critic's head), never a base
    assert not jax.tree.leaves(saved[part].get("base")) and jax.tree.leaves(saved[part]["lora"])
  assert any(np.any(b != 0) for b in jax.tree.leaves(saved["value"]["lora"]))
  assert np.any(saved["value"]["trained"]["head"]["kernel"] != head_before["head"]["kernel"])
  jax.tree.map(np.testing.assert_array_equal, base_before, jax.device_get(params.base))
  stored = train.read_json(str(full_dir / "run_fingerprint.json"))
  assert stored["lora"]["base"] == lora.base_fingerprint(params.base)
  assert stored["value_lora"]["base"] == lora.base_fingerprint(value_params.base)
  assert stored["value_lora"]["seed"] == LORA.seed + 1  # the critic's own adapters
  # Stopped after iteration 2 and resumed from the adapters-only checkpoint (policy adapters,
  # critic adapters + head, both optimizers' state, the rollout stream): bit-identical to the
  # straight run, every logged number included.
  cut_dir = tmp_path / "cut"
  first = ppo.train_and_evaluate(tp.tiny_config(**overrides, **{"loop.stop_after_steps": 2}),
                                 str(cut_dir), models_=_lora_ppo_models(tp, ppo_cfg))
  assert first["preempted"] and first["iteration"] == 2
  again = ppo.train_and_evaluate(config, str(cut_dir), models_=_lora_ppo_models(tp, ppo_cfg))
  assert again["iteration"] == 4 and not again["preempted"]
  jax.tree.map(np.testing.assert_array_equal, train.restore_params(str(cut_dir)), saved)
  cut_rows = train.read_metrics(str(cut_dir), "train")
  for key in ("loss", "vf_loss", "pg_loss", "kl", "rm_score", "gold_reward", "grad_norm"):
    assert [r[key] for r in cut_rows] == [r[key] for r in rows], key
  # critic_init=reward_model: the critic's own frozen base, the reward model's backbone.
  rm_cfg = dataclasses.replace(ppo_cfg, critic_init="reward_model")
  _, rm_value = ppo_models.init_value_params(rm_cfg, tp.MODEL_CFG, params.base, models_.reward,
                                             jax.random.PRNGKey(2), LORA)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(rm_value.base["backbone"]),
               jax.device_get(models_.reward.params["backbone"]))
  assert lora.base_fingerprint(rm_value.base) != lora.base_fingerprint(value_params.base)


@pytest.mark.slow
def test_sft_with_lora_over_a_pretrained_checkpoint_and_its_merged_policy(sft_dir, tmp_path):
  from rlhf_jax.algorithms import sft  # pylint: disable=import-outside-toplevel
  from rlhf_jax.models.hf import export as hf_export  # pylint: disable=import-outside-toplevel
  from offline_fixtures import SFT_OVERRIDES  # pylint: disable=import-outside-toplevel
  hf_dir = str(tmp_path / "hf")
  hf_export.export_run(sft_dir, hf_dir)  # the tiny SFT run as a Hugging Face folder (+ tokenizer)
  config = override(
      load_config("sft_synthetic"), {
          **SFT_OVERRIDES, "loop.num_steps": 8, "loop.log_every": 4, "loop.checkpoint_every": 8,
          "optim.lr": 1e-2, "sources.pretrained": hf_dir})
  config.lora = _lora_section()
  workdir = str(tmp_path / "sft_lora")
  final = sft.train_and_evaluate(config, workdir)
  assert final["step"] == 8
  rows = train.read_metrics(workdir, "train")
  assert rows[-1]["loss"] < rows[0]["loss"], [r["loss"] for r in rows]
  saved = train.restore_params(workdir)
  assert not jax.tree.leaves(saved.get("base")) and jax.tree.leaves(saved["lora"])
  merged = train.load_sft_params(workdir)  # adapters merged into the pretrained base
  batch = _batch()
  lm = lora.LoraModel(models.Transformer(merged.model_config), lora.LoraConfig(rank=8, alpha=16.0))
  base = train.load_sft_params(f"hf:{hf_dir}").params
  want = lm.apply({"params": lora.LoraParams(base=base, lora=saved["lora"])}, batch["tokens"],
                  batch["mask"]).logits_BxTxV
  got = models.Transformer(merged.model_config).apply({"params": merged.params}, batch["tokens"],
                                                      batch["mask"]).logits_BxTxV
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
  # LoRA without a pretrained base is refused.
  fresh = override(load_config("sft_synthetic"), SFT_OVERRIDES)
  fresh.lora = _lora_section()
  with pytest.raises(ValueError, match="config.lora.enabled=True needs config.sources.pretrained"):
    sft.train_and_evaluate(fresh, str(tmp_path / "fresh"))


POLICY_CONFIGS = ("sft_synthetic", "sft_jsonl", "dpo_synthetic", "ipo_synthetic", "simpo_synthetic",
                  "orpo_synthetic", "kto_synthetic", "pro_synthetic", "rrhf_synthetic",
                  "raft_synthetic", "ppo_synthetic", "ppo_jsonl", "grpo_synthetic",
                  "rloo_synthetic", "dapo_synthetic", "bnpo_synthetic", "cispo_synthetic",
                  "gspo_synthetic", "reinforce_pp_synthetic", "rm_synthetic",
                  "online_dpo_synthetic", "iterated_synthetic")


def _known_keys(method: str):
  # pylint: disable=import-outside-toplevel
  from rlhf_jax.algorithms import sft
  from rlhf_jax.algorithms.offline import raft, shell
  from rlhf_jax.algorithms.online import iterated, online_dpo, ppo
  from rlhf_jax.algorithms.reward import trainer
  return set({
      "sft": sft.KNOWN_KEYS, "raft": raft.KNOWN_KEYS, "ppo": ppo.KNOWN_KEYS,
      "online_dpo": online_dpo.KNOWN_KEYS, "iterated_rlhf": iterated.KNOWN_KEYS,
      "reward_model": trainer.KNOWN_KEYS}.get(method, shell.KNOWN_KEYS))


@pytest.mark.parametrize("name", POLICY_CONFIGS)
def test_every_policy_config_takes_lora_flags_and_ships_it_disabled(name, monkeypatch):
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments",
                      "configs", f"{name}.py")
  shipped = load_config(name)
  assert sections.lora_section(shipped) == sections.Lora()  # disabled: the run is unchanged
  assert sections.lora_section(shipped).config() is None
  assert "lora" in _known_keys(shipped.method), (name, shipped.method)
  common.check_config_keys(shipped, _known_keys(shipped.method), shipped.method)
  argv = [
      "run.py", f"--config={path}", "--config.lora.enabled=True", "--config.lora.rank=4",
      "--config.lora.alpha=8"]
  monkeypatch.setattr(sys, "argv", argv)  # config_flags reads its overrides from sys.argv
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", path, flag_values=fv)
  fv(argv)
  got = sections.lora_section(fv.config).config()
  assert got == lora.LoraConfig(rank=4, alpha=8.0), got
  common.check_config_keys(fv.config, _known_keys(fv.config.method), fv.config.method)


@pytest.mark.slow
def test_raft_with_lora_trains_adapters_over_a_frozen_base_and_resumes(tmp_path_factory, tmp_path):
  from offline_fixtures import tiny_rm_workdir  # pylint: disable=import-outside-toplevel
  from rlhf_jax.algorithms.offline import raft  # pylint: disable=import-outside-toplevel
  sft_dir = tiny_sft_workdir(tmp_path_factory)
  rm_dir = tiny_rm_workdir(tmp_path_factory, sft_dir)
  config = override(
      load_config("raft_synthetic"), {
          **TINY_RUN, "sources.sft_workdir": sft_dir, "sources.reward_model_workdir": rm_dir,
          "raft.num_rounds": 2, "raft.prompts_per_round": 8, "raft.samples_per_prompt": 2,
          "data.batch_size": 8, "raft.require_eos": False, "loop.checkpoint_every": 2,
          "optim.lr": 1e-2})
  config.lora = _lora_section()
  workdir = str(tmp_path / "raft_lora")
  final = raft.train_and_evaluate(config, workdir)
  assert final["step"] == 4 and final["round"] == 2.0 and np.isfinite(final["gold_reward"])
  saved = train.restore_params(workdir)
  assert not jax.tree.leaves(saved.get("base")) and jax.tree.leaves(saved["lora"])
  # B starts at 0: nonzero B after 4 steps means the adapters trained.
  assert any(
      float(np.max(np.abs(np.asarray(leaf)))) > 0
      for path, leaf in jax.tree_util.tree_leaves_with_path(saved["lora"])
      if lora.path_str(path).endswith("b"))
  sft = train.load_sft_params(sft_dir)
  stored = train.read_json(os.path.join(workdir, "run_fingerprint.json"))
  assert stored["lora"]["rank"] == 8 and stored["lora"]["base"] == lora.base_fingerprint(sft.params)
  # Re-running resumes from the adapters-only checkpoint over the same base (round 2 is done:
  # the restored LoraParams are evaluated) and gives the same policy.
  again = raft.train_and_evaluate(config, workdir)
  assert again["step"] == 4 and again["gold_reward"] == pytest.approx(final["gold_reward"])
  # The merged read-back differs from the SFT base.
  merged = train.load_sft_params(workdir)
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                       merged.params, sft.params)
  assert max(jax.tree.leaves(diffs)) > 0


def test_reward_model_adapters_and_head_are_the_only_trained_leaves():
  model = models.RewardModel(TINY)
  dummy = jnp.ones((1, 8), jnp.int32)
  full = nn.meta.unbox(model.init(jax.random.PRNGKey(0), dummy, dummy))["params"]
  lm = lora.LoraModel(model, LORA, trained=("head",))
  params = lora.make_params(lm, full, LORA)
  assert set(params.base) == {"backbone"} and set(params.trained) == {"head"}
  assert params.base["backbone"] is full["backbone"]  # no copy of the backbone
  batch = _batch()
  rewards = lambda p: jnp.sum(lm.apply({"params": p}, batch["tokens"], batch["mask"]))
  # Step 0 (B = 0) is the full model exactly; merge() gives the plain tree back.
  np.testing.assert_array_equal(
      np.asarray(lm.apply({"params": params}, batch["tokens"], batch["mask"])),
      np.asarray(model.apply({"params": full}, batch["tokens"], batch["mask"])))
  grads = jax.grad(rewards)(_perturbed(params))
  assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads.base))
  assert all(np.any(np.asarray(g)) for g in jax.tree.leaves(grads.trained))
  assert any(np.any(np.asarray(g)) for g in jax.tree.leaves(grads.lora))
  optimizer, _ = train.make_optimizer(train.OptimConfig(), 10)
  moments = [x for x in jax.tree.leaves(jax.jit(optimizer.init)(params)) if x.ndim > 0]
  live = lora.count_params(params.lora) + lora.count_params(params.trained)
  assert sum(x.size for x in moments) == 2 * live
  perturbed = _perturbed(params)
  merged = lora.merge(perturbed, LORA)
  assert jax.tree.structure(merged) == jax.tree.structure(full)
  np.testing.assert_allclose(
      np.asarray(model.apply({"params": merged}, batch["tokens"], batch["mask"])),
      np.asarray(lm.apply({"params": perturbed}, batch["tokens"], batch["mask"])), atol=1e-5)


def _rm_lora_config(sft_dir, **overrides):
  config = override(
      load_config("rm_synthetic", "bradley_terry"), {
          "sources.sft_workdir": sft_dir, "rm.compute_dtype": "", "rm.early_stopping_patience": 2,
          "data.synthetic_num_prompts": 96, "data.synthetic_num_test_prompts": 16,
          "data.batch_size": 8, "data.eval_batch_size": 16, "limits.buckets":
              (80,), "loop.num_steps": 6, "loop.eval_every": 2, "loop.checkpoint_every": 2,
          "loop.log_every": 2, "loop.progress_every_secs": 0.0, "optim.warmup_steps": 1,
          "optim.lr": 3e-3, "eval.num_normalization_prompts": 4, "eval.samples_per_prompt": 2,
          "eval.num_gold_prompts": 4, "eval.sample_batch": 8, **overrides})
  config.lora = _lora_section()
  return config


@pytest.mark.slow
def test_reward_model_with_lora_trains_saves_adapters_and_head_and_scoring_merges_them(
    sft_dir, tmp_path):
  from rlhf_jax import scoring  # pylint: disable=import-outside-toplevel
  from rlhf_jax.algorithms.reward import trainer  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path / "rm_lora")
  final = trainer.train_and_evaluate(_rm_lora_config(sft_dir), workdir)
  assert final["step"] >= 2 and np.isfinite(final["eval_loss"])
  rows = train.read_metrics(workdir, "train")
  assert rows[-1]["loss"] < rows[0]["loss"], [r["loss"] for r in rows]
  # Checkpoints and the artifact hold adapters + head only; the info names the backbone.
  saved = train.restore_params(workdir)
  assert not jax.tree.leaves(saved.get("base")) and jax.tree.leaves(saved["lora"])
  assert set(saved["trained"]) == {"head"}
  info = scoring.read_reward_model_info(workdir)
  sft = train.load_sft_params(sft_dir)
  base = scoring.reward_model.lora_base(sft.params)
  assert info.lora["base"] == lora.base_fingerprint(base) and info.lora["rank"] == 8
  assert info.lora["base_source"] == os.path.abspath(sft_dir)
  # Scoring merges them over the SFT backbone: the same rewards as the adapted model.
  handle = scoring.load_reward_model(workdir, policy_tokenizer=sft.tokenizer)
  art = jax.tree.map(np.asarray, _restore_artifact(workdir))
  assert set(art) == {"lora", "trained"}  # no backbone in the artifact
  lm = lora.LoraModel(models.RewardModel(info.model_config()), lora.LoraConfig(rank=8, alpha=16.0),
                      trained=("head",))
  batch = _batch()
  want = lm.apply({"params": lora.LoraParams(base=base, lora=art["lora"], trained=art["trained"])},
                  batch["tokens"], batch["mask"])
  got = handle.model.apply({"params": handle.params}, batch["tokens"], batch["mask"])
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
  full_rm = models.RewardModel(info.model_config()).apply({"params": {**base, **art["trained"]}},
                                                          batch["tokens"], batch["mask"])
  assert float(jnp.max(jnp.abs(got - full_rm))) > 1e-4  # the adapters moved the rewards
  # Another backbone is refused with the fingerprints named.
  meta_path = os.path.join(workdir, "reward_model", "reward_model.json")
  meta = train.read_json(meta_path)
  meta["lora"]["base"] = "0" * 16
  train.atomic_write_json(meta_path, meta)
  with pytest.raises(ValueError, match="fingerprint 0000000000000000, which now has fingerprint"):
    scoring.load_reward_model(workdir)
  with pytest.raises(ValueError, match="config.lora.enabled=True with config.rm.init='scratch'"):
    trainer.train_and_evaluate(_rm_lora_config(sft_dir, **{"rm.init": "scratch"}),
                               str(tmp_path / "x"))


def _restore_artifact(workdir):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.join(workdir, "reward_model", "params"))


def _online_dpo_lora_config(sft_dir, num_steps):
  from rlhf_jax.algorithms.online import online_dpo  # pylint: disable=import-outside-toplevel
  config = override(
      load_config("online_dpo_synthetic", "annotator"), {
          "data.batch_size": 4, "data.synthetic_num_prompts": 96,
          "data.synthetic_num_test_prompts": 16, "limits.max_response_len": 8,
          "loop.num_steps": num_steps, "loop.log_every": 1, "loop.eval_every": 0,
          "loop.checkpoint_every": 1, "loop.progress_every_secs": 0.0, "optim.warmup_steps": 1,
          "optim.lr": 3e-3, "eval.num_prompts": 4, "eval.max_new_tokens": 8,
          "eval.print_samples": 0, "sources.sft_workdir": sft_dir})
  config.lora = _lora_section()
  return online_dpo, config


@pytest.mark.slow
def test_online_dpo_with_lora_trains_adapters_and_resumes_bit_identically(sft_dir, tmp_path):
  online_dpo, config = _online_dpo_lora_config(sft_dir, 3)
  full_dir, part_dir = str(tmp_path / "full"), str(tmp_path / "part")
  final = online_dpo.train_and_evaluate(config, full_dir)
  assert final["step"] == 3 and final["labels_total"] == 12
  saved = train.restore_params(full_dir)
  assert not jax.tree.leaves(saved.get("base")) and jax.tree.leaves(saved["lora"])
  assert any(np.any(b != 0) for b in jax.tree.leaves(saved["lora"]))  # the adapters trained
  stored = train.read_json(os.path.join(full_dir, "run_fingerprint.json"))
  sft = train.load_sft_params(sft_dir)
  assert stored["lora"]["base"] == lora.base_fingerprint(sft.params)
  _, short = _online_dpo_lora_config(sft_dir, 2)
  online_dpo.train_and_evaluate(short, part_dir)
  online_dpo.train_and_evaluate(config, part_dir)  # resumes from step 2
  jax.tree.map(np.testing.assert_array_equal, saved, train.restore_params(part_dir))


def test_iterated_rlhf_with_lora_runs_both_stages_with_it_and_samples_the_merged_policy(
    tmp_path, monkeypatch):
  import test_iterated as ti  # pylint: disable=import-outside-toplevel  (its stand-in stages)
  from rlhf_jax import scoring  # pylint: disable=import-outside-toplevel
  from rlhf_jax.algorithms import registry  # pylint: disable=import-outside-toplevel
  from rlhf_jax.algorithms.online import iterated  # pylint: disable=import-outside-toplevel
  m = ti.tiny_models(ti.CFG)
  sft_dir = tmp_path / "sft"
  ti._policy_run(sft_dir, m.policy_params)  # pylint: disable=protected-access
  lm = lora.LoraModel(m.policy, LORA)
  adapters = _perturbed(lora.make_params(lm, m.policy_params, LORA)).lora
  calls = []

  def fake_run(name, cfg, workdir):
    calls.append((name, cfg.to_dict()))
    if name == "reward_model":
      scoring.save_reward_model(workdir, jax.device_get(m.reward.params), ti.rm_info(m.tokenizer))
      return {"preempted": False}
    # A LoRA PPO run's layout: adapters only, the base named by its config and fingerprint.
    ckpt = train.Checkpointer(
        workdir, fingerprint={
            "model": dataclasses.asdict(ti.MODEL_CFG), "tokenizer": m.tokenizer.fingerprint(),
            **common.lora_fingerprint(LORA, lora.LoraParams(base=m.policy_params, lora=None))})
    ckpt.save(1, {"params": {"policy": {"lora": adapters}}}, {})
    ckpt.close()
    train.atomic_write_json(
        os.path.join(workdir, "config.json"),
        {"sources": {"tokenizer": "byte", "sft_workdir": cfg.sources.sft_workdir}})
    return train.write_final_metrics(workdir, {"preempted": False, "gold_reward": 0.3})

  monkeypatch.setattr(registry, "run", fake_run)
  config = load_config("iterated_synthetic")
  config.sources.sft_workdir = str(sft_dir)
  config.rounds, config.pairs_per_round, config.eval_pairs = 1, 4, 2
  config.ppo.data.synthetic_num_prompts, config.ppo.data.synthetic_num_test_prompts = 16, 4
  config.ppo.limits.max_response_len = 8
  config.lora = _lora_section(rank=LORA.rank, alpha=LORA.alpha)
  sampled = []
  real_sample = iterated.sample_comparisons
  monkeypatch.setattr(
      iterated, "sample_comparisons",
      lambda policy, params, *a, **k: sampled.append(params) or real_sample(
          policy, params, *a, **k))
  table = iterated.train_and_evaluate(config, str(tmp_path / "run"))
  assert [name for name, _ in calls] == ["reward_model", "ppo"] and len(table) == 1
  for _, cfg in calls:  # config.lora replaces each stage's own (disabled) section
    assert cfg["lora"]["enabled"] and cfg["lora"]["rank"] == LORA.rank
  # The probe after the PPO stage samples π_1 = the SFT base with the run's adapters merged.
  want = lora.merge(lora.LoraParams(base=m.policy_params, lora=adapters), LORA)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6),
               sampled[-1], want)
