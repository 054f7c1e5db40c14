"""Reward-model objectives: which data kind each needs and how a batch becomes a loss.

=================  ==========  ===========================================================
objective          data kind   per-example loss (losses library unless noted)
=================  ==========  ===========================================================
``bradley_terry``  pairwise    -p log σ(r_c - r_r) - (1 - p) log σ(r_r - r_c) (+ η (r_c + r_r)²,
                               ``center_coef``); p = the pair's ``preference_prob`` (1: hard label)
``all_pairs``      ranked      InstructGPT: mean over the C(K, 2) labelled pairs of one prompt of
                               -log σ(r_i - r_j); one prompt = one batch element, so a prompt's
                               comparisons are never split across steps. Tied labels: no pair.
``plackett_luce``  ranked      -log P_PL(ranking | r), ties by Breslow's rule (below)
``likert``         rated       (r - z)², z = 2 (y - lo) / (hi - lo) - 1 ∈ [-1, 1]
``multi_attribute`` attributes Σ_a w_a (r_a - z_a)² / Σ_a w_a, one head per attribute
=================  ==========  ===========================================================

Ties in Plackett–Luce. Without ties the PL likelihood of a ranking σ(1) ≻ … ≻ σ(n) is
Π_k exp r_σ(k) / Σ_{j ≥ k} exp r_σ(j). The library's ``losses.plackett_luce_loss`` breaks tied
labels by candidate index, which invents an order the annotator did not give. Here tied candidates
are handled with Breslow's approximation (as for tied event times in the Cox partial likelihood,
which PL is): every candidate i contributes

    ℓ_i = -(r_i - log Σ_{j: y_j ≤ y_i} exp r_j)

(its "risk set" is everyone not ranked strictly above it, its tied peers included), except the
candidates with nothing ranked below or tied with them (the unique last one contributes 0 anyway).
Without ties this is exactly the PL loss (tested against the library); with ties no order inside
a tied group is assumed. Ties are counted in the data statistics.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from rlhf_jax import losses, models
from rlhf_jax.data.kinds import pairwise as pairwise_kind
from rlhf_jax.models import lora as lora_lib

OBJECTIVES = ("bradley_terry", "all_pairs", "plackett_luce", "likert", "multi_attribute")
DATA_KIND = {
    "bradley_terry": "pairwise", "all_pairs": "ranked", "plackett_luce": "ranked",
    "likert": "rated", "multi_attribute": "attributes"}


def scale_targets(values: Any, scale: Sequence[float]) -> Any:
  """Maps ratings on ``[lo, hi]`` to ``[-1, 1]``: z = 2 (y - lo) / (hi - lo) - 1."""
  lo, hi = float(scale[0]), float(scale[1])
  return 2.0 * (values - lo) / (hi - lo) - 1.0


def plackett_luce_breslow_loss(rewards_BxK: jax.Array, labels_BxK: jax.Array,
                               candidate_mask_BxK: jax.Array) -> tuple[jax.Array, dict]:
  """Plackett–Luce NLL with Breslow's tie rule (module docstring). Returns ``(loss [B], metrics)``."""
  r_BxK = rewards_BxK.astype(jnp.float32)
  y_BxK = labels_BxK.astype(jnp.float32)
  m_BxK = candidate_mask_BxK > 0
  # risk_BxIxJ: j is in i's risk set (not ranked strictly above i, and real).
  risk_BxIxJ = (y_BxK[:, None, :] <= y_BxK[:, :, None]) & m_BxK[:, None, :] & m_BxK[:, :, None]
  # A finite "minus infinity": rows with an empty risk set (padded candidates) stay finite, so
  # their gradient is 0 rather than NaN once `where` drops them.
  logits_BxIxJ = jnp.where(risk_BxIxJ, r_BxK[:, None, :], -1e9)
  lse_BxI = jax.nn.logsumexp(logits_BxIxJ, axis=2)
  has_other_BxI = jnp.sum(risk_BxIxJ, axis=2) > 1
  term_BxI = jnp.where(m_BxK & has_other_BxI, lse_BxI - r_BxK, 0.0)
  per_example_B = jnp.sum(term_BxI, axis=1)
  best_by_score = jnp.argmax(jnp.where(m_BxK, r_BxK, -jnp.inf), axis=1)
  best_label = jnp.max(jnp.where(m_BxK, y_BxK, -jnp.inf), axis=1)
  top1 = jnp.take_along_axis(y_BxK, best_by_score[:, None], axis=1)[:, 0] == best_label
  return per_example_B, {
      "loss": jnp.mean(per_example_B), "top1_accuracy": jnp.mean(top1.astype(jnp.float32))}


