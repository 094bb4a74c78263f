"""orbax folders: exact save/restore, restore onto a sharded layout, atomic and checked writes."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from support.tiny_specs import SD1_LIKE, UNCONDITIONAL_VQ, random_params

from ldm_jax.atomic import DestinationExistsError
from ldm_jax.checkpoints import LatentDiffusionCheckpoint
from ldm_jax.checkpoints.errors import OrbaxCheckpointError
from ldm_jax.checkpoints.orbax import restore_orbax, save_orbax


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("spec", [SD1_LIKE, UNCONDITIONAL_VQ], ids=["sd1-like", "uncond-vq"])
def test_save_restore_is_exact(tmp_path, spec):
    checkpoint = LatentDiffusionCheckpoint(spec, random_params(spec))
    save_orbax(checkpoint, tmp_path / "ckpt")
    restored = restore_orbax(tmp_path / "ckpt")
    assert restored.spec == spec
    _assert_trees_equal(restored.params, checkpoint.params)


def test_restore_onto_a_sharded_layout(tmp_path):
    assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
    params = random_params(SD1_LIKE)
    save_orbax(LatentDiffusionCheckpoint(SD1_LIKE, params), tmp_path / "ckpt")
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))

    def sharding(leaf):  # FSDP-style: shard the output axis where it divides evenly
        if leaf.ndim >= 2 and leaf.shape[-1] % 4 == 0:
            return NamedSharding(mesh, PartitionSpec(*([None] * (leaf.ndim - 1)), "fsdp"))
        return NamedSharding(mesh, PartitionSpec())

    shardings = jax.tree.map(sharding, params)
    restored = restore_orbax(tmp_path / "ckpt", shardings=shardings)
    _assert_trees_equal(restored.params, params)
    kernel = restored.params["unet"]["conv_in"]["kernel"]
    assert kernel.sharding == shardings["unet"]["conv_in"]["kernel"]
    assert len(kernel.addressable_shards) == 8
    assert kernel.addressable_shards[0].data.shape[-1] == kernel.shape[-1] // 4


def test_existing_destination_is_refused_and_kept(tmp_path):
    destination = tmp_path / "ckpt"
    destination.mkdir()
    (destination / "keep.txt").write_text("mine")
    with pytest.raises(DestinationExistsError, match="already exists"):
        save_orbax(LatentDiffusionCheckpoint(SD1_LIKE, random_params(SD1_LIKE)), destination)
    assert (destination / "keep.txt").read_text() == "mine"


class _FailingTokenizer:
    def write_folder(self, folder):
        folder.mkdir()
        raise OSError("disk full")


def test_failed_save_leaves_nothing(tmp_path):
    # the failure comes after the parameters were written: the whole folder must still vanish
    checkpoint = LatentDiffusionCheckpoint(SD1_LIKE, random_params(SD1_LIKE), _FailingTokenizer())
    with pytest.raises(OSError, match="disk full"):
        save_orbax(checkpoint, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_restore_checks_the_folder(tmp_path):
    with pytest.raises(OrbaxCheckpointError, match="not an ldm_jax orbax checkpoint"):
        restore_orbax(tmp_path)
    save_orbax(LatentDiffusionCheckpoint(SD1_LIKE, random_params(SD1_LIKE)), tmp_path / "c")
    spec = json.loads((tmp_path / "c" / "ldm_spec.json").read_text())
    spec["unet"]["model_channels"] = 64  # the stored params no longer fit the spec
    (tmp_path / "c" / "ldm_spec.json").write_text(json.dumps(spec))
    with pytest.raises(OrbaxCheckpointError, match="does not hold the parameters"):
        restore_orbax(tmp_path / "c")
