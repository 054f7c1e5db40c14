"""Transformer, config validation, log-prob helpers and heads on the `tiny` preset (f32, CPU)."""

import dataclasses
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax.models import (ModelConfig, RewardModel, Transformer, ValueModel, get_model_config,
                             init_cache, sequence_logprobs, stack_layer_params, token_entropy,
                             token_logprobs, with_backbone)

B, T = 2, 8
ATOL = 1e-5


def _init(model, tokens, mask, seed=0):
  return nn.meta.unbox(jax.jit(model.init)(jax.random.key(seed), tokens, mask))["params"]


# Jitted with the (hashable) module static: XLA compile time dominates on CPU, and one compile per
# shape is much cheaper than op-by-op dispatch of a whole forward pass.
@functools.partial(jax.jit, static_argnums=0)
def _logits(model, params, tokens, mask):
  return model.apply({"params": params}, tokens, mask).logits_BxTxV


@functools.partial(jax.jit, static_argnums=(0, 5))
def _step(model, params, tokens, mask, cache, prefill=False):
  out = model.apply({"params": params}, tokens, mask, cache=cache, prefill=prefill)
  return out.logits_BxTxV, out.cache


_seq_logps = jax.jit(sequence_logprobs, static_argnums=0)


@functools.partial(jax.jit, static_argnums=0)
def _apply_head(model, params, tokens, mask):
  return model.apply({"params": params}, tokens, mask)


@pytest.fixture(scope="module")
def tiny():
  cfg = get_model_config("tiny")
  model = Transformer(cfg)
  tokens = jax.random.randint(jax.random.key(1), (B, T), 0, cfg.vocab_size)
  params = _init(model, tokens, jnp.ones((B, T), jnp.int32))
  return cfg, model, params, tokens


# ----------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("overrides, field", [
    (dict(d_model=65), "d_model"),
    (dict(n_kv_heads=3), "n_heads"),
    (dict(position="alibi"), "position"),
    (dict(norm="batchnorm"), "norm"),
    (dict(mlp="relu"), "mlp"),
    (dict(dtype="float64"), "dtype"),
    (dict(remat_policy="sometimes"), "remat_policy"),
    (dict(n_layers=0), "n_layers"),
    (dict(vocab_size=-3), "vocab_size"),
    (dict(dropout_rate=1.0), "dropout_rate"),
    (dict(not_a_field=1), "not_a_field"),])
def test_bad_config_names_the_field(overrides, field):
  with pytest.raises(ValueError, match=field):
    get_model_config("tiny", **overrides)


def test_enum_error_lists_allowed_values():
  with pytest.raises(ValueError, match="learned.*rope"):
    get_model_config("tiny", position="alibi")


def test_unknown_preset():
  with pytest.raises(ValueError, match="allowed presets.*gpt2"):
    get_model_config("gpt5")


def test_config_is_frozen():
  with pytest.raises(dataclasses.FrozenInstanceError):
    get_model_config("tiny").d_model = 3


@pytest.mark.parametrize(
    "preset, expected",
    [
        ("gpt2", 124_439_808),  # transformers GPT2LMHeadModel(GPT2Config()).num_parameters()
        ("llama_1b", 1_235_814_400),  # Llama-3.2-1B (tied embeddings)
    ])
def test_preset_parameter_counts(preset, expected):
  cfg = get_model_config(preset)
  assert cfg.num_params() == expected
  # The module creates exactly those shapes (abstract init: no compile, no memory).
  shapes = jax.eval_shape(lambda: nn.meta.unbox(
      Transformer(cfg.replace(scan_layers=True)).init(jax.random.key(0), jnp.ones(
          (1, 4), jnp.int32))))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == expected


def test_every_param_has_logical_axes():
  cfg = get_model_config("tiny", tie_embeddings=False, qkv_bias=True, scan_layers=True)
  boxed = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), jnp.ones(
      (1, 4), jnp.int32)))["params"]
  allowed = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "layers", None}
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  for leaf in leaves:
    assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= allowed
    assert leaf.names[0] == "layers" or leaf.value.ndim <= 2


