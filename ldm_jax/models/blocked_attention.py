"""Flash-style attention in plain XLA: query blocks x key blocks with an online softmax, and a
backward pass that recomputes its tiles instead of keeping them.

XLA's attention forms the whole [B, N, T, S] logits and passes over them several times; for a
64x64 latent that is 1 GiB per layer of SD 1.5 at batch 2, far outside any CPU cache, and its
gradient keeps the fp32 probabilities alive until the backward pass (4.3 GiB per 64x64
self-attention at 8 images per device). Here each step of a `lax.scan` sees one
[B, N, q_block, k_block] tile, keeps the running max / sum / output in fp32 and rescales them when
the max grows (Dao et al. 2022, "FlashAttention", Alg. 1; Milakov & Gimelshein 2018).

The backward pass is FlashAttention's (Dao 2023, "FlashAttention-2", Alg. 2), as a `custom_vjp`
that saves only q, k, v, the output O and the row log-sum-exp L = m + log(l):

    P_ij  = exp(Q_i K_j^T / sqrt(H) - L_i)        (recomputed per tile)
    dV_j  = sum_i P_ij^T dO_i
    dP_ij = dO_i V_j^T,   D_i = rowsum(dO_i * O_i)
    dS_ij = P_ij * (dP_ij - D_i)
    dQ_i  = sum_j dS_ij K_j / sqrt(H),   dK_j = sum_i dS_ij^T Q_i / sqrt(H)

so a train step's memory holds no [T, S] tensor at all: this is the memory-safe path that the
dispatcher (attention.py) takes wherever no fused kernel applies.

Sequences that no good block divides are padded (queries: sliced off after; keys: masked to -inf
in the tiles), so every shape has a tiled path. Measured on this project's 2-core CPU (SD 1.5,
batch 2, fp32, ldm_jax's compile options): self-attention at 4096 tokens (8 x 40) XLA 2.0 s, this
0.36 s, torch SDPA 0.38 s; cross-attention 4096 x 77 keys XLA 39 ms, this (one key block) 21 ms,
torch 20 ms (benchmarks/cpu_attention.py). No mask or causal support: `dot_product_attention`
only routes unmasked attention here.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

# The fastest tile of a sweep on the 2-core CPU with ldm_jax's compile options (SD 1.5 UNet
# forward 9.6-9.9 s vs 9.8-10.3 s at 256 x 512; smaller tiles lose more to per-step overhead than
# they gain in cache).
Q_BLOCK, K_BLOCK = 512, 256


def block_sizes(num_queries: int, num_keys: int) -> tuple[int, int]:
    """(q_block, k_block) for any lengths.

    A sequence no longer than its target block is one block; a longer one gets the largest divisor
    between a quarter of the target and the target (80x80 latents: 6400 queries -> 400), else the
    target itself (the sequence is then padded up to a multiple of it).
    """
    q_block = _divisor_block(num_queries, Q_BLOCK) or Q_BLOCK
    k_block = _divisor_block(num_keys, K_BLOCK) or K_BLOCK
    return q_block, k_block


def _divisor_block(length: int, target: int) -> int | None:
    if length <= target:
        return length
    return next((b for b in range(target, target // 4 - 1, -1) if length % b == 0), None)


def blocked_attention(
    q_BTNH: jax.Array,
    k_BSNH: jax.Array,
    v_BSNH: jax.Array,
    *,
    q_block: int | None = None,
    k_block: int | None = None,
) -> jax.Array:
    """softmax(q k^T / sqrt(H)) v, tile by tile (fp32 inside); result in v's dtype.

    Blocks default to `block_sizes`; sequences they do not divide are padded (padded keys are
    masked out, padded queries dropped).
    """
    b, t, n, h = q_BTNH.shape
    s = k_BSNH.shape[1]
    default_q, default_k = block_sizes(t, s)
    q_block, k_block = q_block or default_q, k_block or default_k
    t_pad, s_pad = _round_up(t, q_block) - t, _round_up(s, k_block) - s
    q = jnp.pad(q_BTNH, ((0, 0), (0, t_pad), (0, 0), (0, 0)))
    k, v = (jnp.pad(x, ((0, 0), (0, s_pad), (0, 0), (0, 0))) for x in (k_BSNH, v_BSNH))
    out_BTNH = _flash(q, k, v, q_block, k_block, s)
    return out_BTNH[:, :t].astype(v_BSNH.dtype)


def _round_up(length: int, block: int) -> int:
    return math.ceil(length / block) * block


def _to_blocks(x_BLNH, size):  # -> [num_blocks, B, N, size, H], fp32
    b, _, n, h = x_BLNH.shape
    return x_BLNH.astype(jnp.float32).reshape(b, -1, size, n, h).transpose(1, 0, 3, 2, 4)


def _from_blocks(x_LBNKH):  # [num_blocks, B, N, size, H] -> [B, L, N, H]
    nb, b, n, size, h = x_LBNKH.shape
    return x_LBNKH.transpose(1, 0, 3, 2, 4).reshape(b, nb * size, n, h)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _flash(q, k, v, q_block, k_block, num_keys):
    return _flash_forward(q, k, v, q_block, k_block, num_keys)[0]


def _flash_forward(q, k, v, q_block, k_block, num_keys):
    """(out [B, T, N, H] fp32, log-sum-exp [num_q_blocks, B, N, q_block]) of padded inputs."""
    h = q.shape[-1]
    masked = num_keys != k.shape[1]
    q_blocks = _to_blocks(q, q_block) * h**-0.5
    k_blocks, v_blocks = _to_blocks(k, k_block), _to_blocks(v, k_block)
    offsets = jnp.arange(k_blocks.shape[0]) * k_block

    def one_query_block(q_BNQH):
        def step(carry, kv):
            running_max, running_sum, out = carry
            k_BNKH, v_BNKH, offset = kv
            logits = jnp.einsum("bnqh,bnkh->bnqk", q_BNQH, k_BNKH)
            if masked:
                key_index = offset + jnp.arange(k_block)
                logits = jnp.where(key_index < num_keys, logits, -jnp.inf)
            new_max = jnp.maximum(running_max, logits.max(-1))
            p = jnp.exp(logits - new_max[..., None])
            rescale = jnp.exp(running_max - new_max)
            out = out * rescale[..., None] + jnp.einsum("bnqk,bnkh->bnqh", p, v_BNKH)
            return (new_max, running_sum * rescale + p.sum(-1), out), None

        shape = q_BNQH.shape[:-1]
        init = (jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.zeros(q_BNQH.shape))
        (running_max, total, out), _ = lax.scan(step, init, (k_blocks, v_blocks, offsets))
        return out / total[..., None], running_max + jnp.log(total)

    out_blocks, lse = lax.map(one_query_block, q_blocks)
    return _from_blocks(out_blocks), lse


def _flash_fwd(q, k, v, q_block, k_block, num_keys):
    out, lse = _flash_forward(q, k, v, q_block, k_block, num_keys)
    return out, (q, k, v, out, lse)


def _flash_bwd(q_block, k_block, num_keys, residuals, d_out):
    q, k, v, out, lse = residuals
    h = q.shape[-1]
    scale = h**-0.5
    masked = num_keys != k.shape[1]
    q_blocks = _to_blocks(q, q_block) * scale
    k_blocks, v_blocks = _to_blocks(k, k_block), _to_blocks(v, k_block)
    do_blocks = _to_blocks(d_out, q_block)
    # D_i = rowsum(dO_i * O_i): [num_q_blocks, B, N, q_block]
    delta = jnp.sum(do_blocks * _to_blocks(out, q_block), axis=-1)
    k_offsets = jnp.arange(k_blocks.shape[0]) * k_block

    def tile(q_BNQH, k_BNKH, v_BNKH, do_BNQH, lse_BNQ, delta_BNQ, offset):
        """P and dS of one (query block, key block) tile."""
        logits = jnp.einsum("bnqh,bnkh->bnqk", q_BNQH, k_BNKH)
        if masked:
            key_index = offset + jnp.arange(k_block)
            logits = jnp.where(key_index < num_keys, logits, -jnp.inf)
        p = jnp.exp(logits - lse_BNQ[..., None])
        dp = jnp.einsum("bnqh,bnkh->bnqk", do_BNQH, v_BNKH)
        return p, p * (dp - delta_BNQ[..., None])

    def dq_of_query_block(args):
        q_BNQH, do_BNQH, lse_BNQ, delta_BNQ = args

        def step(dq, kv):
            k_BNKH, v_BNKH, offset = kv
            _, ds = tile(q_BNQH, k_BNKH, v_BNKH, do_BNQH, lse_BNQ, delta_BNQ, offset)
            return dq + jnp.einsum("bnqk,bnkh->bnqh", ds, k_BNKH), None

        dq, _ = lax.scan(step, jnp.zeros(q_BNQH.shape), (k_blocks, v_blocks, k_offsets))
        return dq * scale

    def dkv_of_key_block(args):
        k_BNKH, v_BNKH, offset = args

        def step(carry, qs):
            dk, dv = carry
            q_BNQH, do_BNQH, lse_BNQ, delta_BNQ = qs
            p, ds = tile(q_BNQH, k_BNKH, v_BNKH, do_BNQH, lse_BNQ, delta_BNQ, offset)
            dv = dv + jnp.einsum("bnqk,bnqh->bnkh", p, do_BNQH)
            dk = dk + jnp.einsum("bnqk,bnqh->bnkh", ds, q_BNQH)
            return (dk, dv), None

        zeros = jnp.zeros(k_BNKH.shape)
        (dk, dv), _ = lax.scan(step, (zeros, zeros), (q_blocks, do_blocks, lse, delta))
        return dk, dv  # q_blocks carry the scale already: dK_j = sum_i dS_ij^T Q_i / sqrt(H)

    dq = lax.map(dq_of_query_block, (q_blocks, do_blocks, lse, delta))
    dk, dv = lax.map(dkv_of_key_block, (k_blocks, v_blocks, k_offsets))
    return tuple(
        _from_blocks(g).astype(x.dtype) for g, x in ((dq, q), (dk, k), (dv, v))
    )


_flash.defvjp(_flash_fwd, _flash_bwd)
