"""Reward-model objectives: pairwise, all-pairs over a K-way ranking, Likert and multi-attribute.

The listwise Plackett–Luce objective lives in ``listwise.py`` next to PRO, which generalises it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses._common import (
    as_float,
    as_mask,
    check_rank,
    check_same_shape,
    compute_dtype,
    masked_mean,
)


def _pair_metrics(chosen_B, rejected_B, per_example_B):
  return {
      "loss": jnp.mean(per_example_B),
      "accuracy": jnp.mean((chosen_B > rejected_B).astype(chosen_B.dtype)),
      "reward_margin": jnp.mean(chosen_B - rejected_B),
      "rewards_chosen": jnp.mean(chosen_B),
      "rewards_rejected": jnp.mean(rejected_B),}


def bradley_terry_loss(chosen_rewards, rejected_rewards, *, margin=None, center_coef: float = 0.0,
                       preference_prob=None):
  """Pairwise Bradley–Terry reward-model loss, with an optional margin and reward centering.

        ℓ_b = -log σ(r_c - r_r - m_b) + η (r_c + r_r)²

    - Bradley & Terry (1952); as the RLHF reward loss: Christiano et al., 2017, arXiv:1706.03741;
      Stiennon et al., 2020, arXiv:2009.01325.
    - ``margin`` m (scalar or ``[B]``, e.g. from the annotators' preference strength): Touvron et
      al., 2023 (Llama 2), arXiv:2307.09288, Eq. 2. ``None`` means m = 0.
    - ``center_coef`` η: auxiliary loss that pins the reward's mean to zero (Eisenstein et al., 2023,
      arXiv:2312.09244; TRL's ``center_rewards_coefficient``, recommended 0.01).

    - ``preference_prob`` p (``[B]`` in [0, 1], the probability that chosen ≻ rejected, e.g. an AI
      evaluator's soft label; distilled RLAIF, Lee et al., 2023, arXiv:2309.00267, §2.2.1): the
      cross-entropy against the soft target,

        ℓ_b = -p_b log σ(Δ_b) - (1 - p_b) log σ(-Δ_b),     Δ_b = r_c - r_r - m_b,

      whose gradient is ∂ℓ/∂Δ = σ(Δ) - p (minimised at σ(Δ) = p, the evaluator's probability).
      At p = 1 it is the hard loss; ``None`` is the hard loss itself.

    Inputs ``[B]``. Returns ``(per_example_loss [B], metrics)``.
    """
  check_rank("chosen_rewards", chosen_rewards, 1)
  check_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
  if center_coef < 0:
    raise ValueError(f"center_coef must be >= 0, got {center_coef}")
  dtype = compute_dtype(chosen_rewards, rejected_rewards, margin)
  chosen_B = as_float(chosen_rewards, dtype)
  rejected_B = as_float(rejected_rewards, dtype)
  logits_B = chosen_B - rejected_B
  if margin is not None:
    logits_B = logits_B - as_float(margin, dtype)
  if preference_prob is None:
    per_example_B = -jax.nn.log_sigmoid(logits_B)
  else:
    check_same_shape(chosen_rewards=chosen_rewards, preference_prob=preference_prob)
    p_B = as_float(preference_prob, dtype)
    per_example_B = -(p_B * jax.nn.log_sigmoid(logits_B) +
                      (1.0 - p_B) * jax.nn.log_sigmoid(-logits_B))
  if center_coef:
    per_example_B = per_example_B + center_coef * (chosen_B + rejected_B)**2
  metrics = _pair_metrics(chosen_B, rejected_B, per_example_B)
  return per_example_B, metrics


def pairwise_logexp_loss(chosen_rewards, rejected_rewards):
  """The preference-model loss in its log-exp form (Askell et al., 2021, arXiv:2112.00861):

        ℓ_b = log(1 + exp(r_r - r_c))

    Mathematically identical to ``bradley_terry_loss`` without margin or centering; computed as
    ``softplus`` so that it stays finite for any reward gap. Kept as its own entry because papers
    and codebases state it in this form. Returns ``(per_example_loss [B], metrics)``.
    """
  check_rank("chosen_rewards", chosen_rewards, 1)
  check_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
  dtype = compute_dtype(chosen_rewards, rejected_rewards)
  chosen_B = as_float(chosen_rewards, dtype)
  rejected_B = as_float(rejected_rewards, dtype)
  per_example_B = jax.nn.softplus(rejected_B - chosen_B)
  return per_example_B, _pair_metrics(chosen_B, rejected_B, per_example_B)


def all_pairs_ranking_loss(rewards_BxK, labels_BxK, *, candidate_mask=None):
  """InstructGPT's reward-model loss over a K-way ranking, one prompt per batch element.

        ℓ_b = -1/|P_b| Σ_{(i,j) ∈ P_b} log σ(r_i - r_j),   P_b = {(i, j): label_i > label_j, both valid}

    With K ranked responses and no ties |P_b| = C(K, 2): Ouyang et al., 2022, arXiv:2203.02155, Eq. 1
    (all comparisons of a prompt in one batch element, so the reward model does not overfit by
    seeing a completion K-1 times in different batches). ``labels`` are any scores where larger is
    better (gold scores, or ``-rank``); tied pairs carry no preference and are skipped.
    ``candidate_mask`` (``[B, K]``) supports prompts with fewer than K responses.

    Returns ``(per_example_loss [B], metrics)``; ``pair_accuracy`` is over all valid pairs.
    """
  check_rank("rewards_BxK", rewards_BxK, 2)
  check_same_shape(rewards_BxK=rewards_BxK, labels_BxK=labels_BxK)
  dtype = compute_dtype(rewards_BxK)
  mask_BxK = as_mask(candidate_mask, rewards_BxK.shape, dtype)
  rewards_BxK = jnp.where(mask_BxK > 0, as_float(rewards_BxK, dtype), 0.0)
  labels_BxK = jnp.where(mask_BxK > 0, as_float(labels_BxK, dtype), 0.0)
  # pair (i, j) counts when i is labelled strictly better than j and both are real candidates.
  pairs_BxKxK = ((labels_BxK[:, :, None] > labels_BxK[:, None, :]) & (mask_BxK[:, :, None] > 0) &
                 (mask_BxK[:, None, :] > 0)).astype(dtype)
  diff_BxKxK = rewards_BxK[:, :, None] - rewards_BxK[:, None, :]
  pair_loss_BxKxK = -jax.nn.log_sigmoid(diff_BxKxK)
  num_pairs_B = jnp.sum(pairs_BxKxK, axis=(1, 2))
  per_example_B = masked_mean(pair_loss_BxKxK, pairs_BxKxK, axis=(1, 2))
  correct = jnp.sum(jnp.where(pairs_BxKxK > 0, (diff_BxKxK > 0).astype(dtype), 0.0))
  metrics = {
      "loss": jnp.mean(per_example_B),
      "pair_accuracy": correct / jnp.maximum(jnp.sum(num_pairs_B), 1.0),
      "num_pairs": jnp.mean(num_pairs_B),}
  return per_example_B, metrics


def likert_regression_loss(predicted_ratings, ratings):
  """Rating regression for Likert-scale feedback (e.g. HelpSteer, Wang et al., 2023,
    arXiv:2311.09528): ℓ_b = (r̂_b - y_b)². Rescale ratings in the data pipeline (e.g. to [0, 1])
    if the scale should not set the loss magnitude. Inputs ``[B]``."""
  check_rank("predicted_ratings", predicted_ratings, 1)
  check_same_shape(predicted_ratings=predicted_ratings, ratings=ratings)
  dtype = compute_dtype(predicted_ratings)
  pred_B = as_float(predicted_ratings, dtype)
  target_B = as_float(ratings, dtype)
  per_example_B = (pred_B - target_B)**2
  metrics = {
      "loss": jnp.mean(per_example_B),
      "mae": jnp.mean(jnp.abs(pred_B - target_B)),}
  return per_example_B, metrics


def multi_attribute_loss(predicted_BxA, targets_BxA, *, weights=None, attribute_mask=None):
  """Weighted regression over A attribute heads (helpfulness, harmlessness, ...).

        ℓ_b = Σ_a w_a m_ba (r̂_ba - y_ba)² / Σ_a w_a m_ba

    ``weights`` ``[A]`` (default 1) trade attributes off; ``attribute_mask`` ``[B, A]`` marks which
    attributes a record actually rates (records often rate a subset). HelpSteer
    (arXiv:2311.09528) trains such heads; Safe-RLHF (Dai et al., 2023, arXiv:2310.12773) keeps
    helpfulness and harmlessness separate. Rows with no rated attribute contribute 0.
    """
  check_rank("predicted_BxA", predicted_BxA, 2)
  check_same_shape(predicted_BxA=predicted_BxA, targets_BxA=targets_BxA)
  dtype = compute_dtype(predicted_BxA)
  num_attr = predicted_BxA.shape[1]
  mask_BxA = as_mask(attribute_mask, predicted_BxA.shape, dtype)
  w_A = jnp.ones((num_attr,), dtype) if weights is None else as_float(weights, dtype)
  if w_A.shape != (num_attr,):
    raise ValueError(f"weights must have shape ({num_attr},), got {w_A.shape}")
  pred_BxA = jnp.where(mask_BxA > 0, as_float(predicted_BxA, dtype), 0.0)
  target_BxA = jnp.where(mask_BxA > 0, as_float(targets_BxA, dtype), 0.0)
  err_BxA = (pred_BxA - target_BxA)**2
  wm_BxA = mask_BxA * w_A[None, :]
  per_example_B = jnp.sum(err_BxA * w_A[None, :], axis=1) / jnp.maximum(
      jnp.sum(wm_BxA, axis=1),
      jnp.finfo(dtype).tiny)
  metrics = {"loss": jnp.mean(per_example_B)}
  per_attr_A = masked_mean(err_BxA, mask_BxA, axis=0)
  for a in range(num_attr):
    metrics[f"mse_attr{a}"] = per_attr_A[a]
  return per_example_B, metrics


def weighted_attribute_reward(rewards_BxA, weights):
  """Scalar reward from attribute heads: r_b = Σ_a w_a r_ba (the weighted sum used to steer a
    policy between, e.g., helpfulness and harmlessness). Returns ``[B]``; not a loss."""
  check_rank("rewards_BxA", rewards_BxA, 2)
  dtype = compute_dtype(rewards_BxA)
  w_A = as_float(weights, dtype)
  if w_A.shape != (rewards_BxA.shape[1],):
    raise ValueError(f"weights must have shape ({rewards_BxA.shape[1]},), got {w_A.shape}")
  return jnp.einsum("ba,a->b", as_float(rewards_BxA, dtype), w_A)
