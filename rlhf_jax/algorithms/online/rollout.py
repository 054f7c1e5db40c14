"""Rollouts for online RL: frozen models, per-phase jitted functions, shaped rewards and advantages.

An iteration's experience is a :class:`Rollout` (a NamedTuple of arrays, purejaxrl style). With
``P`` prompt columns (left-padded) and ``R`` response columns (right-padded) the full sequences are
``tokens_BxT``, ``T = P + R``; every per-token quantity is response-aligned ``[B, R]``:

    logps_BxR[:, r]  = log π(y_r | x, y_<r)             from logits[:, P-1+r] / temperature
    values_BxR[:, r] = V(x, y_<r)                       the state the action y_r is taken in
                                                        (ValueModel output at column P-1+r)

Phases (each one jitted function, timed by the trainer at its boundary):

1. generation — ``sampling.sample`` (KV cache) → tokens, masks.
2. scoring — the reward model on ``[BOS] prompt response`` (its last real token is the response's
   last token, EOS included), normalised with its stored statistics; responses without EOS lose
   ``missing_eos_penalty``.
3. reference / old log-probs / values — three forwards over the full sequences.
4. advantages (:func:`compute_advantages`):
   - ``ppo``:  r_t = -β KL_t + [t = last] · score (``losses.kl_penalized_rewards``),
     A, R = GAE(r, V) (``losses.gae``), A whitened over the batch (``losses.masked_whiten``;
     ``whiten_advantages`` defaults per algorithm: on for ``ppo`` only).
   - ``rloo``: r = score - β Σ_t KL_t per sequence, A_i = r_i - mean_{j≠i} r_j in its group.
   - ``grpo``: A_i = (s_i - mean(s)) / (std(s) + 1e-4) per group; β · k3 is a loss term instead.
   - ``dr_grpo``: A_i = s_i - mean(s).
   - ``reinforce_baseline``: R_i,t = Σ_{t'≥t} -β KL_t' + (s_i - mean(s)), A = whiten(R) over the
     batch's tokens (``losses.reinforce_baseline_advantages``, OpenRLHF).
   With ``overlong_buffer_len`` > 0, DAPO's soft overlong penalty is added to s first.

Sharding: every builder takes an optional :class:`Placement` (mesh + logical rules). With one, the
phase is jitted with explicit in/out shardings: params per the rules table (``parallel``), rollout
rows split over the batch axes (``data``, ``fsdp``), scalars replicated; and it is traced and called
inside ``parallel.use_mesh`` so the model's activation constraints apply. Outputs therefore carry
exactly the shardings the next phase (and the next iteration) expects, and each phase compiles once.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax import losses, models, sampling, scoring
from rlhf_jax.parallel import Placement
from rlhf_jax.algorithms.online.config import PPOConfig
from rlhf_jax.models import lora as lora_lib


class Rollout(NamedTuple):
  """One iteration's experience; leading axis N = prompts × samples (prompt-major)."""

  tokens_BxT: jax.Array  # [BOS] prompt (left-padded) | response (right-padded)
  mask_BxT: jax.Array  # 1 on real tokens
  response_mask_BxR: jax.Array  # 1 on response tokens (EOS included)
  old_logps_BxR: jax.Array  # policy log-probs at sampling time (float32)
  ref_logps_BxR: jax.Array  # reference log-probs (float32)
  old_values_BxR: jax.Array  # V at sampling time (zeros without a critic)
  advantages_BxR: jax.Array  # per token ([B] advantages broadcast for the critic-free algorithms)
  returns_BxR: jax.Array  # value targets (zeros without a critic)


def response_values(value_model: models.ValueModel, params: Any, tokens_BxT: jax.Array,
                    mask_BxT: jax.Array, prompt_len: int) -> jax.Array:
  """``V(x, y_<r)`` for every response position r: ValueModel columns ``P-1 .. T-2`` → ``[B, R]``."""
  values_BxT = value_model.apply({"params": params}, tokens_BxT, mask_BxT)
  return values_BxT[:, prompt_len - 1:-1].astype(jnp.float32)


@functools.lru_cache(maxsize=16)
def make_generate_fn(policy: models.Transformer, config: sampling.SamplingConfig,
                     placement: Placement | None = None):
  """Jitted ``(policy_params, prompt_tokens_BxP, prompt_mask_BxP, rng) -> (tokens_BxT, mask_BxT,
  response_mask_BxR)``: ``sampling.sample`` with key ``fold_in(rng, 1)`` (the update splits ``rng``
  itself, so the two streams are disjoint), as full ``[BOS] prompt | response`` sequences."""

  def generate(params, prompt_tokens_BxP, prompt_mask_BxP, rng):
    out = sampling.sample(policy, params, prompt_tokens_BxP, prompt_mask_BxP,
                          jax.random.fold_in(rng, 1), config)
    tokens_BxT, mask_BxT, _ = out.full_sequences()
    return tokens_BxT, mask_BxT, out.response_mask_BxR

  if placement is None:
    return jax.jit(generate)
  p = placement
  return p.jit(generate, (p.params(policy), p.rows, p.rows, p.replicated), p.rows)


