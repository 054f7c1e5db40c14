"""The four models of online RLHF and the checks that they fit together.

* policy π_θ — starts from an SFT run (``train.load_sft_params``) or a Hugging Face checkpoint
  (``sources.pretrained``), trained;
* reference π_ref — the SFT model (or ``reference_workdir``), frozen, for the KL penalty;
* reward model r_φ — ``scoring.load_reward_model`` (params + stored normalisation), frozen;
* value model V_ψ — ``ValueModel`` whose backbone and head start from a reward model
  (InstructGPT, ``critic_init="reward_model"``: ``sources.value_model_workdir``, default the reward
  model itself) or backbone from the SFT model with a fresh head (``critic_init="sft"``); only
  for ``algorithm="ppo"``. PPO's rewards are the RM's *normalised* scores (r - μ) / σ, so the
  copied head is put on that scale too (kernel / σ, (b - μ) / σ): V₀ at the last token then
  predicts the reward PPO actually pays, not the raw score.

With ``config.lora`` the policy trains adapters over the frozen SFT params, which are also the
reference (the same arrays), and the critic trains its own adapters (A drawn with seed
``lora.seed + 1``) and its head in full over a frozen backbone: with ``critic_init="sft"`` that
backbone *is* the policy's base (the same arrays again: one copy of the base for policy,
reference and value), with ``critic_init="reward_model"`` it is the value-model run's own
(merged, for a LoRA reward model) backbone, frozen (:func:`init_value_params`).

All of them read the same token ids, so a reference or reward model built with another tokenizer
or vocabulary is refused before any work (:func:`check_compatible`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import flax.linen as nn

from rlhf_jax import fileio, models, parallel, train
from rlhf_jax import scoring
from rlhf_jax.algorithms import common, sections
from rlhf_jax.algorithms.online.config import PPOConfig
from rlhf_jax.data import tokenizers as tok_lib
from rlhf_jax.models import lora as lora_lib


class IncompatibleModelsError(ValueError):
  """The reference / reward model cannot score the policy's token ids."""


class PPOModels(NamedTuple):
  tokenizer: tok_lib.Tokenizer
  policy: models.Transformer
  policy_params: Any
  ref_params: Any  # same architecture as the policy (one apply function)
  reward: scoring.RewardModelHandle
  value_model: models.ValueModel | None
  value_params: Any  # initial value params (None without a critic)
  pretrained: str = ""  # sources.pretrained the policy started from ('' = an SFT run)


def check_compatible(policy_tokenizer: tok_lib.Tokenizer, policy_config: models.ModelConfig, *,
                     reference_tokenizer: tok_lib.Tokenizer, reference_config: models.ModelConfig,
                     reward_info: scoring.RewardModelInfo) -> None:
  """Raises :class:`IncompatibleModelsError` (or ``scoring.TokenizerMismatchError``) when the
  reference or the reward model would read the policy's token ids differently."""
  try:  # the same check as every method's reference (common.check_reference), PPO's error type
    common.check_reference(policy_config, policy_tokenizer, reference_config, reference_tokenizer,
                           where="reference model's")
  except common.ReferenceMismatchError as err:
    raise IncompatibleModelsError(f"{err} (the KL penalty compares the policy's log-probs with "
                                  "the reference's)") from None
  scoring.check_tokenizer(reward_info, policy_tokenizer, what="policy")
  rm_vocab = int(reward_info.model["vocab_size"])
  if rm_vocab != policy_config.vocab_size:
    raise IncompatibleModelsError(
        f"the reward model's vocab_size={rm_vocab} differs from the policy's "
        f"vocab_size={policy_config.vocab_size}; it cannot embed every id the policy samples")
  if policy_tokenizer.vocab_size > policy_config.vocab_size:
    raise IncompatibleModelsError(
        f"the tokenizer has {policy_tokenizer.vocab_size} ids but the policy's "
        f"vocab_size={policy_config.vocab_size}")


def normalized_head(params: Any, mean: float, std: float) -> Any:
  """A one-output head's params on the normalised scale: ``w / σ``, ``(b - μ) / σ``, so that
  ``head(h) = (w·h + b - μ) / σ`` (``scoring.normalize_rewards`` of the raw score)."""
  head = params["head"]
  kernel = jnp.asarray(head["kernel"], jnp.float32) / std
  bias = (jnp.asarray(head["bias"], jnp.float32) - mean) / std
  return {
      **params, "head": {
          **head, "kernel": kernel.astype(jnp.asarray(head["kernel"]).dtype),
          "bias": bias.astype(jnp.asarray(head["bias"]).dtype)}}


