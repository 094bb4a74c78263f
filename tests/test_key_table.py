"""The key-table machinery: exact transforms, one-to-one checks and error reporting."""

import numpy as np
import pytest

from ldm_jax.checkpoints.key_table import (
    CheckpointMismatchError,
    KeyTable,
    Transform,
    key_map,
)

RNG = np.random.default_rng(0)


def _params():
    return {
        "conv": {"kernel": np.zeros((3, 3, 4, 8)), "bias": np.zeros(8)},
        "proj": {"kernel": np.zeros((8, 16))},
        "attn": {"kernel": np.zeros((8, 8))},
    }


def _table():
    return KeyTable(
        [
            key_map("conv.weight", "conv/kernel", Transform.CONV),
            key_map("conv.bias", "conv/bias"),
            key_map("proj.weight", "proj/kernel", Transform.LINEAR),
            key_map("attn.weight", "attn/kernel", Transform.CONV1X1_AS_LINEAR),
        ],
        ignorable=["buffer.position_ids"],
    )


def _state_dict():
    return {
        "conv.weight": RNG.normal(size=(8, 4, 3, 3)).astype(np.float32),
        "conv.bias": RNG.normal(size=8).astype(np.float32),
        "proj.weight": RNG.normal(size=(16, 8)).astype(np.float32),
        "attn.weight": RNG.normal(size=(8, 8, 1, 1)).astype(np.float32),
    }


@pytest.mark.parametrize(
    "transform, torch_shape, flax_shape",
    [
        (Transform.CONV, (8, 4, 3, 3), (3, 3, 4, 8)),
        (Transform.LINEAR, (16, 8), (8, 16)),
        (Transform.CONV1X1_AS_LINEAR, (16, 8, 1, 1), (8, 16)),
        (Transform.IDENTITY, (5,), (5,)),
    ],
)
def test_transforms_are_exact_inverses(transform, torch_shape, flax_shape):
    array = RNG.normal(size=torch_shape).astype(np.float32)
    converted = transform.to_flax(array)
    assert converted.shape == flax_shape
    assert transform.torch_shape(flax_shape) == torch_shape
    np.testing.assert_array_equal(transform.to_torch(converted), array)


def test_conv_transform_moves_axes_as_torch_conv_expects():
    array = RNG.normal(size=(8, 4, 3, 3))
    # torch weight[o, i, y, x] must land at flax kernel[y, x, i, o]
    assert Transform.CONV.to_flax(array)[2, 1, 3, 5] == array[5, 3, 2, 1]


def test_round_trip_is_bit_exact_and_ignores_buffers():
    state_dict = _state_dict()
    params = _table().to_flax({**state_dict, "buffer.position_ids": np.arange(3)}, _params())
    back = _table().to_torch(params)
    assert back.keys() == state_dict.keys()
    for key, value in state_dict.items():
        np.testing.assert_array_equal(back[key], value)


def test_missing_and_unexpected_keys_are_listed():
    state_dict = _state_dict()
    del state_dict["proj.weight"]
    state_dict["stray.weight"] = np.zeros(1)
    with pytest.raises(CheckpointMismatchError, match="missing keys: proj.weight") as info:
        _table().to_flax(state_dict, _params())
    assert "unexpected keys: stray.weight" in str(info.value)


def test_wrong_shape_is_reported_with_both_shapes():
    state_dict = _state_dict()
    state_dict["proj.weight"] = np.zeros((16, 9), np.float32)
    with pytest.raises(CheckpointMismatchError, match=r"proj.weight \(16, 9\).*\(8, 16\)"):
        _table().to_flax(state_dict, _params())


def test_table_must_cover_every_parameter():
    params = _params()
    params["extra"] = {"kernel": np.zeros(2)}
    with pytest.raises(CheckpointMismatchError, match="without a table entry: extra/kernel"):
        _table().to_flax(_state_dict(), params)


def test_duplicate_entries_are_rejected():
    with pytest.raises(ValueError, match="twice"):
        KeyTable([key_map("a", "x/kernel"), key_map("b", "x/kernel")])
    with pytest.raises(ValueError, match="twice"):
        KeyTable([key_map("a", "x/kernel"), key_map("a", "y/kernel")])


def test_rank_mismatch_is_a_clear_error():
    state_dict = _state_dict()
    state_dict["conv.weight"] = np.zeros((8, 4, 9), np.float32)
    with pytest.raises(CheckpointMismatchError, match="rank-4"):
        _table().to_flax(state_dict, _params())
