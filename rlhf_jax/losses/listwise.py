"""Listwise objectives over N ranked candidates per prompt: Plackett–Luce, PRO and RRHF.

Shared conventions: ``scores_BxN`` are what the loss pushes (reward-model outputs for
Plackett–Luce, length-normalised policy log-probs for PRO/RRHF, see ``length_normalized_scores``);
``rewards_BxN`` only *order* the candidates (larger is better; for PRO their differences are also
temperatures). ``candidate_mask`` (``[B, N]``, 1 = real candidate) lets prompts have fewer than N
candidates. Candidates are ranked by reward with ties broken by candidate index.
"""

from __future__ import annotations

import jax.numpy as jnp

from rlhf_jax.losses._common import (
    _NEG,
    as_float,
    as_mask,
    check_rank,
    check_same_shape,
    compute_dtype,
    masked_logsumexp,
)


def length_normalized_scores(sum_logps_BxN, lengths_BxN, *, length_penalty: float = 1.0):
  """p = Σ_t log π(y_t | x, y_<t) / |y|^α, the candidate score of RRHF (Yuan et al., 2023, Eq. 1;
    α is the authors' ``length_penalty``, 1 by default) and of PRO (α = 1). Lengths clamp to ≥ 1."""
  dtype = compute_dtype(sum_logps_BxN)
  lengths = jnp.maximum(as_float(lengths_BxN, dtype), 1.0)
  return as_float(sum_logps_BxN, dtype) / lengths**length_penalty


def best_candidate_index(rewards_BxN, candidate_mask=None):
  """Index ``[B]`` of the highest-reward real candidate (first one on ties): the response RRHF's
    and PRO's SFT terms train on."""
  dtype = compute_dtype(rewards_BxN)
  mask = as_mask(candidate_mask, rewards_BxN.shape, dtype)
  return jnp.argmax(jnp.where(mask > 0, as_float(rewards_BxN, dtype), -jnp.inf), axis=1)


def _prepare(scores_BxN, rewards_BxN, candidate_mask):
  check_rank("scores_BxN", scores_BxN, 2)
  check_same_shape(scores_BxN=scores_BxN, rewards_BxN=rewards_BxN)
  dtype = compute_dtype(scores_BxN, rewards_BxN)
  mask = as_mask(candidate_mask, scores_BxN.shape, dtype)
  scores = jnp.where(mask > 0, as_float(scores_BxN, dtype), 0.0)
  rewards = jnp.where(mask > 0, as_float(rewards_BxN, dtype), 0.0)
  return scores, rewards, mask, dtype


def _sort_by_reward(scores, rewards, mask):
  """Candidates reordered best-first (masked ones last); returns sorted scores, rewards, mask."""
  key = jnp.where(mask > 0, rewards, -jnp.inf)
  order = jnp.argsort(-key, axis=1, stable=True)
  take = lambda x: jnp.take_along_axis(x, order, axis=1)  # noqa: E731
  return take(scores), take(rewards), take(mask)


def _pro_terms(scores, rewards, mask, reward_temperature: bool):
  """Per-position PRO terms ``[B, N]`` (position k in best-first order) and their validity."""
  s_BxN, r_BxN, m_BxN = _sort_by_reward(scores, rewards, mask)
  n = s_BxN.shape[1]
  later_NxN = jnp.arange(n)[None, :] > jnp.arange(n)[:, None]  # [k, j]: j ranked below k
  neg_BxNxN = later_NxN[None] & (m_BxN[:, None, :] > 0) & (m_BxN[:, :, None] > 0)
  has_neg_BxN = jnp.any(neg_BxNxN, axis=2)
  if reward_temperature:
    temp_BxNxN = r_BxN[:, :, None] - r_BxN[:, None, :]  # T_kj = r_k - r_j
    temp_pos_BxN = jnp.max(jnp.where(neg_BxNxN, temp_BxNxN, _NEG), axis=2)
    temp_pos_BxN = jnp.where(has_neg_BxN, temp_pos_BxN, 0.0)
  else:
    temp_BxNxN = jnp.ones_like(s_BxN)[:, :, None] * jnp.ones_like(s_BxN)[:, None, :]
    temp_pos_BxN = jnp.ones_like(s_BxN)
  pos_logit_BxN = s_BxN * temp_pos_BxN
  eye_NxN = jnp.eye(n, dtype=bool)
  logits_BxNxN = jnp.where(eye_NxN[None], pos_logit_BxN[:, :, None], s_BxN[:, None, :] * temp_BxNxN)
  include_BxNxN = neg_BxNxN | (eye_NxN[None] & has_neg_BxN[:, :, None])
  term_BxN = masked_logsumexp(logits_BxNxN, include_BxNxN.astype(s_BxN.dtype),
                              axis=2) - pos_logit_BxN
  return jnp.where(has_neg_BxN, term_BxN, 0.0), has_neg_BxN


