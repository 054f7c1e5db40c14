"""The DPO family, with TRL's ``loss_type`` names and its f-divergence, weighting and
reference-free options.

Notation (per pair b; log-probs are summed over completion tokens):

    u_c = log π(y_c|x) - log π_ref(y_c|x),   u_r = log π(y_r|x) - log π_ref(y_r|x)   (log-ratios)
    s_c = f(u_c), s_r = f(u_r)   the f-divergence "scores" (f = identity for reverse KL)
    Δ  = s_c - s_r               the implicit-reward margin divided by β

f-divergence choices (Wang et al., 2023, "Beyond Reverse KL", arXiv:2309.16240; TRL's
``f_divergence_type``): the score is f'(π/π_ref) with constants dropped,

    reverse_kl        s = u
    forward_kl        s = -exp(-u)
    js_divergence     s = log σ(u)            (= log(2t/(1+t)) - log 2, t = e^u)
    alpha_divergence  s = exp((α-1) u)/(α-1)  (α → 1 is reverse KL; exponent clipped at 80)

Loss types (ε = ``label_smoothing``, ℓ_b the per-pair loss):

    sigmoid       -(1-ε) log σ(βΔ) - ε log σ(-βΔ)          DPO, Rafailov et al. 2023, arXiv:2305.18290;
                                                          ε > 0 is cDPO (Mitchell, 2023)
    hinge         max(0, 1 - βΔ)                          SLiC, Zhao et al. 2023, arXiv:2305.10425
    ipo           (s_c/n_c - s_r/n_r - 1/(2β))², n = completion length in tokens
                                                          IPO, Azar et al. 2023, arXiv:2310.12036 (Eq. 17);
                                                          length-normalised as in TRL, confirmed by the
                                                          IPO authors
    robust        [-(1-ε) log σ(βΔ) + ε log σ(-βΔ)] / (1-2ε)
                                                          rDPO, Chowdhury et al. 2024, arXiv:2403.00409
    exo_pair      KL(q ‖ p_ε), q = (σ(βΔ), σ(-βΔ)), p_ε = (1-ε, ε); ε = 1e-3 when 0
                                                          EXO, Ji et al. 2024, arXiv:2402.00856 (Eq. 16)
    nca_pair      -log σ(βs_c) - ½ log σ(-βs_c) - ½ log σ(-βs_r)
                                                          NCA, Chen et al. 2024, arXiv:2402.05369
    bco_pair      -log σ(βs_c) - log σ(-βs_r)             BCO, Jung et al. 2024, arXiv:2404.04656
                                                          (TRL's current form, no running reward shift)
    sppo_hard     (s_c - 1/(2β))² + (s_r + 1/(2β))²       SPPO, Wu et al. 2024, arXiv:2405.00675
    aot           sigmoid loss (with ε) on sort_b(logπ_c - logπ_r) - sort_b(logπ_ref,c - logπ_ref,r)
                                                          AOT, Melnyk et al. 2024, arXiv:2406.05882
    aot_unpaired  sigmoid loss (with ε) on sort_b(u_c) - sort_b(u_r)         (same paper)
    apo_zero      1 - σ(βu_c) + σ(βu_r)                   APO, D'Oosterlinck et al. 2024, arXiv:2408.06266
    apo_down      σ(βu_c) + 1 - σ(βΔ)                     (same paper, Eq. 8)
    discopop      (1-w) · (-log σ(βΔ)) + w · exp(-βΔ),  w = σ(βΔ/τ)
                                                          DiscoPOP/LRML, Lu et al. 2024, arXiv:2406.08414
    sigmoid_norm  -log σ(β (s_c/n_c - s_r/n_r))           TRL's length-normalised DPO (SimPO-style
                                                          normalisation, Meng et al. 2024, arXiv:2405.14734,
                                                          but keeping the reference)

Soft labels (``preference_prob`` p_b = P(y_c ≻ y_r), e.g. an AI labeller's; RLAIF, Lee et al. 2023,
arXiv:2309.00267): the per-pair target of the sigmoid loss becomes q_b = (1-ε) p_b + ε (1-p_b),

    sigmoid       -q log σ(βΔ) - (1-q) log σ(-βΔ)  =  ℓ_ε + (1-p)(1-2ε) βΔ
    sigmoid_norm  -p log σ(z) - (1-p) log σ(-z)     =  ℓ + (1-p) z,   z = β (s_c/n_c - s_r/n_r)
    ipo           (s_c/n_c - s_r/n_r - (2p-1)/(2β))²  (the expected IPO loss over a label drawn with
                                                     prob. p, up to a constant)

i.e. label smoothing ε_b = 1 - p_b per pair. Each is computed as today's loss plus a term carrying
the factor (1 - p) (log σ(z) - log σ(-z) = z), so at p = 1 the value and the gradient equal the hard
loss bit for bit. Only these three take soft labels (``SOFT_LABEL_LOSS_TYPES``); the others raise.

``aot`` and ``aot_unpaired`` sort over the batch axis, so their per-example values are per *rank*,
not per input pair: only their mean is meaningful. ``loss_type`` may be a list; the per-example loss
is then Σ_k w_k ℓ^(k) with ``loss_weights`` (default all 1), exactly TRL's combination.
``reference_free=True`` drops the reference (π_ref uniform: u = log π); the ref arguments may be
``None`` then.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from rlhf_jax.losses._common import (as_float, check_choice, check_rank, check_same_shape,
                                     compute_dtype, is_concrete)

DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "robust",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
)
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
_LENGTH_NORMALISED = ("ipo", "sigmoid_norm")
# Loss types with a per-pair soft target (``preference_prob``; module docstring).
SOFT_LABEL_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "ipo")
# TRL substitutes this smoothing for EXO when label_smoothing is 0 (log ε must be finite).
EXO_DEFAULT_EPSILON = 1e-3
# exp() argument cap for the alpha-divergence score, as in TRL, so it stays finite in float32.
_ALPHA_EXP_CAP = 80.0


def f_divergence_score(logratio, f_divergence: str = "reverse_kl", alpha: float = 1.0):
  """Score s = f'(π/π_ref) (constants dropped) of a log-ratio u, for the f-divergences above."""
  check_choice("f_divergence", f_divergence, F_DIVERGENCES)
  if f_divergence == "reverse_kl":
    return logratio
  if f_divergence == "forward_kl":
    return -jnp.exp(-logratio)
  if f_divergence == "js_divergence":
    return jax.nn.log_sigmoid(logratio)
  if abs(alpha - 1.0) < 1e-6:  # the α → 1 limit of (t^(α-1) - 1)/(α-1) is log t
    return logratio
  return jnp.exp(jnp.minimum((alpha - 1.0) * logratio, _ALPHA_EXP_CAP)) / (alpha - 1.0)


