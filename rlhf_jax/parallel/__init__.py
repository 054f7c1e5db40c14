"""Meshes, logical-axis sharding rules, sharded initialisation and multi-host helpers.

Typical use::

    from rlhf_jax import parallel
    parallel.initialize_distributed()                  # no-op on one host
    mesh = parallel.make_mesh(parallel.MeshConfig(data=-1, fsdp=2, tensor=1))
    params = parallel.create_sharded(functools.partial(model.init, rng, tokens, mask), mesh)
    batch = parallel.shard_batch(numpy_batch, mesh)
    with parallel.use_mesh(mesh):                      # activation constraints active while tracing
        state, metrics = train_step(state, batch)
"""

from rlhf_jax.parallel.agreement import AgreementTimeout, agree_outcome
from rlhf_jax.parallel.mesh import MESH_AXES, MeshConfig, make_mesh
from rlhf_jax.parallel.multihost import (
    agree,
    allgather_rows,
    check_same_config,
    config_hash,
    device_put_global,
    initialize_distributed,
    is_coordinator,
    local_rows,
    make_global_batch,
    process_count,
    process_index,
    sync,
    to_host,
    topology,
    write_on_coordinator,
)
from rlhf_jax.parallel.placement import Placement, mesh_from_config
from rlhf_jax.parallel.rules import (
    ACTIVATION_AXES,
    DEFAULT_RULES,
    PARAM_AXES,
    Rules,
    logical_partition_specs,
    logical_to_spec,
    validate_rules,
)
from rlhf_jax.parallel.sharding import (
    batch_axes,
    create_sharded,
    data_sharding,
    logical_shardings,
    shard_batch,
    shard_rows,
    use_mesh,
)

__all__ = [
    "ACTIVATION_AXES",
    "DEFAULT_RULES",
    "MESH_AXES",
    "PARAM_AXES",
    "AgreementTimeout",
    "MeshConfig",
    "Rules",
    "agree",
    "agree_outcome",
    "allgather_rows",
    "batch_axes",
    "check_same_config",
    "config_hash",
    "create_sharded",
    "data_sharding",
    "device_put_global",
    "initialize_distributed",
    "is_coordinator",
    "logical_partition_specs",
    "logical_shardings",
    "local_rows",
    "logical_to_spec",
    "make_global_batch",
    "make_mesh",
    "mesh_from_config",
    "Placement",
    "process_count",
    "process_index",
    "shard_batch",
    "shard_rows",
    "sync",
    "to_host",
    "topology",
    "use_mesh",
    "validate_rules",
    "write_on_coordinator",]
