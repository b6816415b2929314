"""The mesh and the one rules table from logical axis names to mesh axes.

The model names only logical axes ('embed', 'mlp', ...). Pure data parallel, FSDP and tensor parallel differ
only in the mesh shape (config.mesh): this is the only file that names mesh axes or reads Flax sharding metadata.
"""
from __future__ import annotations

import math

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxgpt.errors import UserValueError

MESH_AXES = ("data", "fsdp", "tensor")
RULES = {  # logical axis -> mesh axis (or axes); names not listed are replicated
    "batch": ("data", "fsdp"),  # examples split over every data-like axis
    "embed": "fsdp",  # FSDP: every weight is split along its model dimension
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",  # a count the tensor axis does not divide (GQA's few heads) stays whole
    "mlp": "tensor",
    "layers": None,  # the stacked-layers axis of scan_layers models stays whole
    "position": None,
}


def make_mesh(mesh_config, devices=None) -> Mesh:
    """mesh_config has data/fsdp/tensor sizes; one of them may be -1: every device left over."""
    devices = jax.devices() if devices is None else devices
    sizes = [int(mesh_config[a]) for a in MESH_AXES]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise UserValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: use positive sizes and at most one -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise UserValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise UserValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                             f"but {len(devices)} are present")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def spec_for(logical_axes, shape, mesh: Mesh) -> PartitionSpec:
    """Maps logical names to mesh axes; a dimension that the mesh axes do not divide stays whole."""
    spec = []
    for name, dim in zip(logical_axes, shape):
        axes = RULES.get(name) if name else None
        axes = (axes,) if isinstance(axes, str) else axes
        size = math.prod(mesh.shape[a] for a in axes) if axes else 1
        spec.append(None if not axes or size == 1 or dim % size else (axes[0] if len(axes) == 1 else axes))
    return PartitionSpec(*spec)


def constrain(x, logical_axes):
    """Pins an activation's layout by logical names inside a jitted step traced under `jax.set_mesh(mesh)`;
    a no-op without a mesh (a model used on its own)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_for(logical_axes, x.shape, mesh)))


def param_shardings(params: nnx.State, mesh: Mesh):
    """NamedShardings for an nnx.State of parameters (arrays or ShapeDtypeStructs), from their logical axes."""
    def one(variable):
        axes = variable.get_metadata().get("out_sharding") or (None,) * variable.value.ndim
        return variable.replace(NamedSharding(mesh, spec_for(axes, variable.value.shape, mesh)))
    return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def optimizer_shardings(tx: optax.GradientTransformation, abstract_opt_state, params_sharding, mesh: Mesh):
    """Optimizer moments follow their parameters; counters and other scalars are replicated. Where a partitioned
    optimizer's group leaves a parameter out (optax.MaskedNode), its state holds nothing to place."""
    replicated = NamedSharding(mesh, PartitionSpec())
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    return optax.tree_map_params(tx, lambda x, s: x if masked(x) else s, abstract_opt_state, params_sharding,
                                 transform_non_params=lambda _: replicated, is_leaf=masked)


def batch_sharding(mesh: Mesh, ndim: int = 2, batch_axis: int = 0) -> NamedSharding:
    spec = [None] * ndim
    spec[batch_axis] = RULES["batch"]
    return NamedSharding(mesh, PartitionSpec(*spec))


def abstract_batch(mesh: Mesh, shape, batch_axis: int = 0) -> dict:
    """{"inputs", "targets"}: int32 ShapeDtypeStructs of `shape` sharded over the batch axes at batch_axis, what a
    step is lowered and compiled from ahead of any data."""
    spec = batch_sharding(mesh, len(shape), batch_axis)
    return {k: jax.ShapeDtypeStruct(tuple(shape), np.int32, sharding=spec) for k in ("inputs", "targets")}


def batch_shards(mesh: Mesh) -> int:
    """Into how many parts the mesh splits a batch."""
    return math.prod(mesh.shape[a] for a in RULES["batch"])


def current_mesh():
    """The mesh a step is being traced under (an empty AbstractMesh outside one)."""
    return jax.sharding.get_abstract_mesh()


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def host_batch_to_global(batch: dict, mesh: Mesh, batch_axis: int = 0) -> dict:
    """Assembles each process's numpy rows into global jax.Arrays sharded over the batch axes."""
    def one(x):
        sharding = batch_sharding(mesh, x.ndim, batch_axis)
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        global_shape = list(x.shape)
        global_shape[batch_axis] *= jax.process_count()
        return jax.make_array_from_process_local_data(sharding, np.asarray(x), tuple(global_shape))
    return jax.tree.map(one, batch)
