"""Memory plan of the reward model (``algorithms.plan``): its own train step, nothing else resident.

Resident per device: the RM's params (backbone + head) and their AdamW moments. One phase,
``train_step``: ``train.make_train_step(objectives.make_loss_fn(objectives.make_objective(...)))``
jitted as the loop jits it, over the objective's batch — Bradley–Terry: ``[2B, T]`` (chosen and
rejected of B pairs in one forward); Likert: ``[B, T]`` and a rating per row; multi-attribute:
``[B, T]`` and A ratings per row (A = ``len(rm.attribute_weights)``, one head output each).
Ranked objectives are not planned: their ``[B·K, T]`` batch takes K from the data. The backbone is the SFT run's
(``rm.init=sft``: read from its fingerprint, no params loaded) or ``config.model`` (``scratch``),
with ``rm.dropout_rate`` / ``rm.compute_dtype`` on top as the trainer applies them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rlhf_jax import models, parallel, train
from rlhf_jax.algorithms import plan as plan_lib
from rlhf_jax.algorithms import sections
from rlhf_jax.algorithms.reward import objectives, trainer
from rlhf_jax.parallel import memory_plan as mp
from rlhf_jax.train import config_dicts

PLANNED_OBJECTIVES = ("bradley_terry", "likert", "multi_attribute")


def reward_model_plan(model_config: models.ModelConfig, mesh: jax.sharding.Mesh, *, batch_size: int,
                      seq_len: int, optim: train.OptimConfig = train.OptimConfig(),
                      rm: trainer.RMConfig = trainer.RMConfig(),
                      rules=parallel.DEFAULT_RULES) -> mp.MemoryPlan:
  """``batch_size`` examples (pairs or rated rows) of ``seq_len`` tokens (module docstring)."""
  if rm.objective not in PLANNED_OBJECTIVES:
    raise ValueError(f"config.mesh.device_memory_gb: no memory plan for rm.objective="
                     f"{rm.objective!r} (its lists' length comes from the data); planned: "
                     f"{' | '.join(PLANNED_OBJECTIVES)} (set config.mesh.device_memory_gb=0 to run "
                     "unchecked)")
  b = batch_size
  outputs = len(rm.attribute_weights) if rm.objective == "multi_attribute" else 1
  if rm.objective == "multi_attribute" and not outputs:
    raise ValueError("config.mesh.device_memory_gb: a multi_attribute RM is planned from "
                     "config.rm.attribute_weights (one per attribute); set them")
  if rm.objective == "bradley_terry":
    rows, extra, what = 2 * b, {}, f"{b} pairs"
  elif rm.objective == "likert":
    rows, extra, what = b, {"rating": ((b,), jnp.float32)}, f"{b} rated rows"
  else:
    rows, extra, what = b, {"attributes": ((b, outputs), jnp.float32)}, f"{b} rows x {outputs}"
  plan_lib.check_rows(rows, mesh, f"the RM's {rows} rows per batch", rules)
  model = models.RewardModel(model_config, num_outputs=outputs)
  params = plan_lib.abstract_params(model, mesh, rules)
  objective = objectives.make_objective(
      model,
      rm.objective,
      center_coef=rm.center_coef,
      # the scale maps ratings to targets: it changes no shape, so any valid one plans the same
      rating_scale=(0.0, 1.0) if rm.objective != "bradley_terry" else (),
      attribute_weights=rm.attribute_weights)
  batch = plan_lib.rows_batch(rows, seq_len, mesh, rules, **extra)
  step, state = plan_lib.train_step_phase(objectives.make_loss_fn(objective), params, optim, batch,
                                          mesh, rules)
  return mp.MemoryPlan(
      method="reward_model", mesh_shape=plan_lib.mesh_shape(mesh), resident={
          "reward model params": mp.per_device_bytes(state.params),
          "optimizer state": mp.per_device_bytes(state.opt_state)}, phases={"train_step": step},
      gradients=mp.per_device_bytes(state.params),
      flops_per_step=mp.train_flops(model_config, rows * seq_len, seq_len), notes=[
          f"{what} x {seq_len}", f"objective {rm.objective}", f"init {rm.init}",
          f"remat {model_config.remat_policy}"])


def plan(config: Any, model_config: models.ModelConfig, mesh: jax.sharding.Mesh,
         rules=parallel.DEFAULT_RULES) -> mp.MemoryPlan:
  """The RM planner of ``algorithms.plan.PLANNERS`` (``model_config``: the SFT run's, which the
  backbone is with ``rm.init=sft``)."""
  rm = config_dicts.to_dataclass(trainer.RMConfig, config.rm, "rm")
  if rm.init == "scratch":
    model_config = plan_lib.own_model_config(config)
  model_config = model_config.replace(dropout_rate=rm.dropout_rate)
  if rm.compute_dtype:
    model_config = model_config.replace(dtype=rm.compute_dtype)
  limits = config_dicts.to_dataclass(sections.Limits, config.limits, "limits")
  return reward_model_plan(
      model_config, mesh, batch_size=int(config.data.batch_size), seq_len=max(limits.buckets or
                                                                              (limits.max_len,)),
      optim=config_dicts.to_dataclass(train.OptimConfig, config.optim, "optim"), rm=rm, rules=rules)