def _smoothed_sigmoid(logits, eps):
  return -(1.0 - eps) * jax.nn.log_sigmoid(logits) - eps * jax.nn.log_sigmoid(-logits)


def _one_loss(loss_type, *, beta, eps, tau, s_c, s_r, u_c, u_r, pc, pr, rc, rr, n_c, n_r,
              one_minus_p=None):
  delta = s_c - s_r
  if loss_type == "sigmoid":
    loss = _smoothed_sigmoid(beta * delta, eps)
    # soft target q = (1-ε)p + ε(1-p): ℓ_q = ℓ_ε + (1-p)(1-2ε) βΔ (exactly ℓ_ε at p = 1)
    return loss if one_minus_p is None else loss + one_minus_p * (1.0 - 2.0 * eps) * (beta * delta)
  if loss_type == "ipo" and one_minus_p is not None:
    # target (2p-1)/(2β) = 1/(2β) - (1-p)/β
    return (s_c / n_c - s_r / n_r - 1.0 / (2.0 * beta) + one_minus_p / beta)**2
  if loss_type == "hinge":
    return jax.nn.relu(1.0 - beta * delta)
  if loss_type == "ipo":
    return (s_c / n_c - s_r / n_r - 1.0 / (2.0 * beta))**2
  if loss_type == "robust":
    return (-(1.0 - eps) * jax.nn.log_sigmoid(beta * delta) +
            eps * jax.nn.log_sigmoid(-beta * delta)) / (1.0 - 2.0 * eps)
  if loss_type == "exo_pair":
    # A traced ε (vectorised sweep) selects the default with where(); same values.
    eps = (eps if eps > 0 else EXO_DEFAULT_EPSILON) if is_concrete(eps) else jnp.where(
        eps > 0, eps, EXO_DEFAULT_EPSILON)
    log_qw, log_ql = jax.nn.log_sigmoid(beta * delta), jax.nn.log_sigmoid(-beta * delta)
    return jnp.exp(log_qw) * (log_qw - jnp.log1p(-eps)) + jnp.exp(log_ql) * (log_ql - jnp.log(eps))
  if loss_type == "nca_pair":
    return (-jax.nn.log_sigmoid(beta * s_c) - 0.5 * jax.nn.log_sigmoid(-beta * s_c) -
            0.5 * jax.nn.log_sigmoid(-beta * s_r))
  if loss_type == "bco_pair":
    return -jax.nn.log_sigmoid(beta * s_c) - jax.nn.log_sigmoid(-beta * s_r)
  if loss_type == "sppo_hard":
    return (s_c - 0.5 / beta)**2 + (s_r + 0.5 / beta)**2
  if loss_type == "aot":
    d = jnp.sort(pc - pr) - jnp.sort(rc - rr)
    return _smoothed_sigmoid(beta * d, eps)
  if loss_type == "aot_unpaired":
    d = jnp.sort(u_c) - jnp.sort(u_r)
    return _smoothed_sigmoid(beta * d, eps)
  if loss_type == "apo_zero":
    return 1.0 - jax.nn.sigmoid(beta * u_c) + jax.nn.sigmoid(beta * u_r)
  if loss_type == "apo_down":
    return jax.nn.sigmoid(beta * u_c) + 1.0 - jax.nn.sigmoid(beta * delta)
  if loss_type == "discopop":
    logits = beta * delta
    w = jax.nn.sigmoid(logits / tau)
    return (1.0 - w) * (-jax.nn.log_sigmoid(logits)) + w * jnp.exp(-logits)
  # sigmoid_norm
  logits = beta * (s_c / n_c - s_r / n_r)
  loss = -jax.nn.log_sigmoid(logits)
  return loss if one_minus_p is None else loss + one_minus_p * logits


def dpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths=None,
    rejected_lengths=None,
    loss_weights: Sequence[float] | None = None,
    f_divergence: str = "reverse_kl",
    alpha: float = 1.0,
    reference_free: bool = False,
    discopop_tau: float = 0.05,
    preference_prob=None,
):
  """DPO and its TRL variants; see the module docstring for every formula and paper.

    Args:
      policy_chosen_logps, policy_rejected_logps: ``[B]`` summed completion log-probs under π.
      ref_chosen_logps, ref_rejected_logps: ``[B]`` the same under π_ref (``None`` allowed with
        ``reference_free=True``).
      beta: β > 0 (for ``ipo`` the regulariser τ of the paper).
      loss_type: a TRL name or a list of them (``DPO_LOSS_TYPES``).
      label_smoothing: ε ∈ [0, 0.5) — cDPO / rDPO / EXO / AOT noise rate; ignored by the others.
      chosen_lengths, rejected_lengths: ``[B]`` completion token counts, required by ``ipo`` and
        ``sigmoid_norm`` (clamped to ≥ 1 as in TRL).
      loss_weights: one weight per loss type (TRL's ``loss_weights``); default all 1.
      f_divergence: ``F_DIVERGENCES`` (TRL's ``f_divergence_type``); ``alpha`` is its α.
      reference_free: treat π_ref as uniform (u = log π).
      discopop_tau: τ of the DiscoPOP modulation (TRL's default 0.05).
      preference_prob: ``[B]`` soft labels P(y_c ≻ y_r) in [0, 1] (module docstring; ``None`` = hard
        labels, today's loss). Only ``SOFT_LABEL_LOSS_TYPES``.

    Returns ``(per_example_loss [B], metrics)``. Metrics follow TRL: ``rewards/chosen`` = mean β u_c,
    ``rewards/rejected``, ``rewards/margins`` = mean β (u_c - u_r), ``rewards/accuracies`` = fraction
    with β u_c > β u_r, ``logps/chosen``, ``logps/rejected``, ``loss`` and ``loss/<type>`` per type.
    """
  loss_types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
  if not loss_types:
    raise ValueError("loss_type must name at least one of " + str(list(DPO_LOSS_TYPES)))
  for name in loss_types:
    check_choice("loss_type", name, DPO_LOSS_TYPES)
  weights = (1.0,) * len(loss_types) if loss_weights is None else tuple(loss_weights)
  if len(weights) != len(loss_types):
    raise ValueError(
        f"loss_weights has {len(weights)} entries but loss_type has {len(loss_types)}: {loss_types}"
    )
  check_choice("f_divergence", f_divergence, F_DIVERGENCES)
  if is_concrete(beta) and not beta > 0:
    raise ValueError(f"beta must be > 0, got {beta}")
  if is_concrete(label_smoothing) and not 0.0 <= label_smoothing < 0.5:
    raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
  if is_concrete(discopop_tau) and not discopop_tau > 0:
    raise ValueError(f"discopop_tau must be > 0, got {discopop_tau}")
  if not reference_free and (ref_chosen_logps is None or ref_rejected_logps is None):
    raise ValueError("ref_chosen_logps/ref_rejected_logps are required unless reference_free=True")
  needs_lengths = [t for t in loss_types if t in _LENGTH_NORMALISED]
  if needs_lengths and (chosen_lengths is None or rejected_lengths is None):
    raise ValueError(f"loss_type {needs_lengths} needs chosen_lengths and rejected_lengths")
  if preference_prob is not None:
    hard_only = [t for t in loss_types if t not in SOFT_LABEL_LOSS_TYPES]
    if hard_only:
      raise ValueError(f"preference_prob (soft labels) is supported by loss_type "
                       f"{list(SOFT_LABEL_LOSS_TYPES)}; {hard_only} take hard labels only")
  check_rank("policy_chosen_logps", policy_chosen_logps, 1)
  check_same_shape(
      preference_prob=preference_prob,
      policy_chosen_logps=policy_chosen_logps,
      policy_rejected_logps=policy_rejected_logps,
      ref_chosen_logps=None if reference_free else ref_chosen_logps,
      ref_rejected_logps=None if reference_free else ref_rejected_logps,
  )

  dtype = compute_dtype(policy_chosen_logps, policy_rejected_logps)
  pc = as_float(policy_chosen_logps, dtype)
  pr = as_float(policy_rejected_logps, dtype)
  if reference_free:
    rc = rr = jnp.zeros_like(pc)
  else:
    rc, rr = as_float(ref_chosen_logps, dtype), as_float(ref_rejected_logps, dtype)
  u_c, u_r = pc - rc, pr - rr
  s_c = f_divergence_score(u_c, f_divergence, alpha)
  s_r = f_divergence_score(u_r, f_divergence, alpha)
  n_c = n_r = None
  if needs_lengths:
    n_c = jnp.maximum(as_float(chosen_lengths, dtype), 1.0)
    n_r = jnp.maximum(as_float(rejected_lengths, dtype), 1.0)

  one_minus_p = None if preference_prob is None else 1.0 - as_float(preference_prob, dtype)
  per_example_B = jnp.zeros_like(pc)
  metrics = {}
  for name, weight in zip(loss_types, weights):
    loss_B = _one_loss(
        name,
        beta=beta,
        eps=label_smoothing,
        tau=discopop_tau,
        s_c=s_c,
        s_r=s_r,
        u_c=u_c,
        u_r=u_r,
        pc=pc,
        pr=pr,
        rc=rc,
        rr=rr,
        n_c=n_c,
        n_r=n_r,
        one_minus_p=one_minus_p,
    )
    metrics[f"loss/{name}"] = jnp.mean(loss_B)
    per_example_B = per_example_B + weight * loss_B

  chosen_rewards = jax.lax.stop_gradient(beta * u_c)
  rejected_rewards = jax.lax.stop_gradient(beta * u_r)
  metrics.update({
      "loss": jnp.mean(per_example_B),
      "rewards/chosen": jnp.mean(chosen_rewards),
      "rewards/rejected": jnp.mean(rejected_rewards),
      "rewards/margins": jnp.mean(chosen_rewards - rejected_rewards),
      "rewards/accuracies": jnp.mean((chosen_rewards > rejected_rewards).astype(dtype)),
      "logps/chosen": jnp.mean(jax.lax.stop_gradient(pc)),
      "logps/rejected": jnp.mean(jax.lax.stop_gradient(pr)),})
  return per_example_B, metrics
