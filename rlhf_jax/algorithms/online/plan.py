"""Memory plan of online RL (PPO / GRPO / RLOO, ``algorithms.plan``): the trainer's own phases.

Resident per device for the whole run: the policy's params, the value model's (``ppo`` only),
AdamW moments of both (one optimiser, ``update.state_shardings``), the frozen reference's params
and the reward model's. Each iteration then runs, one after another, the phases the trainer
jits (``rollout.make_*_fn`` / ``update.make_update_fn`` with the run's ``Placement``):

* ``generate`` — ``sampling.sample`` on ``rollout_batch_size`` prompts x ``num_samples``; its
  temp holds the KV cache (``2·L·N·K·(P+R)·H`` in the compute dtype, split over the batch and
  tensor axes), reported separately as ``kv_cache``;
* ``score`` — the reward model over the ``N`` sampled sequences;
* ``logprobs`` — old / reference log-probs and values (three forwards);
* ``update`` — every epoch and minibatch as one jitted scan; its temp holds one minibatch's
  gradients and activations.

The rollout arrays an iteration keeps between phases (``[N, P+R]`` tokens, ``[N, R]`` per-token
floats) are counted as the update's transient inputs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rlhf_jax import models, parallel, sampling, train
from rlhf_jax.algorithms import plan as plan_lib
from rlhf_jax.algorithms.online import ppo, rollout, update
from rlhf_jax.algorithms.online.config import PPOConfig
from rlhf_jax.parallel import Placement
from rlhf_jax.parallel import memory_plan as mp


def _sds(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def ppo_plan(policy_config: models.ModelConfig, mesh: jax.sharding.Mesh, *, config: PPOConfig,
             prompt_len: int, reward_config: models.ModelConfig | None = None,
             value_config: models.ModelConfig | None = None, reward_outputs: int = 1,
             optim: train.OptimConfig = train.OptimConfig(), eos_id: int = 1, pad_id: int = 0,
             rules=parallel.DEFAULT_RULES) -> mp.MemoryPlan:
  """One RL iteration of ``config`` (rollout ``config.rollout_batch_size`` prompts of
  ``prompt_len`` tokens, ``config.max_new_tokens`` new ones); the reward model has
  ``reward_config`` (default: the policy's), the critic ``value_config`` (default: the reward
  model's for ``critic_init="reward_model"``, the policy's for ``"sft"``)."""
  placement = Placement(mesh, tuple(rules))
  reward_config = reward_config or policy_config
  n, p, r = config.rollout_size, prompt_len, config.max_new_tokens
  plan_lib.check_rows(config.rollout_batch_size, mesh, "data.batch_size (prompts)", rules)
  plan_lib.check_rows(config.minibatch_size, mesh, "rollout rows per minibatch", rules)
  policy = models.Transformer(policy_config)
  value_model = None
  if config.uses_critic:
    value_model = models.ValueModel(
        value_config or (reward_config if config.critic_init == "reward_model" else policy_config))
  reward_model = models.RewardModel(reward_config, num_outputs=reward_outputs)
  rows, rep = placement.rows, placement.replicated

  policy_params = plan_lib.abstract_params(policy, mesh, rules)
  ref_params = plan_lib.abstract_params(policy, mesh, rules)
  rm_params = plan_lib.abstract_params(reward_model, mesh, rules)
  value_params = plan_lib.abstract_params(value_model, mesh, rules) if value_model else None

  total_updates = config.updates_per_iteration
  optimizer, _ = train.make_optimizer(optim, total_updates)
  params = {"policy": policy_params, **({"value": value_params} if value_model else {})}
  shardings = update.state_shardings(policy, value_model, optim, total_updates, placement)
  shapes = jax.eval_shape(
      lambda ps: update.create_state(ps, optimizer, 0.0, jnp.zeros(2, jnp.uint32)), params)
  state = mp.with_shardings(shapes, shardings)

  samp = sampling.SamplingConfig(max_new_tokens=r, temperature=config.temperature,
                                 top_k=config.top_k, top_p=config.top_p,
                                 num_samples=config.num_samples, eos_id=eos_id, pad_id=pad_id)
  b = config.rollout_batch_size
  key = _sds((2,), jnp.uint32, rep)
  phases = {}
  gen = rollout.make_generate_fn(policy, samp, placement).jitted
  phases["generate"] = mp.compile_phase(gen, (policy_params, _sds(
      (b, p), jnp.int32, rows), _sds((b, p), jnp.int32, rows), key), mesh=mesh,
                                        resident=(True, False, False, False), rules=rules)
  seq = lambda shape, dtype=jnp.int32: _sds(shape, dtype, rows)  # noqa: E731
  score = rollout.make_score_fn(reward_model, eos_id=eos_id, missing_eos_penalty=1.0,
                                attribute_weights=(1.0,) * reward_outputs,
                                placement=placement).jitted
  stats_k = _sds((reward_outputs,), jnp.float32, rep)
  phases["score"] = mp.compile_phase(score, (rm_params, stats_k, stats_k, seq(
      (n, p + r)), seq((n, p + r)), seq((n, r))), mesh=mesh,
                                     resident=(True, True, True, False, False, False), rules=rules)
  logprob = rollout.make_logprob_fn(policy, value_model, p, config.temperature, placement).jitted
  phases["logprobs"] = mp.compile_phase(logprob,
                                        (policy_params, ref_params, value_params, seq(
                                            (n, p + r)), seq((n, p + r))), mesh=mesh,
                                        resident=(True, True, True, False, False), rules=rules)
  f32 = lambda: seq((n, r), jnp.float32)  # noqa: E731
  batch = rollout.Rollout(seq((n, p + r)), seq((n, p + r)), seq((n, r)), f32(), f32(), f32(), f32(),
                          f32())
  upd = update.make_update_fn(config, policy, value_model, optim, total_updates, p,
                              placement).jitted
  phases["update"] = mp.compile_phase(upd, (state, batch), mesh=mesh, resident=(True, False),
                                      rules=rules)

  resident = {"policy params": mp.per_device_bytes(policy_params)}
  if value_model is not None:
    resident["value params"] = mp.per_device_bytes(value_params)
  resident["optimizer state"] = mp.per_device_bytes(state.opt_state)
  resident["reference params"] = mp.per_device_bytes(ref_params)
  resident["reward model params"] = mp.per_device_bytes(rm_params)
  # FLOPs of one iteration: the updates train on every rollout token num_ppo_epochs times (6·N);
  # generation, scoring and the three log-prob forwards are forwards (2·N) over the sequences.
  tokens = n * (p + r)
  flops = mp.train_flops(policy_config, tokens * config.num_ppo_epochs, p + r)
  forward = lambda c: mp.train_flops(c, tokens, p + r) / 3  # noqa: E731
  flops += 3 * forward(policy_config) + forward(reward_config)  # generate, old, ref; RM
  if value_model is not None:
    flops += forward(value_model.config) * (1 + 3 * config.num_ppo_epochs)
  return mp.MemoryPlan(
      method="ppo", mesh_shape=plan_lib.mesh_shape(mesh), resident=resident, phases=phases,
      gradients=mp.per_device_bytes(params),
      kv_cache=plan_lib.kv_cache_bytes(policy_config, n, p + r, mesh, rules), train_phase="update",
      flops_per_step=flops, notes=[
          f"{config.algorithm}: {b} prompts x {config.num_samples} samples, P {p} + R {r}",
          f"{config.num_minibatches} minibatches x {config.num_ppo_epochs} epochs",
          f"remat {policy_config.remat_policy}"])


def plan(config: Any, model_config: models.ModelConfig, mesh: jax.sharding.Mesh,
         rules=parallel.DEFAULT_RULES) -> mp.MemoryPlan:
  """The PPO planner of ``algorithms.plan.PLANNERS``: the reward model's config from its
  ``reward_model.json`` (no params read), the shapes from ``data`` / ``limits`` / ``ppo``."""
  from rlhf_jax import scoring  # pylint: disable=import-outside-toplevel
  parsed = ppo.parse_config(config)
  sources = parsed.sources
  rm_config, outputs = None, 1
  if sources.reward_model_workdir:
    info = scoring.read_reward_model_info(sources.reward_model_workdir)
    rm_config, outputs = info.model_config(), len(info.output_names)
  value_config = None  # critic_init="sft": the policy's backbone; else the value model run's
  if parsed.ppo.uses_critic and parsed.ppo.critic_init == "reward_model" and sources.value_model:
    value_config = scoring.read_reward_model_info(sources.value_model).model_config()
  return ppo_plan(model_config, mesh, config=parsed.ppo, prompt_len=parsed.limits.max_prompt_len,
                  reward_config=rm_config, value_config=value_config, reward_outputs=outputs,
                  optim=parsed.optim, rules=rules)
