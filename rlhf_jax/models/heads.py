"""Scalar heads over the shared decoder: `RewardModel` (per sequence) and `ValueModel` (per token).

Both run the `Transformer` backbone with `return_logits=False` (no [B, T, V] projection) and apply a
float32 linear head to the final-norm hidden states. Params are `{"backbone": <Transformer params>,
"head": {"kernel", "bias"}}`, so an SFT param tree drops in as `backbone` (see `with_backbone`).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import Transformer


def last_token_index(mask_BxT: jax.Array) -> jax.Array:
  """Index of the last real token of each row: max{t : mask[t] = 1} (left or right padding).

  Rows without any real token get index 0.
  """
  t = mask_BxT.shape[1]
  idx_BxT = jnp.where(mask_BxT > 0, jnp.arange(t)[None, :], 0)
  return jnp.max(idx_BxT, axis=1)


class _Head(nn.Module):
  """float32 linear map D -> K with logically partitioned params ("embed", None)."""

  num_outputs: int
  init_std: float
  param_dtype: Any

  @nn.compact
  def __call__(self, h_xD: jax.Array) -> jax.Array:
    d = h_xD.shape[-1]
    kernel_DxK = self.param(
        "kernel",
        nn.with_logical_partitioning(nn.initializers.normal(self.init_std), ("embed", None)),
        (d, self.num_outputs), self.param_dtype)
    bias_K = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
                        (self.num_outputs,), self.param_dtype)
    return (jnp.einsum("...D,DK->...K", h_xD.astype(jnp.float32), kernel_DxK.astype(jnp.float32)) +
            bias_K.astype(jnp.float32))


class RewardModel(nn.Module):
  """r(x, y) = w^T h_last + b: K scalar rewards read at the last real token of each row.

  `apply(variables, tokens_BxT, mask_BxT) -> rewards_BxK` float32. K > 1 gives multi-attribute
  rewards (e.g. helpful / harmless). The head is initialised N(0, 1/(D+1)) as in Ziegler et al.
  (2019) / TRL, so initial rewards have roughly unit scale.
  """

  config: ModelConfig
  num_outputs: int = 1

  @nn.compact
  def __call__(self, tokens_BxT: jax.Array, mask_BxT: jax.Array | None = None, *,
               deterministic: bool = True) -> jax.Array:
    if self.num_outputs <= 0:
      raise ValueError(f"RewardModel.num_outputs={self.num_outputs} must be a positive int")
    if mask_BxT is None:
      mask_BxT = jnp.ones(tokens_BxT.shape, jnp.int32)
    out = Transformer(self.config, name="backbone")(tokens_BxT, mask_BxT, return_logits=False,
                                                    deterministic=deterministic)
    last_B = last_token_index(mask_BxT)
    h_last_BxD = jnp.take_along_axis(out.hidden_BxTxD, last_B[:, None, None], axis=1)[:, 0]
    std = 1.0 / math.sqrt(self.config.d_model + 1)
    return _Head(self.num_outputs, std, self.config.weight_dtype, name="head")(h_last_BxD)


class ValueModel(nn.Module):
  """V(s_t) = w^T h_t + b for every position: `apply(variables, tokens_BxT, mask_BxT) -> [B, T]`.

  values_BxT[:, t] is the value of the state *after* reading tokens[:, :t+1] (the same hidden
  state that produces the logits for token t+1). Padding positions hold unmasked values; mask them
  in the loss. For PPO the value model is usually initialised from the reward model's params (the
  trees match when num_outputs == 1).
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxT: jax.Array, mask_BxT: jax.Array | None = None, *,
               deterministic: bool = True) -> jax.Array:
    out = Transformer(self.config, name="backbone")(tokens_BxT, mask_BxT, return_logits=False,
                                                    deterministic=deterministic)
    std = 1.0 / math.sqrt(self.config.d_model + 1)
    return _Head(1, std, self.config.weight_dtype, name="head")(out.hidden_BxTxD)[..., 0]


def with_backbone(head_params: dict[str, Any], lm_params: dict[str, Any]) -> dict[str, Any]:
  """{"backbone": lm_params, "head": head_params["head"]}, dropping the LM's unused `lm_head`.

  Use it to start a reward / value model from an SFT (or reward-model) checkpoint. Untied LMs
  carry an `lm_head` that the heads never call; dropping it keeps the tree equal to the head
  model's `init`.
  """
  if "backbone" in lm_params:  # another head model's params (e.g. reward model -> value model)
    lm_params = lm_params["backbone"]
  backbone = {k: v for k, v in lm_params.items() if k != "lm_head"}
  return {"backbone": backbone, "head": head_params["head"]}
