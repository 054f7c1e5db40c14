"""Reference-free pairwise preference losses on length-normalised log-probs: SimPO and ORPO.

Both take the *average* per-token log-prob of each completion, a = (1/|y|) Σ_t log π(y_t | x, y_<t)
(``token_logps.sum(-1) / mask.sum(-1)``), and need no reference model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses._common import (as_float, check_rank, check_same_shape, compute_dtype,
                                     is_concrete)

# log(1 - e^a) diverges at a = 0; average log-probs are clamped to at most this value first.
_ORPO_MAX_AVG_LOGP = -1e-7


def simpo_loss(chosen_avg_logps, rejected_avg_logps, *, beta, gamma, label_smoothing: float = 0.0):
  """SimPO (Meng, Xia & Chen, 2024, arXiv:2405.14734, Eq. 6):

        ℓ_b = -(1-ε) log σ(β (a_c - a_r) - γ) - ε log σ(-(β (a_c - a_r) - γ))

    β scales the length-normalised implicit reward β·a, γ is the target reward margin (the paper
    tunes β ∈ [2, 10], γ ∈ [0.3, 1.6]; the authors' code parameterises γ/β, the same loss).
    ε (label smoothing, default 0) is the cDPO-style smoothing the authors' trainer also offers.

    Returns ``(per_example_loss [B], metrics)`` with ``rewards/chosen`` = mean β a_c, etc.
    """
  check_rank("chosen_avg_logps", chosen_avg_logps, 1)
  check_same_shape(chosen_avg_logps=chosen_avg_logps, rejected_avg_logps=rejected_avg_logps)
  if is_concrete(label_smoothing) and not 0.0 <= label_smoothing < 0.5:
    raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
  dtype = compute_dtype(chosen_avg_logps, rejected_avg_logps)
  a_c = as_float(chosen_avg_logps, dtype)
  a_r = as_float(rejected_avg_logps, dtype)
  logits_B = beta * (a_c - a_r) - gamma
  per_example_B = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits_B) - (
      label_smoothing * jax.nn.log_sigmoid(-logits_B))
  chosen_rewards = jax.lax.stop_gradient(beta * a_c)
  rejected_rewards = jax.lax.stop_gradient(beta * a_r)
  metrics = {
      "loss": jnp.mean(per_example_B),
      "rewards/chosen": jnp.mean(chosen_rewards),
      "rewards/rejected": jnp.mean(rejected_rewards),
      "rewards/margins": jnp.mean(chosen_rewards - rejected_rewards),
      "rewards/accuracies": jnp.mean((chosen_rewards > rejected_rewards).astype(dtype)),}
  return per_example_B, metrics


def log1mexp(a):
  """log(1 - e^a) for a < 0, accurate everywhere (Mächler, 2012): log(-expm1(a)) near 0,
    log1p(-exp(a)) for a < -log 2."""
  return jnp.where(
      a > -jnp.log(2.0),
      jnp.log(-jnp.expm1(jnp.minimum(a, _ORPO_MAX_AVG_LOGP))),
      jnp.log1p(-jnp.exp(jnp.minimum(a, -jnp.log(2.0)))),
  )


def orpo_loss(chosen_avg_logps, rejected_avg_logps, *, lam, include_nll: bool = True):
  """ORPO (Hong, Lee & Thorne, 2024, arXiv:2403.07691, Eqs. 6–7):

        odds(y)   = P(y|x) / (1 - P(y|x)),  with P(y|x) = exp(a) the length-normalised likelihood
        log odds  = a - log(1 - e^a)
        L_OR      = -log σ(log odds(y_c) - log odds(y_r))
        ℓ_b       = -a_c + λ · L_OR        (the SFT term -a_c is dropped with include_nll=False)

    The SFT term here is each chosen completion's per-token mean NLL; TRL's ORPO averages the NLL
    over all chosen tokens of the batch instead (the two differ only when lengths differ). The
    paper uses λ = 0.1 (TRL's ``beta``). Average log-probs are clamped to ≤ -1e-7 so that log odds
    stays finite.

    Returns ``(per_example_loss [B], metrics)``: ``nll``, ``or_loss``, ``log_odds_ratio``,
    ``log_odds_chosen`` (TRL's name for the mean log odds ratio), ``rewards/*`` = λ·a as in TRL.
    """
  check_rank("chosen_avg_logps", chosen_avg_logps, 1)
  check_same_shape(chosen_avg_logps=chosen_avg_logps, rejected_avg_logps=rejected_avg_logps)
  dtype = compute_dtype(chosen_avg_logps, rejected_avg_logps)
  a_c = jnp.minimum(as_float(chosen_avg_logps, dtype), _ORPO_MAX_AVG_LOGP)
  a_r = jnp.minimum(as_float(rejected_avg_logps, dtype), _ORPO_MAX_AVG_LOGP)
  log_odds_ratio_B = (a_c - log1mexp(a_c)) - (a_r - log1mexp(a_r))
  or_loss_B = -jax.nn.log_sigmoid(log_odds_ratio_B)
  nll_B = -a_c
  per_example_B = lam * or_loss_B + (nll_B if include_nll else 0.0)
  chosen_rewards = jax.lax.stop_gradient(lam * a_c)
  rejected_rewards = jax.lax.stop_gradient(lam * a_r)
  metrics = {
      "loss": jnp.mean(per_example_B),
      "nll": jnp.mean(nll_B),
      "or_loss": jnp.mean(or_loss_B),
      "log_odds_ratio": jnp.mean(jax.nn.log_sigmoid(log_odds_ratio_B)),
      "log_odds_chosen": jnp.mean(log_odds_ratio_B),
      "rewards/chosen": jnp.mean(chosen_rewards),
      "rewards/rejected": jnp.mean(rejected_rewards),
      "rewards/margins": jnp.mean(chosen_rewards - rejected_rewards),
      "rewards/accuracies": jnp.mean((chosen_rewards > rejected_rewards).astype(dtype)),}
  return per_example_B, metrics
