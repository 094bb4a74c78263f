"""Device meshes and logical-axis sharding rules.

Model code names logical axes only (ldm_jax/models/layers.py: "fan_in", "fan_out", "kernel_h",
"kernel_w", "vocab", "embed", "norm"); the rules mapping them onto mesh axes are data that a config
passes in. A dimension whose size the mesh axes do not divide is replicated instead (e.g. the
4-channel output conv of a UNet on an 8-way fsdp axis), so any rules work with any model.
"""

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# (logical axis, mesh axis | tuple of mesh axes | None). Big kernels are sharded over "fsdp" along
# their output features (and over "tensor" along their input features when that axis is > 1).
DEFAULT_LOGICAL_RULES = (
    ("batch", ("data", "fsdp")),
    ("fan_out", "fsdp"),
    ("fan_in", "tensor"),
    ("vocab", "fsdp"),
    ("embed", "tensor"),
    ("kernel_h", None),
    ("kernel_w", None),
    ("norm", None),
)
BATCH_AXES = ("data", "fsdp")


def make_mesh(axes: Sequence[str], shape: Sequence[int], devices=None) -> Mesh:
    """A Mesh of `devices` (default: all) with named `axes`; one -1 in `shape` takes the rest."""
    axes, shape = tuple(axes), tuple(int(s) for s in shape)
    devices = list(jax.devices() if devices is None else devices)
    if len(axes) != len(shape) or len(set(axes)) != len(axes):
        raise ValueError(f"mesh axes {axes} and shape {shape} must have equal length, unique names")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {shape}: sizes must be >= 1 with at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if len(devices) % known:
        raise ValueError(
            f"mesh shape {shape} does not divide the {len(devices)} devices "
            f"(product of the fixed sizes is {known})"
        )
    shape = tuple(len(devices) // known if s == -1 else s for s in shape)
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"mesh shape {shape} has {math.prod(shape)} devices but {len(devices)} are available; "
            "use -1 for one axis to take the rest"
        )
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), axes)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def gather_to_host(tree):
    """A (possibly multi-host sharded) tree as numpy arrays on this host, each fully assembled:
    what exports and sample grids read. Every process must call it (it is a collective)."""
    mesh = Mesh(np.array(jax.devices()), ("all",))
    full = jax.jit(lambda t: t, out_shardings=replicated(mesh))(tree)
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), full)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The data-parallel mesh axes ("data", "fsdp" where present) the batch is split over."""
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the data-parallel axes, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(batch_axes(mesh) or None))


def is_boxed(x) -> bool:
    return isinstance(x, nn.Partitioned)


def _mesh_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def logical_to_sharding(names, shape, mesh: Mesh, rules) -> NamedSharding:
    """NamedSharding for one array with logical axis `names`; undivisible dims are replicated."""
    # rules naming mesh axes this mesh lacks map to nothing (e.g. "tensor" on a data x fsdp mesh)
    rules = tuple((logical, _present(mesh_axes, mesh)) for logical, mesh_axes in rules)
    spec = nn.logical_to_mesh_axes(names, rules)
    spec = [
        axes if axes is not None and size % _mesh_size(mesh, axes) == 0 else None
        for axes, size in zip(spec, shape, strict=True)
    ]
    return NamedSharding(mesh, PartitionSpec(*spec))


def _present(mesh_axes, mesh: Mesh):
    if mesh_axes is None:
        return None
    if isinstance(mesh_axes, str):
        return mesh_axes if mesh_axes in mesh.axis_names else None
    kept = tuple(a for a in mesh_axes if a in mesh.axis_names)
    return kept or None


def logical_shardings(boxed_tree, mesh: Mesh, rules=DEFAULT_LOGICAL_RULES):
    """Tree of NamedSharding matching the unboxed `boxed_tree` (abstract or concrete).

    nn.LogicallyPartitioned leaves are sharded by their names; any other leaf is replicated.
    """

    def leaf_sharding(x):
        if is_boxed(x):
            return logical_to_sharding(tuple(x.names), np.shape(x.value), mesh, rules)
        return replicated(mesh)

    return jax.tree.map(leaf_sharding, boxed_tree, is_leaf=is_boxed)


def box_like(tree, boxed_template):
    """Put the (unboxed) leaves of `tree` back into the boxes of `boxed_template`."""
    return jax.tree.map(
        lambda box, value: box.replace_boxed(value) if is_boxed(box) else value,
        boxed_template,
        tree,
        is_leaf=is_boxed,
    )


def with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs carrying the given shardings: inputs for jit(...).lower without data."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings
    )
