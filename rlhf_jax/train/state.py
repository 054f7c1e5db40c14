"""TrainState: everything a train step reads and writes, as one pytree.

``step`` counts optimiser updates (one call of ``step(state, batch)``), ``rng`` is a raw ``uint32[2]``
key (raw rather than a typed ``jax.random.key`` so that orbax stores and restores it as a plain
array, bit for bit). The train step splits ``rng`` once per update and carries the new key forward,
so a resumed run draws exactly the random numbers an uninterrupted one would.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimiser updates done
  params: Any
  opt_state: optax.OptState
  rng: jax.Array  # uint32[2]


def create_train_state(
    params: Any,
    optimizer: optax.GradientTransformation,
    rng: jax.Array,
    mesh: Mesh,
) -> TrainState:
  """Builds the state around already-created (possibly sharded) ``params``.

  The optimiser state is created by a jitted ``optimizer.init``, whose moments inherit the
  parameters' shardings by propagation; step and rng are replicated on ``mesh``.
  """
  replicated = NamedSharding(mesh, PartitionSpec())
  opt_state = jax.jit(optimizer.init)(params)
  # Moments inherit the params' NamedShardings; leaves built from constants (Adam's step count)
  # come out on one device and are replicated over the mesh instead.
  opt_state = jax.tree.map(
      lambda x: x
      if isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh else jax.device_put(
          x, replicated), opt_state)
  step = jax.device_put(jnp.zeros((), jnp.int32), replicated)
  rng = jax.device_put(jnp.asarray(rng, jnp.uint32), replicated)
  return TrainState(step=step, params=params, opt_state=opt_state, rng=rng)


def state_shardings(state: TrainState) -> Any:
  """Pytree of the shardings of ``state``'s leaves (for ``jit`` in/out shardings)."""
  return jax.tree.map(lambda x: x.sharding, state)


def abstract_state(state_or_fn: TrainState | Callable[[], TrainState]) -> Any:
  """``jax.ShapeDtypeStruct`` tree (with shardings) of a state, for restoring checkpoints."""
  if callable(state_or_fn):
    return jax.eval_shape(state_or_fn)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state_or_fn)


def _has_frozen(x: Any) -> bool:
  return hasattr(x, "split_frozen") and hasattr(x, "join_frozen")


def split_frozen(tree: Any) -> tuple[Any, Any]:
  """``(tree without the frozen parts of its params, those parts)``; ``(tree, None)`` if none.

  Params objects with a frozen part (``models.lora.LoraParams``: the base under the adapters)
  expose ``split_frozen() -> (live params, frozen)`` and ``join_frozen(frozen)``; they may sit
  anywhere in ``tree`` (a ``TrainState``, PPO's ``{"policy": ..., "value": ...}``). The frozen
  parts get no optimizer state (``train.optim.skip_frozen``), are not donated to the jitted step
  and not written to checkpoints (``train.loop``). The second value is a list aligned with the
  tree's leaves (None where a leaf has nothing frozen): a pytree, so it can be a jit argument.
  """
  leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=_has_frozen)
  if not any(_has_frozen(x) for x in leaves):
    return tree, None
  pairs = [x.split_frozen() if _has_frozen(x) else (x, None) for x in leaves]
  frozen = [f for _, f in pairs]
  if all(f is None for f in frozen):
    return tree, None
  return jax.tree_util.tree_unflatten(treedef, [live for live, _ in pairs]), frozen


def join_frozen(tree: Any, frozen: Any) -> Any:
  """Inverse of :func:`split_frozen`."""
  if frozen is None:
    return tree
  leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=_has_frozen)
  return jax.tree_util.tree_unflatten(
      treedef, [x if f is None else x.join_frozen(f) for x, f in zip(leaves, frozen)])