@functools.lru_cache(maxsize=16)
def make_score_fn(reward_model: models.RewardModel, *, eos_id: int, missing_eos_penalty: float,
                  attribute_weights: tuple[float, ...] | None = None,
                  placement: Placement | None = None):
  """Jitted ``(rm_params, mean_K, std_K, tokens_BxT, mask_BxT, response_mask_BxR) -> (scores_B, rm_B)``.

  ``rm_B`` = Σ_k w_k (r_φ,k(x, y) - μ_k) / σ_k, computed by ``scoring.rewards_from_raw`` — the
  normalisation and attribute reduction every other method applies — on the response as sampled
  (EOS iff emitted). ``attribute_weights`` is the handle's resolved w
  (``RewardModelHandle.attribute_weights``); None is allowed for a single-output RM only.
  ``scores_B`` is ``rm_B`` minus ``missing_eos_penalty`` for responses that never emitted EOS
  (TRL's ``missing_eos_penalty``). Cached per (model, settings), so repeated runs in one process
  reuse the compiled function.
  """
  k = reward_model.num_outputs
  if attribute_weights is None and k == 1:
    attribute_weights = (1.0,)
  if attribute_weights is None or len(attribute_weights) != k:
    raise ValueError(f"make_score_fn: the reward model has K={k} outputs and attribute_weights="
                     f"{attribute_weights!r}; allowed: K weights (config.sources.attribute_weights,"
                     " resolved by scoring.load_reward_model)")
  weights_K = tuple(float(w) for w in attribute_weights)

  def score_fn(rm_params, mean_K, std_K, tokens_BxT, mask_BxT, response_mask_BxR):
    raw_BxK = reward_model.apply({"params": rm_params}, tokens_BxT, mask_BxT)
    rm_B = scoring.rewards_from_raw(raw_BxK, mean_K, std_K, jnp.asarray(weights_K, jnp.float32))
    if not missing_eos_penalty:
      return rm_B, rm_B
    r = response_mask_BxR.shape[1]
    has_eos_B = jnp.any((tokens_BxT[:, -r:] == eos_id) & (response_mask_BxR > 0), axis=1)
    return jnp.where(has_eos_B, rm_B, rm_B - missing_eos_penalty), rm_B

  if placement is None:
    return jax.jit(score_fn)
  p = placement
  return p.jit(score_fn,
               (p.params(reward_model), p.replicated, p.replicated, p.rows, p.rows, p.rows), p.rows)


@functools.lru_cache(maxsize=16)
def make_logprob_fn(policy: models.Transformer, value_model: models.ValueModel | None,
                    prompt_len: int, temperature: float, placement: Placement | None = None):
  """Jitted ``(policy_params, ref_params, value_params, tokens, mask) -> (old_logps, ref_logps,
  old_values, entropy)``, all ``[B, R]`` float32 (values are zeros without a critic). The
  reference shares the policy's architecture (``ppo_models.check_compatible``)."""

  def logprob_fn(policy_params, ref_params, value_params, tokens_BxT, mask_BxT):
    old_BxR, ent_BxR = models.response_token_logps(policy, policy_params, tokens_BxT, mask_BxT,
                                                   prompt_len, temperature=temperature,
                                                   with_entropy=True)
    ref_BxR, _ = models.response_token_logps(policy, ref_params, tokens_BxT, mask_BxT, prompt_len,
                                             temperature=temperature)
    if value_model is None:
      values_BxR = jnp.zeros_like(old_BxR)
    else:
      values_BxR = response_values(value_model, value_params, tokens_BxT, mask_BxT, prompt_len)
    return old_BxR, ref_BxR, values_BxR, ent_BxR

  if placement is None:
    return jax.jit(logprob_fn)
  p = placement
  value_shardings = p.params(value_model) if value_model is not None else None
  # The reference is the base model (a LoRA policy's base, with its adapters off).
  ref_shardings = p.params(lora_lib.unwrap(policy))
  return p.jit(logprob_fn, (p.params(policy), ref_shardings, value_shardings, p.rows, p.rows),
               p.rows)


def _masked_var(x_BxR, mask_BxR):
  n = jnp.maximum(jnp.sum(mask_BxR), 1.0)
  mean = jnp.sum(jnp.where(mask_BxR > 0, x_BxR, 0.0)) / n
  return jnp.sum(jnp.where(mask_BxR > 0, (x_BxR - mean)**2, 0.0)) / n


