"""Squared-hinge DPO, the README's "Adding a method" example (``tests/test_adding_a_method.py``
copies it into a package, registers it and trains it end to end).

For pair b with summed response log-probs of the policy (π) and the frozen reference (ref),

    Δ_b = (π_c − ref_c) − (π_r − ref_r),    L_b = max(0, 1 − β Δ_b)²

the squared version of SLiC's hinge (TRL's ``loss_type="hinge"`` is the unsquared one): the loss and
its gradient −2β(1 − βΔ) vanish once the implicit-reward margin reaches 1/β.
In the project the loss would live in ``rlhf_jax/losses/`` and the rest in
``rlhf_jax/algorithms/offline/sqhinge.py``; this file holds both so that it is one example.
"""

import dataclasses

import jax.numpy as jnp

from rlhf_jax import models
from rlhf_jax.algorithms import reference
from rlhf_jax.algorithms.offline import pairwise_shell
from rlhf_jax.data.kinds import pairwise
from rlhf_jax.train import config_dicts


def sqhinge_loss(pc_B, pr_B, rc_B, rr_B, *, beta: float):
  """Per-pair ``max(0, 1 − βΔ)²`` ``[B]`` and metrics (module docstring)."""
  margin_B = beta * ((pc_B - rc_B) - (pr_B - rr_B))
  per_B = jnp.square(jnp.maximum(0.0, 1.0 - margin_B))
  return per_B, {
      "rewards/margins": jnp.mean(margin_B), "rewards/accuracies": jnp.mean(
          (margin_B > 0).astype(jnp.float32))}


@dataclasses.dataclass(frozen=True)
class SqHingeConfig:
  """``config.loss``: β, the inverse target margin."""

  beta: float = 0.1

  def __post_init__(self):
    if not self.beta > 0:
      raise ValueError(f"SqHingeConfig.beta={self.beta!r} is invalid; allowed: a float > 0")


def make_loss_fn(model: models.Transformer, cfg: SqHingeConfig):
  """``loss_fn(params, batch, rng)`` over the stacked ``[2B, T]`` pairwise batch."""

  def loss_fn(params, batch, rng):
    del rng  # no dropout: preference training runs the policy deterministically
    sums_2B = models.response_logps(model, params, batch["tokens"], batch["mask"],
                                    batch["loss_mask"])
    pc_B, pr_B = pairwise.split(sums_2B)
    rc_B, rr_B = pairwise.split(batch[reference.REF_KEY])
    per_B, metrics = sqhinge_loss(pc_B, pr_B, rc_B, rr_B, beta=cfg.beta)
    return jnp.mean(per_B), metrics

  return loss_fn


def train_and_evaluate(config, workdir: str) -> dict:
  cfg = config_dicts.to_dataclass(SqHingeConfig, config.loss, "loss")
  return pairwise_shell.train_pairwise(config, workdir, method="sqhinge",
                                       label=f"sqhinge(beta={cfg.beta:g})",
                                       make_loss_fn=lambda model: make_loss_fn(model, cfg),
                                       uses_reference=True,
                                       fingerprint_extra={"loss": dataclasses.asdict(cfg)})
