"""Optimiser: AdamW with a weight-decay mask, warmup + decay schedules and global-norm clipping.

The update applied at optimiser step ``t`` (0-based) with gradient ``g_t`` is

    g_t      <- g_t * min(1, clip_norm / ||g_t||_2)                 (global norm over all leaves)
    m_t       = b1 m_{t-1} + (1 - b1) g_t
    v_t       = b2 v_{t-1} + (1 - b2) g_t^2
    u_t       = m_t / (1 - b1^{t+1}) / (sqrt(v_t / (1 - b2^{t+1})) + eps)
    theta_t+1 = theta_t - lr(t) * (u_t + wd * mask * theta_t)

(decoupled weight decay, Loshchilov & Hutter 2019, as ``optax.adamw``). ``mask`` is 1 for matrices
that multiply activations and 0 for norm scales, biases and, unless ``decay_embeddings``, embedding
tables: decaying a norm's scale towards 0 or an embedding row that is rarely seen is not a
regulariser, it is a bias towards dead features.

The learning rate ``lr(t)`` rises linearly from 0 to ``lr`` over ``warmup_steps`` and then follows
``schedule`` down to ``lr * end_lr_ratio`` at ``total_steps``:

    cosine:   lr(t) = end + (lr - end) * 0.5 * (1 + cos(pi * (t - w) / (T - w)))
    linear:   lr(t) = lr + (end - lr) * (t - w) / (T - w)
    constant: lr(t) = lr

Gradient accumulation (``grad_accum_steps``) is not done here with ``optax.MultiSteps``: the train
step (``rlhf_jax.train.loop.make_train_step``) scans over micro-batches inside one jitted call, so
that one call of ``step`` is always one optimiser update (step counters, schedules, checkpoints and
logged metrics all count real updates) and no gradient buffer lives in the optimiser state.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from rlhf_jax.models import lora as lora_lib  # the one param-path spelling (LoRA targets too)

SCHEDULES = ("cosine", "linear", "constant")

# Leaf paths (joined with "/") that are never decayed: norm scales/biases and all biases.
_NO_DECAY_RE = re.compile(r"(^|/)(bias|b|scale|[^/]*norm[^/]*|ln_[^/]*)(/|$)", re.IGNORECASE)
# Embedding tables: decayed only when ``OptimConfig.decay_embeddings``.
_EMBED_RE = re.compile(r"(^|/)([^/]*embed[^/]*|embedding|wte|wpe)(/|$)", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Hyperparameters of the AdamW optimiser (see the module docstring for the update).

  Attributes:
    lr: peak learning rate (> 0).
    schedule: one of ``SCHEDULES``: shape of the decay after warmup.
    warmup_steps: linear warmup length in optimiser steps (>= 0).
    end_lr_ratio: final learning rate as a fraction of ``lr``, in [0, 1].
    b1, b2: Adam moment decay rates, in [0, 1).
    eps: Adam denominator epsilon (> 0).
    weight_decay: decoupled weight decay coefficient (>= 0).
    decay_embeddings: whether embedding tables are weight-decayed.
    clip_norm: global gradient-norm clip; 0 disables clipping.
    grad_accum_steps: micro-batches per optimiser step (>= 1); the batch size must be divisible.
  """

  lr: float = 3e-4
  schedule: str = "cosine"
  warmup_steps: int = 0
  end_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  decay_embeddings: bool = False
  clip_norm: float = 1.0
  grad_accum_steps: int = 1

  def __post_init__(self):

    def bad(field, value, allowed):
      raise ValueError(f"OptimConfig.{field}={value!r} is invalid; allowed: {allowed}.")

    if not self.lr > 0:
      bad("lr", self.lr, "a float > 0")
    if self.schedule not in SCHEDULES:
      bad("schedule", self.schedule, " | ".join(SCHEDULES))
    if not (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0):
      bad("warmup_steps", self.warmup_steps, "an int >= 0")
    if not 0.0 <= self.end_lr_ratio <= 1.0:
      bad("end_lr_ratio", self.end_lr_ratio, "a float in [0, 1]")
    for name in ("b1", "b2"):
      if not 0.0 <= getattr(self, name) < 1.0:
        bad(name, getattr(self, name), "a float in [0, 1)")
    if not self.eps > 0:
      bad("eps", self.eps, "a float > 0")
    if not self.weight_decay >= 0:
      bad("weight_decay", self.weight_decay, "a float >= 0")
    if not isinstance(self.decay_embeddings, bool):
      bad("decay_embeddings", self.decay_embeddings, "True | False")
    if not self.clip_norm >= 0:
      bad("clip_norm", self.clip_norm, "a float >= 0 (0 disables clipping)")
    if not (isinstance(self.grad_accum_steps, int) and self.grad_accum_steps >= 1):
      bad("grad_accum_steps", self.grad_accum_steps, "an int >= 1")


