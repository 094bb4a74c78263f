"""Exact key tables between PyTorch state dicts and ldm_jax parameter trees.

A table is a list of `KeyMap(torch_key, flax_path, transform)`, written out per architecture
(never guessed from key suffixes or tensor rank). Loading and exporting both check that the table
is one-to-one, that it covers every parameter of the Flax model and every tensor of the state
dict, and that every shape matches after its transform; anything else raises
`CheckpointMismatchError` listing the offending keys.
"""

import dataclasses
import enum
from collections.abc import Iterable, Mapping
from typing import Any

import flax
import numpy as np

from ldm_jax.checkpoints.errors import CheckpointMismatchError

_MAX_LISTED = 20



class Transform(enum.Enum):
    """How a PyTorch tensor becomes a Flax parameter (and back)."""

    IDENTITY = "identity"  # biases, norm scales, embedding tables
    CONV = "conv"  # torch conv [out, in, kh, kw] <-> flax [kh, kw, in, out]
    LINEAR = "linear"  # torch linear [out, in] <-> flax dense [in, out]
    # torch 1x1 conv [out, in, 1, 1] <-> flax dense [in, out]
    CONV1X1_AS_LINEAR = "conv1x1_as_linear"
    # torch 1-d conv with kernel 1 [out, in, 1] <-> flax dense [in, out] (openaimodel qkv/proj_out)
    CONV1D_AS_LINEAR = "conv1d_as_linear"

    def to_flax(self, array: np.ndarray) -> np.ndarray:
        if self is Transform.CONV:
            _require_rank(array, 4, self)
            return np.transpose(array, (2, 3, 1, 0))
        if self is Transform.LINEAR:
            _require_rank(array, 2, self)
            return np.transpose(array)
        if self is Transform.CONV1X1_AS_LINEAR:
            _require_rank(array, 4, self)
            if array.shape[2:] != (1, 1):
                raise CheckpointMismatchError(f"expected a 1x1 conv kernel, got {array.shape}")
            return np.transpose(array[:, :, 0, 0])
        if self is Transform.CONV1D_AS_LINEAR:
            _require_rank(array, 3, self)
            if array.shape[2] != 1:
                raise CheckpointMismatchError(f"expected a kernel-1 conv1d, got {array.shape}")
            return np.transpose(array[:, :, 0])
        return array

    def to_torch(self, array: np.ndarray) -> np.ndarray:
        if self is Transform.CONV:
            return np.transpose(array, (3, 2, 0, 1))
        if self is Transform.LINEAR:
            return np.transpose(array)
        if self is Transform.CONV1X1_AS_LINEAR:
            return np.transpose(array)[:, :, None, None]
        if self is Transform.CONV1D_AS_LINEAR:
            return np.transpose(array)[:, :, None]
        return array

    def torch_shape(self, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The PyTorch shape that maps to a Flax parameter of `flax_shape`."""
        return self.to_torch(np.empty(flax_shape, dtype=np.uint8)).shape


def _require_rank(array: np.ndarray, rank: int, transform: Transform) -> None:
    if array.ndim != rank:
        raise CheckpointMismatchError(
            f"{transform.value} transform expects a rank-{rank} tensor, got shape {array.shape}"
        )


@dataclasses.dataclass(frozen=True)
class KeyMap:
    torch_key: str
    flax_path: tuple[str, ...]
    transform: Transform = Transform.IDENTITY


def key_map(torch_key: str, flax_path: str, transform: Transform = Transform.IDENTITY) -> KeyMap:
    """KeyMap with the Flax path written "a/b/kernel"."""
    return KeyMap(torch_key, tuple(flax_path.split("/")), transform)


def layer_maps(
    torch_name: str, flax_path: str, transform: Transform, *, bias: bool = True
) -> list[KeyMap]:
    """`<torch_name>.weight` -> `<flax_path>/kernel` (with `transform`), and the bias if any."""
    entries = [key_map(f"{torch_name}.weight", f"{flax_path}/kernel", transform)]
    if bias:
        entries.append(key_map(f"{torch_name}.bias", f"{flax_path}/bias"))
    return entries


def norm_maps(torch_name: str, flax_path: str) -> list[KeyMap]:
    """A GroupNorm / LayerNorm: `.weight`/`.bias` -> `scale`/`bias`."""
    return [
        key_map(f"{torch_name}.weight", f"{flax_path}/scale"),
        key_map(f"{torch_name}.bias", f"{flax_path}/bias"),
    ]


@dataclasses.dataclass(frozen=True)
class FusedKeyMap:
    """One torch tensor that stacks several of our parameters along its first (output) axis.

    OpenCLIP's `in_proj_weight` is [q; k; v] (`num_heads=None`). openaimodel's legacy
    AttentionBlock `qkv` interleaves per head, [h0: q k v, h1: q k v, ...] (QKVAttentionLegacy):
    give `num_heads` to split that order. Each part goes through `transform`.
    """

    torch_key: str
    flax_paths: tuple[tuple[str, ...], ...]
    transform: Transform = Transform.IDENTITY
    num_heads: int | None = None

    def split(self, array: np.ndarray) -> list[np.ndarray]:
        parts = len(self.flax_paths)
        if array.shape[0] % (parts * (self.num_heads or 1)):
            raise CheckpointMismatchError(
                f"{self.torch_key} {array.shape}: first axis not divisible into {parts} parts"
                + (f" x {self.num_heads} heads" if self.num_heads else "")
            )
        if self.num_heads is None:
            pieces = np.split(array, parts, axis=0)
        else:
            per_head = array.reshape(self.num_heads, parts, -1, *array.shape[1:])
            pieces = [per_head[:, i].reshape(-1, *array.shape[1:]) for i in range(parts)]
        return [self.transform.to_flax(piece) for piece in pieces]

    def merge(self, arrays: list[np.ndarray]) -> np.ndarray:
        pieces = [self.transform.to_torch(np.asarray(a)) for a in arrays]
        if self.num_heads is None:
            return np.concatenate(pieces, axis=0)
        per_head = [p.reshape(self.num_heads, -1, *p.shape[1:]) for p in pieces]
        stacked = np.stack(per_head, axis=1)
        return stacked.reshape(-1, *stacked.shape[3:])


def fused_key_map(
    torch_key: str,
    flax_paths: Iterable[str],
    transform: Transform = Transform.IDENTITY,
    num_heads: int | None = None,
) -> FusedKeyMap:
    """FusedKeyMap with the Flax paths written "a/b/kernel"."""
    return FusedKeyMap(
        torch_key, tuple(tuple(p.split("/")) for p in flax_paths), transform, num_heads
    )


Entry = KeyMap | FusedKeyMap


def _flax_paths(entry: Entry) -> tuple[tuple[str, ...], ...]:
    return entry.flax_paths if isinstance(entry, FusedKeyMap) else (entry.flax_path,)


def listed(keys: Iterable[Any]) -> str:
    keys = sorted(str(k) for k in keys)
    shown = ", ".join(keys[:_MAX_LISTED])
    more = len(keys) - _MAX_LISTED
    return shown + (f", ... and {more} more" if more > 0 else "")


def _path_str(path: tuple[str, ...]) -> str:
    return "/".join(path)


class KeyTable:
    """A checked, one-to-one mapping between a state dict's keys and a Flax parameter tree."""

    def __init__(self, entries: Iterable[Entry], ignorable: Iterable[str] = ()):
        self.entries = tuple(entries)
        self.ignorable = frozenset(ignorable)  # state-dict keys that carry no parameters
        by_key: dict[str, Entry] = {}
        by_path: dict[tuple[str, ...], Entry] = {}
        for entry in self.entries:
            if entry.torch_key in by_key:
                raise ValueError(f"key table maps {entry.torch_key!r} twice")
            by_key[entry.torch_key] = entry
            for path in _flax_paths(entry):
                if path in by_path:
                    raise ValueError(f"key table maps onto {_path_str(path)!r} twice")
                by_path[path] = entry
        self.by_key = by_key
        self.by_path = by_path

    def prefixed(self, torch_prefix: str, flax_prefix: str = "") -> "KeyTable":
        """This table moved under a torch key prefix and a Flax path prefix.

        E.g. prefixed("model.diffusion_model.", "unet"): whole-checkpoint tables are unions of
        per-network tables moved this way.
        """
        head = tuple(flax_prefix.split("/")) if flax_prefix else ()
        entries = []
        for e in self.entries:
            key = torch_prefix + e.torch_key
            if isinstance(e, FusedKeyMap):
                paths = tuple(head + p for p in e.flax_paths)
                entries.append(FusedKeyMap(key, paths, e.transform, e.num_heads))
            else:
                entries.append(KeyMap(key, head + e.flax_path, e.transform))
        return KeyTable(entries, (torch_prefix + k for k in self.ignorable))

    @staticmethod
    def union(*tables: "KeyTable") -> "KeyTable":
        """One table from several (disjoint) ones; overlaps are an error."""
        return KeyTable(
            (e for t in tables for e in t.entries), (k for t in tables for k in t.ignorable)
        )

    def __len__(self) -> int:
        return len(self.entries)

    def check_covers(self, flax_params: Any) -> None:
        """Every parameter of the Flax tree has exactly one entry, and no entry points elsewhere."""
        paths = set(flatten_params(flax_params))
        missing = paths - self.by_path.keys()
        extra = self.by_path.keys() - paths
        if missing or extra:
            raise CheckpointMismatchError(
                "key table and model parameters differ:"
                + (
                    f" parameters without a table entry: {listed(map(_path_str, missing))}."
                    if missing
                    else ""
                )
                + (
                    f" table entries for parameters the model lacks: "
                    f"{listed(map(_path_str, extra))}."
                    if extra
                    else ""
                )
            )

    def to_flax(self, state_dict: Mapping[str, Any], abstract_params: Any, *, dtype=None) -> dict:
        """State dict (numpy-convertible values) -> nested Flax params shaped like abstract_params.

        abstract_params may hold arrays or jax.ShapeDtypeStructs (from jax.eval_shape).
        """
        self.check_covers(abstract_params)
        missing = [e.torch_key for e in self.entries if e.torch_key not in state_dict]
        unexpected = [k for k in state_dict if k not in self.by_key and k not in self.ignorable]
        if missing or unexpected:
            raise CheckpointMismatchError(
                "checkpoint does not fit this architecture:"
                + (f" {len(missing)} missing keys: {listed(missing)}." if missing else "")
                + (
                    f" {len(unexpected)} unexpected keys: {listed(unexpected)}."
                    if unexpected
                    else ""
                )
            )
        expected_shapes = flatten_params(abstract_params)
        flat, wrong = {}, []
        for entry in self.entries:
            source = np.asarray(state_dict[entry.torch_key])
            if isinstance(entry, FusedKeyMap):
                arrays = entry.split(source)
            else:
                arrays = [entry.transform.to_flax(source)]
            for path, array in zip(_flax_paths(entry), arrays, strict=True):
                want = tuple(expected_shapes[path].shape)
                if array.shape != want:
                    wrong.append(
                        f"{entry.torch_key} {tuple(source.shape)} -> {_path_str(path)} needs {want}"
                    )
                    continue
                flat[path] = array if dtype is None else array.astype(dtype)
        if wrong:
            raise CheckpointMismatchError(
                f"{len(wrong)} tensors have the wrong shape for this architecture: {listed(wrong)}"
            )
        return flax.traverse_util.unflatten_dict(flat)

    def to_torch(self, params: Any) -> dict[str, np.ndarray]:
        """Flax params -> flat state dict of numpy arrays (exact inverse of `to_flax`)."""
        self.check_covers(params)
        flat = flatten_params(params)
        out = {}
        for e in self.entries:
            if isinstance(e, FusedKeyMap):
                array = e.merge([flat[p] for p in e.flax_paths])
            else:
                array = e.transform.to_torch(np.asarray(flat[e.flax_path]))
            out[e.torch_key] = np.ascontiguousarray(array)
        return out


def flatten_params(params: Any) -> dict[tuple[str, ...], Any]:
    """Flatten a (possibly boxed, possibly frozen) parameter tree to {path tuple: leaf}."""
    params = flax.core.meta.unbox(params)
    if isinstance(params, flax.core.FrozenDict):
        params = params.unfreeze()
    if "params" in params and len(params) == 1:
        params = params["params"]
    return flax.traverse_util.flatten_dict(params)
