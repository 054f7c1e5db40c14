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

Online DPO (``online_dpo_plan``): policy + moments, reference, reward model (``judge=reward_model``)
resident; per step ``generate`` (two answers per prompt), ``score``, ``reference`` (the summed
reference log-probs of the 2B rows) and ``train_step`` (its DPO step over the pairs).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rlhf_jax import models, parallel, sampling, train
from rlhf_jax.algorithms import plan as plan_lib
from rlhf_jax.algorithms import sections
from rlhf_jax.algorithms.online import online_dpo, ppo, rollout, update
from rlhf_jax.algorithms.online.config import PPOConfig
from rlhf_jax.parallel import Placement
from rlhf_jax.parallel import memory_plan as mp
from rlhf_jax.train import config_dicts


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
  """The PPO (and online DPO) planner of ``algorithms.plan.PLANNERS``: the reward model's config
  from its ``reward_model.json`` (no params read), the shapes from ``data`` / ``limits`` /
  ``ppo``."""
  if config.get("method") == "online_dpo":
    return plan_online_dpo(config, model_config, mesh, rules)
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


def online_dpo_plan(policy_config: models.ModelConfig, mesh: jax.sharding.Mesh, *, batch_size: int,
                    prompt_len: int, response_len: int, config: Any = None,
                    optim: train.OptimConfig = train.OptimConfig(),
                    reward_config: models.ModelConfig | None = None, reward_outputs: int = 1,
                    rules=parallel.DEFAULT_RULES) -> mp.MemoryPlan:
  """One online-DPO step: ``batch_size`` prompts x 2 answers of ``prompt_len + response_len``;
  ``reward_config=None`` and ``config.judge == "annotator"``: no reward model."""
  config = config or online_dpo.OnlineDPOConfig()
  b, n, p, r = batch_size, 2 * batch_size, prompt_len, response_len
  plan_lib.check_rows(b, mesh, "data.batch_size (prompts)", rules)
  policy = models.Transformer(policy_config)
  params = plan_lib.abstract_params(policy, mesh, rules)
  samp = sampling.SamplingConfig(max_new_tokens=r, temperature=config.temperature,
                                 top_k=config.top_k, top_p=config.top_p, num_samples=2)
  phases = {"generate": plan_lib.sample_phase(policy, params, samp, b, p, mesh, rules)}
  resident_rm = {}
  if config.judge == "reward_model":
    reward_model = models.RewardModel(reward_config or policy_config, num_outputs=reward_outputs)
    rm_params = plan_lib.abstract_params(reward_model, mesh, rules)
    phases["score"] = plan_lib.reward_phase(reward_model, rm_params, n, p + r, mesh, rules)
    resident_rm = {"reward model params": mp.per_device_bytes(rm_params)}
  rows = parallel.data_sharding(mesh, rules)
  seq = jax.ShapeDtypeStruct((n, p + r), jnp.int32, sharding=rows)
  ref_logps = online_dpo.make_ref_logps_fn(policy, p)
  phases["reference"] = mp.compile_phase(ref_logps, (params, seq, seq), mesh=mesh,
                                         resident=(True, False, False), rules=rules)
  batch = plan_lib.rows_batch(n, p + r, mesh, rules, response_mask=((n, r), jnp.int32),
                              ref_logps=((n,), jnp.float32), first_wins=((b,), jnp.float32),
                              valid=((b,), jnp.float32))
  del batch["loss_mask"]  # the loss reads the response mask instead
  step, state = plan_lib.train_step_phase(online_dpo.make_loss_fn(config, policy, p), params, optim,
                                          batch, mesh, rules)
  phases["train_step"] = step
  forward = lambda c: mp.train_flops(c, n * (p + r), p + r) / 3  # noqa: E731
  flops = mp.train_flops(policy_config, n * (p + r), p + r) + 2 * forward(policy_config)
  return mp.MemoryPlan(
      method="online_dpo", mesh_shape=plan_lib.mesh_shape(mesh), resident={
          "policy params": mp.per_device_bytes(state.params),
          "optimizer state": mp.per_device_bytes(state.opt_state),
          "reference params": mp.per_device_bytes(params), **resident_rm}, phases=phases,
      gradients=mp.per_device_bytes(state.params),
      kv_cache=plan_lib.kv_cache_bytes(policy_config, n, p + r, mesh, rules), flops_per_step=flops,
      notes=[
          f"{b} prompts x 2 answers, P {p} + R {r}", f"judge {config.judge}",
          f"remat {policy_config.remat_policy}"])


def plan_online_dpo(config: Any, model_config: models.ModelConfig, mesh: jax.sharding.Mesh,
                    rules=parallel.DEFAULT_RULES) -> mp.MemoryPlan:
  """``online_dpo``'s entry of ``algorithms.plan.PLANNERS`` (``plan`` dispatches here)."""
  odpo = config_dicts.to_dataclass(online_dpo.OnlineDPOConfig, config.online_dpo, "online_dpo")
  limits = config_dicts.to_dataclass(sections.Limits, config.limits, "limits")
  reward_config, outputs = plan_lib.reward_model_of(config, model_config)
  optim = config_dicts.to_dataclass(train.OptimConfig, config.optim, "optim")
  return online_dpo_plan(model_config, mesh, batch_size=int(config.data.batch_size),
                         prompt_len=limits.max_prompt_len, response_len=limits.max_response_len,
                         config=odpo, optim=optim, reward_config=reward_config,
                         reward_outputs=outputs, rules=rules)