def test_abstract_params_match_a_real_init_for_every_model_kind():
  cfg = get_model_config("tiny")
  for module in (Transformer(cfg), RewardModel(cfg, num_outputs=2), ValueModel(cfg)):
    real = module.init(jax.random.key(1), jnp.ones((2, 5), jnp.int32), jnp.ones((2, 5), jnp.int32))
    real_params = nn.meta.unbox(real)["params"]
    abstract = models.abstract_params(module)
    assert jax.tree.structure(abstract) == jax.tree.structure(real_params)
    jax.tree.map(lambda a, r: (a.shape, a.dtype) == (r.shape, r.dtype) or pytest.fail(str(a)),
                 abstract, real_params)
    boxed = jax.tree.leaves(
        models.abstract_variables(module)["params"],
        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert all(isinstance(x, nn.LogicallyPartitioned) for x in boxed)


# ------------------------------------------------------------------------------------- transformer


def test_causality(tiny):
  cfg, model, params, tokens = tiny
  mask = jnp.ones((B, T), jnp.int32)
  logits = _logits(model, params, tokens, mask)
  changed = tokens.at[:, 5].set((tokens[:, 5] + 1) % cfg.vocab_size)
  logits2 = _logits(model, params, changed, mask)
  np.testing.assert_allclose(logits[:, :5], logits2[:, :5], atol=ATOL)
  assert np.abs(logits[:, 5:] - logits2[:, 5:]).max() > 1e-3


def _left_and_right_padded(tokens, lengths):
  """Same real tokens, placed at the start (right-padded) or at the end (left-padded)."""
  right = np.zeros_like(tokens)
  left = np.zeros_like(tokens)
  right_mask = np.zeros_like(tokens)
  left_mask = np.zeros_like(tokens)
  t = tokens.shape[1]
  for b, n in enumerate(lengths):
    right[b, :n] = tokens[b, :n]
    right_mask[b, :n] = 1
    left[b, t - n:] = tokens[b, :n]
    left_mask[b, t - n:] = 1
  return right, right_mask, left, left_mask


def test_left_and_right_padding_agree(tiny):
  _, model, params, tokens = tiny
  lengths = [5, 8]
  right, right_mask, left, left_mask = _left_and_right_padded(np.asarray(tokens), lengths)
  # Loss on every real token except the first (nothing real predicts it).
  right_loss = right_mask.copy()
  right_loss[:, 0] = 0
  lp_right = _seq_logps(model, params, right, right_mask, right_loss)
  left_loss = np.zeros_like(left_mask)
  for b, n in enumerate(lengths):
    left_loss[b, T - n + 1:] = 1
  lp_left = _seq_logps(model, params, left, left_mask, left_loss)
  for b, n in enumerate(lengths):
    np.testing.assert_allclose(lp_right[b, 1:n], lp_left[b, T - n + 1:], atol=ATOL)
    assert np.all(np.asarray(lp_right[b, 1:n]) < 0)
  np.testing.assert_array_equal(np.asarray(lp_right)[right_loss == 0], 0.0)


def test_kv_cache_matches_full_forward(tiny):
  cfg, model, params, tokens = tiny
  # Row 0 left-padded by 2, row 1 unpadded.
  mask = jnp.array([[0, 0] + [1] * (T - 2), [1] * T])
  full = _logits(model, params, tokens, mask)
  cache = init_cache(cfg, B, T + 1)  # one spare slot: the cache may be larger than the sequence
  prefill = 4
  logits, cache = _step(model, params, tokens[:, :prefill], mask[:, :prefill], cache)
  chunks = [logits]
  for t in range(prefill, T):
    logits, cache = _step(model, params, tokens[:, t:t + 1], mask[:, t:t + 1], cache)
    chunks.append(logits)
  assert int(cache.index) == T
  np.testing.assert_array_equal(cache.mask_BxS[:, :T], mask)
  incremental = jnp.concatenate(chunks, axis=1)
  np.testing.assert_allclose(incremental[0, 2:], full[0, 2:], atol=ATOL)
  np.testing.assert_allclose(incremental[1], full[1], atol=ATOL)


def test_split_kv_cache_matches_stacked(tiny):
  """Per-layer cache buffers (the sampler's unrolled decode loop) give the stacked cache's logits,
  and `split_layers` / `stack_layers` / the old-layout properties round-trip."""
  from rlhf_jax.models import kv_cache
  cfg, model, params, tokens = tiny
  mask = jnp.array([[0, 0] + [1] * (T - 2), [1] * T])
  results = []
  for split in (False, True):
    cache = init_cache(cfg, B, T)
    cache = kv_cache.split_layers(cache) if split else cache
    logits, cache = _step(model, params, tokens[:, :T - 1], mask[:, :T - 1], cache, True)
    last, cache = _step(model, params, tokens[:, T - 1:], mask[:, T - 1:], cache)
    assert cache.is_split == split
    results.append((logits, last, kv_cache.stack_layers(cache)))
  (l0, last0, c0), (l1, last1, c1) = results
  np.testing.assert_allclose(l1, l0, atol=ATOL)
  np.testing.assert_allclose(last1, last0, atol=ATOL)
  np.testing.assert_array_equal(c1.k_LxBxKxSxH, c0.k_LxBxKxSxH)
  np.testing.assert_array_equal(kv_cache.split_layers(c0).k_LxBxSxKxH, c0.k_LxBxSxKxH)
  np.testing.assert_array_equal(c0.v_LxBxSxKxH, np.swapaxes(c0.v_LxBxKxSxH, 2, 3))


def test_bfloat16_matmul_gradients():
  """`ops.matmul` on bf16 operands (f32 accumulation, custom backward) matches float32 math."""
  from rlhf_jax.models.ops import matmul
  a = jax.random.normal(jax.random.key(0), (2, 3, 16), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (16, 4, 8), jnp.float32)
  c = jax.random.normal(jax.random.key(2), (2, 3, 4, 8), jnp.float32)
  spec = "BTD,DNH->BTNH"
  loss = lambda x, y, f: jnp.sum(f(x, y).astype(jnp.float32) * c)
  bf = lambda x: x.astype(jnp.bfloat16)
  a, b = bf(a).astype(jnp.float32), bf(b).astype(jnp.float32)  # exactly representable in bf16
  ref = jax.grad(loss, argnums=(0, 1))(a, b, lambda x, y: jnp.einsum(spec, x, y))
  got = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(bf(a), bf(b),
                                                                  lambda x, y: matmul(spec, x, y))
  for g, r in zip(got, ref):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g, np.float32), r, atol=0.05, rtol=0.02)
  assert matmul(spec, bf(a), bf(b), jnp.float32).dtype == jnp.float32


