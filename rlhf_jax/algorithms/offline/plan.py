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
the lists are sampled once before training, which the plan does not cover.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rlhf_jax import models, parallel, train
from rlhf_jax.algorithms import plan as plan_lib
from rlhf_jax.algorithms import reference, sections
from rlhf_jax.algorithms.offline import dpo, kto, listwise
from rlhf_jax.parallel import memory_plan as mp
from rlhf_jax.train import config_dicts


def dpo_plan(model_config: models.ModelConfig, mesh: jax.sharding.Mesh, *, batch_size: int,
             seq_len: int, optim: train.OptimConfig = train.OptimConfig(),
             loss: dpo.DPOLossConfig = dpo.DPOLossConfig(),
             rules=parallel.DEFAULT_RULES) -> mp.MemoryPlan:
  """``batch_size`` pairs (``2 * batch_size`` rows) of ``seq_len`` tokens (module docstring)."""
  rows = 2 * batch_size
  plan_lib.check_rows(rows, mesh, "2 x data.batch_size", rules)
  model = models.Transformer(model_config)
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
  if loss.uses_reference:
    resident["reference params"] = mp.per_device_bytes(params)
  if with_reference:
    phases["reference"] = _reference_phase(model, params, batch, mesh, rules)
  # The reference forward is 2·N·tokens of the 6·N·tokens a trained token costs.
  flops = mp.train_flops(model_config, rows * seq_len, seq_len) * (4 / 3 if with_reference else 1)
  return mp.MemoryPlan(
      method="dpo", mesh_shape=plan_lib.mesh_shape(mesh), resident=resident, phases=phases,
      gradients=mp.per_device_bytes(state.params), flops_per_step=flops, notes=[
          f"{batch_size} pairs x {seq_len}", f"loss {loss.label}",
          f"reference {loss.reference_logps if loss.uses_reference else 'none'}",
          f"remat {model_config.remat_policy}"])


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
             loss: kto.KTOLossConfig = kto.KTOLossConfig(),
             rules=parallel.DEFAULT_RULES) -> mp.MemoryPlan:
  """``batch_size`` unpaired examples and their KL rows (``2 * batch_size`` rows) of ``seq_len``."""
  rows = 2 * batch_size
  plan_lib.check_rows(rows, mesh, "2 x data.batch_size", rules)
  model = models.Transformer(model_config)
  params = plan_lib.abstract_params(model, mesh, rules)
  batch = plan_lib.rows_batch(
      rows, seq_len, mesh, rules, **{
          reference.REF_KEY: ((rows,), jnp.float32), "valid": ((batch_size,), jnp.float32),
          "label": ((batch_size,), jnp.float32)})
  step, state = plan_lib.train_step_phase(kto.make_loss_fn(model, loss), params, optim, batch, mesh,
                                          rules)
  return mp.MemoryPlan(
      method="kto", mesh_shape=plan_lib.mesh_shape(mesh), resident={
          "policy params": mp.per_device_bytes(state.params),
          "optimizer state": mp.per_device_bytes(state.opt_state),
          "reference params": mp.per_device_bytes(params)},
      phases={"train_step": step,
              "reference": _reference_phase(model, params, batch, mesh,
                                            rules)}, gradients=mp.per_device_bytes(state.params),
      flops_per_step=mp.train_flops(model_config, rows * seq_len, seq_len) * 4 / 3, notes=[
          f"{batch_size} examples + {batch_size} KL rows x {seq_len}", f"loss {loss.label}",
          "reference on_the_fly", f"remat {model_config.remat_policy}"])


def listwise_plan(model_config: models.ModelConfig, mesh: jax.sharding.Mesh, *, batch_size: int,
                  seq_len: int, num_candidates: int, optim: train.OptimConfig = train.OptimConfig(),
                  loss: listwise.ListwiseLossConfig = listwise.ListwiseLossConfig(),
                  rules=parallel.DEFAULT_RULES) -> mp.MemoryPlan:
  """``batch_size`` lists of ``num_candidates`` candidates of ``seq_len`` tokens (module docs)."""
  b, k = batch_size, num_candidates
  plan_lib.check_rows(b, mesh, "data.batch_size (lists)", rules)
  model = models.Transformer(model_config)
  params = plan_lib.abstract_params(model, mesh, rules)
  batch = plan_lib.rows_batch(b * k, seq_len, mesh, rules, candidate_mask=((b, k), jnp.float32),
                              scores=((b, k), jnp.float32))
  step, state = plan_lib.train_step_phase(listwise.make_loss_fn(model, loss), params, optim, batch,
                                          mesh, rules)
  return mp.MemoryPlan(
      method="listwise", mesh_shape=plan_lib.mesh_shape(mesh), resident={
          "policy params": mp.per_device_bytes(state.params),
          "optimizer state": mp.per_device_bytes(state.opt_state)}, phases={"train_step": step},
      gradients=mp.per_device_bytes(state.params),
      flops_per_step=mp.train_flops(model_config, b * k * seq_len, seq_len), notes=[
          f"{b} lists x {k} candidates x {seq_len}", f"loss {loss.method}",
          f"remat {model_config.remat_policy}"])


def plan(config: Any, model_config: models.ModelConfig, mesh: jax.sharding.Mesh,
         rules=parallel.DEFAULT_RULES) -> mp.MemoryPlan:
  """The DPO, KTO and PRO / RRHF planner of ``algorithms.plan.PLANNERS``: ``data.batch_size``
  pairs (KTO: examples; PRO / RRHF: lists) x the longest bucket, the config's ``loss``, ``optim``."""
  limits = config_dicts.to_dataclass(sections.Limits, config.limits, "limits")
  shapes = dict(batch_size=int(config.data.batch_size), seq_len=max(limits.buckets or
                                                                    (limits.max_len,)),
                optim=config_dicts.to_dataclass(train.OptimConfig, config.optim,
                                                "optim"), rules=rules)
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
