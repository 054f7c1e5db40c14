"""Names → loss functions, so configs can pick a loss by string.

Every DPO ``loss_type`` is also registered on its own as ``dpo_<loss_type>`` (``dpo_loss`` with that
``loss_type`` bound); ``"dpo"`` is the default sigmoid loss. ``get_loss`` fails with the allowed
names on a typo.
"""

from __future__ import annotations

import functools
from typing import Callable

from rlhf_jax.losses import advantages, dpo, grpo, kl, kto, listwise, ppo, preference, reward, sft

_BASE: dict[str, Callable] = {
    "sft": sft.sft_loss,
    "bradley_terry": reward.bradley_terry_loss,
    "pairwise_logexp": reward.pairwise_logexp_loss,
    "all_pairs_ranking": reward.all_pairs_ranking_loss,
    "plackett_luce": listwise.plackett_luce_loss,
    "likert_regression": reward.likert_regression_loss,
    "multi_attribute": reward.multi_attribute_loss,
    "dpo": dpo.dpo_loss,
    "simpo": preference.simpo_loss,
    "orpo": preference.orpo_loss,
    "kto": kto.kto_loss,
    "kto_reference_point": kto.kto_reference_point,
    "pro": listwise.pro_loss,
    "rrhf": listwise.rrhf_loss,
    "ppo_policy": ppo.ppo_policy_loss,
    "ppo_value": ppo.ppo_value_loss,
    "entropy": ppo.entropy_loss,
    "kl": kl.kl_estimate,
    "gae": advantages.gae,
    "rloo": advantages.rloo_advantages,
    "grpo": advantages.grpo_advantages,
    "dr_grpo": advantages.dr_grpo_advantages,
    "reinforce_baseline": advantages.reinforce_baseline_advantages,
    "grpo_policy": grpo.grpo_policy_loss,
    "overlong_penalty": grpo.overlong_penalty,}


def _dpo_variant(loss_type: str) -> Callable:
  fn = functools.partial(dpo.dpo_loss, loss_type=loss_type)
  functools.update_wrapper(fn, dpo.dpo_loss)
  return fn


LOSSES: dict[str, Callable] = {
    **_BASE,
    **{f"dpo_{name}": _dpo_variant(name) for name in dpo.DPO_LOSS_TYPES},}


def get_loss(name: str) -> Callable:
  """The function registered as ``name``; a ValueError listing every allowed name otherwise."""
  try:
    return LOSSES[name]
  except KeyError:
    raise ValueError(f"unknown loss {name!r}; allowed: {sorted(LOSSES)}") from None


def list_losses() -> list[str]:
  return sorted(LOSSES)
