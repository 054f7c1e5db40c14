"""Sharded creation of parameters / train states, batch placement, and the mesh+rules context.

The recipe (the Flax ``lm1b`` / big_vision one) for state that never exists unsharded:

1. ``jax.eval_shape(init_fn)`` — shapes, dtypes and ``nn.LogicallyPartitioned`` boxes, no FLOPs;
2. ``nn.get_partition_spec`` → logical specs, checked against the rules (:mod:`.rules`);
3. ``nn.logical_to_mesh_sharding`` → one ``NamedSharding`` per leaf;
4. ``jax.jit(init_fn, out_shardings=...)`` — every device materialises only its own shard.

Activation constraints (``nn.with_logical_constraint`` inside the model) are only active when a
mesh and rules are in context while a function is *traced*; :func:`use_mesh` provides both::

    mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=2, tensor=2))
    params = parallel.create_sharded(functools.partial(model.init, rng, tokens, mask), mesh)
    with parallel.use_mesh(mesh):                 # trace + run inside the context
        logits = jax.jit(model.apply)({"params": params["params"]}, tokens, mask).logits

Outside any ``use_mesh`` the constraints are no-ops, so single-device code needs none of this.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlhf_jax.parallel import multihost
from rlhf_jax.parallel.rules import DEFAULT_RULES, MeshAxes, logical_partition_specs, validate_rules


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES) -> Iterator[Mesh]:
  """Context in which ``nn.with_logical_constraint`` resolves ``rules`` on ``mesh``.

    Enters ``jax.set_mesh(mesh)`` (the concrete mesh that bare ``PartitionSpec`` s refer to) and
    ``nn.logical_axis_rules(rules)`` (the table Flax reads at trace time). Jit caches key on the
    mesh, so a function first traced outside the context is re-traced inside it; the rules are
    plain Python state, so do not switch rules tables for an already-traced function on one mesh.
    """
  validate_rules(rules, mesh.axis_names)
  with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(rules)):
    yield mesh


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _strip_boxes(tree: Any) -> Any:
  """Unboxes without ``nn.meta.unbox``'s sharding constraint (which needs traced values)."""

  def strip(x):
    if isinstance(x, nn.meta.Partitioned):
      return x.value
    return x.unbox() if isinstance(x, nn.meta.AxisMetadata) else x

  return jax.tree_util.tree_map(strip, tree, is_leaf=nn.meta.is_axis_metadata)


def _check_divisible(shape: Sequence[int], spec: PartitionSpec, mesh: Mesh, what: str) -> None:
  for dim, axes in enumerate(tuple(spec)):
    if axes is None:
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    ways = math.prod(mesh.shape[a] for a in axes)
    if shape[dim] % ways:
      raise ValueError(
          f"{what}: dim {dim} of shape {tuple(shape)} is sharded {ways} ways over mesh axes "
          f"{axes} but {shape[dim]} is not divisible by {ways}; pad that dimension (e.g. the "
          f"vocabulary to a multiple of {ways}) or map its logical axis to None in the rules")


def logical_shardings(abstract_tree: Any, mesh: Mesh,
                      rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES) -> Any:
  """``NamedSharding`` per leaf for a (possibly boxed) abstract tree, shaped like its unboxed form.

    Validates every leaf's logical names (:func:`.rules.logical_partition_specs`) and that each
    sharded dimension divides evenly over its mesh axes, naming the parameter path on failure.
    """
  validate_rules(rules, mesh.axis_names)
  logical = logical_partition_specs(abstract_tree, rules)
  shardings = nn.logical_to_mesh_sharding(logical, mesh, tuple(rules))
  unboxed = _strip_boxes(abstract_tree)
  is_sharding = lambda x: isinstance(x, NamedSharding)
  flat_shardings = jax.tree_util.tree_leaves(shardings, is_leaf=is_sharding)
  flat_leaves = jax.tree_util.tree_flatten_with_path(unboxed)[0]
  if len(flat_shardings) != len(flat_leaves):  # a non-array leaf would get no sharding
    raise ValueError(f"logical_shardings: {len(flat_leaves)} leaves but {len(flat_shardings)} "
                     "shardings; every leaf of the init output must be an array")
  for (path, leaf), sharding in zip(flat_leaves, flat_shardings):
    _check_divisible(leaf.shape, sharding.spec, mesh, f"param {_path_str(path) or '<root>'}")
  return shardings


