"""Offline pairwise preference optimisation: the DPO family (every TRL ``loss_type``), SimPO and ORPO.

One trainer driven by :class:`DPOLossConfig`. A pairwise batch of B pairs ``(x, y_c, y_r)`` holds
the chosen and rejected sequences ``[BOS] x y [EOS]`` stacked once by the collator, ``tokens
[2B, T]`` (pair b in rows 2b, 2b+1; ``kinds.pairwise.split``), and they go through the policy in
**one** forward pass:

    logp_2BxT = log π_θ(tokens_t | tokens_<t) · loss_mask          (models.response_logps, f32)
    s_2B = Σ_t logp_2BxT,   n_2B = Σ_t loss_mask                    (response tokens incl. EOS)
    (π_c, π_r) = split(s_2B),  (n_c, n_r) = split(n_2B)

then ``method`` picks the loss (formulas in ``rlhf_jax/losses``):

    dpo    losses.dpo_loss(π_c, π_r, ref_c, ref_r, beta, loss_type, label_smoothing, loss_weights,
                           f_divergence, alpha, reference_free, lengths n_c / n_r)
    simpo  losses.simpo_loss(π_c / n_c, π_r / n_r, beta, gamma)        (reference-free)
    orpo   losses.orpo_loss(π_c / n_c, π_r / n_r, lam)                 (reference-free, SFT term inside)

plus, with ``sft_weight = w > 0``, ``w · (-π_c / n_c)`` (RPO; TRL's ``rpo_alpha``). The batch loss
is the mean over pairs.

Reference log-probs ``(ref_c, ref_r) = split(batch["ref_logps"])`` come from
:mod:`rlhf_jax.algorithms.reference` (``loss.reference_logps``): ``on_the_fly`` (a jitted forward
of the frozen reference params over the same rows, before each step; TRL's default) or
``precomputed`` (one pass, ``<workdir>/data/reference_logps.npz`` keyed on the reference run, its
checkpoint step, model config, tokenizer and the dataset, looked up by ``batch["index"]``; TRL's
``precompute_ref_log_probs``; works multi-host). Reference-free losses never touch the reference.

Dropout: off in training by default (``loss.disable_dropout``, as TRL); the held-out metrics always
run in eval mode (``loss_fn(params, batch, rng=None)``, deterministic).

Pairs whose chosen and rejected are identical carry no preference (every loss is constant in θ or,
for ORPO / RPO, pure SFT on an arbitrary side): ``prepare_dataset(drop_uninformative=True)`` drops
them and counts them (``skipped_identical_pairs``). Each evaluation reports the policy metrics of
``rlhf_jax.eval.policy`` and, on held-out pairs, the loss's implicit-reward metrics
(``pairs/rewards/margins``, ``pairs/rewards/accuracies``, ...).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import ml_collections

from rlhf_jax import losses, models, train
from rlhf_jax.algorithms import reference
from rlhf_jax.algorithms.offline import pairwise_shell
from rlhf_jax.data.kinds import pairwise
from rlhf_jax.models import lora as lora_lib
from rlhf_jax.train import config_dicts

METHODS = ("dpo", "simpo", "orpo")
REFERENCE_MODES = reference.MODES


@dataclasses.dataclass(frozen=True)
class DPOLossConfig:
  """Which pairwise loss, with its hyper-parameters (names follow TRL's ``DPOConfig``).

  Attributes:
    method: ``dpo`` (the family selected by ``loss_type``), ``simpo`` or ``orpo``.
    loss_type: one TRL name (``losses.DPO_LOSS_TYPES``) or several joined by commas, e.g.
      ``"sigmoid,bco_pair"`` (summed with ``loss_weights``, TRL's list form; a string so that
      command-line and sweep overrides stay plain values).
    loss_weights: one weight per loss type; () = all 1.
    beta: β of DPO / SimPO (for ``ipo`` the regulariser τ).
    label_smoothing: ε of cDPO / rDPO / EXO / AOT (and SimPO's smoothing).
    f_divergence, alpha: TRL's ``f_divergence_type`` and its α.
    reference_free: DPO against a uniform reference (no reference forward).
    discopop_tau: τ of DiscoPOP.
    simpo_gamma: SimPO's target margin γ.
    orpo_lambda: ORPO's λ (TRL's ``beta`` for ORPO).
    sft_weight: w of the extra chosen-NLL term (RPO / TRL's ``rpo_alpha``); 0 = off.
    reference_logps: ``on_the_fly`` or ``precomputed`` (module docstring).
    disable_dropout: train the policy without dropout (TRL's ``disable_dropout``, default on), so
      policy and reference log-probs are the same function of their params; off: dropout in the
      policy's training forward only (held-out metrics are always deterministic).
    soft_labels: train on each pair's ``preference_prob`` p (the pairwise records' soft label,
      e.g. RLAIF's AI labels; 1 for hard-labelled files) as the per-pair target, i.e. label
      smoothing ε_b = 1 - p_b (``losses.dpo_loss(preference_prob=)``; loss types
      ``losses.SOFT_LABEL_LOSS_TYPES``, method ``dpo``). Off: the hard label (chosen ≻ rejected).
  """

  method: str = "dpo"
  loss_type: str = "sigmoid"
  loss_weights: tuple = ()
  beta: float = 0.1
  label_smoothing: float = 0.0
  f_divergence: str = "reverse_kl"
  alpha: float = 1.0
  reference_free: bool = False
  discopop_tau: float = 0.05
  simpo_gamma: float = 0.5
  orpo_lambda: float = 0.1
  sft_weight: float = 0.0
  soft_labels: bool = False
  reference_logps: str = "on_the_fly"
  disable_dropout: bool = True

  def __post_init__(self):
    if not isinstance(self.loss_type, str):
      raise ValueError(f"DPOLossConfig.loss_type={self.loss_type!r} is invalid; allowed: a string "
                       "of comma-separated names")
    object.__setattr__(self, "loss_weights", tuple(float(w) for w in self.loss_weights))
    if self.method not in METHODS:
      raise ValueError(
          f"DPOLossConfig.method={self.method!r} is invalid; allowed: {' | '.join(METHODS)}")
    if not isinstance(self.disable_dropout, bool):
      raise ValueError(
          f"DPOLossConfig.disable_dropout={self.disable_dropout!r} is invalid; allowed: "
          "True | False")
    if self.reference_logps not in REFERENCE_MODES:
      raise ValueError(
          f"DPOLossConfig.reference_logps={self.reference_logps!r} is invalid; allowed: "
          f"{' | '.join(REFERENCE_MODES)}")
    bad = [t for t in self.loss_types if t not in losses.DPO_LOSS_TYPES]
    if not self.loss_types or bad:
      raise ValueError(
          f"DPOLossConfig.loss_type={self.loss_type!r} is invalid; allowed: one or more "
          f"of {list(losses.DPO_LOSS_TYPES)}")
    if self.loss_weights and len(self.loss_weights) != len(self.loss_types):
      raise ValueError(
          f"DPOLossConfig.loss_weights={self.loss_weights!r} is invalid; allowed: () or "
          f"one weight per loss_type ({len(self.loss_types)})")
    if not self.beta > 0:
      raise ValueError(f"DPOLossConfig.beta={self.beta!r} is invalid; allowed: a float > 0")
    if not 0.0 <= self.label_smoothing < 0.5:
      raise ValueError(
          f"DPOLossConfig.label_smoothing={self.label_smoothing!r} is invalid; allowed: "
          "[0, 0.5)")
    if self.f_divergence not in losses.F_DIVERGENCES:
      raise ValueError(f"DPOLossConfig.f_divergence={self.f_divergence!r} is invalid; allowed: "
                       f"{' | '.join(losses.F_DIVERGENCES)}")
    for name in ("discopop_tau", "orpo_lambda"):
      if not getattr(self, name) > 0:
        raise ValueError(f"DPOLossConfig.{name}={getattr(self, name)!r} is invalid; allowed: > 0")
    if not self.sft_weight >= 0:
      raise ValueError(f"DPOLossConfig.sft_weight={self.sft_weight!r} is invalid; allowed: >= 0")
    hard_only = [t for t in self.loss_types if t not in losses.SOFT_LABEL_LOSS_TYPES]
    if self.soft_labels and (self.method != "dpo" or hard_only):
      raise ValueError(f"DPOLossConfig.soft_labels=True with method={self.method!r}, loss_type="
                       f"{self.loss_type!r} is invalid; allowed: method 'dpo' with loss types "
                       f"{' | '.join(losses.SOFT_LABEL_LOSS_TYPES)}")

  @property
  def loss_types(self) -> tuple[str, ...]:
    return tuple(t.strip() for t in self.loss_type.split(",") if t.strip())

  @property
  def uses_reference(self) -> bool:
    return self.method == "dpo" and not self.reference_free

  @property
  def label(self) -> str:
    """Short name for tables: ``dpo:sigmoid``, ``dpo:ipo+sft``, ``simpo``, ``orpo``."""
    name = self.method if self.method != "dpo" else "dpo:" + "+".join(self.loss_types)
    return name + ("+rpo" if self.sft_weight > 0 else "")


def pair_loss(cfg: DPOLossConfig, pc_B, pr_B, nc_B, nr_B, ref_c_B=None, ref_r_B=None,
              preference_prob_B=None):
  """Per-pair loss ``[B]`` and metrics from summed log-probs (π) and response lengths (n);
  ``preference_prob_B``: the pairs' soft labels, used when ``cfg.soft_labels``."""
  avg_c, avg_r = pc_B / jnp.maximum(nc_B, 1.0), pr_B / jnp.maximum(nr_B, 1.0)
  if cfg.method == "dpo":
    per_B, metrics = losses.dpo_loss(
        pc_B, pr_B, ref_c_B, ref_r_B, beta=cfg.beta, loss_type=cfg.loss_types,
        label_smoothing=cfg.label_smoothing, chosen_lengths=nc_B, rejected_lengths=nr_B,
        loss_weights=cfg.loss_weights or None, f_divergence=cfg.f_divergence, alpha=cfg.alpha,
        reference_free=cfg.reference_free, discopop_tau=cfg.discopop_tau,
        preference_prob=preference_prob_B if cfg.soft_labels else None)
  elif cfg.method == "simpo":
    per_B, metrics = losses.simpo_loss(avg_c, avg_r, beta=cfg.beta, gamma=cfg.simpo_gamma,
                                       label_smoothing=cfg.label_smoothing)
  else:
    per_B, metrics = losses.orpo_loss(avg_c, avg_r, lam=cfg.orpo_lambda)
  metrics = dict(metrics)
  if cfg.sft_weight > 0:
    nll_B = -avg_c
    per_B = per_B + cfg.sft_weight * nll_B
    metrics["rpo_nll"] = jnp.mean(nll_B)
  metrics["loss"] = jnp.mean(per_B)
  return per_B, metrics


def make_loss_fn(model: models.Transformer, cfg: DPOLossConfig) -> train.loop.LossFn:
  """``loss_fn(params, batch, rng)`` over the batch's ``[2B, T]`` rows in one forward.

  ``rng=None`` is eval mode (deterministic). With ``rng`` given, dropout is on only if the model
  has ``dropout_rate > 0`` and ``cfg.disable_dropout`` is False.
  """
  dropout = lora_lib.uses_dropout(model) and not cfg.disable_dropout  # model's or LoRA's

  def loss_fn(params, batch, rng):
    tokens, mask, loss_mask = batch["tokens"], batch["mask"], batch["loss_mask"]
    if dropout and rng is not None:
      out = model.apply({"params": params}, tokens, mask, deterministic=False,
                        rngs={"dropout": rng})
      sums_2B = jnp.sum(models.token_logprobs(out.logits_BxTxV, tokens, loss_mask), axis=-1)
    else:
      sums_2B = models.response_logps(model, params, tokens, mask, loss_mask)
    lens_2B = jnp.sum(loss_mask, axis=-1).astype(jnp.float32)
    pc_B, pr_B = pairwise.split(sums_2B)
    nc_B, nr_B = pairwise.split(lens_2B)
    ref_c = ref_r = None
    if cfg.uses_reference:
      ref_c, ref_r = pairwise.split(batch[reference.REF_KEY])
    per_B, metrics = pair_loss(cfg, pc_B, pr_B, nc_B, nr_B, ref_c, ref_r,
                               batch.get("preference_prob"))
    return jnp.mean(per_B), metrics

  return loss_fn


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) DPO / SimPO / ORPO as configured; returns and writes the final metrics.

  See ``experiments/configs/dpo_synthetic.py`` for every key; the shell (data, reference log-probs,
  loop, evaluation) is ``algorithms.offline.pairwise_shell``.
  """
  loss_cfg = config_dicts.to_dataclass(DPOLossConfig, config.loss, "loss")
  return pairwise_shell.train_pairwise(config, workdir, method="dpo", label=loss_cfg.label,
                                       make_loss_fn=lambda model: make_loss_fn(model, loss_cfg),
                                       uses_reference=loss_cfg.uses_reference,
                                       reference_logps=loss_cfg.reference_logps,
                                       fingerprint_extra={"loss": _fingerprint(loss_cfg)})


def _fingerprint(loss_cfg: DPOLossConfig) -> dict:
  # soft_labels is recorded only when on, so runs from before the field existed still resume
  return {k: v for k, v in dataclasses.asdict(loss_cfg).items() if k != "soft_labels" or v}
