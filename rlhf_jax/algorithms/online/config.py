"""Frozen, validated configs of the online RL trainer (PPO, RLOO, GRPO and its loss family,
REINFORCE++-baseline).

``PPOConfig`` (``config.ppo``) holds every hyperparameter that reaches jitted code;
``PPODataConfig`` (``config.data``, a ``sections.DataSource``) says where the prompts come from.
The models come from ``config.sources`` (``sections.Sources``), the token limits from
``config.limits`` (``sections.Limits``: ``max_prompt_len``, and ``max_response_len`` = the
response budget), the iteration cadence from ``config.loop`` (``train.LoopConfig``, one step =
one iteration). Errors name the field and the allowed values, and ``experiments/configs/ppo_*.py``
build their sections from these defaults (``train.config_dicts.dataclass_section``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from rlhf_jax.algorithms import sections

ALGORITHMS = ("ppo", "rloo", "grpo", "dr_grpo", "reinforce_baseline")
# TRL's GRPOConfig.loss_type names ("" = the clipped surrogate reduced by ``aggregation``).
LOSS_TYPES = ("", "grpo", "bnpo", "dr_grpo", "dapo", "cispo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
CRITIC_INITS = ("reward_model", "sft")
KL_CONTROLLERS = ("fixed", "adaptive")
KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                "seq_mean_token_sum_norm")
# Advantage whitening per algorithm when PPOConfig.whiten_advantages is None: on for PPO (GAE
# advantages, as InstructGPT / TRL); off for the group baselines, whose advantages are already
# centred per group; GRPO divides by the group std itself, and Dr. GRPO exists to drop it.
# REINFORCE++-baseline whitens inside its estimator (OpenRLHF), so not a second time.
WHITEN_ADVANTAGES_DEFAULT = {
    "ppo": True, "rloo": False, "grpo": False, "dr_grpo": False, "reinforce_baseline": False}


def _bad(cls: str, field: str, value, allowed: str):
  raise ValueError(f"{cls}.{field}={value!r} is invalid; allowed: {allowed}")


def _int_at_least(cls: str, obj, names, low: int):
  for name in names:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      _bad(cls, name, value, f"an int >= {low}")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
  """Hyperparameters of one RL iteration (rollout + update).

  Attributes:
    algorithm: ``ppo`` (critic + GAE, KL penalty in the per-token reward), ``rloo`` (leave-one-out
      baseline over ``num_samples`` responses per prompt, KL penalty in the sequence reward),
      ``grpo`` (group-normalised advantages, KL as a k3 loss term), ``dr_grpo`` (group-centred
      advantages without the std, constant token normaliser) or ``reinforce_baseline``
      (REINFORCE++-baseline, OpenRLHF's name: group-mean baseline, per-token KL penalty in the
      reward-to-go, then whitening over the batch's tokens).
    loss_type: TRL's ``GRPOConfig.loss_type``: how the policy loss is formed and normalised
      (``losses.grpo_policy_loss``): ``grpo`` (sequence mean of token means), ``bnpo`` (mean
      over the minibatch's tokens), ``dr_grpo`` (sum / (rows · max_new_tokens)), ``dapo``
      (sum / tokens per minibatch of the whole rollout batch, so every token of the iteration
      weighs the same; TRL's default) or ``cispo`` (capped importance weight, no gradient, on the
      REINFORCE term; cap ``clip_eps_high``, required). The KL loss term is normalised alike.
      ``""`` (the default) keeps the clipped surrogate reduced by ``aggregation``
      (``losses.ppo_policy_loss``), as before.
    importance_sampling_level: ``token`` or ``sequence`` (GSPO: one ratio per response,
      exp(mean token log-ratio)); ``sequence`` needs a ``loss_type``.
    dynamic_sampling: DAPO's dynamic sampling (critic-free algorithms): groups whose rewards are
      all equal (max - min <= ``dynamic_sampling_tol``; their advantages are 0) are dropped and
      replaced by groups from further prompt batches, at most ``dynamic_sampling_max_batches``
      generations per iteration; a batch still short is filled with dropped groups (never empty)
      and the shortfall is logged (``dynamic_sampling_shortfall``).
    overlong_buffer_len: DAPO's soft overlong punishment (OpenRLHF's
      ``--reward.overlong_buffer_len``; 0 = off): responses longer than max_new_tokens - L lose
      up to ``overlong_penalty_factor`` linearly (``losses.overlong_penalty``).
    mask_truncated_completions: DAPO's overlong filtering (TRL's name): responses without EOS are
      left out of the loss (they still count in their group's baseline).
    rollout_batch_size: prompts per iteration; each gets ``num_samples`` responses. In an
      experiment config this is ``config.data.batch_size``.
    num_samples: responses per prompt (>= 2 for the critic-free algorithms).
    max_new_tokens: response budget R (tokens incl. EOS); in an experiment config this is
      ``config.limits.max_response_len``.
    temperature, top_k, top_p: sampling settings. Log-probs for the ratio and the KL are computed
      from ``logits / temperature`` (as TRL does); top-k / top-p only shape the sampler.
    num_ppo_epochs: passes over each rollout batch.
    num_minibatches: minibatches per epoch (must divide ``rollout_batch_size * num_samples``).
    clip_eps: PPO ratio clip ε; ``clip_eps_high`` > 0 gives DAPO's asymmetric upper clip (0 = ε).
    vf_clip_eps: value clip (0 disables the clipped value loss).
    vf_coef: weight of the value loss (its gradient only reaches the value model's params).
    ent_coef: weight of the entropy bonus (0 disables it).
    gamma, lam: GAE discount and trace decay.
    whiten_advantages: normalise advantages over the rollout batch (mean 0, std 1) before the
      update; None (the default) = per algorithm (``WHITEN_ADVANTAGES_DEFAULT``: on for ``ppo``,
      off for ``rloo`` / ``grpo`` / ``dr_grpo``; whitening Dr. GRPO's advantages would put back
      the std division it removes).
    whiten_rewards: scale-only whitening of the shaped per-token rewards before GAE.
    kl_controller: ``fixed`` (β = ``kl_coef``) or ``adaptive`` (Ziegler et al. 2019, towards
      ``kl_target`` nats per sequence with horizon ``kl_horizon``).
    kl_coef: β (initial β for the adaptive controller).
    kl_estimator: estimator of the per-token KL in the reward (``k1`` as InstructGPT / TRL PPO).
      GRPO always uses k3 in its loss term (DeepSeekMath).
    missing_eos_penalty: subtracted from the reward-model score of responses that never emit EOS.
    critic_init: ``reward_model`` (InstructGPT) or ``sft``: where the value model's backbone starts;
      the head starts from the reward model's head or a fresh init respectively.
    aggregation: how per-token losses are reduced (``losses.TOKEN_AGGREGATIONS``); ``dr_grpo``
      requires ``seq_mean_token_sum_norm``.
  """

  algorithm: str = "ppo"
  rollout_batch_size: int = 64
  num_samples: int = 1
  max_new_tokens: int = 48
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  num_ppo_epochs: int = 4
  num_minibatches: int = 4
  clip_eps: float = 0.2
  clip_eps_high: float = 0.0
  vf_clip_eps: float = 0.2
  vf_coef: float = 0.1
  ent_coef: float = 0.0
  gamma: float = 1.0
  lam: float = 0.95
  whiten_advantages: bool | None = None
  whiten_rewards: bool = False
  kl_controller: str = "fixed"
  kl_coef: float = 0.05
  kl_target: float = 6.0
  kl_horizon: float = 10000.0
  kl_estimator: str = "k1"
  missing_eos_penalty: float = 0.0
  critic_init: str = "reward_model"
  aggregation: str = "token_mean"
  loss_type: str = ""
  importance_sampling_level: str = "token"
  dynamic_sampling: bool = False
  dynamic_sampling_tol: float = 0.0
  dynamic_sampling_max_batches: int = 3
  overlong_buffer_len: int = 0
  overlong_penalty_factor: float = 1.0
  mask_truncated_completions: bool = False

  def __post_init__(self):
    c = "PPOConfig"
    if not isinstance(self.whiten_advantages, (bool, type(None))):
      _bad(c, "whiten_advantages", self.whiten_advantages, "True | False | None (per algorithm)")
    for name, allowed in (("algorithm", ALGORITHMS), ("critic_init", CRITIC_INITS),
                          ("kl_controller", KL_CONTROLLERS), ("kl_estimator", KL_ESTIMATORS),
                          ("aggregation", AGGREGATIONS), ("loss_type", LOSS_TYPES),
                          ("importance_sampling_level", IMPORTANCE_SAMPLING_LEVELS)):
      if getattr(self, name) not in allowed:
        _bad(c, name, getattr(self, name), " | ".join(allowed))
    _int_at_least(c, self, ("rollout_batch_size", "num_samples", "max_new_tokens", "num_ppo_epochs",
                            "num_minibatches"), 1)
    _int_at_least(c, self, ("top_k",), 0)
    if self.algorithm != "ppo" and self.num_samples < 2:
      _bad(
          c, "num_samples", self.num_samples, f"an int >= 2 with algorithm={self.algorithm!r} "
          "(the group baseline needs several responses per prompt)")
    if self.loss_type:
      if self.aggregation != "token_mean":
        _bad(
            c, "aggregation", self.aggregation, f"the default 'token_mean' with loss_type="
            f"{self.loss_type!r} (the loss type fixes the token normalisation)")
      if self.loss_type == "cispo" and not self.clip_eps_high > 0:
        _bad(
            c, "clip_eps_high", self.clip_eps_high, "a float > 0 with loss_type='cispo' (the "
            "cap of the importance weight, ε_max; ScaleRL recommends 5.0)")
    elif self.importance_sampling_level != "token":
      _bad(c, "importance_sampling_level", self.importance_sampling_level,
           "'token' with loss_type='' (set a loss_type, e.g. 'grpo', for GSPO's sequence ratio)")
    elif self.algorithm == "dr_grpo" and self.aggregation != "seq_mean_token_sum_norm":
      _bad(c, "aggregation", self.aggregation, "seq_mean_token_sum_norm with algorithm='dr_grpo'")
    for name in ("dynamic_sampling", "mask_truncated_completions"):
      if not isinstance(getattr(self, name), bool):
        _bad(c, name, getattr(self, name), "True | False")
    if self.dynamic_sampling and self.algorithm == "ppo":
      _bad(c, "dynamic_sampling", self.dynamic_sampling, "False with algorithm='ppo' (it filters "
           "the groups of the critic-free algorithms)")
    _int_at_least(c, self, ("dynamic_sampling_max_batches",), 1)
    _int_at_least(c, self, ("overlong_buffer_len",), 0)
    if self.overlong_buffer_len > self.max_new_tokens:
      _bad(c, "overlong_buffer_len", self.overlong_buffer_len,
           f"an int in [0, max_new_tokens={self.max_new_tokens}]")
    if self.rollout_size % self.num_minibatches:
      _bad(c, "num_minibatches", self.num_minibatches,
           f"a divisor of rollout_batch_size * num_samples = {self.rollout_size}")
    if not self.temperature > 0:
      _bad(c, "temperature", self.temperature, "a float > 0")
    if not 0.0 < self.top_p <= 1.0:
      _bad(c, "top_p", self.top_p, "a float in (0, 1]")
    if not self.clip_eps > 0:
      _bad(c, "clip_eps", self.clip_eps, "a float > 0")
    for name in ("clip_eps_high", "vf_clip_eps", "vf_coef", "ent_coef", "kl_coef",
                 "missing_eos_penalty", "dynamic_sampling_tol", "overlong_penalty_factor"):
      if not getattr(self, name) >= 0:
        _bad(c, name, getattr(self, name), "a float >= 0")
    for name in ("gamma", "lam"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        _bad(c, name, getattr(self, name), "a float in [0, 1]")
    for name in ("kl_target", "kl_horizon"):
      if not getattr(self, name) > 0:
        _bad(c, name, getattr(self, name), "a float > 0")
    if self.kl_controller == "adaptive" and not self.kl_coef > 0:
      _bad(c, "kl_coef", self.kl_coef, "a float > 0 with kl_controller='adaptive'")

  @property
  def rollout_size(self) -> int:
    """Rows per rollout: prompts × samples per prompt."""
    return self.rollout_batch_size * self.num_samples

  @property
  def whitens_advantages(self) -> bool:
    """``whiten_advantages`` resolved per algorithm (``WHITEN_ADVANTAGES_DEFAULT``) when None."""
    if self.whiten_advantages is None:
      return WHITEN_ADVANTAGES_DEFAULT[self.algorithm]
    return self.whiten_advantages

  @property
  def uses_critic(self) -> bool:
    return self.algorithm == "ppo"

  @property
  def minibatch_size(self) -> int:
    return self.rollout_size // self.num_minibatches

  @property
  def updates_per_iteration(self) -> int:
    return self.num_ppo_epochs * self.num_minibatches


@dataclasses.dataclass(frozen=True)
class PPODataConfig(sections.DataSource):
  """Where the prompts come from (``config.data``; the shared ``sections.DataSource`` fields).

  ``source="synthetic"``: the embedded task's prompts (``synthetic_dir``, or generated under
  ``<workdir>/data/synthetic``), held-out ones from its ``prompts_test.jsonl``. ``source="jsonl"``:
  ``train_jsonl`` holds the training prompts (``{"prompt"}`` or chat ``messages`` records; any
  record kind with a prompt), ``eval_prompts_jsonl`` (or ``eval_jsonl``) the held-out ones.
  ``batch_size`` is the number of prompts per iteration (each answered
  ``ppo.num_samples`` times); ``shuffle_seed`` orders them per epoch. Held-out prompts are
  optional with ``source="jsonl"`` (no evaluation without them).
  """

  OPTIONAL_JSONL: ClassVar[tuple] = ("eval_jsonl",)


JUDGES = ("reward_model", "annotator")


@dataclasses.dataclass(frozen=True)
class OnlineDPOConfig:
  """Hyperparameters of online DPO (``config.online_dpo``; ``algorithms/online/online_dpo.py``).

  Attributes:
    loss_type: a DPO-family loss (``losses.DPO_LOSS_TYPES``; TRL's ``OnlineDPOConfig.loss_type``
      offers ``sigmoid`` and ``ipo``). ``ipo`` here is ``losses.dpo_loss``'s length-normalised IPO
      (TRL's offline DPO), not TRL online DPO's unnormalised one.
    beta: β of the loss (TRL's default 0.1).
    label_smoothing: ε of the losses that take one (cDPO, robust, ...).
    judge: who picks the preferred of the two samples: ``reward_model`` (``sources.
      reward_model_workdir``; the higher score wins, ties to the first, as TRL) or ``annotator``
      (``config.annotator``, a ``feedback.annotators`` label_fn; the label is drawn from its
      P(a ≻ b), so a simulated human is as noisy as the one that labelled the offline pairs).
    temperature, top_k, top_p: sampling of the two responses (TRL's default temperature 0.9);
      the loss's log-probs are the model's own (temperature 1, as TRL).
    missing_eos_penalty: subtracted from the reward-model score of a response without EOS
      (``judge="reward_model"``; TRL's ``missing_eos_penalty``).
  """

  loss_type: str = "sigmoid"
  beta: float = 0.1
  label_smoothing: float = 0.0
  judge: str = "reward_model"
  temperature: float = 0.9
  top_k: int = 0
  top_p: float = 1.0
  missing_eos_penalty: float = 0.0

  def __post_init__(self):
    # pylint: disable-next=import-outside-toplevel  (imports jax; the config module stays light)
    from rlhf_jax import losses
    c = "OnlineDPOConfig"
    if self.loss_type not in losses.DPO_LOSS_TYPES:
      _bad(c, "loss_type", self.loss_type, " | ".join(losses.DPO_LOSS_TYPES))
    if self.loss_type in ("aot", "aot_unpaired"):
      _bad(c, "loss_type", self.loss_type, "a per-pair loss (aot sorts over the batch)")
    if self.judge not in JUDGES:
      _bad(c, "judge", self.judge, " | ".join(JUDGES))
    if not self.beta > 0:
      _bad(c, "beta", self.beta, "a float > 0")
    if not 0.0 <= self.label_smoothing < 0.5:
      _bad(c, "label_smoothing", self.label_smoothing, "a float in [0, 0.5)")
    if not self.temperature > 0:
      _bad(c, "temperature", self.temperature, "a float > 0")
    _int_at_least(c, self, ("top_k",), 0)
    if not 0.0 < self.top_p <= 1.0:
      _bad(c, "top_p", self.top_p, "a float in (0, 1]")
    if not self.missing_eos_penalty >= 0:
      _bad(c, "missing_eos_penalty", self.missing_eos_penalty, "a float >= 0")
