"""The RL update: every PPO epoch and minibatch of one iteration as ONE jitted function.

    update(state, rollout) -> (state, metrics)

is a ``lax.scan`` over epochs (each draws a permutation of the N rollout rows from the state's
key) of a ``lax.scan`` over minibatches of N / M rows, each one optimiser step on

    L = L_clip(π)  +  c_v · L_V  -  c_e · H(π)  [ +  β · KL_k3(π ‖ π_ref)  for (dr_)grpo ]

    L_clip = aggregate_t max(-A_t ρ_t, -A_t clip(ρ_t, 1-ε, 1+ε_high)),  ρ_t = π(y_t)/π_old(y_t)
    L_V    = aggregate_t ½ max((V_t - R_t)², (V_old,t + clip(V_t - V_old,t, ±ε_v) - R_t)²)

(``losses.ppo_policy_loss`` / ``ppo_value_loss`` / ``entropy_loss`` / ``kl_estimate``). With a
``loss_type`` (TRL's GRPO names) L_clip is ``losses.grpo_policy_loss`` instead (token or sequence
importance ratio, cispo's capped REINFORCE term) and the KL term is normalised the same way; for
``dapo`` / ``cispo`` the token normaliser is the rollout's response tokens / ``num_minibatches``
(so every token of the iteration weighs the same whichever minibatch it lands in). Policy and
value model are two param trees under one optimiser, as TRL's ``PolicyAndValueWrapper``: the
value loss only reaches the value params, and gradient clipping is over the joint global norm.
The state is donated, so the update reuses its own buffers. With a ``parallel.Placement`` the
update is jitted with the state's shardings (:func:`state_shardings`) in and out and the rollout
rows split over the batch axes, so iteration after iteration it sees the same input shardings.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import losses, models, parallel, train
from rlhf_jax.algorithms.online.config import PPOConfig
from rlhf_jax.algorithms.online.rollout import Rollout, response_values
from rlhf_jax.models import lora as lora_lib
from rlhf_jax.parallel import Placement


@flax.struct.dataclass
class PPOState:
  """Everything an iteration reads and writes (checkpointed as one pytree)."""

  iteration: jax.Array  # int32: finished iterations
  params: Any  # {"policy": Transformer params, "value": ValueModel params (ppo only)}
  opt_state: optax.OptState
  kl_coef: jax.Array  # float32 β (moves with the adaptive controller)
  rng: jax.Array  # uint32[2] raw key, split once per iteration


def create_state(params: Any, optimizer: optax.GradientTransformation, kl_coef: float,
                 rng: jax.Array) -> PPOState:
  return PPOState(iteration=jnp.zeros(
      (), jnp.int32), params=params, opt_state=jax.jit(optimizer.init)(params),
                  kl_coef=jnp.asarray(kl_coef, jnp.float32), rng=jnp.asarray(rng, jnp.uint32))


@functools.lru_cache(maxsize=16)
def state_shardings(policy: models.Transformer, value_model: models.ValueModel | None,
                    optim: train.OptimConfig, total_updates: int, placement: Placement) -> PPOState:
  """``PPOState`` of ``NamedSharding`` s: params per the rules table, optimiser moments like their
  params (``optax.tree_map_params``), step counters / β / key replicated."""
  params = {"policy": placement.params(policy)}
  if value_model is not None:
    params["value"] = placement.params(value_model)
  optimizer, _ = train.make_optimizer(optim, total_updates)
  abstract_params = _abstract_params(policy, value_model)
  abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
  rep = placement.replicated
  # The optimizer state mirrors the live params only (a LoRA base has none: train.optim).
  live_params = train.state.split_frozen(params)[0]
  opt = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, live_params,
                              transform_non_params=lambda _: rep)
  return PPOState(iteration=rep, params=params, opt_state=opt, kl_coef=rep, rng=rep)


def _abstract_params(policy, value_model) -> Any:
  tree = {"policy": lora_lib.abstract_params(policy)}  # LoraParams for a LoRA policy
  if value_model is not None:
    tree["value"] = lora_lib.abstract_params(value_model)  # LoraParams for a LoRA critic
  return tree


def place(tree: Any, shardings: Any) -> Any:
  """``jax.device_put(tree, shardings)`` from any source: host NumPy, this process's devices (a
  checkpoint restored onto one device) or global arrays already on the mesh.

  In a multi-process job a ``jax.Array`` held on this process's devices only cannot be put onto a
  sharding that spans other processes' devices; it goes through host NumPy (every process holds
  the same values, so each places its own shards). One process: a plain ``device_put``.
  """
  if parallel.process_count() == 1:
    return jax.device_put(tree, shardings)

  def host(x):
    local = isinstance(x, jax.Array) and x.is_fully_addressable
    return np.asarray(x) if local or not isinstance(x, jax.Array) else x

  return jax.device_put(jax.tree.map(host, tree), shardings)


def place_state(params: Any, optimizer: optax.GradientTransformation, kl_coef: float,
                rng: jax.Array, shardings: PPOState) -> PPOState:
  """A fresh state (:func:`create_state`) on ``shardings``; ``params`` are copied, never aliased
  (the state is donated to the update)."""
  # A LoRA base (train.state.split_frozen) is never donated: placed, not copied.
  live, frozen = train.state.split_frozen(params)
  if parallel.process_count() > 1:  # host copies: placing them copies (and never aliases) too
    live = jax.tree.map(
        lambda x: np.array(x)
        if isinstance(x, jax.Array) and x.is_fully_addressable else jnp.copy(x), live)
  else:
    live = jax.tree.map(jnp.copy, live)
  params = place(train.state.join_frozen(live, frozen), shardings.params)
  return place(create_state(params, optimizer, kl_coef, rng), shardings)


def make_loss_fn(config: PPOConfig, policy: models.Transformer,
                 value_model: models.ValueModel | None, prompt_len: int):
  """``loss_fn(params, minibatch: Rollout, kl_coef, num_items) -> (loss, metrics)``; ``num_items``
  is the dapo / cispo token normaliser (ignored by the other loss types)."""
  need_entropy = config.ent_coef > 0
  kl_in_loss = config.algorithm in ("grpo", "dr_grpo")
  agg = config.aggregation

  def aggregate(values_BxR, mask, num_items):
    if not config.loss_type:
      return losses.aggregate_tokens(values_BxR, mask.astype(jnp.float32), agg)
    return losses.grpo_aggregate(values_BxR, mask, config.loss_type, num_items_in_batch=num_items,
                                 max_completion_length=config.max_new_tokens)

  def loss_fn(params, mb: Rollout, kl_coef, num_items=None):
    mask = mb.response_mask_BxR
    logps_BxR, ent_BxR = models.response_token_logps(policy, params["policy"], mb.tokens_BxT,
                                                     mb.mask_BxT, prompt_len,
                                                     temperature=config.temperature,
                                                     with_entropy=need_entropy)
    if config.loss_type:
      pg_B, pg_m = losses.grpo_policy_loss(
          logps_BxR, mb.old_logps_BxR, mb.advantages_BxR, mask, loss_type=config.loss_type,
          importance_sampling_level=config.importance_sampling_level, epsilon=config.clip_eps,
          epsilon_high=config.clip_eps_high or None, num_items_in_batch=num_items,
          max_completion_length=config.max_new_tokens)
    else:
      pg_B, pg_m = losses.ppo_policy_loss(logps_BxR, mb.old_logps_BxR, mb.advantages_BxR, mask,
                                          clip_eps=config.clip_eps,
                                          clip_eps_high=config.clip_eps_high or None,
                                          aggregation=agg)
    loss = jnp.mean(pg_B)
    metrics = {
        "pg_loss": pg_m["loss"], "clipfrac": pg_m["clipfrac"], "approx_kl": pg_m["approx_kl"],
        "ratio_mean": pg_m["ratio_mean"]}
    if value_model is not None:
      values_BxR = response_values(value_model, params["value"], mb.tokens_BxT, mb.mask_BxT,
                                   prompt_len)
      vf_B, vf_m = losses.ppo_value_loss(values_BxR, mb.old_values_BxR, mb.returns_BxR, mask,
                                         clip_eps=config.vf_clip_eps or None, aggregation=agg)
      loss = loss + config.vf_coef * jnp.mean(vf_B)
      metrics.update(vf_loss=vf_m["loss"], vf_clipfrac=vf_m["vf_clipfrac"])
    if need_entropy:
      ent_B, ent_m = losses.entropy_loss(ent_BxR, mask, aggregation=agg)
      if config.loss_type:  # TRL: the token mean (dapo / cispo: over their normaliser)
        ent_type = config.loss_type if config.loss_type in ("dapo", "cispo") else "bnpo"
        ent_B = -losses.grpo_aggregate(ent_BxR, mask, ent_type, num_items_in_batch=num_items)
      loss = loss + config.ent_coef * jnp.mean(ent_B)
      metrics["update_entropy"] = ent_m["entropy"]
    if kl_in_loss:
      kl_BxR = losses.kl_estimate(logps_BxR, mb.ref_logps_BxR, estimator="k3", mask=mask)
      kl_term = jnp.mean(aggregate(kl_BxR, mask, num_items))
      loss = loss + kl_coef * kl_term
      metrics["kl_loss"] = kl_term
    metrics["loss"] = loss
    return loss, metrics

  return loss_fn


@functools.lru_cache(maxsize=16)
def make_update_fn(config: PPOConfig, policy: models.Transformer,
                   value_model: models.ValueModel | None, optim: train.OptimConfig,
                   total_updates: int, prompt_len: int, placement: Placement | None = None):
  """Jitted, state-donating ``update(state, rollout) -> (state, metrics)`` (module docstring).

  The optimiser is ``train.make_optimizer(optim, total_updates)`` (the state's ``opt_state`` must
  come from the same call). Metrics are means over all ``num_ppo_epochs × num_minibatches`` steps,
  plus ``grad_norm`` (before clipping). The state's key is split once: one sub-key per epoch's
  permutation. Cached per arguments, so repeated runs in one process reuse the compilation.
  """
  optimizer, _ = train.make_optimizer(optim, total_updates)
  grad_fn = jax.value_and_grad(make_loss_fn(config, policy, value_model, prompt_len), has_aux=True)
  num_mb, mb_size = config.num_minibatches, config.minibatch_size

  def update(state: PPOState, rollout: Rollout):
    n = rollout.tokens_BxT.shape[0]
    if n != num_mb * mb_size:
      raise ValueError(f"rollout has {n} rows, expected rollout_batch_size * num_samples = "
                       f"{num_mb * mb_size}")
    rng, epoch_rng = jax.random.split(state.rng)
    # dapo / cispo: response tokens per minibatch of the whole rollout (TRL's num_items_in_batch).
    num_items = jnp.sum(rollout.response_mask_BxR.astype(jnp.float32)) / num_mb

    def minibatch_step(carry, mb):
      params, opt_state = carry
      (_, metrics), grads = grad_fn(params, mb, state.kl_coef, num_items)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      metrics = dict(metrics, grad_norm=optax.global_norm(grads))
      return (params, opt_state), metrics

    def epoch(carry, key):
      perm = jax.random.permutation(key, n)
      mbs = jax.tree.map(lambda x: x[perm].reshape(num_mb, mb_size, *x.shape[1:]), rollout)
      return jax.lax.scan(minibatch_step, carry, mbs)

    keys = jax.random.split(epoch_rng, config.num_ppo_epochs)
    (params, opt_state), metrics = jax.lax.scan(epoch, (state.params, state.opt_state), keys)
    metrics = jax.tree.map(jnp.mean, metrics)
    return state.replace(params=params, opt_state=opt_state, rng=rng), metrics

  if not any(isinstance(m, lora_lib.LoraModel) for m in (policy, value_model)):
    if placement is None:
      return jax.jit(update, donate_argnums=(0,))
    state_sh = state_shardings(policy, value_model, optim, total_updates, placement)
    return placement.jit(update, (state_sh, placement.rows), (state_sh, placement.replicated),
                         donate_argnums=(0,))

  # LoRA: the frozen base is a separate argument, neither donated nor returned (the reference
  # reads the same buffers), as in train.loop.jit_train_step.
  def split_update(live, frozen, rollout):
    new_state, metrics = update(train.state.join_frozen(live, frozen), rollout)
    return train.state.split_frozen(new_state)[0], metrics

  if placement is None:
    jitted = jax.jit(split_update, donate_argnums=(0,))
  else:
    live_sh, frozen_sh = train.state.split_frozen(
        state_shardings(policy, value_model, optim, total_updates, placement))
    jitted = placement.jit(split_update, (live_sh, frozen_sh, placement.rows),
                           (live_sh, placement.replicated), donate_argnums=(0,))

  def call(state, rollout):
    live, frozen = train.state.split_frozen(state)
    new_live, metrics = jitted(live, frozen, rollout)
    return train.state.join_frozen(new_live, frozen), metrics

  return call
