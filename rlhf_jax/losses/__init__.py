"""Every alignment objective as a pure function over arrays and masks.

Contract: inputs are log-probs / rewards / values / masks (no model), math runs in at least float32,
every function is jit-able, and losses return ``(per_example_losses [B], metrics)`` where
``metrics`` is a dict of scalars; ``gae`` returns ``(advantages, returns)`` and ``kl_estimate``
per-token values. Each docstring writes out the math and names the paper. ``get_loss(name)`` maps
registry names to functions.
"""

from rlhf_jax.losses._common import TOKEN_AGGREGATIONS, aggregate_tokens
from rlhf_jax.losses.advantages import (
    dr_grpo_advantages,
    gae,
    grpo_advantages,
    masked_whiten,
    reinforce_baseline_advantages,
    rloo_advantages,
)
from rlhf_jax.losses.dpo import (DPO_LOSS_TYPES, F_DIVERGENCES, SOFT_LABEL_LOSS_TYPES, dpo_loss,
                                 f_divergence_score)
from rlhf_jax.losses.grpo import (
    GRPO_LOSS_TYPES,
    IMPORTANCE_SAMPLING_LEVELS,
    degenerate_groups,
    grpo_aggregate,
    grpo_policy_loss,
    overlong_penalty,
    sequence_log_ratio,
)
from rlhf_jax.losses.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
    kl_penalized_rewards,
    last_token_index,
)
from rlhf_jax.losses.kto import KTO_LOSS_TYPES, kto_loss, kto_reference_point
from rlhf_jax.losses.listwise import (
    best_candidate_index,
    length_normalized_scores,
    plackett_luce_loss,
    pro_loss,
    rrhf_loss,
)
from rlhf_jax.losses.ppo import entropy_from_logits, entropy_loss, ppo_policy_loss, ppo_value_loss
from rlhf_jax.losses.preference import orpo_loss, simpo_loss
from rlhf_jax.losses.registry import LOSSES, get_loss, list_losses
from rlhf_jax.losses.reward import (
    all_pairs_ranking_loss,
    bradley_terry_loss,
    likert_regression_loss,
    multi_attribute_loss,
    pairwise_logexp_loss,
    weighted_attribute_reward,
)
from rlhf_jax.losses.sft import sft_loss

__all__ = [
    "AdaptiveKLController",
    "DPO_LOSS_TYPES",
    "F_DIVERGENCES",
    "FixedKLController",
    "GRPO_LOSS_TYPES",
    "IMPORTANCE_SAMPLING_LEVELS",
    "KL_ESTIMATORS",
    "KTO_LOSS_TYPES",
    "LOSSES",
    "SOFT_LABEL_LOSS_TYPES",
    "TOKEN_AGGREGATIONS",
    "aggregate_tokens",
    "all_pairs_ranking_loss",
    "best_candidate_index",
    "bradley_terry_loss",
    "degenerate_groups",
    "dpo_loss",
    "dr_grpo_advantages",
    "entropy_from_logits",
    "entropy_loss",
    "f_divergence_score",
    "gae",
    "get_loss",
    "grpo_advantages",
    "grpo_aggregate",
    "grpo_policy_loss",
    "kl_estimate",
    "kl_penalized_rewards",
    "kto_loss",
    "kto_reference_point",
    "last_token_index",
    "length_normalized_scores",
    "likert_regression_loss",
    "list_losses",
    "masked_whiten",
    "multi_attribute_loss",
    "orpo_loss",
    "overlong_penalty",
    "pairwise_logexp_loss",
    "plackett_luce_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "pro_loss",
    "reinforce_baseline_advantages",
    "rloo_advantages",
    "rrhf_loss",
    "sequence_log_ratio",
    "sft_loss",
    "simpo_loss",
    "weighted_attribute_reward",]