def init_value_params(config: PPOConfig, policy_config: models.ModelConfig, policy_params: Any,
                      reward: scoring.RewardModelHandle, rng: jax.Array,
                      lora_cfg: lora_lib.LoraConfig | None = None, mesh: Any = None,
                      rules: Any = None):
  """``(value_model, value_params)`` for ``config.critic_init`` (``(None, None)`` without a critic).

  With ``critic_init="reward_model"`` ``reward`` is the value-model run's handle: its backbone and
  its head (normalised with its stored μ, σ: :func:`normalized_head`) start the critic. With
  ``lora_cfg`` the critic is a ``LoraModel`` (own adapters, seed + 1; the head trained in full)
  whose frozen ``base`` is that backbone: for ``critic_init="sft"`` the very arrays of
  ``policy_params`` (the policy's LoRA base), not a copy.
  """
  if not config.uses_critic:
    return None, None
  value_model, value_params = _value_params(config, policy_config, policy_params, reward, rng)
  if lora_cfg is None:
    return value_model, value_params
  critic_cfg = dataclasses.replace(lora_cfg, seed=lora_cfg.seed + 1)
  value_model = lora_lib.LoraModel(value_model, critic_cfg, trained=("head",))
  return value_model, lora_lib.make_params(value_model, value_params, critic_cfg, mesh, rules)


def _value_params(config: PPOConfig, policy_config: models.ModelConfig, policy_params: Any,
                  reward: scoring.RewardModelHandle, rng: jax.Array):
  if config.critic_init == "reward_model":
    if reward.num_outputs != 1:
      raise ValueError(
          f"PPOConfig.critic_init='reward_model' needs a reward model with one output, "
          f"this one has {reward.output_names}; use critic_init='sft'")
    value_model = models.ValueModel(reward.info.model_config())
    params = jax.tree.map(jnp.asarray, parallel.to_host(reward.params))  # multi-host: gathered
    params = normalized_head(params, float(reward.info.mean[0]), float(reward.info.std[0]))
    return value_model, models.with_backbone(params, params)
  value_model = models.ValueModel(policy_config)
  dummy = jnp.ones((1, 8), jnp.int32)
  fresh = nn.meta.unbox(value_model.init(rng, dummy, dummy))["params"]
  return value_model, models.with_backbone(fresh, policy_params)


def load_models(config: PPOConfig, sources: sections.Sources, rng: jax.Array, *, mesh=None,
                rules=parallel.DEFAULT_RULES, model_section=None,
                lora: sections.Lora | None = None) -> PPOModels:
  """Loads policy / reference (SFT runs) and the reward model of ``config.sources``, checks them,
  builds the critic (from ``sources.value_model``). The reward models are restored onto ``mesh``
  with ``rules`` (default: one device). With ``lora`` enabled the policy is a
  ``models.lora.LoraModel`` over the frozen SFT params, whose ``LoraParams.base`` is the reference
  (the same arrays) unless ``sources.reference_workdir`` names another run."""
  sft_dir = sources.policy or sources.require(
      "sft_workdir", "ppo", "the policy starts from it "
      "(or sources.pretrained)")
  rm_dir = sources.require("reward_model_workdir", "ppo", "it scores the rollouts")
  policy_ckpt = train.load_sft_params(sft_dir,
                                      **common.pretrained_kwargs(sources, mesh, model_section))
  if sources.tokenizer and not sources.pretrained:  # with pretrained it overrides the folder's
    wanted = tok_lib.load_tokenizer(sources.tokenizer)
    if wanted.fingerprint() != policy_ckpt.tokenizer.fingerprint():
      raise IncompatibleModelsError(
          f"config.sources.tokenizer={sources.tokenizer!r} (fingerprint {wanted.fingerprint()}) "
          f"differs from the SFT run's ({policy_ckpt.tokenizer.fingerprint()}); leave it '' to "
          "use the SFT run's tokenizer")
  ref_ckpt = (train.load_sft_params(sources.reference_workdir)
              if sources.reference_workdir else policy_ckpt)
  info = scoring.read_reward_model_info(rm_dir)
  check_compatible(policy_ckpt.tokenizer, policy_ckpt.model_config,
                   reference_tokenizer=ref_ckpt.tokenizer, reference_config=ref_ckpt.model_config,
                   reward_info=info)
  reward = scoring.load_reward_model(rm_dir, policy_tokenizer=policy_ckpt.tokenizer, mesh=mesh,
                                     rules=rules, attribute_weights=sources.attribute_weights)
  value_source = reward
  if (config.uses_critic and config.critic_init == "reward_model" and
      fileio.absolute(sources.value_model) != fileio.absolute(rm_dir)):
    value_source = scoring.load_reward_model(sources.value_model,
                                             policy_tokenizer=policy_ckpt.tokenizer, mesh=mesh,
                                             rules=rules)
  lora_cfg = lora.config() if lora is not None else None
  value_model, value_params = init_value_params(config, policy_ckpt.model_config,
                                                policy_ckpt.params, value_source, rng, lora_cfg)
  policy, policy_params = models.Transformer(policy_ckpt.model_config), policy_ckpt.params
  if lora_cfg is not None:
    policy = lora_lib.LoraModel(policy, lora_cfg)
    policy_params = lora_lib.make_params(policy, policy_params, lora_cfg)
  return PPOModels(tokenizer=policy_ckpt.tokenizer, policy=policy, policy_params=policy_params,
                   ref_params=ref_ckpt.params, reward=reward, value_model=value_model,
                   value_params=value_params, pretrained=sources.pretrained)
