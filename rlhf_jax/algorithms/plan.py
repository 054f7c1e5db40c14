"""Plan a method's per-device memory from its config before anything is allocated.

The plan compiles the trainers' own jitted steps on abstract, sharded inputs
(``parallel.memory_plan``): SFT's ``train.make_train_step(common.nll_loss_fn(model))`` jitted by
``train.loop.jit_train_step``; DPO's and KTO's steps and their reference forward, PRO / RRHF's
step, RAFT's and best-of-n's sampling, scoring (and RAFT's step) (``offline/plan.py``); the reward model's step (``reward/plan.py``); PPO's generation, scoring,
log-prob and update phases, online DPO's sampling, scoring, reference and step
(``online/plan.py``). Entry points:

* :func:`plan_method` — ``(method, model config, mesh, shapes)`` → ``MemoryPlan`` (what
  ``experiments/plan_memory.py`` tabulates for ``llama_1b`` / an 8B Llama on 8..256 devices);
* :func:`plan_config` — the same from an experiment config: the model comes from ``config.model``,
  ``sources.pretrained`` (its ``config.json``) or the SFT run / reward model a stage starts from
  (their stored configs; no checkpoint is read), the shapes from ``config.data`` / ``limits``;
* :func:`check_config` — with ``config.mesh.device_memory_gb = X > 0``, plans and raises
  ``parallel.memory_plan.PlanExceedsMemoryError`` (one line, then the plan) when the peak per
  device exceeds X GiB. ``registry.run`` calls it, so every launcher refuses before allocating.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from rlhf_jax import fileio, models, parallel, sampling, train
from rlhf_jax.algorithms import common, sections
from rlhf_jax.models import lora as lora_lib
from rlhf_jax.parallel import memory_plan as mp
from rlhf_jax.train import checkpoint as ckpt_lib
from rlhf_jax.train import config_dicts

# method -> module with ``plan(config, model_config, mesh, rules) -> MemoryPlan`` (lazily imported:
# a family's planner imports that family's steps; this module imports no family).
PLANNERS = {
    "sft": "rlhf_jax.algorithms.plan", "dpo": "rlhf_jax.algorithms.offline.plan",
    "kto": "rlhf_jax.algorithms.offline.plan", "listwise": "rlhf_jax.algorithms.offline.plan",
    "raft": "rlhf_jax.algorithms.offline.plan", "best_of_n": "rlhf_jax.algorithms.offline.plan",
    "reward_model": "rlhf_jax.algorithms.reward.plan", "ppo": "rlhf_jax.algorithms.online.plan",
    "online_dpo": "rlhf_jax.algorithms.online.plan"}

# The planners that take a ``lora`` section (the policy's adapters over its frozen base).
LORA_PLANNED = ("sft", "dpo", "kto", "listwise")

SEQ_KEYS = ("tokens", "mask", "loss_mask")


def abstract_params(module: Any, mesh: jax.sharding.Mesh, rules=parallel.DEFAULT_RULES) -> Any:
  """A module's params as ``ShapeDtypeStruct`` s with the rules table's shardings on ``mesh``; for
  a ``models.lora.LoraModel`` a ``LoraParams`` (base, adapters sharded like their kernels)."""
  inner = lora_lib.unwrap(module)
  shardings = parallel.logical_shardings(models.abstract_variables(inner), mesh, rules)["params"]
  if isinstance(module, lora_lib.LoraModel):
    return mp.with_shardings(lora_lib.abstract_params(module),
                             lora_lib.param_shardings(module, mesh, rules, shardings))
  return mp.with_shardings(models.abstract_params(module), shardings)


def with_lora(model: Any, lora: lora_lib.LoraConfig | None) -> Any:
  """``model`` with LoRA adapters when ``lora`` is set (the policy of a LoRA run)."""
  return model if lora is None else lora_lib.LoraModel(model, lora)


def trained_bytes(params: Any) -> int:
  """Per-device bytes of what a step trains: a LoRA run's adapters, else every param."""
  return mp.per_device_bytes(params.lora if lora_lib.is_lora(params) else params)


def abstract_opt_state(optimizer: optax.GradientTransformation, params: Any,
                       mesh: jax.sharding.Mesh) -> Any:
  """``optimizer.init(params)`` abstractly, each moment sharded like its parameter and the rest
  (Adam's count) replicated: the layout ``train.create_train_state`` produces."""
  rep = NamedSharding(mesh, PartitionSpec())
  shapes = jax.eval_shape(optimizer.init, params)
  # moments exist for the live params only (a frozen LoRA base has none: train.optim.skip_frozen)
  param_sh = jax.tree.map(lambda x: x.sharding, train.state.split_frozen(params)[0])
  shardings = optax.tree_map_params(optimizer, lambda _, s: s, shapes, param_sh,
                                    transform_non_params=lambda _: rep)
  return mp.with_shardings(shapes, shardings)


