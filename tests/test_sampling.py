"""The jitted KV-cache sampler and its logit processors on the `tiny` preset (float32, CPU).

Every reference here is a full forward over a fixed [B, P + R] buffer (one compile), never the
sampler's own cache path.
"""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import Transformer, get_model_config, sequence_logprobs
from rlhf_jax.sampling import (SampleOutput, SamplingConfig, apply_top_k, apply_top_p,
                               process_logits, sample)

P, R = 6, 6
LENGTHS = (3, 6)  # real prompt tokens per row; row 0 is left-padded by 3


def random_params(model, seed=0, std=0.1):
  """Random params with the model's exact tree, drawn in NumPy (skips a slow init compile)."""
  shapes = jax.eval_shape(
      lambda: nn.meta.unbox(model.init(jax.random.key(0), jnp.ones((1, 2), jnp.int32)))["params"])
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return jnp.ones(s.shape, s.dtype)
    return jnp.asarray(rng.normal(size=s.shape) * std, s.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def setup():
  cfg = get_model_config("tiny")
  model = Transformer(cfg)
  params = random_params(model)
  rng = np.random.default_rng(1)
  prompts = np.zeros((len(LENGTHS), P), np.int32)
  mask = np.zeros((len(LENGTHS), P), np.int32)
  for b, n in enumerate(LENGTHS):
    prompts[b, P - n:] = rng.integers(3, cfg.vocab_size, size=n)
    mask[b, P - n:] = 1
  return model, params, jnp.asarray(prompts), jnp.asarray(mask)


@functools.partial(jax.jit, static_argnums=0)
def _logits(model, params, tokens, mask):
  return model.apply({"params": params}, tokens, mask).logits_BxTxV


def _next_token_logits(model, params, out: SampleOutput):
  """logits_BxRxV[:, t] = full-forward logits that predict response token t."""
  tokens, mask, _ = out.full_sequences()
  logits = _logits(model, params, tokens, mask)
  return logits[:, P - 1:P + R - 1].astype(jnp.float32)


def test_greedy_equals_argmax_loop_over_full_forwards(setup):
  model, params, prompts, mask = setup
  out = sample(model, params, prompts, mask, jax.random.key(0),
               SamplingConfig(max_new_tokens=R, greedy=True))
  # Reference: grow the sequence one argmax at a time with full forwards over a [B, P + R] buffer.
  tokens = np.concatenate([np.asarray(prompts), np.zeros((2, R), np.int32)], axis=1)
  full_mask = np.concatenate([np.asarray(mask), np.zeros((2, R), np.int32)], axis=1)
  ref_logps = np.zeros((2, R), np.float32)
  for t in range(R):
    logits = np.asarray(_logits(model, params, tokens, full_mask), np.float64)[:, P + t - 1]
    tokens[:, P + t] = logits.argmax(-1)
    full_mask[:, P + t] = 1
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ref_logps[:, t] = logits.max(-1) - log_z
  np.testing.assert_array_equal(out.response_tokens_BxR, tokens[:, P:])
  np.testing.assert_array_equal(out.response_mask_BxR, 1)
  np.testing.assert_array_equal(out.response_lengths_B, R)
  np.testing.assert_allclose(out.response_logps_BxR, ref_logps, atol=1e-5)
  np.testing.assert_array_equal(out.response_sampling_logps_BxR, 0.0)
  again = sample(model, params, prompts, mask, jax.random.key(9),
                 SamplingConfig(max_new_tokens=R, greedy=True))
  np.testing.assert_array_equal(again.response_tokens_BxR, out.response_tokens_BxR)


def test_stops_at_eos_and_stop_ids(setup):
  model, params, prompts, mask = setup
  greedy = sample(model, params, prompts, mask, jax.random.key(0),
                  SamplingConfig(max_new_tokens=R, greedy=True))
  free = np.asarray(greedy.response_tokens_BxR)
  eos, stop = int(free[0, 2]), int(free[1, 1])
  out = sample(
      model, params, prompts, mask, jax.random.key(0),
      SamplingConfig(max_new_tokens=R, greedy=True, eos_id=eos, stop_ids=(stop,), pad_id=258))
  tokens, resp_mask = np.asarray(out.response_tokens_BxR), np.asarray(out.response_mask_BxR)
  for b in range(2):
    hits = [t for t in range(R) if free[b, t] in (eos, stop)]
    end = hits[0] + 1  # the stop token itself is part of the response
    assert end <= 3
    np.testing.assert_array_equal(tokens[b, :end], free[b, :end])
    np.testing.assert_array_equal(resp_mask[b], [1] * end + [0] * (R - end))
    np.testing.assert_array_equal(tokens[b, end:], 258)
    np.testing.assert_array_equal(out.response_logps_BxR[b, end:], 0.0)
    assert out.response_lengths_B[b] == end
  assert out.response_tokens_BxR.shape == (2, R)


def test_sampling_respects_top_k_top_p_and_temperature(setup):
  model, params, prompts, mask = setup
  n = 3
  cfg = SamplingConfig(max_new_tokens=R, temperature=0.7, top_k=5, top_p=0.9, num_samples=n)
  out = sample(model, params, prompts, mask, jax.random.key(1), cfg)
  assert out.response_tokens_BxR.shape == (2 * n, R)
  # Prompt-major rows: row i * n + j continues prompt i.
  np.testing.assert_array_equal(out.prompt_tokens, np.repeat(prompts, n, axis=0))
  np.testing.assert_array_equal(out.prompt_mask, np.repeat(mask, n, axis=0))
  np.testing.assert_array_equal(out.response_lengths_B, R)

  logits_BxRxV = _next_token_logits(model, params, out)
  tokens = np.asarray(out.response_tokens_BxR)
  top5 = np.argsort(-np.asarray(logits_BxRxV), axis=-1)[..., :5]
  assert all(tokens[b, t] in top5[b, t] for b in range(2 * n) for t in range(R))
  # The processed (temperature -> top-k -> top-p) distribution, recomputed from full forwards.
  processed = process_logits(logits_BxRxV.reshape(-1, logits_BxRxV.shape[-1]), cfg)
  processed_logp = jax.nn.log_softmax(processed, -1).reshape(logits_BxRxV.shape)
  raw_logp = jax.nn.log_softmax(logits_BxRxV, -1)
  pick = lambda x: np.take_along_axis(np.asarray(x), tokens[..., None], -1)[..., 0]
  assert np.all(np.isfinite(pick(processed_logp)))  # never outside the nucleus
  np.testing.assert_allclose(out.response_sampling_logps_BxR, pick(processed_logp), atol=1e-4)
  np.testing.assert_allclose(out.response_logps_BxR, pick(raw_logp), atol=1e-5)
  # ... and the raw log-probs are what sequence_logprobs re-scores from the full sequences.
  full_tokens, full_mask, loss_mask = out.full_sequences()
  rescored = jax.jit(sequence_logprobs, static_argnums=0)(model, params, full_tokens, full_mask,
                                                          loss_mask)[:, P:]
  np.testing.assert_allclose(out.response_logps_BxR, rescored, atol=1e-5)

  # Deterministic for a fixed key, different for another key.
  again = sample(model, params, prompts, mask, jax.random.key(1), cfg)
  np.testing.assert_array_equal(again.response_tokens_BxR, out.response_tokens_BxR)
  other = sample(model, params, prompts, mask, jax.random.key(2), cfg)
  assert np.any(np.asarray(other.response_tokens_BxR) != tokens)


def test_top_k_one_equals_greedy(setup):
  model, params, prompts, mask = setup
  greedy = sample(model, params, prompts, mask, jax.random.key(0),
                  SamplingConfig(max_new_tokens=R, greedy=True))
  top1 = sample(model, params, prompts, mask, jax.random.key(3),
                SamplingConfig(max_new_tokens=R, top_k=1, temperature=2.0))
  np.testing.assert_array_equal(top1.response_tokens_BxR, greedy.response_tokens_BxR)
  np.testing.assert_allclose(top1.response_sampling_logps_BxR, 0.0, atol=1e-6)


def test_processors_on_hand_made_logits():
  probs = np.array([[0.5, 0.05, 0.3, 0.15]])
  logits = jnp.asarray(np.log(probs), jnp.float32)
  finite = lambda x: np.isfinite(np.asarray(x))[0].tolist()
  assert finite(apply_top_p(logits, 0.6)) == [True, False, True, False]
  assert finite(apply_top_p(logits, 0.85)) == [True, False, True, True]
  assert finite(apply_top_p(logits, 0.2)) == [True, False, False, False]
  assert finite(apply_top_p(logits, 1.0)) == [True, True, True, True]
  assert finite(apply_top_k(logits, 2)) == [True, False, True, False]
  assert finite(apply_top_k(logits, 0)) == [True, True, True, True]
  scaled = process_logits(logits, SamplingConfig(max_new_tokens=1, temperature=0.5))
  np.testing.assert_allclose(scaled, logits / 0.5, rtol=1e-6)


class TopPTest(chex.TestCase):
  """Top-p keeps the smallest prefix of the sorted tokens, also through a tie group."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_a_tie_group_at_the_boundary_is_cut(self):
    # (.4, .2, .2, .2), p = 0.5: the masses before each sorted token are 0, .4, .6, .8, so the .4
    # and the first .2 (lowest index) are kept. The old logit threshold kept all four.
    logits = jnp.log(jnp.asarray([[0.2, 0.4, 0.2, 0.2], [0.4, 0.2, 0.2, 0.2]], jnp.float32))
    got = self.variant(apply_top_p, static_argnums=1)(logits, 0.5)
    chex.assert_shape(got, (2, 4))
    np.testing.assert_array_equal(np.isfinite(np.asarray(got)),
                                  [[True, True, False, False], [True, True, False, False]])
    kept = np.isfinite(np.asarray(got))
    chex.assert_trees_all_close(np.asarray(got)[kept], np.asarray(logits)[kept])

  def test_matches_hugging_face_top_p_warper(self):
    import torch  # pylint: disable=import-outside-toplevel  (the peer baseline; installed)
    from transformers.generation import logits_process as warpers  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(16, 50)) * 2).astype(np.float32)
    ties = np.log(np.array([[0.4, 0.2, 0.2, 0.2]], np.float32))
    for p in (0.1, 0.5, 0.9, 0.99):
      hf = warpers.TopPLogitsWarper(top_p=p)(None, torch.from_numpy(logits)).numpy()
      ours = np.asarray(apply_top_p(jnp.asarray(logits), p))
      np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(hf))
      hf_ties = warpers.TopPLogitsWarper(top_p=0.5)(None, torch.from_numpy(ties)).numpy()
      assert np.isfinite(hf_ties).sum() == np.isfinite(np.asarray(apply_top_p(ties,
                                                                              0.5))).sum() == 2


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=4, temperature=0.0), "temperature"),
    (dict(max_new_tokens=4, top_k=-1), "top_k"),
    (dict(max_new_tokens=4, top_p=0.0), "top_p"),
    (dict(max_new_tokens=4, num_samples=0), "num_samples"),
    (dict(max_new_tokens=4, eos_id=-2), "eos_id"),
    (dict(max_new_tokens=4, stop_ids=[-1]), "stop_ids"),])
def test_bad_sampling_config_names_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    SamplingConfig(**kwargs)


def test_sampling_config_is_hashable():
  cfg = SamplingConfig(max_new_tokens=4, stop_ids=[5, 6])
  assert cfg.stop_ids == (5, 6) and hash(cfg) == hash(
      SamplingConfig(max_new_tokens=4, stop_ids=(5, 6)))


def test_input_validation(setup):
  model, params, prompts, mask = setup
  right_padded = jnp.asarray(np.fliplr(np.asarray(mask)))
  with pytest.raises(ValueError, match="left-padded"):
    sample(model, params, prompts, right_padded, jax.random.key(0),
           SamplingConfig(max_new_tokens=2))
  learned = Transformer(get_model_config("tiny", position="learned", max_seq_len=8))
  with pytest.raises(ValueError, match="max_seq_len"):
    sample(learned, params, prompts, mask, jax.random.key(0), SamplingConfig(max_new_tokens=3))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_decode_loop_updates_cache_in_place(setup, scan_layers):
  """The compiled sampler never copies the cache (a copy per step would make decoding memory-bound
  on the cache instead of the weights): no copy of the stacked [L, B, K, S, H] buffers or of a
  layer's [B, K, S, H] buffer, no transposed layer (the old [L, B, S, K, H] layout made XLA transpose
  every layer's keys and values each step) and, for the unrolled stack, no slice of a stacked buffer
  (it carries per-layer buffers). Checked on the optimised HLO text."""
  from rlhf_jax.sampling.sampler import _sample_jit
  model, _, prompts, mask = setup
  model = Transformer(model.config.replace(scan_layers=scan_layers))
  cfg = model.config
  abstract = jax.eval_shape(
      lambda: nn.meta.unbox(model.init(jax.random.key(0), jnp.ones((1, 2), jnp.int32))))
  hlo = _sample_jit.lower(model, SamplingConfig(max_new_tokens=R), abstract, prompts, mask,
                          jax.random.key(0)).compile().as_text()
  layer_dims = f"2,{cfg.num_kv_heads},{P + R},{cfg.head_size}]"
  stacked_shape, layer_shape = f"f32[{cfg.n_layers},{layer_dims}", f"f32[{layer_dims}"
  assert hlo.count(stacked_shape if scan_layers else layer_shape) > 0
  lines = hlo.splitlines()
  copies = [l for l in lines if (stacked_shape in l or layer_shape in l) and " copy(" in l]
  assert not copies, copies[:3]
  transposed = [l for l in lines if f"= {layer_shape}" in l and " transpose(" in l]
  assert not transposed, transposed[:3]
  if not scan_layers:
    slices = [l for l in lines if f"= f32[1,{layer_dims}" in l and " slice(" in l]
    assert not slices, slices[:3]


def test_bfloat16_model_samples_and_scores(setup):
  """bf16 activations: the sampler runs and its raw log-probs agree with the float32 model."""
  model, params, prompts, mask = setup
  bf16 = Transformer(model.config.replace(dtype="bfloat16"))
  out = sample(bf16, params, prompts, mask, jax.random.key(0),
               SamplingConfig(max_new_tokens=R, greedy=True))
  assert out.response_logps_BxR.dtype == jnp.float32
  tokens, full_mask, loss_mask = out.full_sequences()
  ref = jax.jit(sequence_logprobs, static_argnums=0)(model, params, tokens, full_mask, loss_mask)
  np.testing.assert_allclose(out.response_logps_BxR, ref[:, P:], atol=0.1)