def make_schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
  """Learning rate as a function of the optimiser step (warmup, then ``config.schedule``)."""
  if total_steps < 1:
    raise ValueError(f"total_steps={total_steps} is invalid; allowed: an int >= 1.")
  warmup = min(config.warmup_steps, total_steps)
  end = config.lr * config.end_lr_ratio
  decay_steps = max(total_steps - warmup, 1)
  if config.schedule == "cosine":
    decay = optax.cosine_decay_schedule(config.lr, decay_steps, alpha=config.end_lr_ratio)
  elif config.schedule == "linear":
    decay = optax.linear_schedule(config.lr, end, decay_steps)
  else:
    decay = optax.constant_schedule(config.lr)
  if warmup == 0:
    return decay
  ramp = optax.linear_schedule(0.0, config.lr, warmup)
  return optax.join_schedules([ramp, decay], boundaries=[warmup])


def weight_decay_mask(params: Any, *, decay_embeddings: bool = False) -> Any:
  """Pytree of bools like ``params``: True where decoupled weight decay applies.

  Decided by the leaf's path, not its rank, because layers scanned with ``nn.scan`` give norm
  scales and biases a leading ``layers`` axis (rank 2). Not decayed: any path component named
  ``bias``/``b``/``scale`` or containing ``norm`` or starting with ``ln_``; embedding tables
  (a component containing ``embed``, or ``wte``/``wpe``) unless ``decay_embeddings``.
  """

  def decide(path, _):
    name = lora_lib.path_str(path)
    if _NO_DECAY_RE.search(name):
      return False
    if _EMBED_RE.search(name):
      return decay_embeddings
    return True

  return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(config: OptimConfig,
                   total_steps: int) -> tuple[optax.GradientTransformation, Callable[[Any], Any]]:
  """Returns ``(optimizer, schedule)``; ``schedule(step)`` is the learning rate, for logging."""
  schedule = make_schedule(config, total_steps)
  parts = []
  if config.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.clip_norm))
  parts.append(
      optax.adamw(
          learning_rate=schedule,
          b1=config.b1,
          b2=config.b2,
          eps=config.eps,
          weight_decay=config.weight_decay,
          mask=lambda p: weight_decay_mask(p, decay_embeddings=config.decay_embeddings),
      ))
  return skip_frozen(optax.chain(*parts)), schedule


def skip_frozen(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """``inner`` on the live part of params with frozen parts (``train.state.split_frozen``, e.g.
  ``models.lora.LoraParams``: the adapters); zero updates and no state for the frozen parts (the
  base). Plain param trees go to ``inner`` unchanged. Clipping and the decay mask then see the
  adapters only."""
  from rlhf_jax.train import state as state_lib  # pylint: disable=import-outside-toplevel

  def init(params):
    return inner.init(state_lib.split_frozen(params)[0])

  def update(updates, state, params=None):
    # ``updates``: gradients of the whole params (zeros on the frozen part, which get zero
    # updates back) or of the live part only (``train.loop.make_train_step``).
    live_updates, frozen = state_lib.split_frozen(updates)
    live_params = None if params is None else state_lib.split_frozen(params)[0]
    new, state = inner.update(live_updates, state, live_params)
    if frozen is None:
      return new, state
    return state_lib.join_frozen(new, jax.tree.map(jnp.zeros_like, frozen)), state

  return optax.GradientTransformation(init, update)
