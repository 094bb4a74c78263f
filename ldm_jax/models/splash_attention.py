"""Unmasked attention through the TPU Pallas splash-attention kernel, for any shape.

The kernel (`jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel`,
`make_splash_mha_single_device`) takes one example as [heads, tokens, head_dim], tiles the query
and key sequences into blocks that must be multiples of 128 (`NUM_LANES`; the segment-id path
raises NotImplementedError otherwise) and does not scale the logits (its reference,
`_attention_reference_default`, is softmax(q k^T) v). Stable Diffusion's shapes fit none of
that directly: 77 text tokens, 24x24 latents (576 tokens), head_dim 40/64/80/160. So here:

- tokens: queries and keys are zero-padded to a multiple of the block (`splash_block_sizes`);
  padded queries are computed and dropped, padded keys are masked with segment ids: every query
  and every real key gets id 0, padded keys id 1. Segment ids rather than a static mask object
  because (a) they are runtime arrays of length T and S that the kernel compares per tile, while
  a `NumpyMask` of the padding would be a [T, S] numpy array per head, processed at trace time,
  whose last key-block column becomes int8 "partial mask blocks" the kernel loads from memory
  for every query block; (b) giving the padded QUERIES the
  real keys' id keeps every row of the mask non-empty, which the kernel requires (`SegmentIds`
  docstring: an all-masked row gives an invalid softmax) - those rows are discarded anyway and
  get a zero cotangent, so they add nothing to dq, dk or dv.
- head_dim: zero-padded to a multiple of 128. q.k and the softmax are unchanged by zero columns
  in q and k; zero columns of v give zero output columns, sliced off. jax's own splash tests only
  draw head_dim 128 or 256 (tests/pallas/tpu_splash_attention_kernel_test.py), and the MXU
  contracts over at least 128 at a time (256 on v6e), so a 40-wide contraction costs a full pass
  anyway; interpret mode accepts any width, and padding everywhere makes the CPU tests run the
  exact TPU data path (interpret time is ~all compilation: equal with and without padding).
- scale: q is multiplied by the ORIGINAL head_dim**-0.5 before the kernel.

The kernel's custom VJP gives dq/dk/dv when the backward block sizes are set (they are here).
Under a mesh the kernel runs inside `jax.shard_map` with the batch split over the mesh's "data"
and "fsdp" axes, so each device calls Pallas on its own examples; XLA cannot partition a custom
call. Off TPU the same kernel runs in Pallas interpret mode (`pallas_call(interpret=True)`: the
kernel body lowered to ordinary XLA loops; for tests, not speed).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ldm_jax.models.backend import target_backend

# The kernel's tiles are multiples of the TPU lane width; 512 is the largest block jax's splash
# tests draw for the forward pass and MaxText's default.
LANES = splash.NUM_LANES
_BLOCK_CHOICES = (512, 384, 256, 128)
# Mesh axes that carry the batch (as ldm_jax.training.sharding.BATCH_AXES, which models/ may not
# import); any others are replicated here.
BATCH_AXES = ("data", "fsdp")

_REAL, _PADDING = 0, 1  # segment ids


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def sequence_block(length: int) -> int:
    """The block for a sequence: the least padding, then the largest block (fewest grid steps).

    Up to 512 tokens that is one block of `length` rounded up to 128 (77 -> 128, 320 -> 384);
    longer sequences pad by less than 128 (2304 -> 384 x 6 rather than 512 x 5).
    """
    if length < 1:
        raise ValueError(f"splash attention needs at least one token, got {length}")
    return min(_BLOCK_CHOICES, key=lambda b: (_round_up(length, b), -b))


def splash_block_sizes(num_queries: int, num_keys: int) -> splash.BlockSizes:
    """Forward and backward tiles for `num_queries` x `num_keys` (padded to their blocks)."""
    bq, bkv = sequence_block(num_queries), sequence_block(num_keys)
    return splash.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv,
        block_q_dq=bq,
        block_kv_dq=bkv,
    )


def _use_interpret(interpret: bool | None) -> bool:
    return target_backend() != "tpu" if interpret is None else interpret


def _batch_axes(mesh, batch: int) -> tuple[str, ...]:
    """Mesh axes among BATCH_AXES (size > 1, not already manual) that together divide `batch`.

    An axis that would not divide the batch is left out (replicated) rather than failing: a
    batch of 2 on a data=4 mesh still runs, just without splitting.
    """
    manual = set(getattr(mesh, "manual_axes", ())) | set(
        jax.sharding.get_abstract_mesh().manual_axes
    )
    axes, size = [], 1
    for name in BATCH_AXES:
        if name not in mesh.axis_names or name in manual:
            continue
        n = mesh.shape[name]
        if n > 1 and batch % (size * n) == 0:
            axes.append(name)
            size *= n
    return tuple(axes)


def _splash_per_device(q_BTNH, k_BSNH, v_BSNH, *, interpret: bool):
    """The kernel on whatever batch this device holds: pad, vmap over batch, unpad."""
    _, t, n, h = q_BTNH.shape
    s = k_BSNH.shape[1]
    blocks = splash_block_sizes(t, s)
    t_pad, s_pad = _round_up(t, blocks.block_q), _round_up(s, blocks.block_kv)
    h_pad = _round_up(h, LANES)

    def to_kernel_layout(x_BLNH, length):  # -> [B, N, L_pad, H_pad]
        x = jnp.pad(x_BLNH, ((0, 0), (0, length - x_BLNH.shape[1]), (0, 0), (0, h_pad - h)))
        return x.transpose(0, 2, 1, 3)

    q = to_kernel_layout(q_BTNH * h**-0.5, t_pad)  # the original head_dim's scale
    k, v = to_kernel_layout(k_BSNH, s_pad), to_kernel_layout(v_BSNH, s_pad)
    segment_ids = splash.SegmentIds(
        q=jnp.full((t_pad,), _REAL, jnp.int32),
        kv=jnp.where(jnp.arange(s_pad) < s, _REAL, _PADDING).astype(jnp.int32),
    )
    mask = mask_lib.MultiHeadMask([mask_lib.FullMask((t_pad, s_pad))] * n)
    kernel = splash.make_splash_mha_single_device(mask, block_sizes=blocks, interpret=interpret)
    out_BNTH = jax.vmap(kernel, in_axes=(0, 0, 0, None))(q, k, v, segment_ids)
    return out_BNTH.transpose(0, 2, 1, 3)[:, :t, :, :h]


def splash_attention(
    q_BTNH: jax.Array,
    k_BSNH: jax.Array,
    v_BSNH: jax.Array,
    *,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """softmax(q k^T / sqrt(head_dim)) v for [batch, tokens, heads, head_dim]; out in v's dtype.

    Same contract as `dot_product_attention(..., implementation="xla")` without a mask. The
    kernel computes in the inputs' common dtype (logits and softmax statistics in fp32).
    `mesh` None uses the context mesh (`jax.set_mesh`) if there is one; `interpret` None means
    Pallas interpret mode unless the default backend is a TPU.
    """
    shapes = q_BTNH.shape, k_BSNH.shape, v_BSNH.shape
    if (any(len(x) != 4 for x in shapes) or k_BSNH.shape != v_BSNH.shape
            or (q_BTNH.shape[0], *q_BTNH.shape[2:]) != (k_BSNH.shape[0], *k_BSNH.shape[2:])):
        raise ValueError(
            "splash_attention expects q [B, T, N, H] and k, v [B, S, N, H] with the same B, N, "
            f"H; got q {shapes[0]}, k {shapes[1]}, v {shapes[2]}"
        )
    b = q_BTNH.shape[0]
    out_dtype = v_BSNH.dtype
    dtype = jnp.result_type(q_BTNH, k_BSNH, v_BSNH)
    q_BTNH, k_BSNH, v_BSNH = (x.astype(dtype) for x in (q_BTNH, k_BSNH, v_BSNH))
    run = functools.partial(_splash_per_device, interpret=_use_interpret(interpret))

    if mesh is None:
        context = jax.sharding.get_abstract_mesh()
        mesh = None if context.empty else context
    axes = () if mesh is None else _batch_axes(mesh, b)
    if not axes:
        return run(q_BTNH, k_BSNH, v_BSNH).astype(out_dtype)
    spec = P(axes)
    explicit = any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
    if explicit:  # typed shardings must match in_specs exactly; give the output q's back below
        q_spec = jax.typeof(q_BTNH).sharding.spec
        target = spec if isinstance(mesh, jax.sharding.AbstractMesh) else NamedSharding(mesh, spec)
        q_BTNH, k_BSNH, v_BSNH = (jax.reshard(x, target) for x in (q_BTNH, k_BSNH, v_BSNH))
    # Manual over every axis not already manual (an enclosing shard_map's): the axes outside
    # `spec` replicate. check_vma=False: the kernel's out_shape declares no varying axes, which
    # check_vma=True rejects ("`manual_axis_type` on `jax.ShapeDtypeStruct` must not be None").
    free_axes = set(mesh.axis_names) - set(jax.sharding.get_abstract_mesh().manual_axes)
    sharded = jax.shard_map(
        run, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
        axis_names=free_axes, check_vma=False,
    )
    out_BTNH = sharded(q_BTNH, k_BSNH, v_BSNH).astype(out_dtype)
    if explicit:
        target = q_spec if isinstance(mesh, jax.sharding.AbstractMesh) else NamedSharding(
            mesh, q_spec)
        out_BTNH = jax.reshard(out_BTNH, target)
    return out_BTNH
