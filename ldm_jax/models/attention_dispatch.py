"""Which attention kernel runs where: one pure rule from backend, dtype and shape.

    GPU, bf16/fp16, head_dim a multiple of 8 and <= 256 (Hopper+) / <= 128 (before)  -> "cudnn"
    TPU, unmasked                                                                      -> "splash"
    CPU, unmasked, >= 1024 queries                                                     -> "blocked"
    anything else whose fp32 logits would exceed MAX_MATERIALISED_LOGITS_BYTES        -> "blocked"
    the rest (short sequences, masks, causal text encoders)                            -> "xla"

"cudnn" is cuDNN's fused flash attention through `jax.nn.dot_product_attention` (sequences padded
to an even multiple and masked by length, attention.py); "splash" the Pallas TPU kernel
(splash_attention.py); "blocked" the flash-style tiles in plain XLA with a recomputing backward
pass (blocked_attention.py); "xla" materialises [B, N, T, S] fp32 logits, so it is only chosen
where they are small. Masked and causal attention (the 77-token text encoders) always take "xla":
no tiled path here takes a mask, and their logits are [B, 12, 77, 77].

fp32 on a GPU: "xla" below the logits limit, "blocked" above it. Which of the two is faster for
mid-sized fp32 shapes has not been measured on a GPU yet (the GPU suite runs bf16).
"""

from __future__ import annotations

import dataclasses

import numpy as np

IMPLEMENTATIONS = ("xla", "cudnn", "blocked", "splash")
# None on a CPU backend: "blocked" from this many queries on (SD's 32x32 and 64x64 levels, self-
# and cross-attention: 5.5x faster at 4096 x 4096 tokens, 1.9x at 4096 x 77 keys, 1.3x at 1024 x
# 77); shorter sequences keep XLA's one-pass attention (at 256 tokens the two are within 10%)
BLOCKED_MIN_QUERIES_ON_CPU = 1024
# The default never materialises fp32 logits larger than this (256 MiB: SD 1.5's 32x32 level at
# batch 8 is [8, 8, 1024, 1024] x 4 B = 256 MiB; its 64x64 level is 16x that).
MAX_MATERIALISED_LOGITS_BYTES = 2**28
CUDNN_DTYPES = ("bfloat16", "float16")
CUDNN_HEAD_DIM_MULTIPLE = 8


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    """What the choice depends on: [batch, queries, heads, head_dim] x [keys], dtype, masking."""

    batch: int
    queries: int
    keys: int
    heads: int
    head_dim: int
    dtype: str
    masked: bool = False  # a mask or causal attention

    @classmethod
    def of(cls, q_BTNH, k_BSNH, *, masked: bool = False) -> AttentionShape:
        b, t, n, h = q_BTNH.shape
        return cls(b, t, k_BSNH.shape[1], n, h, np.dtype(q_BTNH.dtype).name, masked)

    @property
    def logits_bytes(self) -> int:
        return self.batch * self.heads * self.queries * self.keys * 4


def cuda_major(compute_capability: str | None) -> int | None:
    """The major CUDA compute capability ("9.0" -> 9); None for no / a non-NVIDIA device."""
    try:
        return int(str(compute_capability).split(".")[0])
    except ValueError:
        return None


def cudnn_head_dim_limit(compute_capability: str | None) -> int:
    """256 on Hopper (compute capability 9.0) and later, 128 before (A100: SD 1.5's 160 fails)."""
    return 256 if (cuda_major(compute_capability) or 0) >= 9 else 128


def cudnn_rejection(shape: AttentionShape, compute_capability: str | None) -> str | None:
    """Why cuDNN's flash attention cannot take `shape`, or None when it can."""
    if cuda_major(compute_capability) is None:
        return f"cuDNN needs an NVIDIA GPU (compute capability {compute_capability!r})"
    if shape.dtype not in CUDNN_DTYPES:
        return f"cuDNN flash attention needs {' or '.join(CUDNN_DTYPES)} inputs, got {shape.dtype}"
    limit = cudnn_head_dim_limit(compute_capability)
    if shape.head_dim % CUDNN_HEAD_DIM_MULTIPLE or shape.head_dim > limit:
        return (
            f"cuDNN flash attention needs head_dim a multiple of {CUDNN_HEAD_DIM_MULTIPLE} and "
            f"<= {limit} on compute capability {compute_capability}, got {shape.head_dim}"
        )
    return None


def choose_attention(
    shape: AttentionShape, backend: str, compute_capability: str | None = None
) -> str:
    """The implementation `dot_product_attention(..., implementation=None)` runs for `shape`."""
    if shape.masked:
        return "xla"
    if backend in ("gpu", "cuda") and cudnn_rejection(shape, compute_capability) is None:
        return "cudnn"
    if backend == "tpu":
        return "splash"
    if backend == "cpu" and shape.queries >= BLOCKED_MIN_QUERIES_ON_CPU:
        return "blocked"
    if shape.logits_bytes > MAX_MATERIALISED_LOGITS_BYTES:
        return "blocked"
    return "xla"


AUTO = "auto"
ATTENTION_CHOICES = (AUTO, *IMPLEMENTATIONS)  # what configs and CLI flags accept


def implementation_from_name(name: str | None) -> str | None:
    """A config / CLI attention setting -> `dot_product_attention`'s `implementation`:
    "auto" (or None / "") -> None (choose per call), else one of IMPLEMENTATIONS."""
    if name in (None, "", AUTO):
        return None
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attention {name!r}; allowed: {', '.join(ATTENTION_CHOICES)}")
    return name
