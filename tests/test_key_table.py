"""The key-table machinery: exact transforms, one-to-one checks and error reporting."""

import numpy as np
import pytest

from ldm_jax.checkpoints.errors import CheckpointMismatchError
from ldm_jax.checkpoints.key_table import KeyTable, Transform, fused_key_map, key_map

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


def test_conv1d_transform_round_trip():
    array = RNG.normal(size=(12, 4, 1)).astype(np.float32)
    assert Transform.CONV1D_AS_LINEAR.to_flax(array).shape == (4, 12)
    np.testing.assert_array_equal(
        Transform.CONV1D_AS_LINEAR.to_torch(Transform.CONV1D_AS_LINEAR.to_flax(array)), array
    )


def _qkv_params(width):
    return {n: {"kernel": np.zeros((width, width)), "bias": np.zeros(width)} for n in "qkv"}


def test_fused_contiguous_split_matches_torch_in_proj_chunks():
    # OpenCLIP / nn.MultiheadAttention: in_proj_weight = [q; k; v] along the output axis.
    width = 6
    weight = RNG.normal(size=(3 * width, width)).astype(np.float32)
    bias = RNG.normal(size=3 * width).astype(np.float32)
    table = KeyTable(
        [
            fused_key_map("in_proj_weight", ["q/kernel", "k/kernel", "v/kernel"], Transform.LINEAR),
            fused_key_map("in_proj_bias", ["q/bias", "k/bias", "v/bias"]),
        ]
    )
    params = table.to_flax({"in_proj_weight": weight, "in_proj_bias": bias}, _qkv_params(width))
    for i, name in enumerate("qkv"):
        np.testing.assert_array_equal(params[name]["kernel"], weight[i * width : (i + 1) * width].T)
        np.testing.assert_array_equal(params[name]["bias"], bias[i * width : (i + 1) * width])
    back = table.to_torch(params)
    np.testing.assert_array_equal(back["in_proj_weight"], weight)
    np.testing.assert_array_equal(back["in_proj_bias"], bias)


def test_fused_per_head_split_follows_qkv_attention_legacy():
    # openaimodel QKVAttentionLegacy: qkv.reshape(heads, 3 * head_dim, T).split(head_dim) per head.
    heads, head_dim = 2, 3
    width = heads * head_dim
    weight = RNG.normal(size=(3 * width, width, 1)).astype(np.float32)
    table = KeyTable(
        [
            fused_key_map(
                "qkv.weight",
                ["q/kernel", "k/kernel", "v/kernel"],
                Transform.CONV1D_AS_LINEAR,
                num_heads=heads,
            )
        ]
    )
    params = {n: {"kernel": np.zeros((width, width))} for n in "qkv"}
    params = table.to_flax({"qkv.weight": weight}, params)
    per_head = weight[:, :, 0].reshape(heads, 3 * head_dim, width)
    for i, name in enumerate("qkv"):
        expected = per_head[:, i * head_dim : (i + 1) * head_dim].reshape(width, width)
        np.testing.assert_array_equal(params[name]["kernel"], expected.T)
    np.testing.assert_array_equal(table.to_torch(params)["qkv.weight"], weight)


def test_prefixed_union_composes_tables():
    table = KeyTable.union(_table().prefixed("model.a.", "a"), _table().prefixed("model.b.", "b"))
    assert len(table) == 2 * len(_table())
    assert "model.a.buffer.position_ids" in table.ignorable
    params = table.to_flax(
        {f"model.{n}.{k}": v for n in "ab" for k, v in _state_dict().items()},
        {"a": _params(), "b": _params()},
    )
    assert params["b"]["proj"]["kernel"].shape == (8, 16)
    with pytest.raises(ValueError, match="twice"):
        KeyTable.union(_table(), _table())
