"""The device mesh ('data', 'fsdp', 'tensor'), the logical-axis rules, and sharding helpers.

Parameters declare *logical* axes in their nnx variable metadata (`out_sharding`, e.g.
`('embed', 'mlp')`, with `eager_sharding=False` so nothing is placed at construction). This module
is the one place that maps logical axes to mesh axes (`LOGICAL_RULES`). A mesh axis that does not
divide a dimension is dropped for that dimension, which then stays replicated along it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from apo_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "norm": None,
    "lora_rank": None,  # a LoRA adapter's rank axis (small: replicated)
    # activations and batches
    "batch": ("data", "fsdp"),
    "length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    "head_dim": None,
}


class MeshError(UserError):
    """A mesh shape that does not fit the available devices."""


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, n_devices: int) -> tuple[int, int, int]:
    """The (data, fsdp, tensor) sizes with a -1 resolved; raises MeshError when they cannot be.

    Args:
      data, fsdp, tensor: axis sizes; at most one may be -1 (all the devices the others leave).
      n_devices: devices of all processes together; the mesh must use them all.

    Returns:
      The three sizes, whose product is `n_devices`.
    """
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise MeshError(
            f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}"
        )
    if any(s == 0 or s < -1 for s in sizes):
        raise MeshError(f"mesh sizes must be positive or -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if n_devices % known:
        raise MeshError(
            f"data*fsdp*tensor = {known} does not divide the {n_devices} devices of all processes"
        )
    if -1 in sizes:
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise MeshError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} "
            f"does not match the {n_devices} devices of all processes: make data*fsdp*tensor "
            f"equal {n_devices} (or set one axis to -1)"
        )
    return sizes[0], sizes[1], sizes[2]


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, *, devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
    """Builds the ('data', 'fsdp', 'tensor') mesh with Auto (GSPMD-propagated) axes.

    Args:
      data: data-parallel size; -1 takes all devices the other axes leave.
      fsdp: parameter-sharded data-parallel size; -1 allowed (at most one axis may be -1).
      tensor: tensor-parallel size; -1 allowed.
      devices: devices to use (default: all `jax.devices()`).

    Returns:
      A `jax.sharding.Mesh`. Raises MeshError when the sizes do not multiply to the device count.
    """
    n = len(devices) if devices is not None else jax.device_count()
    sizes = resolve_mesh_shape(data, fsdp, tensor, n)
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(
    logical_axes: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh,
) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec, dropping mesh axes that do not divide a dim.

    Args:
      logical_axes: one logical name (or None) per dimension; None for a fully replicated value.
      shape: the array shape.
      mesh: the mesh whose axis sizes decide divisibility.

    Returns:
      The PartitionSpec.
    """
    if not logical_axes:
        return PartitionSpec()
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical_axes, shape, strict=True):
        if name is not None and name not in LOGICAL_RULES:
            raise ValueError(f"unknown logical axis {name!r}; add it to sharding.LOGICAL_RULES")
        rule = LOGICAL_RULES.get(name) if name is not None else None
        axes = (rule,) if isinstance(rule, str) else tuple(rule or ())
        kept = []
        for ax in axes:
            if (
                ax in sizes
                and ax not in used
                and dim % (math.prod(sizes[a] for a in kept) * sizes[ax]) == 0
            ):
                kept.append(ax)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def _var_axes(var: nnx.Variable) -> tuple[str | None, ...] | None:
    return var.get_metadata().get("out_sharding")


def param_shardings(abstract_state: nnx.State, mesh: jax.sharding.Mesh) -> nnx.State:
    """Returns a NamedSharding per variable of an (abstract or concrete) nnx state.

    Args:
      abstract_state: `nnx.state(model)` or the state of `nnx.eval_shape(...)`.
      mesh: the target mesh.

    Returns:
      A state of the same structure whose Variables hold `NamedSharding`s (the shape
      `jax.jit(in_shardings=...)` expects for `nnx.split(model)[1]`, like `nnx.get_named_sharding`).
    """

    def one(var):
        return var.replace(NamedSharding(mesh, logical_to_spec(_var_axes(var), var.shape, mesh)))

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh) -> nnx.Module:
    """Places every variable of `model` onto `mesh` per the logical rules (in place).

    Args:
      model: an nnx module whose variables carry logical `out_sharding` metadata.
      mesh: the target mesh.

    Returns:
      The same model, its variables now sharded.
    """
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, param_shardings(state, mesh)))
    return model


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 2) -> NamedSharding:
    """Returns the sharding of a batch array: leading axis over ('data', 'fsdp'), rest replicated.

    Args:
      mesh: the mesh.
      ndim: rank of the batch array.

    Returns:
      The NamedSharding.
    """
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Hints an activation's sharding by logical axes; a no-op when no mesh is set.

    Args:
      x: the activation.
      logical_axes: one logical name (or None) per dimension of `x`.

    Returns:
      `x`, with a sharding constraint when inside `jax.set_mesh(mesh)`.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, mesh))