def abstract_train_state(params: Any, optimizer: optax.GradientTransformation,
                         mesh: jax.sharding.Mesh) -> train.TrainState:
  rep = NamedSharding(mesh, PartitionSpec())
  return train.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), params=params,
                          opt_state=abstract_opt_state(optimizer, params, mesh),
                          rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep))


def rows_batch(rows: int, seq_len: int, mesh: jax.sharding.Mesh, rules=parallel.DEFAULT_RULES,
               **extra: Any) -> dict:
  """Abstract ``tokens / mask / loss_mask [rows, seq_len]`` int32 (the collators' dtypes), rows
  split over the batch axes, plus ``extra`` name -> (shape, dtype) leaves sharded the same way."""
  sharding = parallel.data_sharding(mesh, rules)
  batch = {k: jax.ShapeDtypeStruct((rows, seq_len), jnp.int32, sharding=sharding) for k in SEQ_KEYS}
  for name, (shape, dtype) in extra.items():
    batch[name] = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  return batch


def train_step_phase(loss_fn: Any, params: Any, optim: train.OptimConfig, batch: dict,
                     mesh: jax.sharding.Mesh, rules=parallel.DEFAULT_RULES):
  """The method's train step exactly as the loop runs it (``make_train_step`` +
  ``jit_train_step``: state shardings in and out, donated) → ``(PhaseMemory, abstract state)``."""
  optimizer, schedule = train.make_optimizer(optim, 1000)
  state = abstract_train_state(params, optimizer, mesh)
  step = train.make_train_step(loss_fn, optimizer, schedule,
                               grad_accum_steps=optim.grad_accum_steps)
  jitted = train.loop.jit_train_step(step, state, mesh, rules)
  if hasattr(jitted,
             "jitted"):  # a frozen LoRA base: its own argument, neither donated nor returned
    live, frozen = train.state.split_frozen(state)
    return mp.compile_phase(jitted.jitted, (live, frozen, batch), mesh=mesh,
                            resident=(True, True, False), rules=rules), state
  return mp.compile_phase(jitted, (state, batch), mesh=mesh, resident=(True, False),
                          rules=rules), state


