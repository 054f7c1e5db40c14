"""Jitted autoregressive sampler over the model's KV cache.

  out = sample(model, params, prompt_tokens_BxP, prompt_mask_BxP, rng, SamplingConfig(...))

Algorithm (one `jax.jit` per (model, config, shapes)):
  1. Repeat each left-padded prompt `num_samples` times (prompt-major rows, i * num_samples + j).
  2. Prefill: one forward over the prompts into an empty cache of P + R slots; keep the logits of
     the last column (the last real prompt token, since prompts are left-padded).
  3. `lax.while_loop` over at most R steps, exiting early once every row has stopped. Each step
     samples one token per row from the processed distribution, records it with both log-probs,
     marks rows that emitted a stop id as done, and feeds the tokens through the model (T = 1) to
     get the next logits. Rows that are done emit `pad_id` with response_mask 0.

Step s draws with `fold_in(rng, s)`, so a fixed key gives a fixed output.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.models.kv_cache import KVCache, init_cache, split_layers
from rlhf_jax.models.logprobs import as_variables
from rlhf_jax.sampling.config import SamplingConfig
from rlhf_jax.sampling.processors import process_logits


class SampleOutput(NamedTuple):
  """Sampler output; every array has B * num_samples rows (prompt-major).

  response_logps_BxR: log p_model(y_t | x, y_<t) under the RAW model (temperature 1, no top-k /
    top-p), i.e. what `sequence_logprobs` recomputes (up to the cached-vs-full forward rounding);
    this is the "old log-prob" PPO and the KL penalty need. 0 where response_mask is 0.
  response_sampling_logps_BxR: log-prob of y_t under the PROCESSED distribution the token was drawn
    from (temperature, top-k, top-p; 0 under greedy decoding). 0 where response_mask is 0.
  """

  prompt_tokens: jax.Array  # [B, P] left-padded
  prompt_mask: jax.Array  # [B, P]
  response_tokens_BxR: jax.Array  # pad_id after the stop token
  response_mask_BxR: jax.Array  # int32, 1 up to and including the stop token
  response_lengths_B: jax.Array  # int32, sum of response_mask
  response_logps_BxR: jax.Array  # float32, raw model
  response_sampling_logps_BxR: jax.Array  # float32, processed distribution

  def full_sequences(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(tokens, mask, loss_mask) [B, P + R]: prompt then response, loss_mask = response tokens.

    The rows are left-padded (prompt) and right-padded (response) at once; the model's mask-derived
    positions handle that, so `sequence_logprobs(model, params, tokens, mask, loss_mask)[:, P:]`
    re-scores exactly the sampled tokens.
    """
    tokens = jnp.concatenate([self.prompt_tokens, self.response_tokens_BxR], axis=1)
    mask = jnp.concatenate([self.prompt_mask, self.response_mask_BxR], axis=1)
    loss_mask = jnp.concatenate([jnp.zeros_like(self.prompt_mask), self.response_mask_BxR], axis=1)
    return tokens, mask, loss_mask


class _LoopState(NamedTuple):
  step: jax.Array
  cache: KVCache
  logits_BxV: jax.Array
  tokens_BxR: jax.Array
  mask_BxR: jax.Array
  logps_BxR: jax.Array
  sampling_logps_BxR: jax.Array
  done_B: jax.Array


def _gather(x_BxV: jax.Array, idx_B: jax.Array) -> jax.Array:
  return jnp.take_along_axis(x_BxV, idx_B[:, None], axis=-1)[:, 0]


def _pick(logits_BxV: jax.Array, key: jax.Array, config: SamplingConfig):
  """Returns (tokens_B, raw_logps_B, sampling_logps_B)."""
  logits_BxV = logits_BxV.astype(jnp.float32)
  raw_logp_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)
  if config.greedy:
    tok_B = jnp.argmax(logits_BxV, axis=-1)
    return tok_B, _gather(raw_logp_BxV, tok_B), jnp.zeros(tok_B.shape, jnp.float32)
  processed_BxV = process_logits(logits_BxV, config)
  tok_B = jax.random.categorical(key, processed_BxV, axis=-1)
  sampling_logp_B = _gather(jax.nn.log_softmax(processed_BxV, axis=-1), tok_B)
  return tok_B, _gather(raw_logp_BxV, tok_B), sampling_logp_B


