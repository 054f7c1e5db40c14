"""Per-device memory of a sharded program, read from XLA before anything is allocated.

A plan is built from *abstract* arguments (``jax.ShapeDtypeStruct`` s that carry their
``NamedSharding``): each jitted phase of a method is lowered and compiled for the mesh, and its
``compiled.memory_analysis()`` gives, per device,

    argument  bytes of the inputs          (params, optimiser state, batch)
    output    bytes of the outputs         (the new state, metrics)
    alias     outputs that reuse a donated input's buffer (a donated train state)
    temp      everything else XLA allocates while the program runs: gradients, activations
              saved for the backward pass (after the remat policy), all-gathered FSDP weights,
              the sampler's KV cache, workspace

No device buffer is created: lowering and compiling read shapes, dtypes and shardings only, so a
Llama-8B step on 256 *simulated* CPU devices (``--xla_force_host_platform_device_count=256``)
is planned on a laptop. What stays on the device for the whole run (every model's params, the
optimiser state) is counted once as *resident*; each phase adds its own transient bytes
(``temp`` plus the inputs and outputs that are not resident), and the peak is

    peak = Σ resident + max over phases (temp + transient inputs + non-aliased outputs)

The numbers are XLA's for the backend that compiled the program: a CPU compile fuses and
schedules differently from a TPU / GPU one (no latency-hiding scheduler, bf16 matmuls upcast on
some CPUs), so on CPU treat ``temp`` as an estimate within tens of percent; the resident bytes are
exact on any backend (they follow from shapes and shardings alone).

:func:`train_flops` is the step's 6·N·tokens estimate (plus causal attention), the convention of
the benchmarks (DESIGN.md, "Performance conventions").
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from rlhf_jax.parallel.rules import DEFAULT_RULES
from rlhf_jax.parallel.sharding import use_mesh

GIB = 2**30


class PlanExceedsMemoryError(ValueError):
  """A configuration whose planned per-device peak is larger than the memory it was given."""


def with_shardings(abstract_tree: Any, shardings: Any) -> Any:
  """``ShapeDtypeStruct`` tree whose leaves carry the matching ``shardings`` leaf."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      abstract_tree, shardings)


