"""Per-token log-probabilities and entropies from logits, in float32.

Alignment (the contract every loss relies on): column t holds the quantity for *predicting* token t,

  logps_BxT[:, t] = log p(tokens[:, t] | tokens[:, :t]) = logits[:, t-1, tokens[:, t]]
                                                          - logsumexp(logits[:, t-1, :]),

column 0 (nothing predicts the first token) and positions with loss_mask == 0 are 0.

Why logsumexp + gather: `log_softmax(logits)[..., y]` would build a second float32 [B, T, V] tensor
(the normalised log-probs) only to read one entry per row. Instead the logits are cast to float32
once, the normaliser is a reduction over V (`logsumexp`, which XLA fuses with the cast) and the
target logit is a gather, so memory beyond the logits is O(B*T).

Summed response log-probs (the one function every method uses for "log π(y|x)": the DPO reference,
candidate scoring, the policy evaluator's KL, SFT's held-out NLL):

  response_logps(model, params, tokens_BxT, mask_BxT, loss_mask_BxT)[b]
      = Σ_t loss_mask[b, t] · log π(tokens[b, t] | tokens[b, :t])                      [B] float32

It is jitted once per (model, shapes) with the params as an argument (never baked in as constants),
and with ``mesh=`` the rows are split over the mesh's batch axes and the call is traced inside
``parallel.use_mesh`` so the model's activation constraints apply. Called inside another jitted
function it is simply inlined. :func:`response_token_logps` is the per-token variant for a
left-padded prompt block of fixed width P (PPO's rollout and update): it only builds float32
logits for the R response columns.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp


def _shift_right(x_BxT: jax.Array) -> jax.Array:
  """Column t of the result is column t-1 of x; column 0 is 0."""
  return jnp.pad(x_BxT[:, :-1], ((0, 0), (1, 0)))


def token_logprobs(logits_BxTxV: jax.Array, tokens_BxT: jax.Array,
                   loss_mask_BxT: jax.Array | None = None) -> jax.Array:
  """float32 [B, T] log-probs of `tokens` under `logits` (aligned as in the module docstring)."""
  logits_f32_BxTxV = logits_BxTxV.astype(jnp.float32)
  # next_BxT[:, t] = tokens[:, t+1]: the target predicted by logits column t (last column: dummy).
  next_BxT = jnp.pad(tokens_BxT[:, 1:], ((0, 0), (0, 1)))
  lse_BxT = jax.nn.logsumexp(logits_f32_BxTxV, axis=-1)
  target_BxT = jnp.take_along_axis(logits_f32_BxTxV, next_BxT[:, :, None].astype(jnp.int32),
                                   axis=-1)[..., 0]
  logps_BxT = _shift_right(target_BxT - lse_BxT)
  if loss_mask_BxT is not None:
    logps_BxT = jnp.where(loss_mask_BxT > 0, logps_BxT, 0.0)
  return logps_BxT


def token_entropy(logits_BxTxV: jax.Array, loss_mask_BxT: jax.Array | None = None) -> jax.Array:
  """float32 [B, T] entropy of the next-token distribution that predicts token t (same alignment).

    H = -sum_v p_v log p_v = logsumexp(z) - sum_v softmax(z)_v z_v.
  """
  logits_f32_BxTxV = logits_BxTxV.astype(jnp.float32)
  lse_BxT = jax.nn.logsumexp(logits_f32_BxTxV, axis=-1)
  probs_BxTxV = jnp.exp(logits_f32_BxTxV - lse_BxT[..., None])
  entropy_BxT = _shift_right(lse_BxT - jnp.sum(probs_BxTxV * logits_f32_BxTxV, axis=-1))
  if loss_mask_BxT is not None:
    entropy_BxT = jnp.where(loss_mask_BxT > 0, entropy_BxT, 0.0)
  return entropy_BxT


def as_variables(params: Any) -> dict[str, Any]:
  """Accepts a param tree or a full variables dict ({"params": ...}); returns the variables."""
  if isinstance(params, dict) and set(params) == {"params"}:
    return params
  return {"params": params}


def sequence_logprobs(model: Any, params: Any, tokens_BxT: jax.Array, mask_BxT: jax.Array,
                      loss_mask_BxT: jax.Array | None = None) -> jax.Array:
  """Runs `model` (a `Transformer`) on the batch and returns `token_logprobs` [B, T] float32.

  `params` is the model's param tree (boxed or unboxed), or `{"params": tree}`. Sum over T for the
  sequence log-likelihood of the completion: `sequence_logprobs(...).sum(-1)`.
  """
  out = model.apply(as_variables(params), tokens_BxT, mask_BxT)
  return token_logprobs(out.logits_BxTxV, tokens_BxT, loss_mask_BxT)


@functools.partial(jax.jit, static_argnums=0)
def _summed_logps(model: Any, params: Any, tokens_BxT: jax.Array, mask_BxT: jax.Array,
                  loss_mask_BxT: jax.Array) -> jax.Array:
  return jnp.sum(sequence_logprobs(model, params, tokens_BxT, mask_BxT, loss_mask_BxT), axis=-1)


def response_logps(model: Any, params: Any, tokens_BxT: Any, mask_BxT: Any, loss_mask_BxT: Any, *,
                   mesh: jax.sharding.Mesh | None = None,
                   rules: Sequence | None = None) -> jax.Array:
  """``[B]`` float32 Σ_t log π over ``loss_mask`` (module docstring); jitted once per shape.

  Args:
    model: a ``Transformer`` (hashable: the jit cache key together with the shapes).
    params: its param tree (boxed or unboxed) or ``{"params": tree}``; an argument of the jitted
      function, so new params (every training step) reuse the compiled program.
    tokens_BxT, mask_BxT, loss_mask_BxT: any padding; ``loss_mask`` 1 on the scored tokens.
    mesh, rules: if ``mesh`` is given, host rows are split over its batch axes
      (``parallel.shard_batch``) and the call runs inside ``parallel.use_mesh(mesh, rules)``.
  """
  if mesh is None or isinstance(tokens_BxT, jax.core.Tracer):
    return _summed_logps(model, params, tokens_BxT, mask_BxT, loss_mask_BxT)
  from rlhf_jax import parallel  # pylint: disable=import-outside-toplevel  (parallel imports models)
  rules = parallel.DEFAULT_RULES if rules is None else rules
  with parallel.use_mesh(mesh, rules):
    rows = parallel.shard_batch({"t": tokens_BxT, "m": mask_BxT, "l": loss_mask_BxT}, mesh, rules)
    return _summed_logps(model, params, rows["t"], rows["m"], rows["l"])


def response_token_logps(model: Any, params: Any, tokens_BxT: jax.Array, mask_BxT: jax.Array,
                         prompt_len: int, *, temperature: float = 1.0, with_entropy: bool = False):
  """``(logps_BxR, entropy_BxR or None)`` of the response tokens under ``logits / temperature``.

  The rows are ``[left-padded prompt (P columns) | right-padded response (R columns)]``, as the
  sampler's ``SampleOutput.full_sequences`` builds them; column r is the log-prob of response token
  r (0 where ``mask`` is 0). Only the logit columns ``P-1 .. T-1`` (those that predict the response)
  are cast to float32, so no ``[B, P, V]`` float32 tensor is built for the prompt. Pure: call it
  inside a jitted step.
  """
  out = model.apply(as_variables(params), tokens_BxT, mask_BxT)
  logits_BxRxV = out.logits_BxTxV[:, prompt_len - 1:].astype(jnp.float32)
  if temperature != 1.0:
    logits_BxRxV = logits_BxRxV / temperature
  targets = tokens_BxT[:, prompt_len - 1:]
  response_mask = jnp.pad(mask_BxT[:, prompt_len:], ((0, 0), (1, 0)))
  logps_BxR = token_logprobs(logits_BxRxV, targets, response_mask)[:, 1:]
  entropy_BxR = None
  if with_entropy:
    entropy_BxR = token_entropy(logits_BxRxV, response_mask)[:, 1:]
  return logps_BxR, entropy_BxR