@functools.partial(jax.jit, static_argnums=(0, 1))
def _sample_jit(model: Any, config: SamplingConfig, variables: Any, prompt_tokens_BxP: jax.Array,
                prompt_mask_BxP: jax.Array, rng: jax.Array) -> SampleOutput:
  n, r = config.num_samples, config.max_new_tokens
  prompt_tokens_BxP = jnp.repeat(prompt_tokens_BxP, n, axis=0)
  prompt_mask_BxP = jnp.repeat(prompt_mask_BxP.astype(jnp.int32), n, axis=0)
  b, p = prompt_tokens_BxP.shape

  cache = init_cache(model.config, b, p + r)
  if not model.config.scan_layers:
    cache = split_layers(cache)  # per-layer buffers: read in place, never sliced (see kv_cache.py)
  prefill = model.apply(variables, prompt_tokens_BxP, prompt_mask_BxP, cache=cache, prefill=True,
                        last_logits_only=True)
  stop_ids = jnp.asarray(config.all_stop_ids or (-1,), jnp.int32)

  def cond(s: _LoopState) -> jax.Array:
    return (s.step < r) & ~jnp.all(s.done_B)

  def body(s: _LoopState) -> _LoopState:
    tok_B, logp_B, sampling_logp_B = _pick(s.logits_BxV, jax.random.fold_in(rng, s.step), config)
    active_B = ~s.done_B
    tok_B = jnp.where(active_B, tok_B, config.pad_id).astype(jnp.int32)
    done_B = s.done_B | (active_B & jnp.any(tok_B[:, None] == stop_ids[None, :], axis=-1))
    # Finished rows feed padding (mask 0): it never becomes a key for their own later queries.
    out = model.apply(variables, tok_B[:, None], active_B[:, None].astype(jnp.int32), cache=s.cache)
    col = lambda buf, v: jax.lax.dynamic_update_slice(buf, v[:, None].astype(buf.dtype),
                                                      (0, s.step))
    return _LoopState(
        step=s.step + 1, cache=out.cache, logits_BxV=out.logits_BxTxV[:, -1],
        tokens_BxR=col(s.tokens_BxR, tok_B), mask_BxR=col(s.mask_BxR, active_B),
        logps_BxR=col(s.logps_BxR, jnp.where(active_B, logp_B, 0.0)),
        sampling_logps_BxR=col(s.sampling_logps_BxR, jnp.where(active_B, sampling_logp_B,
                                                               0.0)), done_B=done_B)

  init = _LoopState(step=jnp.zeros((), jnp.int32), cache=prefill.cache,
                    logits_BxV=prefill.logits_BxTxV[:, -1], tokens_BxR=jnp.full(
                        (b, r), config.pad_id, jnp.int32), mask_BxR=jnp.zeros((b, r), jnp.int32),
                    logps_BxR=jnp.zeros((b, r), jnp.float32), sampling_logps_BxR=jnp.zeros(
                        (b, r), jnp.float32), done_B=jnp.zeros((b,), bool))
  final = jax.lax.while_loop(cond, body, init)
  return SampleOutput(prompt_tokens=prompt_tokens_BxP, prompt_mask=prompt_mask_BxP,
                      response_tokens_BxR=final.tokens_BxR, response_mask_BxR=final.mask_BxR,
                      response_lengths_B=jnp.sum(final.mask_BxR,
                                                 axis=1), response_logps_BxR=final.logps_BxR,
                      response_sampling_logps_BxR=final.sampling_logps_BxR)


def sample(model: Any, params: Any, prompt_tokens_BxP: jax.Array, prompt_mask_BxP: jax.Array,
           rng: jax.Array, config: SamplingConfig) -> SampleOutput:
  """Samples `config.max_new_tokens` tokens after each left-padded prompt.

  Args:
    model: a `rlhf_jax.models.Transformer` (hashable; part of the jit cache key with `config`).
    params: its param tree (boxed or unboxed) or `{"params": tree}`.
    prompt_tokens_BxP: int prompts, LEFT-padded (every row's last column is a real token).
    prompt_mask_BxP: 1 for real prompt tokens, 0 for padding.
    rng: a PRNG key; the same key gives the same samples.
    config: `SamplingConfig` (static).
  Returns:
    `SampleOutput` with B * num_samples rows (see its docstring for the two log-prob fields).
  """
  prompt_tokens_BxP = jnp.asarray(prompt_tokens_BxP)
  prompt_mask_BxP = jnp.asarray(prompt_mask_BxP)
  if prompt_tokens_BxP.ndim != 2 or prompt_tokens_BxP.shape != prompt_mask_BxP.shape:
    raise ValueError(f"prompt_tokens {prompt_tokens_BxP.shape} and prompt_mask "
                     f"{prompt_mask_BxP.shape} must both be [B, P]")
  model_cfg = model.config
  total = prompt_tokens_BxP.shape[1] + config.max_new_tokens
  if model_cfg.position == "learned" and total > model_cfg.max_seq_len:
    raise ValueError(f"prompt length {prompt_tokens_BxP.shape[1]} + max_new_tokens "
                     f"{config.max_new_tokens} exceeds ModelConfig.max_seq_len="
                     f"{model_cfg.max_seq_len} (learned position table)")
  if not isinstance(prompt_mask_BxP, jax.core.Tracer):
    last_col_real = bool(jnp.all(prompt_mask_BxP[:, -1] > 0))
    if not last_col_real:
      raise ValueError("prompts must be left-padded: prompt_mask[:, -1] must be 1 for every row")
  return _sample_jit(model, config, as_variables(params), prompt_tokens_BxP, prompt_mask_BxP, rng)