def create_sharded(init_fn: Callable[..., Any], mesh: Mesh,
                   rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES, *,
                   args: Sequence[Any] = ()) -> Any:
  """Runs ``init_fn(*args)`` so that its output is born sharded on ``mesh``; returns it unboxed.

    ``init_fn`` returns params (``model.init(...)``) or a whole train state whose leaves are
    ``nn.LogicallyPartitioned`` boxes (sharded per ``rules``) or plain arrays (replicated, e.g. the
    step counter). Optimiser moments built by optax from boxed params inherit the boxes, so they are
    sharded like their parameters. Pass large inputs via ``args`` rather than closing over them, so
    they are not baked into the program as constants.
    """
  args = tuple(args)
  with use_mesh(mesh, rules):
    abstract = jax.eval_shape(init_fn, *args)
    shardings = logical_shardings(abstract, mesh, rules)
    init = jax.jit(lambda *a: nn.meta.unbox(init_fn(*a)), out_shardings=shardings)
    return init(*args)


def batch_axes(rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES) -> MeshAxes:
  """Mesh axes the leading (batch) dimension is split over: the ``activation_batch`` rule."""
  table = validate_rules(rules)
  if "activation_batch" not in table:
    raise ValueError(f"rules have no 'activation_batch' entry; known: {sorted(table)}")
  return table["activation_batch"]


def data_sharding(mesh: Mesh, rules: Sequence[tuple[str,
                                                    MeshAxes]] = DEFAULT_RULES) -> NamedSharding:
  """Sharding of a batch array: dim 0 over the batch mesh axes (``("data", "fsdp")``), rest replicated."""
  return NamedSharding(mesh, PartitionSpec(batch_axes(rules)))


def shard_batch(batch: Any, mesh: Mesh, rules: Sequence[tuple[str,
                                                              MeshAxes]] = DEFAULT_RULES) -> Any:
  """Places a pytree of host arrays (leading dim = batch) on ``mesh`` as global ``jax.Array`` s.

    Single process: ``batch`` is the global batch and is split over the batch axes. Multi-process:
    ``batch`` is this host's slice and the global batch is assembled with
    :func:`.multihost.make_global_batch`.
    """
  if multihost.process_count() > 1:
    return multihost.make_global_batch(batch, data_sharding(mesh, rules))
  sharding = data_sharding(mesh, rules)

  def put(path, x):
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    if x.ndim == 0:
      raise ValueError(f"shard_batch: leaf {_path_str(path)} is a scalar; batch leaves need a "
                       "leading batch dimension")
    _check_divisible(x.shape, sharding.spec, mesh, f"batch leaf {_path_str(path)}")
    return jax.device_put(x, sharding)

  return jax.tree_util.tree_map_with_path(put, batch)


def shard_rows(batch: Any, mesh: Mesh, rules: Sequence[tuple[str,
                                                             MeshAxes]] = DEFAULT_RULES) -> Any:
  """Places a batch that *every* process holds in full, split over the batch axes of ``mesh``.

    Each process contributes its contiguous ``1 / process_count`` of every leaf's rows (a pair's or
    a list's rows stay in the same process: leaves are example-major), so the global batch equals
    ``batch`` and each device computes only its rows. When a leaf's rows do not split evenly over
    the processes and batch shards, ``batch`` comes back as it is (every device then computes all
    rows, replicated: correct, only slower).
    """
  sharding = data_sharding(mesh, rules)
  ways = math.prod(mesh.shape[a] for a in _axes_tuple(batch_axes(rules)))
  # Row groups the processes hold (1 when the batch axes lie within each process, e.g. a tensor
  # axis across hosts: then every process passes all rows).
  groups = ways // multihost._local_batch_ways(sharding)  # pylint: disable=protected-access
  leaves = jax.tree_util.tree_leaves(batch)
  if (not leaves or groups not in (1, multihost.process_count()) or
      any(np.ndim(x) == 0 or np.shape(x)[0] % ways for x in leaves)):
    return batch
  if groups == 1:
    return shard_batch(batch, mesh, rules) if multihost.process_count() == 1 else jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
  index = multihost.process_index()

  def mine(x):
    n = np.shape(x)[0] // groups
    return np.asarray(x)[index * n:(index + 1) * n]

  return shard_batch(jax.tree_util.tree_map(mine, batch), mesh, rules)


def _axes_tuple(axes: MeshAxes) -> tuple:
  return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
