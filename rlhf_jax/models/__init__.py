"""Flax Linen decoder (GPT-2 / Llama / Qwen2 / Gemma family options), reward/value heads, KV cache.

Public names: `ModelConfig`, `get_model_config`, `PRESETS`, `Transformer`, `TransformerOutput`,
`RewardModel`, `ValueModel`, `KVCache`, `init_cache`, `token_logprobs`, `token_entropy`,
`sequence_logprobs`, `response_logps` (summed, jitted), `response_token_logps` (per token, pure),
`stack_layer_params`, `unstack_layer_params`, `with_backbone`,
`last_token_index`, `default_positions`, `abstract_variables`, `abstract_params`.
"""

from rlhf_jax.models.abstract import abstract_params, abstract_variables
from rlhf_jax.models.config import DTYPES, PRESETS, ModelConfig, get_model_config
from rlhf_jax.models.heads import RewardModel, ValueModel, last_token_index, with_backbone
from rlhf_jax.models.kv_cache import KVCache, init_cache
from rlhf_jax.models.logprobs import (response_logps, response_token_logps, sequence_logprobs,
                                      token_entropy, token_logprobs)
from rlhf_jax.models.transformer import (Transformer, TransformerOutput, default_positions,
                                         stack_layer_params, unstack_layer_params)

__all__ = [
    "DTYPES",
    "PRESETS",
    "ModelConfig",
    "get_model_config",
    "KVCache",
    "init_cache",
    "response_logps",
    "response_token_logps",
    "sequence_logprobs",
    "token_entropy",
    "token_logprobs",
    "Transformer",
    "TransformerOutput",
    "default_positions",
    "stack_layer_params",
    "unstack_layer_params",
    "RewardModel",
    "ValueModel",
    "last_token_index",
    "with_backbone",
    "abstract_variables",
    "abstract_params",]
