"""Memory plans of the DPO family and KTO (``algorithms.plan``): their own train steps and the
reference forward.

Resident per device: the policy's params and AdamW moments, and the frozen reference's params
(separate buffers: the policy's are donated to every step). Phases:

* ``train_step`` — ``train.make_train_step(dpo.make_loss_fn(model, loss))`` over the stacked
  ``[2B, T]`` pairwise batch plus its ``ref_logps [2B]``, jitted as the loop jits it;
* ``reference`` — the on-the-fly reference forward (``reference.logps_fn``) over the same rows,
  run before each step (``loss.reference_logps="on_the_fly"``; a precomputed table is a host
  array, and SimPO / ORPO need no reference at all: no reference params, no phase).

KTO (``kto_plan``) has the same resident set and phases over its ``[2B, T]`` unpaired batch: B
examples plus B KL rows (each prompt with another example's completion), its reference log-probs
always on the fly. PRO / RRHF (``listwise_plan``) keep only the policy and its moments: one train
step over ``[B·K, T]`` candidate rows (K = ``data.num_candidates``); with ``candidates=generated``
the lists are sampled once before training, which the plan does not cover. With a ``lora``
section the policy is the frozen base plus adapters (moments and gradients for the adapters only)
and the reference is that same base: no reference copy is resident.

RAFT (``raft_plan``) and best-of-n (``best_of_n_plan``) sample: ``sample`` is one sampler call
(``scoring.sample_candidates``' chunk of prompts x K samples; its temp holds the KV cache) and
``score`` the reward model's forward over those rows; RAFT then fine-tunes (``train_step``: SFT's
step on ``data.batch_size`` kept sequences). Resident: the policy (RAFT: with its moments), the
SFT reference (RAFT's KL evaluation) and the reward model.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rlhf_jax import models, parallel, sampling, scoring, train
from rlhf_jax.algorithms import plan as plan_lib
from rlhf_jax.algorithms import common, reference, sections
from rlhf_jax.algorithms.offline import best_of_n, dpo, kto, listwise, raft
from rlhf_jax.eval import policy as policy_eval
from rlhf_jax.models import lora as lora_lib
from rlhf_jax.parallel import memory_plan as mp
from rlhf_jax.train import config_dicts


def dpo_plan(model_config: models.ModelConfig, mesh: jax.sharding.Mesh, *, batch_size: int,
             seq_len: int, optim: train.OptimConfig = train.OptimConfig(),
             loss: dpo.DPOLossConfig = dpo.DPOLossConfig(), lora: lora_lib.LoraConfig | None = None,
             rules=parallel.DEFAULT_RULES) -> mp.MemoryPlan:
  """``batch_size`` pairs (``2 * batch_size`` rows) of ``seq_len`` tokens (module docstring)."""
  rows = 2 * batch_size
  plan_lib.check_rows(rows, mesh, "2 x data.batch_size", rules)
  model = plan_lib.with_lora(models.Transformer(model_config), lora)
  params = plan_lib.abstract_params(model, mesh, rules)
  batch = plan_lib.rows_batch(rows, seq_len, mesh, rules,
                              **{reference.REF_KEY: ((rows,), jnp.float32)})
  step, state = plan_lib.train_step_phase(dpo.make_loss_fn(model, loss), params, optim, batch, mesh,
                                          rules)
  resident = {
      "policy params": mp.per_device_bytes(state.params),
      "optimizer state": mp.per_device_bytes(state.opt_state)}
  phases = {"train_step": step}
  with_reference = loss.uses_reference and loss.reference_logps == "on_the_fly"
  if loss.uses_reference and lora is None:  # with LoRA the reference is the resident base
    resident["reference params"] = mp.per_device_bytes(params)
  if with_reference:
    phases["reference"] = _reference_phase(model, _reference_params(params), batch, mesh, rules)
  # The reference forward is 2·N·tokens of the 6·N·tokens a trained token costs.
  flops = mp.train_flops(model_config, rows * seq_len, seq_len) * (4 / 3 if with_reference else 1)
  return mp.MemoryPlan(
      method="dpo", mesh_shape=plan_lib.mesh_shape(mesh), resident=resident, phases=phases,
      gradients=plan_lib.trained_bytes(state.params), flops_per_step=flops, notes=[
          f"{batch_size} pairs x {seq_len}", f"loss {loss.label}",
          f"reference {loss.reference_logps if loss.uses_reference else 'none'}",
          f"remat {model_config.remat_policy}", *plan_lib.lora_notes(lora)])


def _reference_params(params: Any) -> Any:
  """The reference's params: a LoRA policy's frozen base (the same buffers), else a copy."""
  return params.base if lora_lib.is_lora(params) else params


def _reference_phase(model: models.Transformer, params: Any, batch: dict, mesh: jax.sharding.Mesh,
                     rules) -> mp.PhaseMemory:
  """The on-the-fly reference forward (``reference.logps_fn``) over the batch's rows."""
  rows_sh = parallel.data_sharding(mesh, rules)
  fwd = jax.jit(
      reference.logps_fn(model), in_shardings=(jax.tree.map(lambda x: x.sharding,
                                                            params), rows_sh, rows_sh, rows_sh),
      out_shardings=rows_sh)
  seqs = [batch[k] for k in plan_lib.SEQ_KEYS]
  return mp.compile_phase(fwd, (params, *seqs), mesh=mesh, resident=(True, False, False, False),
                          rules=rules)