def _loss_and_grads(model, params, tokens, mask):

  def loss(p):
    return -jnp.sum(sequence_logprobs(model, p, tokens, mask, mask))

  return jax.jit(jax.value_and_grad(loss))(params)


def test_scan_and_remat_leave_numerics_unchanged(tiny):
  cfg, model, params, tokens = tiny
  mask = jnp.array([[0] + [1] * (T - 1), [1] * (T - 2) + [0, 0]])
  ref_loss, ref_grads = _loss_and_grads(model, params, tokens, mask)
  stacked = stack_layer_params(params, cfg.n_layers)
  variants = [
      # Two variants cover both switches (each grad compile costs seconds on CPU).
      (cfg.replace(remat_policy="full"), params, False),
      (cfg.replace(scan_layers=True, remat_policy="dots_saveable"), stacked, True),]
  for variant_cfg, variant_params, is_scanned in variants:
    loss, grads = _loss_and_grads(Transformer(variant_cfg), variant_params, tokens, mask)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    expected = stack_layer_params(ref_grads, cfg.n_layers) if is_scanned else ref_grads
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), grads,
                 expected)
  assert np.abs(ref_grads["layers_0"]["attn"]["q_kernel"]).max() > 0


def test_bfloat16_gradients_track_float32(tiny):
  """dtype=bf16 (f32 params): loss and gradients close to float32, unrolled and scanned+remat."""
  cfg, model, params, tokens = tiny
  mask = jnp.ones((B, T), jnp.int32)
  ref_loss, ref_grads = _loss_and_grads(model, params, tokens, mask)
  stacked = stack_layer_params(params, cfg.n_layers)
  for variant_cfg, variant_params, is_scanned in ((cfg.replace(dtype="bfloat16"), params, False),
                                                  (cfg.replace(dtype="bfloat16", scan_layers=True,
                                                               remat_policy="dots_saveable"),
                                                   stacked, True)):
    loss, grads = _loss_and_grads(Transformer(variant_cfg), variant_params, tokens, mask)
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-2)
    expected = stack_layer_params(ref_grads, cfg.n_layers) if is_scanned else ref_grads
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
      assert g.dtype == jnp.float32  # params (and so their gradients) stay float32
      np.testing.assert_allclose(g, r, atol=0.05 * float(np.abs(r).max()) + 1e-6)


