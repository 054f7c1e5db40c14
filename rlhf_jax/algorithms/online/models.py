"""The four models of online RLHF and the checks that they fit together.

* policy π_θ — starts from an SFT run (``train.load_sft_params``), trained;
* reference π_ref — the SFT model (or ``reference_workdir``), frozen, for the KL penalty;
* reward model r_φ — ``scoring.load_reward_model`` (params + stored normalisation), frozen;
* value model V_ψ — ``ValueModel`` whose backbone and head start from the reward model
  (InstructGPT, ``critic_init="reward_model"``) or backbone from the SFT model with a fresh head
  (``critic_init="sft"``); only for ``algorithm="ppo"``.

All of them read the same token ids, so a reference or reward model built with another tokenizer
or vocabulary is refused before any work (:func:`check_compatible`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import flax.linen as nn

from rlhf_jax import models, parallel, train
from rlhf_jax import scoring
from rlhf_jax.algorithms.online.config import PPOConfig, PPODataConfig
from rlhf_jax.data import tokenizers as tok_lib


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


def check_compatible(policy_tokenizer: tok_lib.Tokenizer, policy_config: models.ModelConfig, *,
                     reference_tokenizer: tok_lib.Tokenizer, reference_config: models.ModelConfig,
                     reward_info: scoring.RewardModelInfo) -> None:
  """Raises :class:`IncompatibleModelsError` (or ``scoring.TokenizerMismatchError``) when the
  reference or the reward model would read the policy's token ids differently."""
  if reference_tokenizer.fingerprint() != policy_tokenizer.fingerprint():
    raise IncompatibleModelsError(
        f"the reference model's tokenizer {reference_tokenizer!r} (fingerprint "
        f"{reference_tokenizer.fingerprint()}) differs from the policy's {policy_tokenizer!r} "
        f"(fingerprint {policy_tokenizer.fingerprint()}); the KL penalty would compare log-probs of "
        "different texts. Use a reference SFT run with the policy's tokenizer.")
  if reference_config != policy_config:
    diff = {f.name: (getattr(reference_config, f.name), getattr(policy_config, f.name))
            for f in dataclasses.fields(policy_config)
            if getattr(reference_config, f.name) != getattr(policy_config, f.name)}
    raise IncompatibleModelsError(
        f"the reference model's config differs from the policy's in {sorted(diff)} "
        f"(reference, policy) = {diff}; the reference must be the policy's architecture "
        "(normally the SFT model the policy starts from)")
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


def init_value_params(config: PPOConfig, policy_config: models.ModelConfig, policy_params: Any,
                      reward: scoring.RewardModelHandle, rng: jax.Array):
  """``(value_model, value_params)`` for ``config.critic_init`` (``(None, None)`` without a critic)."""
  if not config.uses_critic:
    return None, None
  if config.critic_init == "reward_model":
    if reward.num_outputs != 1:
      raise ValueError(f"PPOConfig.critic_init='reward_model' needs a reward model with one output, "
                       f"this one has {reward.output_names}; use critic_init='sft'")
    value_model = models.ValueModel(reward.info.model_config())
    params = jax.device_get(reward.params)
    return value_model, jax.tree.map(jnp.asarray, models.with_backbone(params, params))
  value_model = models.ValueModel(policy_config)
  dummy = jnp.ones((1, 8), jnp.int32)
  fresh = nn.meta.unbox(value_model.init(rng, dummy, dummy))["params"]
  return value_model, models.with_backbone(fresh, policy_params)


def load_models(config: PPOConfig, data: PPODataConfig, rng: jax.Array, *, mesh=None,
                rules=parallel.DEFAULT_RULES) -> PPOModels:
  """Loads policy / reference (SFT runs) and the reward model, checks them, builds the critic.
  The reward model is restored onto ``mesh`` with ``rules`` (default: one device)."""
  for name in ("sft_workdir", "reward_model_workdir"):
    if not getattr(data, name):
      raise ValueError(f"config.data.{name} is empty; allowed: the workdir of a finished "
                       f"{'SFT' if name == 'sft_workdir' else 'reward-model'} run")
  policy_ckpt = train.load_sft_params(data.sft_workdir)
  ref_ckpt = train.load_sft_params(data.reference_workdir) if data.reference_workdir else policy_ckpt
  info = scoring.read_reward_model_info(data.reward_model_workdir)
  check_compatible(policy_ckpt.tokenizer, policy_ckpt.model_config,
                   reference_tokenizer=ref_ckpt.tokenizer, reference_config=ref_ckpt.model_config,
                   reward_info=info)
  reward = scoring.load_reward_model(data.reward_model_workdir,
                                            policy_tokenizer=policy_ckpt.tokenizer, mesh=mesh,
                                            rules=rules)
  value_model, value_params = init_value_params(config, policy_ckpt.model_config,
                                                policy_ckpt.params, reward, rng)
  return PPOModels(tokenizer=policy_ckpt.tokenizer,
                   policy=models.Transformer(policy_ckpt.model_config),
                   policy_params=policy_ckpt.params, ref_params=ref_ckpt.params, reward=reward,
                   value_model=value_model, value_params=value_params)