def kto_plan(model_config: models.ModelConfig, mesh: jax.sharding.Mesh, *, batch_size: int,
             seq_len: int, optim: train.OptimConfig = train.OptimConfig(),
             loss: kto.KTOLossConfig = kto.KTOLossConfig(), lora: lora_lib.LoraConfig | None = None,
             rules=parallel.DEFAULT_RULES) -> mp.MemoryPlan:
  """``batch_size`` unpaired examples and their KL rows (``2 * batch_size`` rows) of ``seq_len``."""
  rows = 2 * batch_size
  plan_lib.check_rows(rows, mesh, "2 x data.batch_size", rules)
  model = plan_lib.with_lora(models.Transformer(model_config), lora)
  params = plan_lib.abstract_params(model, mesh, rules)
  batch = plan_lib.rows_batch(
      rows, seq_len, mesh, rules, **{
          reference.REF_KEY: ((rows,), jnp.float32), "valid": ((batch_size,), jnp.float32),
          "label": ((batch_size,), jnp.float32)})
  step, state = plan_lib.train_step_phase(kto.make_loss_fn(model, loss), params, optim, batch, mesh,
                                          rules)
  resident = {
      "policy params": mp.per_device_bytes(state.params),
      "optimizer state": mp.per_device_bytes(state.opt_state)}
  if lora is None:  # with LoRA the reference is the resident base
    resident["reference params"] = mp.per_device_bytes(params)
  return mp.MemoryPlan(
      method="kto", mesh_shape=plan_lib.mesh_shape(mesh), resident=resident, phases={
          "train_step": step,
          "reference": _reference_phase(model, _reference_params(params), batch, mesh,
                                        rules)}, gradients=plan_lib.trained_bytes(state.params),
      flops_per_step=mp.train_flops(model_config, rows * seq_len, seq_len) * 4 / 3, notes=[
          f"{batch_size} examples + {batch_size} KL rows x {seq_len}", f"loss {loss.label}",
          "reference on_the_fly", f"remat {model_config.remat_policy}", *plan_lib.lora_notes(lora)])


def listwise_plan(model_config: models.ModelConfig, mesh: jax.sharding.Mesh, *, batch_size: int,
                  seq_len: int, num_candidates: int, optim: train.OptimConfig = train.OptimConfig(),
                  loss: listwise.ListwiseLossConfig = listwise.ListwiseLossConfig(),
                  lora: lora_lib.LoraConfig | None = None,
                  rules=parallel.DEFAULT_RULES) -> mp.MemoryPlan:
  """``batch_size`` lists of ``num_candidates`` candidates of ``seq_len`` tokens (module docs)."""
  b, k = batch_size, num_candidates
  plan_lib.check_rows(b, mesh, "data.batch_size (lists)", rules)
  model = plan_lib.with_lora(models.Transformer(model_config), lora)
  params = plan_lib.abstract_params(model, mesh, rules)
  batch = plan_lib.rows_batch(b * k, seq_len, mesh, rules, candidate_mask=((b, k), jnp.float32),
                              scores=((b, k), jnp.float32))
  step, state = plan_lib.train_step_phase(listwise.make_loss_fn(model, loss), params, optim, batch,
                                          mesh, rules)
  return mp.MemoryPlan(
      method="listwise", mesh_shape=plan_lib.mesh_shape(mesh), resident={
          "policy params": mp.per_device_bytes(state.params),
          "optimizer state": mp.per_device_bytes(state.opt_state)}, phases={"train_step": step},
      gradients=plan_lib.trained_bytes(state.params),
      flops_per_step=mp.train_flops(model_config, b * k * seq_len, seq_len), notes=[
          f"{b} lists x {k} candidates x {seq_len}", f"loss {loss.method}",
          f"remat {model_config.remat_policy}", *plan_lib.lora_notes(lora)])


