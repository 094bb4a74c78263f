"""Pod meshes (ldm_jax/training/mesh.py): the ICI x DCN shapes, slice-major hybrid layouts,
topology-aware placement on (fake) TPU slices, the plain-order fallback and its warning, and one
clear error per bad shape. Multi-process runs of a hybrid mesh: tests/test_multihost.py."""

import itertools
import logging

import jax
import ml_collections
import numpy as np
import pytest
from support import toy_regression_config
from support.toy_task import TOY_TASKS

from ldm_jax.cli import train as train_cli
from ldm_jax.training import config_checks
from ldm_jax.training.base_config import base_config
from ldm_jax.training.mesh import device_grid, make_pod_mesh, process_layout
from ldm_jax.training.setup import mesh_from_config

AXES = ("data", "fsdp", "tensor")


class Fake:
    """A stand-in device: only the attributes mesh_utils reads (CPU ones have no slice_index)."""

    def __init__(self, **attrs):
        self.__dict__.update(attrs)

    def __repr__(self):
        return f"Fake({self.id})"


def cpu_processes(n_processes=2, per_process=4):
    """CPU devices of several processes, listed interleaved (grouping must not rely on order)."""
    devices = [Fake(id=p * 100 + i, process_index=p, platform="cpu", device_kind="cpu")
               for p in range(n_processes) for i in range(per_process)]
    return [devices[i % n_processes * per_process + i // n_processes]
            for i in range(len(devices))]


# a fixed shuffle of the 8 chips of a 2x2x2 torus: plain order would not keep neighbours together
ORDER = (5, 2, 7, 0, 3, 6, 1, 4)


def tpu_slice(slice_index=0, coords=None):
    """8 fake TPU v4 chips of one 2x2x2 slice, listed in the ORDER shuffle."""
    coords = coords or [c for c in itertools.product(range(2), repeat=3)]
    chips = [Fake(id=slice_index * 8 + k, process_index=slice_index, slice_index=slice_index,
                  platform="tpu", device_kind="TPU v4", coords=coords[k], core_on_chip=0)
             for k in range(len(coords))]
    return [chips[k] for k in ORDER[:len(chips)]]


def attribute(grid, name):
    return np.vectorize(lambda d: getattr(d, name), otypes=[object])(grid)


def neighbours(a, b) -> bool:
    return sum(abs(x - y) for x, y in zip(a.coords, b.coords, strict=True)) == 1


def test_default_config_is_the_plain_reshape_of_the_cpu_devices():
    mesh = mesh_from_config(base_config("ldm"))
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    np.testing.assert_array_equal(mesh.devices, np.array(jax.devices()).reshape(1, 8, 1))
    # a mesh block written before dcn_shape existed still builds (one slice)
    old = ml_collections.ConfigDict({"axes": AXES, "shape": (2, -1, 1)})
    assert dict(mesh_from_config(ml_collections.ConfigDict({"mesh": old})).shape) == {
        "data": 2, "fsdp": 4, "tensor": 1}


def test_one_process_with_process_granules_fills_dcn_minus_one_with_one():
    mesh = make_pod_mesh(AXES, (2, -1, 1), (1, -1, 1), process_is_granule=True)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    np.testing.assert_array_equal(mesh.devices, np.array(jax.devices()).reshape(2, 4, 1))


def test_hybrid_mesh_puts_each_process_in_its_own_block_of_the_dcn_axis():
    devices = cpu_processes()
    grid, how = device_grid(AXES, (2, -1, 1), (1, 2, 1), devices, process_is_granule=True)
    assert grid.shape == (2, 4, 1)
    assert "create_hybrid_device_mesh" in how and "(2, 2, 1) x dcn (1, 2, 1)" in how
    # fsdp = 2 processes x 2 devices: process 0 owns fsdp 0-1 of both data rows
    np.testing.assert_array_equal(attribute(grid, "process_index")[..., 0],
                                  [[0, 0, 1, 1], [0, 0, 1, 1]])
    # within a process, its devices in their own order (CPU: no topology)
    assert [d.id for d in grid[:, :2, 0].ravel()] == [0, 1, 2, 3]
    # plain reshape of the same list would interleave the processes: the test can tell them apart
    plain = np.array([d.process_index for d in devices]).reshape(2, 4)
    assert not np.array_equal(plain, [[0, 0, 1, 1], [0, 0, 1, 1]])

    grid, _ = device_grid(AXES, (1, -1, 1), (-1, 1, 1), devices, process_is_granule=True)
    assert grid.shape == (2, 4, 1)
    np.testing.assert_array_equal(attribute(grid, "process_index")[..., 0], [[0] * 4, [1] * 4])


def test_one_tpu_slice_is_placed_on_the_torus():
    devices = tpu_slice()
    grid, how = device_grid(AXES, (1, -1, 2), None, devices)
    assert grid.shape == (1, 4, 2) and how.startswith("mesh_utils.create_device_mesh")
    # the innermost (tensor) axis pairs physical neighbours; plain order would not
    assert all(neighbours(a, b) for a, b in grid.reshape(4, 2))
    plain = np.array(devices, dtype=object).reshape(4, 2)
    assert not all(neighbours(a, b) for a, b in plain)


def test_two_tpu_slices_split_the_dcn_axis_by_slice_index():
    devices = tpu_slice(1) + tpu_slice(0)  # listed out of slice order
    grid, how = device_grid(AXES, (1, -1, 2), (-1, 1, 1), devices)
    assert grid.shape == (2, 4, 2) and "create_hybrid_device_mesh" in how and "2 slices" in how
    np.testing.assert_array_equal(attribute(grid, "slice_index"),
                                  np.arange(2)[:, None, None] * np.ones((2, 4, 2), int))
    assert all(neighbours(a, b) for a, b in grid.reshape(8, 2))


def test_mesh_utils_failure_falls_back_to_plain_order_with_a_warning(caplog):
    # coordinates with a hole (not a cuboid): mesh_utils cannot place them and raises
    holed = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 1), (3, 1, 1)]
    devices = tpu_slice(coords=holed)
    with caplog.at_level(logging.WARNING, logger="ldm_jax.training.mesh"):
        grid, how = device_grid(AXES, (1, -1, 2), None, devices)
    assert "plain order" in how and "create_device_mesh" in caplog.text
    assert list(grid.ravel()) == devices

    caplog.clear()
    two = tpu_slice(0, holed) + tpu_slice(1, holed)
    with caplog.at_level(logging.WARNING, logger="ldm_jax.training.mesh"):
        grid, how = device_grid(AXES, (1, -1, 2), (2, 1, 1), two)
    assert "slices in plain order" in how and "create_hybrid_device_mesh" in caplog.text
    assert list(grid[0].ravel()) == two[:8] and list(grid[1].ravel()) == two[8:]