def test_scanned_model_with_kv_cache(tiny):
  cfg, model, params, tokens = tiny
  scanned = Transformer(cfg.replace(scan_layers=True))
  stacked = stack_layer_params(params, cfg.n_layers)
  mask = jnp.ones((B, T), jnp.int32)
  full = _logits(model, params, tokens, mask)
  # prefill=True (the sampler's path): the empty cache is written but not read.
  first, cache = _step(scanned, stacked, tokens[:, :T - 1], mask[:, :T - 1], init_cache(cfg, B, T),
                       True)
  last, _ = _step(scanned, stacked, tokens[:, T - 1:], mask[:, T - 1:], cache)
  np.testing.assert_allclose(first, full[:, :T - 1], atol=ATOL)
  np.testing.assert_allclose(last[:, 0], full[:, -1], atol=ATOL)


def test_dropout_only_in_training_mode(tiny):
  cfg, model, params, tokens = tiny
  dropout_model = Transformer(cfg.replace(dropout_rate=0.5))
  mask = jnp.ones((B, T), jnp.int32)
  ref = _logits(model, params, tokens, mask)
  np.testing.assert_allclose(_logits(dropout_model, params, tokens, mask), ref, atol=ATOL)
  train = jax.jit(lambda p, k: dropout_model.apply({"params": p}, tokens, mask, deterministic=False,
                                                   rngs={"dropout": k}).logits_BxTxV)
  train_a, train_b = train(params, jax.random.key(3)), train(params, jax.random.key(4))
  assert np.abs(train_a - ref).max() > 1e-3 and np.abs(train_a - train_b).max() > 1e-3


# -------------------------------------------------------------------------------------- log-probs


def _np_log_softmax(x):
  x = x.astype(np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_token_logprobs_and_entropy_match_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 6, 11)).astype(np.float32) * 3
  tokens = rng.integers(0, 11, size=(3, 6))
  loss_mask = rng.integers(0, 2, size=(3, 6))
  logp = _np_log_softmax(logits)
  expected = np.zeros((3, 6))
  expected_h = np.zeros((3, 6))
  for b in range(3):
    for t in range(1, 6):
      if loss_mask[b, t]:
        expected[b, t] = logp[b, t - 1, tokens[b, t]]
        expected_h[b, t] = -(np.exp(logp[b, t - 1]) * logp[b, t - 1]).sum()
  got = token_logprobs(jnp.asarray(logits), tokens, loss_mask)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, expected, atol=1e-5)
  np.testing.assert_allclose(token_entropy(jnp.asarray(logits), loss_mask), expected_h, atol=1e-5)
  # bfloat16 logits are upcast before the log-softmax.
  got_bf16 = token_logprobs(jnp.asarray(logits, jnp.bfloat16), tokens, loss_mask)
  assert got_bf16.dtype == jnp.float32