def kv_cache_bytes(model_config: models.ModelConfig, rows: int, slots: int, mesh: jax.sharding.Mesh,
                   rules=parallel.DEFAULT_RULES) -> int:
  """Per-device bytes of the sampler's k and v buffers ``[L, rows, K, slots, H]`` (rows over the
  batch axes, kv heads over ``activation_kv_heads``' axes when they divide)."""
  c = model_config
  table = parallel.validate_rules(rules)

  def ways(axes):
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1

  row_ways, head_ways = ways(table["activation_batch"]), ways(table["activation_kv_heads"])
  heads = c.num_kv_heads // head_ways if c.num_kv_heads % head_ways == 0 else c.num_kv_heads
  per_row = 2 * c.n_layers * heads * slots * c.head_size * c.compute_dtype.itemsize
  return int(-(-rows // row_ways) * per_row)


def sample_phase(model: models.Transformer, params: Any, samp: sampling.SamplingConfig,
                 prompts: int, prompt_len: int, mesh: jax.sharding.Mesh,
                 rules=parallel.DEFAULT_RULES) -> mp.PhaseMemory:
  """``sampling.sample`` of ``samp.num_samples`` responses for each of ``prompts`` prompts of
  ``prompt_len`` tokens (prompts split over the batch axes; its temp holds the KV cache)."""
  placement = parallel.Placement(mesh, tuple(rules))

  def generate(params_, tokens_BxP, mask_BxP, rng):
    out = sampling.sample(model, params_, tokens_BxP, mask_BxP, rng, samp)
    return out.response_tokens_BxR, out.response_mask_BxR

  rows = placement.rows
  jitted = placement.jit(generate, (placement.params(model), rows, rows, placement.replicated),
                         rows).jitted
  prompt = jax.ShapeDtypeStruct((prompts, prompt_len), jnp.int32, sharding=rows)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=placement.replicated)
  return mp.compile_phase(jitted, (params, prompt, prompt, key), mesh=mesh,
                          resident=(True, False, False, False), rules=rules)


def reward_phase(reward_model: models.RewardModel, params: Any, rows: int, seq_len: int,
                 mesh: jax.sharding.Mesh, rules=parallel.DEFAULT_RULES) -> mp.PhaseMemory:
  """The reward model's forward over ``rows`` full sequences of ``seq_len`` tokens."""
  placement = parallel.Placement(mesh, tuple(rules))
  fn = lambda params_, tokens, mask: reward_model.apply({"params": params_}, tokens, mask)  # noqa
  jitted = placement.jit(fn, (placement.params(reward_model), placement.rows, placement.rows),
                         placement.rows).jitted
  seq = jax.ShapeDtypeStruct((rows, seq_len), jnp.int32, sharding=placement.rows)
  return mp.compile_phase(jitted, (params, seq, seq), mesh=mesh, resident=(True, False, False),
                          rules=rules)


def reward_model_of(config: Any, policy_config: models.ModelConfig) -> tuple[Any, int]:
  """(model config, outputs) of the trained reward model ``sources.reward_model_workdir`` names,
  read from its ``reward_model.json`` (no params read); the policy's config and 1 when unset."""
  from rlhf_jax import scoring  # pylint: disable=import-outside-toplevel
  sources = config_dicts.to_dataclass(sections.Sources, config.sources, "sources")
  if not sources.reward_model_workdir:
    return policy_config, 1
  info = scoring.read_reward_model_info(sources.reward_model_workdir)
  return info.model_config(), len(info.output_names)


def mesh_shape(mesh: jax.sharding.Mesh) -> dict:
  return {k: int(v) for k, v in mesh.shape.items()}


def check_rows(rows: int, mesh: jax.sharding.Mesh, what: str, rules=parallel.DEFAULT_RULES):
  axes = parallel.batch_axes(rules)
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  ways = 1
  for a in axes:
    ways *= mesh.shape[a]
  if rows % ways:
    raise ValueError(f"{what}={rows} rows do not split over the mesh's {ways} batch ways "
                     f"({' x '.join(axes)}); use a multiple of {ways}")


def sft_plan(model_config: models.ModelConfig, mesh: jax.sharding.Mesh, *, batch_size: int,
             seq_len: int, optim: train.OptimConfig = train.OptimConfig(),
             aggregation: str = "token_mean", lora: lora_lib.LoraConfig | None = None,
             rules=parallel.DEFAULT_RULES) -> mp.MemoryPlan:
  """SFT: the policy's params and AdamW moments resident; one train step on ``[batch, seq_len]``
  (with ``lora``: the frozen base and the adapters, moments and gradients for the adapters)."""
  check_rows(batch_size, mesh, "data.batch_size", rules)
  model = with_lora(models.Transformer(model_config), lora)
  params = abstract_params(model, mesh, rules)
  phase, state = train_step_phase(common.nll_loss_fn(model, aggregation), params, optim,
                                  rows_batch(batch_size, seq_len, mesh, rules), mesh, rules)
  return mp.MemoryPlan(
      method="sft", mesh_shape=mesh_shape(mesh), resident={
          "policy params": mp.per_device_bytes(state.params),
          "optimizer state": mp.per_device_bytes(state.opt_state)}, phases={"train_step": phase},
      gradients=trained_bytes(state.params),
      flops_per_step=mp.train_flops(model_config, batch_size * seq_len, seq_len), notes=[
          f"batch {batch_size} x {seq_len}", f"remat {model_config.remat_policy}",
          f"scan_layers {model_config.scan_layers}", f"dtype {model_config.dtype}",
          *lora_notes(lora)])


def lora_notes(lora: lora_lib.LoraConfig | None) -> list[str]:
  return [] if lora is None else [f"LoRA rank {lora.rank} on {lora.targets}"]


def plan_method(method: str, config: Any, model_config: models.ModelConfig, mesh: jax.sharding.Mesh,
                rules=parallel.DEFAULT_RULES) -> mp.MemoryPlan:
  """The plan of ``method`` for an experiment ``config`` (its data / limits / optim / loss / ppo
  sections) with the policy ``model_config`` on ``mesh``."""
  if method not in PLANNERS:
    raise ValueError(f"config.mesh.device_memory_gb: no memory plan for method {method!r}; "
                     f"planned: {' | '.join(PLANNERS)} (set config.mesh.device_memory_gb=0 to run "
                     "unchecked)")
  return importlib.import_module(PLANNERS[method]).plan(config, model_config, mesh, rules)


def plan(config: Any, model_config: models.ModelConfig, mesh: jax.sharding.Mesh,
         rules=parallel.DEFAULT_RULES) -> mp.MemoryPlan:
  """SFT's planner (``PLANNERS["sft"]``): batch ``data.batch_size`` x the longest bucket."""
  limits = config_dicts.to_dataclass(sections.Limits, config.limits, "limits")
  optim = config_dicts.to_dataclass(train.OptimConfig, config.optim, "optim")
  return sft_plan(model_config, mesh, batch_size=int(config.data.batch_size),
                  seq_len=max(limits.buckets or (limits.max_len,)), optim=optim,
                  aggregation=config.get("aggregation", "token_mean"),
                  lora=sections.lora_section(config).config(), rules=rules)


# ----------------------------------------------------------------------------------------------------
# From an experiment config
# ----------------------------------------------------------------------------------------------------


def stored_model_config(source: str, model_section: Any = None) -> models.ModelConfig:
  """The model config of a run a stage starts from, read from its files (no params are read):
  an SFT (or any loop) run's ``run_fingerprint.json``, or a Hugging Face folder's
  ``config.json`` (``sources.pretrained``; ``config.model``'s runtime fields on top)."""
  if train.runs.is_pretrained(source):
    from rlhf_jax.models import hf  # pylint: disable=import-outside-toplevel
    path = train.runs.pretrained_path(source)
    return hf.config_from_hf(hf.read_config(path), source=os.path.join(path, "config.json"),
                             **common.model_overrides(model_section))
  path = fileio.join(source, ckpt_lib.FINGERPRINT_FILE)  # a run directory: local or a URL
  if not fileio.isfile(path):
    raise ValueError(f"config.mesh.device_memory_gb: {source} has no {ckpt_lib.FINGERPRINT_FILE} "
                     "to plan from; allowed: a finished (or started) SFT run directory")
  fields = fileio.read_json(path)["model"]
  return models.ModelConfig(
      **{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def policy_model_config(config: Any) -> models.ModelConfig:
  """The policy's model config for ``config``: ``sources.pretrained`` / ``sources.sft_workdir``
  when set, else ``config.model`` (``vocab_size`` following the tokenizer, as SFT does)."""
  sources = config_dicts.to_dataclass(sections.Sources, config.sources, "sources")
  if sources.policy:
    return stored_model_config(sources.policy, config.get("model"))
  return own_model_config(config, sources)


def own_model_config(config: Any, sources: sections.Sources | None = None) -> models.ModelConfig:
  """``config.model`` (a model the run initialises), ``vocab_size`` following the tokenizer."""
  sources = sources or config_dicts.to_dataclass(sections.Sources, config.sources, "sources")
  if "model" not in config:
    raise ValueError("config.mesh.device_memory_gb: no config.model and no sources.sft_workdir / "
                     "sources.pretrained to plan the policy from")
  section = config.model.to_dict()
  if section.get("vocab_size") is None:
    from rlhf_jax.data import tokenizers  # pylint: disable=import-outside-toplevel
    section["vocab_size"] = tokenizers.load_tokenizer(sources.tokenizer or "byte").vocab_size
  return config_dicts.build_model_config(section)


def plan_config(config: Any, rules=parallel.DEFAULT_RULES) -> mp.MemoryPlan:
  """The plan of an experiment config on the mesh ``parallel.mesh_from_config`` builds from it."""
  method = config.get("method", "")
  if sections.lora_section(config).config() is not None and method not in LORA_PLANNED:
    raise ValueError(f"config.mesh.device_memory_gb: LoRA runs of {method!r} are not planned; "
                     f"planned with LoRA: {' | '.join(LORA_PLANNED)} (set "
                     "config.mesh.device_memory_gb=0 to run unchecked)")
  if method not in PLANNERS:  # before reading any source: the message names what is planned
    plan_method(method, config, None, None, rules)
  mesh = parallel.mesh_from_config(config.mesh)
  return plan_method(method, config, policy_model_config(config), mesh, rules)


def device_memory_gb(config: Any) -> float:
  mesh = config.get("mesh") if hasattr(config, "get") else None
  value = mesh.get("device_memory_gb", 0.0) if mesh is not None else 0.0
  return float(value or 0.0)


def check_config(config: Any) -> mp.MemoryPlan | None:
  """With ``config.mesh.device_memory_gb > 0``: the plan, or ``PlanExceedsMemoryError`` when its
  peak exceeds that many GiB per device. ``None`` (nothing planned) when the limit is 0."""
  limit = device_memory_gb(config)
  if not limit:
    return None
  result = plan_config(config)
  result.check(limit)
  return result