def compute_advantages(config: PPOConfig, scores_B, old_logps_BxR, ref_logps_BxR, values_BxR,
                       response_mask_BxR, kl_coef):
  """``(advantages_BxR, returns_BxR, metrics)`` for ``config.algorithm`` (module docstring).

  Metrics: ``kl`` (mean per-sequence Σ_t k-estimate of KL(π‖π_ref)), ``non_score_reward``
  (mean -β Σ KL), ``rlhf_reward`` (score + non-score reward), ``explained_variance`` of the
  old values w.r.t. the returns (PPO only). Pure and jit-able (β may be traced).
  """
  mask = response_mask_BxR.astype(jnp.float32)
  metrics = {}
  if config.overlong_buffer_len:
    penalty_B = losses.overlong_penalty(jnp.sum(mask, axis=1), max_new_tokens=mask.shape[1],
                                        buffer_len=config.overlong_buffer_len,
                                        penalty_factor=config.overlong_penalty_factor)
    scores_B = scores_B + penalty_B
    metrics["overlong_penalty"] = jnp.mean(penalty_B)
  if config.algorithm == "reinforce_baseline":
    kl_BxR = losses.kl_estimate(old_logps_BxR, ref_logps_BxR, estimator=config.kl_estimator,
                                mask=mask)
    kl_B = jnp.sum(kl_BxR, axis=1)
    metrics.update(kl=jnp.mean(kl_B), non_score_reward=-kl_coef * jnp.mean(kl_B),
                   rlhf_reward=jnp.mean(scores_B - kl_coef * kl_B))
    g = config.num_samples
    adv_BxGxR = losses.reinforce_baseline_advantages(scores_B.reshape(-1, g),
                                                     kl_BxR.reshape(-1, g, kl_BxR.shape[1]),
                                                     mask.reshape(-1, g, mask.shape[1]),
                                                     kl_coef=kl_coef)
    advantages_BxR = adv_BxGxR.reshape(mask.shape)
    returns_BxR = jnp.zeros_like(advantages_BxR)
  elif config.algorithm == "ppo":
    rewards_BxR, kl_metrics = losses.kl_penalized_rewards(scores_B, old_logps_BxR, ref_logps_BxR,
                                                          mask, kl_coef=kl_coef,
                                                          estimator=config.kl_estimator)
    metrics.update(kl=kl_metrics["kl"], non_score_reward=kl_metrics["non_score_reward"])
    if config.whiten_rewards:
      rewards_BxR = losses.masked_whiten(rewards_BxR, mask, shift_mean=False)
    advantages_BxR, returns_BxR = losses.gae(rewards_BxR, values_BxR, mask, gamma=config.gamma,
                                             lam=config.lam)
    metrics["explained_variance"] = 1.0 - (_masked_var(returns_BxR - values_BxR, mask) /
                                           jnp.maximum(_masked_var(returns_BxR, mask), 1e-8))
    metrics["rlhf_reward"] = jnp.mean(scores_B) + kl_metrics["non_score_reward"]
  else:
    kl_B = jnp.sum(
        losses.kl_estimate(old_logps_BxR, ref_logps_BxR, estimator=config.kl_estimator, mask=mask),
        axis=1)
    metrics["kl"] = jnp.mean(kl_B)
    group = (-1, config.num_samples)
    if config.algorithm == "rloo":
      seq_rewards_B = scores_B - kl_coef * kl_B
      metrics["non_score_reward"] = -kl_coef * metrics["kl"]
      adv_B = losses.rloo_advantages(seq_rewards_B.reshape(group)).reshape(-1)
    else:
      seq_rewards_B = scores_B
      metrics["non_score_reward"] = jnp.zeros(())
      adv_fn = losses.grpo_advantages if config.algorithm == "grpo" else losses.dr_grpo_advantages
      adv_B = adv_fn(seq_rewards_B.reshape(group)).reshape(-1)
    metrics["rlhf_reward"] = jnp.mean(seq_rewards_B)
    advantages_BxR = jnp.where(mask > 0, adv_B[:, None], 0.0)
    returns_BxR = jnp.zeros_like(advantages_BxR)
  if config.whitens_advantages:
    advantages_BxR = losses.masked_whiten(advantages_BxR, mask)
  return advantages_BxR, returns_BxR, metrics


@functools.lru_cache(maxsize=16)
def make_advantage_fn(config: PPOConfig, placement: Placement | None = None):
  """Jitted ``(scores_B, old_logps, ref_logps, values, response_mask, kl_coef) -> (advantages,
  returns, metrics)`` (:func:`compute_advantages`)."""
  fn = functools.partial(compute_advantages, config)
  if placement is None:
    return jax.jit(fn)
  p = placement
  return p.jit(fn, (p.rows,) * 5 + (p.replicated,), (p.rows, p.rows, p.replicated))