def _tiny_batch():
  cfg = get_model_config("tiny")
  model = Transformer(cfg)
  rng = np.random.default_rng(3)
  tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, size=(B, T)), jnp.int32)
  mask = jnp.asarray([[0, 0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1]], jnp.int32)
  loss_mask = jnp.asarray([[0, 0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1, 1, 1]], jnp.int32)
  params = _init(model, tokens, mask)
  return model, params, tokens, mask, loss_mask


class ResponseLogpsTest(chex.TestCase):
  """The one summed-log-prob function and its per-token response variant, with and without jit."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_summed_logps_equal_masked_sum_of_token_logprobs(self):
    model, params, tokens, mask, loss_mask = _tiny_batch()
    fn = self.variant(lambda p, t, m, l: models.response_logps(model, p, t, m, l))
    got_B = fn(params, tokens, mask, loss_mask)
    chex.assert_shape(got_B, (B,))
    chex.assert_type(got_B, jnp.float32)
    expect_B = np.sum(np.asarray(_seq_logps(model, params, tokens, mask, loss_mask)), -1)
    chex.assert_trees_all_close(got_B, expect_B, atol=ATOL)

  @chex.variants(with_jit=True, without_jit=True)
  def test_response_token_logps_match_full_forward_columns(self):
    model, params, tokens, _, _ = _tiny_batch()
    p = 3  # prompt block [0, 3): left-padded row 0, full row 1; response [3, T) right-padded
    mask = jnp.asarray([[0, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]], jnp.int32)
    fn = self.variant(lambda prm, t, m: models.response_token_logps(model, prm, t, m, p, temperature
                                                                    =2.0, with_entropy=True))
    logps_BxR, ent_BxR = fn(params, tokens, mask)
    chex.assert_shape([logps_BxR, ent_BxR], (B, T - p))
    logits = np.asarray(_logits(model, params, tokens, mask), np.float64) / 2.0
    logp = _np_log_softmax(logits)
    for b in range(B):
      for r in range(T - p):
        want = logp[b, p - 1 + r, int(tokens[b, p + r])] if mask[b, p + r] else 0.0
        np.testing.assert_allclose(logps_BxR[b, r], want, atol=1e-4)
        want_h = -(np.exp(logp[b, p - 1 + r]) * logp[b, p - 1 + r]).sum() if mask[b, p + r] else 0.
        np.testing.assert_allclose(ent_BxR[b, r], want_h, atol=1e-4)


def test_response_logps_on_a_mesh_equals_single_device():
  model, params, tokens, mask, loss_mask = _tiny_batch()
  from rlhf_jax import parallel
  mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=1, tensor=1),
                            devices=jax.devices()[:2])
  single_B = models.response_logps(model, params, tokens, mask, loss_mask)
  sharded_B = models.response_logps(model, params, np.asarray(tokens), np.asarray(mask),
                                    np.asarray(loss_mask), mesh=mesh)
  assert len(sharded_B.sharding.device_set) == 2  # rows were split over the data axis
  chex.assert_trees_all_close(sharded_B, single_B, atol=ATOL)


# ------------------------------------------------------------------------------------------ heads


def _head_params(head_model, lm_params, tokens, seed=5):
  """Head-model params built from the LM params plus a random head (no second init compile)."""
  shapes = jax.eval_shape(lambda: nn.meta.unbox(
      head_model.init(jax.random.key(0), tokens, jnp.ones(tokens.shape, jnp.int32)))["params"])
  rng = np.random.default_rng(seed)
  head = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes["head"])
  params = with_backbone({"head": head}, lm_params)
  assert jax.tree.structure(params) == jax.tree.structure(shapes)  # LM tree drops in as backbone
  return params


def test_reward_model_reads_last_real_token(tiny):
  cfg, model, lm_params, tokens = tiny
  rm = RewardModel(cfg, num_outputs=2)
  params = _head_params(rm, lm_params, tokens)
  lengths = [5, 8]
  right, right_mask, left, left_mask = _left_and_right_padded(np.asarray(tokens), lengths)
  r_right = _apply_head(rm, params, right, right_mask)
  r_left = _apply_head(rm, params, left, left_mask)
  assert r_right.shape == (B, 2) and r_right.dtype == jnp.float32
  np.testing.assert_allclose(r_right, r_left, atol=ATOL)
  # Independent check: the head applied to the backbone's hidden state at the last real token.
  hidden = model.apply({"params": lm_params}, right, right_mask).hidden_BxTxD
  last = np.array(lengths) - 1
  manual = hidden[np.arange(B), last] @ params["head"]["kernel"] + params["head"]["bias"]
  np.testing.assert_allclose(r_right, manual, atol=1e-4)
  # Padding content after the last real token is irrelevant.
  junk = np.where(right_mask > 0, right, 7)
  np.testing.assert_allclose(_apply_head(rm, params, junk, right_mask), r_right, atol=ATOL)


def test_value_model_per_token(tiny):
  cfg, _, lm_params, tokens = tiny
  vm = ValueModel(cfg)
  params = _head_params(vm, lm_params, tokens)
  mask = jnp.ones((B, T), jnp.int32)
  values = _apply_head(vm, params, tokens, mask)
  assert values.shape == (B, T) and values.dtype == jnp.float32
  # Causal: the value at t does not see tokens after t.
  changed = tokens.at[:, 6].set((tokens[:, 6] + 1) % cfg.vocab_size)
  np.testing.assert_allclose(
      _apply_head(vm, params, changed, mask)[:, :6], values[:, :6], atol=ATOL)
  assert np.abs(values[:, 6:] - _apply_head(vm, params, changed, mask)[:, 6:]).max() > 1e-4


def test_head_models_init_layout():
  cfg = get_model_config("tiny", tie_embeddings=False)
  tokens = jnp.ones((1, 4), jnp.int32)
  rm = jax.eval_shape(lambda: nn.meta.unbox(RewardModel(cfg, 3).init(jax.random.key(0), tokens)))
  lm = jax.eval_shape(lambda: nn.meta.unbox(Transformer(cfg).init(jax.random.key(0), tokens)))
  assert set(rm["params"]) == {"backbone", "head"}
  assert rm["params"]["head"]["kernel"].shape == (cfg.d_model, 3)
  # The untied LM has an lm_head the reward model never uses; with_backbone drops it.
  assert "lm_head" in lm["params"] and "lm_head" not in rm["params"]["backbone"]
  merged = with_backbone(rm["params"], lm["params"])
  assert jax.tree.structure(merged) == jax.tree.structure(rm["params"])
  with pytest.raises(ValueError, match="num_outputs"):
    jax.eval_shape(lambda: RewardModel(cfg, 0).init(jax.random.key(0), tokens))


def test_public_names():
  for name in ("ModelConfig", "get_model_config", "Transformer", "TransformerOutput", "RewardModel",
               "ValueModel", "token_logprobs", "sequence_logprobs", "token_entropy", "KVCache",
               "response_logps", "response_token_logps"):
    assert hasattr(models, name)
  assert isinstance(get_model_config("small"), ModelConfig)


def test_materialize_cotangent_is_the_identity_in_both_branches():
  """Its backward's conditional picks a branch on whether the first cotangent entry is NaN; both
  branches must hand the cotangent back unchanged (the NaN then propagates as usual)."""
  from rlhf_jax.models.ops import materialize_cotangent
  x_2x3 = jnp.arange(6.0).reshape(2, 3)
  for g_2x3 in (jnp.linspace(-1.0, 1.0,
                             6).reshape(2, 3), jnp.array([[jnp.nan, 1.0, -2.0], [3.0, 4.0, 5.0]])):
    y, vjp = jax.vjp(materialize_cotangent, x_2x3)
    np.testing.assert_array_equal(y, x_2x3)
    np.testing.assert_array_equal(jax.jit(vjp)(g_2x3)[0], g_2x3)