def plackett_luce_loss(scores_BxN, rewards_BxN, *, candidate_mask=None):
  """Plackett–Luce negative log-likelihood of the reward ordering under the scores.

    With candidates sorted best-first by reward, σ(1), …, σ(n):

        ℓ_b = -Σ_{k=1}^{n-1} [ s_σ(k) - log Σ_{j ≥ k} exp s_σ(j) ]

    Plackett (1975), Luce (1959); as a K-wise reward-model loss: Zhu, Jordan & Jiao, 2023,
    arXiv:2301.11270. With n = 2 this is exactly the Bradley–Terry loss -log σ(s_1 - s_2).
    Returns ``(per_example_loss [B], metrics)``.
    """
  scores, rewards, mask, _ = _prepare(scores_BxN, rewards_BxN, candidate_mask)
  terms_BxN, _ = _pro_terms(scores, rewards, mask, reward_temperature=False)
  per_example_B = jnp.sum(terms_BxN, axis=1)
  metrics = {
      "loss": jnp.mean(per_example_B),
      "top1_accuracy": _top1_accuracy(scores, rewards, mask),}
  return per_example_B, metrics


def pro_loss(scores_BxN, rewards_BxN, *, candidate_mask=None, reward_temperature: bool = True):
  """PRO, Preference Ranking Optimization (Song et al., 2023, arXiv:2306.17492),
    as in the authors' implementation (AlibabaResearch/DAMO-ConvAI, PRO/train/utils/process_manager.py).

    Candidates sorted best-first by reward r; s = length-normalised policy log-probs
    (``length_normalized_scores`` with α = 1). For every position k with a worse candidate left:

        T_kj = r_k - r_j  (j > k),   T_k = max_{j > k} T_kj = r_k - min_{j > k} r_j
        ℓ_k  = -log [ exp(s_k T_k) / ( exp(s_k T_k) + Σ_{j > k} exp(s_j T_kj) ) ]
        ℓ_b  = Σ_k ℓ_k

    The temperatures make a wide reward gap demand a wide score gap. With
    ``reward_temperature=False`` all T = 1 and PRO is the plain-softmax (Plackett–Luce) form the
    paper starts from. The authors add 1e-10 inside the log; this uses an exact
    log-sum-exp instead.

    SFT term (composed separately, e.g. ``sft_loss(..., aggregation="seq_mean_token_sum")`` on the
    candidate picked by ``best_candidate_index``): the authors add
    ``sft_weight · (N - 1)² · mean_b(-Σ_t log π(y_sft,t))`` on the response their preprocessed data
    marks with ``sft_index`` — a *summed* (not length-normalised) log-prob, scaled by (N-1)², the
    square of the number of ranking terms, on top of the ``sft_weight`` hyperparameter.

    Returns ``(per_example_loss [B], metrics)``.
    """
  scores, rewards, mask, _ = _prepare(scores_BxN, rewards_BxN, candidate_mask)
  terms_BxN, has_neg_BxN = _pro_terms(scores, rewards, mask, reward_temperature)
  per_example_B = jnp.sum(terms_BxN, axis=1)
  metrics = {
      "loss": jnp.mean(per_example_B),
      "num_rank_terms": jnp.mean(jnp.sum(has_neg_BxN, axis=1).astype(scores.dtype)),
      "top1_accuracy": _top1_accuracy(scores, rewards, mask),}
  return per_example_B, metrics


def rrhf_loss(scores_BxN, rewards_BxN, *, candidate_mask=None):
  """RRHF rank loss (Yuan et al., 2023, arXiv:2304.05302, Eq. 2):

        ℓ_b = Σ_{i, j: r_i < r_j} max(0, p_i - p_j)

    with p the length-normalised log-probs (``length_normalized_scores``; the authors' length
    penalty α defaults to 1). Zero once the scores are ordered like the rewards; tied rewards carry
    no constraint. The full RRHF objective adds the SFT term on the best candidate,
    ``-mean_t log π(y_best,t)`` (token mean, weight 1 in the paper), composed separately via
    ``best_candidate_index`` and ``sft_loss(..., aggregation="seq_mean_token_mean")``.

    Returns ``(per_example_loss [B], metrics)``; ``violation_rate`` = share of ordered pairs with
    p_i > p_j.
    """
  scores, rewards, mask, dtype = _prepare(scores_BxN, rewards_BxN, candidate_mask)
  pairs_BxNxN = ((rewards[:, :, None] < rewards[:, None, :]) & (mask[:, :, None] > 0) &
                 (mask[:, None, :] > 0))
  hinge_BxNxN = jnp.maximum(scores[:, :, None] - scores[:, None, :], 0.0)
  per_example_B = jnp.sum(jnp.where(pairs_BxNxN, hinge_BxNxN, 0.0), axis=(1, 2))
  num_pairs = jnp.sum(pairs_BxNxN).astype(dtype)
  violations = jnp.sum(pairs_BxNxN & (hinge_BxNxN > 0)).astype(dtype)
  metrics = {
      "loss": jnp.mean(per_example_B),
      "violation_rate": violations / jnp.maximum(num_pairs, 1.0),}
  return per_example_B, metrics


def _top1_accuracy(scores, rewards, mask):
  """Share of prompts whose highest-score candidate is also the highest-reward one."""
  neg_inf = -jnp.inf
  best_by_score = jnp.argmax(jnp.where(mask > 0, scores, neg_inf), axis=1)
  best_by_reward = jnp.argmax(jnp.where(mask > 0, rewards, neg_inf), axis=1)
  return jnp.mean((best_by_score == best_by_reward).astype(scores.dtype))