def _sampling(model_config: models.ModelConfig, *, prompts: int, num_samples: int, prompt_len: int,
              response_len: int, temperature: float) -> tuple[sampling.SamplingConfig, int]:
  samp = sampling.SamplingConfig(max_new_tokens=response_len, temperature=temperature,
                                 num_samples=num_samples)
  return samp, prompts * num_samples


def best_of_n_plan(model_config: models.ModelConfig, mesh: jax.sharding.Mesh, *, chunk_prompts: int,
                   num_samples: int, prompt_len: int, response_len: int,
                   reward_config: models.ModelConfig | None = None, reward_outputs: int = 1,
                   temperature: float = 1.0, rules=parallel.DEFAULT_RULES) -> mp.MemoryPlan:
  """Best-of-n: ``chunk_prompts`` prompts x ``num_samples`` samples per sampler call, scored."""
  plan_lib.check_rows(chunk_prompts, mesh, "bon.chunk_prompts", rules)
  model = models.Transformer(model_config)
  reward_model = models.RewardModel(reward_config or model_config, num_outputs=reward_outputs)
  params = plan_lib.abstract_params(model, mesh, rules)
  rm_params = plan_lib.abstract_params(reward_model, mesh, rules)
  samp, rows = _sampling(model_config, prompts=chunk_prompts, num_samples=num_samples,
                         prompt_len=prompt_len, response_len=response_len, temperature=temperature)
  seq_len = prompt_len + response_len
  phases = {
      "sample": plan_lib.sample_phase(model, params, samp, chunk_prompts, prompt_len, mesh, rules),
      "score": plan_lib.reward_phase(reward_model, rm_params, rows, seq_len, mesh, rules)}
  forward = lambda c: mp.train_flops(c, rows * seq_len, seq_len) / 3  # noqa: E731
  return mp.MemoryPlan(
      method="best_of_n", mesh_shape=plan_lib.mesh_shape(mesh), resident={
          "policy params": mp.per_device_bytes(params),
          "reward model params": mp.per_device_bytes(rm_params)}, phases=phases,
      kv_cache=plan_lib.kv_cache_bytes(model_config, rows, seq_len, mesh,
                                       rules), train_phase="sample",
      flops_per_step=forward(model_config) + forward(reward_model.config), notes=[
          f"{chunk_prompts} prompts x {num_samples} samples per call, P {prompt_len} + R "
          f"{response_len}", "per sampler call (no training)"])


def raft_plan(model_config: models.ModelConfig, mesh: jax.sharding.Mesh, *, batch_size: int,
              chunk_prompts: int, num_samples: int, prompt_len: int, response_len: int,
              optim: train.OptimConfig = train.OptimConfig(),
              reward_config: models.ModelConfig | None = None, reward_outputs: int = 1,
              temperature: float = 1.0, rules=parallel.DEFAULT_RULES) -> mp.MemoryPlan:
  """RAFT: a sampler call of ``chunk_prompts`` x ``num_samples``, its scores, and SFT's step on
  ``batch_size`` kept sequences of ``prompt_len + response_len`` tokens."""
  plan_lib.check_rows(batch_size, mesh, "data.batch_size", rules)
  plan_lib.check_rows(chunk_prompts, mesh, "the sampler's prompts per call", rules)
  model = models.Transformer(model_config)
  reward_model = models.RewardModel(reward_config or model_config, num_outputs=reward_outputs)
  params = plan_lib.abstract_params(model, mesh, rules)
  rm_params = plan_lib.abstract_params(reward_model, mesh, rules)
  samp, rows = _sampling(model_config, prompts=chunk_prompts, num_samples=num_samples,
                         prompt_len=prompt_len, response_len=response_len, temperature=temperature)
  seq_len = prompt_len + response_len
  step, state = plan_lib.train_step_phase(common.nll_loss_fn(model), params, optim,
                                          plan_lib.rows_batch(batch_size, seq_len, mesh, rules),
                                          mesh, rules)
  phases = {
      "sample": plan_lib.sample_phase(model, params, samp, chunk_prompts, prompt_len, mesh, rules),
      "score": plan_lib.reward_phase(reward_model, rm_params, rows, seq_len, mesh,
                                     rules), "train_step": step}
  return mp.MemoryPlan(
      method="raft", mesh_shape=plan_lib.mesh_shape(mesh), resident={
          "policy params": mp.per_device_bytes(state.params),
          "optimizer state": mp.per_device_bytes(state.opt_state),
          "reference params": mp.per_device_bytes(params),
          "reward model params": mp.per_device_bytes(rm_params)}, phases=phases,
      gradients=mp.per_device_bytes(state.params),
      kv_cache=plan_lib.kv_cache_bytes(model_config, rows, seq_len, mesh, rules),
      flops_per_step=mp.train_flops(model_config, batch_size * seq_len, seq_len), notes=[
          f"sampler call {chunk_prompts} prompts x {num_samples}, P {prompt_len} + R "
          f"{response_len}", f"fine-tune batch {batch_size} x {seq_len}",
          f"remat {model_config.remat_policy}"])


