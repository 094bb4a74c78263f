"""Device meshes and logical-axis sharding rules.

Model code names logical axes only (ldm_jax/models/layers.py: "fan_in", "fan_out", "kernel_h",
"kernel_w", "vocab", "embed", "norm"); the rules mapping them onto mesh axes are data that a config
passes in. A dimension whose size the mesh axes do not divide is replicated instead (e.g. the
4-channel output conv of a UNet on an 8-way fsdp axis), so any rules work with any model.
"""

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ldm_jax.training.mesh import make_pod_mesh

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
    """A one-slice Mesh of `devices` (default: all) with named `axes`; one -1 in `shape` takes the
    rest. Topology-aware on TPU/GPU; pod meshes (ICI x DCN): ldm_jax/training/mesh.py."""
    return make_pod_mesh(axes, shape, None, False, devices)


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


def traced_on_mesh(fn, mesh: Mesh):
    """`fn` traced with `mesh` as the abstract mesh in context, so kernels that must run per
    device (Pallas splash attention, models/splash_attention.py) find the batch axes to
    `shard_map` over; on the default (auto) axis types nothing else changes."""

    @functools.wraps(fn)
    def traced(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)

    return traced


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