def test_default_dcn_over_several_slices_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="ldm_jax.training.mesh"):
        grid, _ = device_grid(AXES, (1, -1, 1), None, tpu_slice(0) + tpu_slice(1))
    assert grid.shape == (1, 16, 1) and "span 2 slices" in caplog.text


@pytest.mark.parametrize("shape, dcn, granule, message", [
    ((-1, -1, 1), (1, 1, 1), False, r"mesh.shape=\(-1, -1, 1\): sizes must be >= 1 with at most "
                                    "one -1"),
    ((2, 2, 1), (1, 1, 1), False, r"mesh.shape=\(2, 2, 1\) needs 4 devices but 8 are available"),
    ((3, -1, 1), (1, 1, 1), False, "multiply to 3, which does not divide the 8 devices"),
    ((1, -1), (1, 1, 1), False, r"mesh.shape=\(1, -1\) must have one size per mesh axis"),
    ((1, 0, 1), (1, 1, 1), False, "sizes must be >= 1"),
    ((1, -1, 1), (1, -1, -1), True, r"mesh.dcn_shape=\(1, -1, -1\): .* at most one -1"),
    ((1, -1, 1), (1, 2, 1), False, r"needs 2 slices but 1 is available.*"
                                   "mesh.process_is_granule=True makes each process a slice"),
    ((1, -1, 1), (1, 1, 1), True, r"mesh.dcn_shape=\(1, 1, 1\) needs 1 processes but 2 are"),
    ((1, 3, 1), (1, 2, 1), True, r"mesh.shape=\(1, 3, 1\) needs 3 devices per process but 4 "),
])
def test_bad_shapes_get_one_clear_error(shape, dcn, granule, message):
    devices = jax.devices() if not granule else cpu_processes()
    with pytest.raises(ValueError, match=message):
        device_grid(AXES, shape, dcn, devices, process_is_granule=granule)


def test_unequal_processes_are_rejected():
    devices = cpu_processes()[:-1]
    with pytest.raises(ValueError, match=r"2 processes hold unequal numbers of devices \[3, 4\]"):
        device_grid(AXES, (1, -1, 1), (1, 2, 1), devices, process_is_granule=True)


def test_train_rejects_a_bad_mesh_before_jax_work(tmp_path, capsys):
    argv = ["train.py", "--config", toy_regression_config.PATH, "--workdir", str(tmp_path / "r")]
    assert train_cli.main([*argv, "--config.mesh.dcn_shape=(-1,1,-1)"], tasks=TOY_TASKS) == 2
    assert "mesh.dcn_shape=(-1, 1, -1)" in capsys.readouterr().err
    config = base_config("ldm")
    config.mesh = ml_collections.ConfigDict({**config.mesh.to_dict(), "process_is_granule": 1})
    with pytest.raises(config_checks.ConfigError, match="process_is_granule=1 must be True"):
        config_checks.check_config(config)
    # a dcn_shape that does not match this single process: the task's mesh says so, exit 2
    assert train_cli.main([*argv, "--config.mesh.dcn_shape=(1,2,1)"], tasks=TOY_TASKS) == 2
    assert "mesh.process_is_granule=True makes each process a slice" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_process_layout_reads_the_mesh():
    mesh = make_pod_mesh(AXES, (2, -1, 1))
    np.testing.assert_array_equal(process_layout(mesh), np.zeros((2, 4, 1), int))
