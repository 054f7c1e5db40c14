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