def per_device_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of arrays / ``ShapeDtypeStruct`` s with shardings: each leaf's
  ``sharding.shard_shape`` (its largest shard; the whole array when it has no sharding)."""
  total = 0
  for leaf in jax.tree_util.tree_leaves(tree):
    sharding = getattr(leaf, "sharding", None)
    shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return int(total)


@dataclasses.dataclass(frozen=True)
class PhaseMemory:
  """One compiled phase, per device (bytes).

  Attributes:
    argument, output, alias, temp: ``memory_analysis()`` of the compiled program.
    resident_args: the part of ``argument`` that is resident (params / state, counted once in
      the plan); the rest of the inputs (a batch, a rollout) is transient.
    compile_secs: wall time of lower + compile.
    xla_flops: XLA's ``cost_analysis()["flops"]`` of the per-device program (-1 if absent).
  """

  argument: int
  output: int
  alias: int
  temp: int
  resident_args: int
  compile_secs: float
  xla_flops: float = -1.0

  @property
  def transient(self) -> int:
    """Bytes this phase adds on top of the resident ones while it runs."""
    return self.temp + (self.argument - self.resident_args) + (self.output - self.alias)


def compile_phase(fn: Callable, args: Sequence[Any], *, mesh: jax.sharding.Mesh,
                  resident: Sequence[bool], rules: Sequence = DEFAULT_RULES) -> PhaseMemory:
  """Lowers and compiles jitted ``fn`` on abstract ``args`` (traced inside ``use_mesh``, so the
  model's activation constraints apply as in training) and reads its memory analysis.

  ``resident[i]`` says whether ``args[i]`` lives on the device for the whole run.
  """
  t0 = time.perf_counter()
  with use_mesh(mesh, rules):
    compiled = fn.lower(*args).compile()
  secs = time.perf_counter() - t0
  stats = compiled.memory_analysis()
  if stats is None:
    raise RuntimeError(f"{jax.default_backend()}: compiled.memory_analysis() is unavailable")
  flops = -1.0
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", -1.0)) if cost else -1.0
  except Exception:  # pylint: disable=broad-except  (cost analysis is optional per backend)
    pass
  resident_args = sum(per_device_bytes(a) for a, keep in zip(args, resident) if keep)
  return PhaseMemory(argument=int(stats.argument_size_in_bytes),
                     output=int(stats.output_size_in_bytes), alias=int(stats.alias_size_in_bytes),
                     temp=int(stats.temp_size_in_bytes), resident_args=resident_args,
                     compile_secs=secs, xla_flops=flops)


def train_flops(model_config: Any, tokens: float, seq_len: int) -> float:
  """FLOPs of one training pass over ``tokens`` tokens of sequences ``seq_len`` long:

      6 · N_matmul · tokens + 6 · L · T · d · tokens

  (forward + backward of every weight matmul, plus causal attention: half of 12·L·T·d per token).
  N_matmul leaves out a learned position table (a lookup, not a matmul)."""
  c = model_config
  n_matmul = c.num_params() - (c.max_seq_len * c.d_model if c.position == "learned" else 0)
  return float(tokens) * (6.0 * n_matmul + 6.0 * c.n_layers * seq_len * c.d_model)


@dataclasses.dataclass
class MemoryPlan:
  """Per-device bytes of one method's run on one mesh (module docstring).

  Attributes:
    method: ``sft`` | ``dpo`` | ``ppo`` (the planner that built it).
    mesh_shape: ``{"data": ., "fsdp": ., "tensor": .}``.
    resident: category -> per-device bytes held for the whole run (``policy params``,
      ``optimizer state``, ``reference params``, ...).
    phases: phase name -> :class:`PhaseMemory`.
    gradients: per-device bytes of the gradients (the live params' sharded size; they are part
      of the train phase's ``temp``).
    kv_cache: per-device bytes of the sampler's KV cache (part of the generation phase's
      ``temp``; 0 for offline methods).
    train_phase: the phase whose ``temp`` holds the gradients and saved activations.
    flops_per_step: :func:`train_flops` of one optimiser step (or of one RL iteration's updates).
    notes: what the planner assumed (shapes, remat policy), one short string each.
  """

  method: str
  mesh_shape: Mapping[str, int]
  resident: dict[str, int]
  phases: dict[str, PhaseMemory]
  gradients: int = 0
  kv_cache: int = 0
  train_phase: str = "train_step"
  flops_per_step: float = 0.0
  notes: list[str] = dataclasses.field(default_factory=list)

  @property
  def resident_bytes(self) -> int:
    return sum(self.resident.values())

  @property
  def peak_phase(self) -> str:
    return max(self.phases, key=lambda name: self.phases[name].transient)

  @property
  def peak_bytes(self) -> int:
    return self.resident_bytes + max(p.transient for p in self.phases.values())

  @property
  def activation_bytes(self) -> int:
    """Saved activations + workspace of the train phase: its ``temp`` minus the gradients."""
    phase = self.phases.get(self.train_phase)
    return max(phase.temp - self.gradients, 0) if phase is not None else 0

  def categories(self) -> dict[str, int]:
    """The README table's columns (per device, bytes)."""
    params = sum(v for k, v in self.resident.items() if k.endswith("params"))
    return {
        "params": params, "optimizer state": self.resident.get("optimizer state",
                                                               0), "gradients": self.gradients,
        "activations": self.activation_bytes, "kv cache": self.kv_cache, "peak": self.peak_bytes}

  def summary(self) -> str:
    """A few lines: the mesh, resident bytes by category, each phase, the peak, the FLOPs."""
    mesh = " x ".join(f"{k} {v}" for k, v in self.mesh_shape.items())
    lines = [f"memory plan ({self.method}, per device, mesh {mesh}):"]
    lines.append("  resident: " + ", ".join(f"{k} {_gib(v)}" for k, v in self.resident.items()))
    for name, p in self.phases.items():
      extra = ""
      if name == self.train_phase:
        extra = f" (gradients {_gib(self.gradients)}, activations {_gib(self.activation_bytes)})"
      elif self.kv_cache and name == "generate":
        extra = f" (kv cache {_gib(self.kv_cache)})"
      lines.append(f"  {name}: +{_gib(p.transient)} (temp {_gib(p.temp)}{extra})")
    lines.append(f"  peak {_gib(self.peak_bytes)} in {self.peak_phase}; "
                 f"{self.flops_per_step:.3g} FLOP per step (6·N·tokens + attention)")
    return "\n".join(lines)

  def check(self, device_memory_gb: float) -> None:
    """Raises :class:`PlanExceedsMemoryError` when the peak exceeds ``device_memory_gb`` GiB
    (0 = no limit); its message is one line: the reason, then :meth:`summary`'s lines joined."""
    if device_memory_gb and self.peak_bytes > device_memory_gb * GIB:
      plan = "; ".join(line.strip().rstrip(":") for line in self.summary().splitlines())
      raise PlanExceedsMemoryError(
          f"config.mesh.device_memory_gb={device_memory_gb:g}: the planned peak is "
          f"{_gib(self.peak_bytes)} per device ({self.peak_phase}); shard more (mesh.fsdp, "
          "mesh.tensor), shrink the batch, raise optim.grad_accum_steps or remat more "
          f"(model.remat_policy). Refused before allocating anything. {plan}")

  def to_json(self) -> dict:
    return {
        "method": self.method, "mesh_shape": dict(self.mesh_shape), "resident": self.resident,
        "phases": {
            k: dataclasses.asdict(v) | {"transient": v.transient} for k, v in self.phases.items()
        }, "gradients": self.gradients, "kv_cache": self.kv_cache,
        "activations": self.activation_bytes, "peak": self.peak_bytes,
        "peak_phase": self.peak_phase, "flops_per_step": self.flops_per_step,
        "notes": list(self.notes)}


def _gib(n: int) -> str:
  if n < GIB:
    return f"{n / 2**20:.2f} MiB"
  return f"{n / GIB:.2f} GiB"
