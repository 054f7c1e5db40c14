"""Supervised fine-tuning: masked negative log-likelihood of the response tokens.

Reference: Ouyang et al., 2022, "Training language models to follow instructions with human
feedback" (InstructGPT), arXiv:2203.02155 — the SFT stage; the prompt tokens are masked out.
"""

from __future__ import annotations

import jax.numpy as jnp

from rlhf_jax.losses._common import aggregate_tokens, as_float, as_mask, check_rank, compute_dtype


def sft_loss(token_logps, mask, *, aggregation: str = "token_mean", norm_len: int | None = None):
  """Masked NLL of target tokens.

    With token log-probs ``log π(y_bt | y_<t)`` (``[B, T]``, e.g. from
    ``rlhf_jax.models.token_logprobs``) and the loss mask ``m_bt`` (1 on response tokens):

        v_bt = -log π(y_bt | y_<t)
        ℓ_b  = aggregate(v, m)   (see ``aggregation``; the batch loss is mean_b ℓ_b)

    ``aggregation`` (names as in TRL/verl):
      ``"token_mean"`` (default)  Σ_bt m v / Σ_bt m — every token weighs the same;
      ``"seq_mean_token_mean"``   mean over sequences of each sequence's token mean;
      ``"seq_mean_token_sum"``    mean over sequences of each sequence's token sum;
      ``"seq_mean_token_sum_norm"`` token sum divided by ``norm_len`` (default the padded
      length T): a constant per-token weight 1 / (B L) whatever a batch's width.

    Returns ``(per_example_loss [B], metrics)``; metrics: ``loss``, ``nll_per_token`` (always the
    token mean, whatever the aggregation) and ``num_tokens``.
    """
  check_rank("token_logps", token_logps, 2)
  dtype = compute_dtype(token_logps)
  logps_BxT = as_float(token_logps, dtype)
  mask_BxT = as_mask(mask, logps_BxT.shape, dtype)
  nll_BxT = -logps_BxT
  per_example_B = aggregate_tokens(nll_BxT, mask_BxT, aggregation, norm_len)
  num_tokens = jnp.sum(mask_BxT)
  metrics = {
      "loss": jnp.mean(per_example_B),
      "nll_per_token": jnp.sum(jnp.where(mask_BxT > 0, nll_BxT, 0.0)) /
                       jnp.maximum(num_tokens, 1.0),
      "num_tokens": num_tokens,}
  return per_example_B, metrics
