"""KTO: Kahneman–Tversky Optimisation on unpaired desirable / undesirable examples.

Ethayarajh, Xu, Muennighoff, Jurafsky & Kiela, 2024, "KTO: Model Alignment as Prospect Theoretic
Optimization", arXiv:2402.01306, Eq. (7) — as TRL spells it (``KTOTrainer._compute_loss``,
huggingface/trl@f2cd57710ae345ea6428ae95363267fcf38a3dc8, ``trl/trainer/kto_trainer.py``).

Each example b is one completion y_b of prompt x_b with a binary label (desirable or not). With
summed completion log-probs of the policy and the frozen reference,

    r_b  = log π_θ(y_b | x_b) − log π_ref(y_b | x_b)                 (the implicit reward / β)
    z₀   = max(0, mean_j [log π_θ(y'_j | x_j) − log π_ref(y'_j | x_j)])   (reference point)

where (x_j, y'_j) are *mismatched* prompt–completion pairs of the same batch (TRL rotates the
completions by one: y'_j = y_{j−1 mod B}), so z₀ estimates KL(π_θ ‖ π_ref) on the batch's prompts.
z₀ carries no gradient (stop-gradient; over several devices the mean is over the global batch —
inside ``jit`` a global array's mean already is). Then

    kto                 desirable:    ℓ_b = λ_D (1 − σ(β (r_b − z₀)))
                        undesirable:  ℓ_b = λ_U (1 − σ(β (z₀ − r_b)))
    apo_zero_unpaired   desirable:    ℓ_b = λ_D (1 − σ(β r_b))          (D'Oosterlinck et al. 2024,
                        undesirable:  ℓ_b = λ_U σ(β r_b)                 arXiv:2408.06266; no z₀)

with λ_D = ``desirable_weight``, λ_U = ``undesirable_weight``. The batch loss is the mean of ℓ_b
over the batch's examples (TRL: ``losses.nanmean()`` of the weighted per-example losses; the weights
are not renormalised). The paper (Eq. 8) recommends λ_D n_D / (λ_U n_U) ∈ [1, 4/3] when the counts
of desirable (n_D) and undesirable (n_U) examples differ.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses._common import (as_float, as_mask, check_choice, check_rank, check_same_shape,
                                     compute_dtype, is_concrete, masked_mean, zero_masked)

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def kto_reference_point(mismatched_policy_logps, mismatched_ref_logps, *, mask=None):
  """KTO's reference point z₀ = max(0, mean_j (π_θ(y'_j|x_j) − π_ref(y'_j|x_j))), no gradient.

  Args:
    mismatched_policy_logps, mismatched_ref_logps: ``[B]`` summed log-probs of the mismatched
      (KL) rows: prompt j with another example's completion (module docstring).
    mask: ``[B]`` 1 for rows that count (0 for filler rows); None = all.

  Returns:
    A scalar (0-d array), clamped at 0 and wrapped in ``stop_gradient``.
  """
  check_rank("mismatched_policy_logps", mismatched_policy_logps, 1)
  check_same_shape(mismatched_policy_logps=mismatched_policy_logps,
                   mismatched_ref_logps=mismatched_ref_logps)
  dtype = compute_dtype(mismatched_policy_logps, mismatched_ref_logps)
  m_B = as_mask(mask, jnp.shape(mismatched_policy_logps), dtype)
  ratio_B = as_float(mismatched_policy_logps, dtype) - as_float(mismatched_ref_logps, dtype)
  return jax.lax.stop_gradient(jnp.maximum(masked_mean(ratio_B, m_B), 0.0))


def kto_loss(policy_logps, ref_logps, labels, *, kl_ref_point, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0, loss_type: str = "kto",
             mask=None):
  """Per-example KTO losses ``[B]`` (weights applied) and metrics (module docstring).

  Args:
    policy_logps, ref_logps: ``[B]`` summed completion log-probs (matched rows).
    labels: ``[B]`` bool / 0-1, True = desirable.
    kl_ref_point: z₀ (``kto_reference_point``); held constant (stop-gradient here too).
      Ignored by ``apo_zero_unpaired``.
    beta: β > 0.
    desirable_weight, undesirable_weight: λ_D, λ_U >= 0.
    loss_type: ``kto`` | ``apo_zero_unpaired``.
    mask: ``[B]`` 1 for examples that count; masked examples get loss 0 and are left out of every
      mean (``metrics["loss"]`` is the mean over unmasked examples).

  Returns:
    ``(per_example_loss [B], metrics)``; metrics: ``loss``, ``kl`` (z₀), ``rewards/chosen`` /
    ``rewards/rejected`` (mean β r over desirable / undesirable examples, 0 when there are none),
    ``rewards/margins`` (their difference), ``logps/chosen`` / ``logps/rejected``,
    ``desirable_fraction``.
  """
  check_choice("loss_type", loss_type, KTO_LOSS_TYPES)
  check_rank("policy_logps", policy_logps, 1)
  check_same_shape(policy_logps=policy_logps, ref_logps=ref_logps, labels=labels)
  if is_concrete(beta) and not beta > 0:  # traced in a vectorised sweep: checked per run there
    raise ValueError(f"beta must be > 0, got {beta}")
  weights = (desirable_weight, undesirable_weight)
  if all(map(is_concrete, weights)) and not min(weights) >= 0:
    raise ValueError(f"desirable_weight={desirable_weight}, undesirable_weight="
                     f"{undesirable_weight}: both must be >= 0")
  dtype = compute_dtype(policy_logps, ref_logps)
  shape = jnp.shape(policy_logps)
  m_B = as_mask(mask, shape, dtype)
  pi_B = zero_masked(as_float(policy_logps, dtype), m_B)
  ref_B = zero_masked(as_float(ref_logps, dtype), m_B)
  z0 = jax.lax.stop_gradient(as_float(kl_ref_point, dtype))
  desirable_B = jnp.asarray(labels) != 0
  r_B = pi_B - ref_B
  if loss_type == "kto":
    loss_d_B = 1.0 - jax.nn.sigmoid(beta * (r_B - z0))
    loss_u_B = 1.0 - jax.nn.sigmoid(beta * (z0 - r_B))
  else:  # apo_zero_unpaired
    loss_d_B = 1.0 - jax.nn.sigmoid(beta * r_B)
    loss_u_B = jax.nn.sigmoid(beta * r_B)
  per_B = jnp.where(desirable_B, desirable_weight * loss_d_B, undesirable_weight * loss_u_B)
  per_B = zero_masked(per_B, m_B)

  d_B = m_B * desirable_B.astype(dtype)
  u_B = m_B - d_B
  rewards_B = jax.lax.stop_gradient(beta * r_B)
  chosen, rejected = masked_mean(rewards_B, d_B), masked_mean(rewards_B, u_B)
  metrics = {
      "loss": masked_mean(per_B, m_B),
      "kl": z0 if loss_type == "kto" else jnp.zeros((), dtype),
      "rewards/chosen": chosen,
      "rewards/rejected": rejected,
      "rewards/margins": chosen - rejected,
      "logps/chosen": masked_mean(jax.lax.stop_gradient(pi_B), d_B),
      "logps/rejected": masked_mean(jax.lax.stop_gradient(pi_B), u_B),
      "desirable_fraction": jnp.sum(d_B) / jnp.maximum(jnp.sum(m_B), 1.0),}
  return per_B, metrics