def plan(config: Any, model_config: models.ModelConfig, mesh: jax.sharding.Mesh,
         rules=parallel.DEFAULT_RULES) -> mp.MemoryPlan:
  """The DPO, KTO and PRO / RRHF planner of ``algorithms.plan.PLANNERS``: ``data.batch_size``
  pairs (KTO: examples; PRO / RRHF: lists) x the longest bucket, the config's ``loss``, ``optim``."""
  limits = config_dicts.to_dataclass(sections.Limits, config.limits, "limits")
  if config.method in ("raft", "best_of_n"):
    reward_config, outputs = plan_lib.reward_model_of(config, model_config)
    lengths = dict(prompt_len=limits.max_prompt_len, response_len=limits.max_response_len,
                   reward_config=reward_config, reward_outputs=outputs, rules=rules)
    if config.method == "best_of_n":  # the evaluator's response length and temperature
      bon = config_dicts.to_dataclass(best_of_n.BestOfNConfig, config.bon, "bon")
      eval_cfg = config_dicts.to_dataclass(policy_eval.PolicyEvalConfig, config.eval, "eval")
      lengths["response_len"] = eval_cfg.max_new_tokens
      return best_of_n_plan(model_config, mesh, chunk_prompts=bon.chunk_prompts,
                            num_samples=max(bon.ns), temperature=eval_cfg.temperature, **lengths)
    cfg = config_dicts.to_dataclass(raft.RAFTConfig, config.raft, "raft")
    return raft_plan(model_config, mesh, batch_size=int(config.data.batch_size),
                     chunk_prompts=min(scoring.CHUNK_PROMPTS, cfg.prompts_per_round),
                     num_samples=cfg.samples_per_prompt, temperature=cfg.temperature,
                     optim=config_dicts.to_dataclass(train.OptimConfig, config.optim,
                                                     "optim"), **lengths)
  shapes = dict(batch_size=int(config.data.batch_size), seq_len=max(limits.buckets or
                                                                    (limits.max_len,)),
                optim=config_dicts.to_dataclass(train.OptimConfig, config.optim, "optim"),
                lora=sections.lora_section(config).config(), rules=rules)
  if config.method == "listwise":
    k = int(config.data.num_candidates)
    if k < 2:
      raise ValueError(f"config.mesh.device_memory_gb: data.num_candidates={k} (every candidate "
                       "of the data's lists) leaves the list length to the data; set it to the "
                       "longest list to plan, or config.mesh.device_memory_gb=0 to run unchecked")
    return listwise_plan(
        model_config, mesh, num_candidates=k,
        loss=config_dicts.to_dataclass(listwise.ListwiseLossConfig, config.loss, "loss"), **shapes)
  if config.method == "kto":
    return kto_plan(model_config, mesh,
                    loss=config_dicts.to_dataclass(kto.KTOLossConfig, config.loss,
                                                   "loss"), **shapes)
  return dpo_plan(model_config, mesh, loss=config_dicts.to_dataclass(dpo.DPOLossConfig, config.loss,
                                                                     "loss"), **shapes)