def _rewards(model: models.RewardModel, params: Any, tokens: jax.Array, mask: jax.Array,
             rng: jax.Array | None) -> jax.Array:
  """``[N, K]`` float32 rewards; dropout active iff ``rng`` is given and the model has dropout."""
  if rng is not None and lora_lib.uses_dropout(model):  # the model's or the LoRA adapters'
    return model.apply({"params": params}, tokens, mask, deterministic=False, rngs={"dropout": rng})
  return model.apply({"params": params}, tokens, mask)


def make_objective(
    model: models.RewardModel, objective: str, *, center_coef: float = 0.0,
    rating_scale: Sequence[float] = (), attribute_weights: Sequence[float] = ()
) -> Callable[..., tuple[jax.Array, Mapping[str, jax.Array]]]:
  """``f(params, batch, rng | None) -> (per_example_loss [B], metrics)``; ``rng=None`` = eval mode.

  Pairwise batches run chosen and rejected as one forward of their 2B rows; ranked batches run
  their ``[B·K, T]`` candidate rows (padded candidates masked out of the loss).
  """
  if objective not in OBJECTIVES:
    raise ValueError(f"objective={objective!r} is invalid; allowed: {' | '.join(OBJECTIVES)}")
  if objective in ("likert", "multi_attribute") and len(rating_scale) != 2:
    raise ValueError(
        f"objective={objective!r} needs rating_scale=(low, high), got {rating_scale!r}")

  def f(params, batch, rng):
    if objective == "bradley_terry":  # pairwise batches: [2B, T], rows 2b / 2b+1 = pair b
      r_2B = _rewards(model, params, batch["tokens"], batch["mask"], rng)[:, 0]
      r_chosen_B, r_rejected_B = pairwise_kind.split(r_2B)
      # preference_prob: the pairs' soft labels (1 for hard labels; distilled RLAIF's AI labels)
      return losses.bradley_terry_loss(r_chosen_B, r_rejected_B, center_coef=center_coef,
                                       preference_prob=batch.get("preference_prob"))
    if objective in ("all_pairs", "plackett_luce"):  # ranked batches: [B·K, T]
      b, k = batch["candidate_mask"].shape
      r_BxK = _rewards(model, params, batch["tokens"], batch["mask"], rng)[:, 0].reshape(b, k)
      if objective == "all_pairs":
        return losses.all_pairs_ranking_loss(r_BxK, batch["scores"],
                                             candidate_mask=batch["candidate_mask"])
      return plackett_luce_breslow_loss(r_BxK, batch["scores"], batch["candidate_mask"])
    r_BxK = _rewards(model, params, batch["tokens"], batch["mask"], rng)
    if objective == "likert":
      return losses.likert_regression_loss(r_BxK[:, 0], scale_targets(batch["rating"],
                                                                      rating_scale))
    weights = jnp.asarray(attribute_weights, jnp.float32) if attribute_weights else None
    return losses.multi_attribute_loss(r_BxK, scale_targets(batch["attributes"], rating_scale),
                                       weights=weights)

  return f


def make_loss_fn(objective_fn: Callable) -> Callable:
  """``loss_fn(params, batch, rng) -> (mean loss, metrics)`` for ``train.make_train_step``."""

  def loss_fn(params, batch, rng):
    per_example_B, metrics = objective_fn(params, batch, rng)
    metrics = {k: v for k, v in metrics.items() if k != "loss"}
    return jnp.mean(per_example_B), metrics

  return loss_fn
