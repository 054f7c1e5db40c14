"""One table from logical axis names to mesh axes, and the checks that keep it honest.

Parameters and activations are annotated with *logical* axis names where they are defined
(``nn.with_logical_partitioning`` / ``nn.with_logical_constraint``); a rules table decides how each
logical axis is laid out on the ("data", "fsdp", "tensor") mesh. Changing the parallelism strategy
is editing this table, never the model.

``DEFAULT_RULES`` implements FSDP x tensor parallelism:

=======================  ==================  ===============================================
logical axis             mesh axes           why
=======================  ==================  ===============================================
``vocab``                ``tensor``          embedding / unembedding split by vocabulary rows
``embed``                ``fsdp``            ZeRO-3: every weight's model dimension sharded
``mlp``                  ``tensor``          Megatron column/row-parallel MLP
``heads``/``kv_heads``   ``tensor``          attention heads split across tensor ranks
``head_dim``/``layers``  replicated          small / scanned (each scan step needs its slice)
``activation_batch``     ``(data, fsdp)``    FSDP ranks also consume distinct batch slices
``activation_heads`` ..  ``tensor``          activations follow their weights' tensor split
``activation_embed``     replicated          residual stream is replicated across ``tensor``
``activation_length``    replicated          no sequence parallelism (yet)
=======================  ==================  ===============================================

Flax resolves rules by silently dropping a mesh axis that a tensor already uses. That hides bugs
(a param you believed sharded is replicated), so :func:`logical_to_spec` refuses instead: one
tensor never maps two of its dimensions onto the same mesh axis, and a logical name that is not in
the table is an error that lists the names it knows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec

from rlhf_jax.parallel.mesh import MESH_AXES

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

PARAM_AXES: tuple[str, ...] = ("vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "layers")
ACTIVATION_AXES: tuple[str, ...] = (
    "activation_batch",
    "activation_length",
    "activation_embed",
    "activation_heads",
    "activation_kv_heads",
    "activation_mlp",
    "activation_vocab",
)

DEFAULT_RULES: Rules = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)


def _mesh_axes_tuple(axes: MeshAxes) -> tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def validate_rules(rules: Sequence[tuple[str, MeshAxes]],
                   mesh_axis_names: Sequence[str] = MESH_AXES) -> dict[str, MeshAxes]:
  """Checks a rules table and returns it as ``{logical_name: mesh_axes}``.

    Each entry is ``(logical_name, mesh_axes)`` with ``mesh_axes`` a mesh axis name, a tuple of
    them, or None (replicated). Logical names must be unique (one table, one answer: no
    priority-ordered fallbacks), mesh axes must exist, and one entry may not repeat a mesh axis.
    """
  if isinstance(rules, Mapping) or not isinstance(rules, (tuple, list)):
    raise TypeError(f"rules must be a tuple of (logical_name, mesh_axes) pairs, got "
                    f"{type(rules).__name__}")
  table: dict[str, MeshAxes] = {}
  for i, entry in enumerate(rules):
    if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)):
      raise ValueError(f"rules[{i}] must be a (logical_name, mesh_axes) pair, got {entry!r}")
    name, axes = entry
    if name in table:
      raise ValueError(f"rules[{i}]: logical axis {name!r} appears more than once")
    axes_tuple = _mesh_axes_tuple(axes)
    unknown = [a for a in axes_tuple if a not in mesh_axis_names]
    if unknown:
      raise ValueError(f"rules[{i}] ({name!r}): unknown mesh axes {unknown}; the mesh has "
                       f"{tuple(mesh_axis_names)}")
    if len(set(axes_tuple)) != len(axes_tuple):
      raise ValueError(f"rules[{i}] ({name!r}): mesh axis repeated in {axes!r}")
    table[name] = axes
  return table


def logical_to_spec(names: Sequence[str | None], rules: Sequence[tuple[str,
                                                                       MeshAxes]] = DEFAULT_RULES,
                    *, what: str = "tensor") -> PartitionSpec:
  """Maps one tensor's logical dimension names to a mesh ``PartitionSpec``.

    ``names[i]`` is the logical name of dimension i (None: replicated). Raises if a name is not in
    ``rules`` or if two dimensions would be sharded over the same mesh axis (``what`` names the
    tensor in the message, e.g. its parameter path).
    """
  table = validate_rules(rules)
  spec: list[MeshAxes] = []
  owner: dict[str, tuple[int, str]] = {}  # mesh axis -> (dim, logical name) that took it
  for dim, name in enumerate(names):
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise ValueError(f"{what}: logical axis {name!r} (dim {dim}) has no rule; known logical "
                       f"axes: {sorted(table)}")
    axes = table[name]
    for axis in _mesh_axes_tuple(axes):
      if axis in owner:
        prev_dim, prev_name = owner[axis]
        raise ValueError(
            f"{what}: logical axes {prev_name!r} (dim {prev_dim}) and {name!r} (dim {dim}) "
            f"both map to mesh axis {axis!r}; a tensor dimension pair cannot share a mesh "
            f"axis — change the rules table")
      owner[axis] = (dim, name)
    spec.append(axes)
  return PartitionSpec(*spec)


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def logical_partition_specs(boxed_tree: Any,
                            rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES) -> Any:
  """Checks every ``nn.LogicallyPartitioned`` leaf of ``boxed_tree`` against ``rules``.

    Returns the tree of *logical* ``PartitionSpec`` s (``nn.get_partition_spec``: boxes become their
    logical names, plain arrays become ``PartitionSpec()``), after :func:`logical_to_spec` has
    validated each one with its tree path in the error message.
    """
  logical = nn.get_partition_spec(boxed_tree)
  is_spec = lambda x: isinstance(x, PartitionSpec)
  for path, spec in jax.tree_util.tree_flatten_with_path(logical, is_leaf=is_spec)[0]:
    if is_spec(spec):
      logical_to_spec(tuple(spec), rules, what=f"param {_path_str(path) or '<root>'}")
  return logical
