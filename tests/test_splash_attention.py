"""Splash attention (TPU Pallas kernel, interpret mode on CPU): values and gradients equal XLA's
attention at SD's scaled-down shapes, padding of tokens and head_dim, the block rule, and the
shard_map path under a mesh (8 fake CPU devices from conftest)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ldm_jax.models import splash_attention as splash_module
from ldm_jax.models.splash_attention import sequence_block, splash_attention, splash_block_sizes

# fp32: the kernel and XLA sum the same products in a different order (online softmax over key
# blocks); measured <= 1.6e-6 on values and grads.
FP32_TOL = 1e-5
# bf16 against an fp32 reference on the same (bf16-valued) inputs: the kernel rounds q * scale,
# its output and, in the backward pass, its bf16 matmul operands to bf16 (unit roundoff 2^-9 =
# 2e-3 each, relative to the largest entry); a few such roundings measured <= 6.2e-3, so 2e-2
# leaves ~3x margin, while leaving the padded keys unmasked measured 8e-2 to 3e-1.
BF16_TOL = 2e-2


def _rel(ours, reference) -> float:
    """max |ours - reference| / max |reference| (norm-wise: the reference crosses zero)."""
    ours, reference = (np.asarray(x, np.float64) for x in (ours, reference))
    assert ours.shape == reference.shape
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def _inputs(b, n, t, s, h, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    # logits of standard deviation 1 (q.k / sqrt(h) with unit entries): a peaked softmax, yet
    # unmasked zero-padded keys (logit 0) would still take ~10% of its mass
    q, k, v = (rng.standard_normal((b, length, n, h)) for length in (t, s, s))
    cotangent = rng.standard_normal((b, t, n, h))
    return [jnp.asarray(x, dtype) for x in (q, k, v)], jnp.asarray(cotangent, jnp.float32)


def _xla(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")


def _value_and_grads(fn, qkv, cotangent):
    """fn(q, k, v) and the gradient of sum(fn * cotangent) w.r.t. q, k, v, in one jit."""

    @jax.jit
    def run(q, k, v):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(cotangent.astype(out.dtype))

    return run(*qkv)


def _compare(qkv, cotangent, tol):
    out, grads = _value_and_grads(splash_attention, qkv, cotangent)
    qkv32 = [x.astype(jnp.float32) for x in qkv]
    want_out, want_grads = _value_and_grads(_xla, qkv32, cotangent)
    assert out.shape == want_out.shape and out.dtype == qkv[2].dtype
    errors = {"out": _rel(out, want_out)}
    pairs = zip("qkv", grads, want_grads, strict=True)
    errors.update({f"d{name}": _rel(g, w) for name, g, w in pairs})
    assert max(errors.values()) <= tol, errors
    return errors


# (batch, heads, queries, keys, head_dim): self-attention at 16x16 latents (256) and a length
# that is no multiple of 128 (320 -> 384), cross-attention to CLIP's 77 tokens; SD's head dims
# 40 (SD1 at 320 channels), 64 (SD2), 80 and 160 (SD1's deeper levels).
FP32_CASES = [
    (1, 2, 256, 256, 40),
    (2, 1, 320, 320, 64),
    (1, 2, 256, 77, 80),
    (2, 1, 320, 77, 160),
]


@pytest.mark.parametrize("shape", FP32_CASES, ids=lambda s: "b{}n{}-t{}s{}-h{}".format(*s))
def test_fp32_values_and_gradients_match_xla(shape):
    qkv, cotangent = _inputs(*shape)
    _compare(qkv, cotangent, FP32_TOL)


@pytest.mark.parametrize("shape", [(1, 2, 320, 77, 40), (1, 1, 320, 320, 160)],
                         ids=lambda s: "b{}n{}-t{}s{}-h{}".format(*s))
def test_bf16_values_and_gradients_within_bf16_rounding(shape):
    qkv, cotangent = _inputs(*shape, dtype=jnp.bfloat16)
    _compare(qkv, cotangent, BF16_TOL)


def test_runs_the_pallas_kernel_in_interpret_mode_off_tpu():
    (q, k, v), _ = _inputs(1, 1, 128, 128, 64)
    assert "pallas_call" in str(jax.make_jaxpr(splash_attention)(q, k, v))
    # the flag reaches the kernel: compiled (non-interpret) Pallas TPU refuses a CPU backend
    with pytest.raises(ValueError, match="interpret"):
        splash_attention(q, k, v, interpret=False)


def test_rejects_mismatched_shapes():
    (q, k, v), _ = _inputs(1, 2, 128, 77, 64)
    with pytest.raises(ValueError, match=r"\[B, S, N, H\]"):
        splash_attention(q, k[..., :32], v)


@pytest.mark.parametrize(
    ("length", "block"),
    [(1, 128), (77, 128), (128, 128), (256, 256), (320, 384), (512, 512), (576, 128),
     (1024, 512), (2304, 384), (4096, 512), (6400, 256), (9216, 512)],
)
def test_sequence_block_table(length, block):
    # SD at 512 px: 4096/1024/256/64 tokens; 768 px: 9216/2304/576/144; 80x80 latents: 6400
    assert sequence_block(length) == block


def test_block_rule_pads_by_less_than_a_lane_tile_with_legal_blocks():
    for length in range(1, 5000):
        block = sequence_block(length)
        padded = -(-length // block) * block
        assert block % 128 == 0 and block <= 512 and padded - length < 128, length
        # no larger legal block pads as little
        assert all(-(-length // b) * b > padded for b in range(block + 128, 513, 128)), length
    with pytest.raises(ValueError, match="at least one token"):
        sequence_block(0)


def test_block_sizes_set_forward_and_backward_tiles():
    blocks = splash_block_sizes(320, 77)
    assert blocks.has_backward_blocks and not blocks.use_fused_bwd_kernel
    assert (blocks.block_q, blocks.block_q_dkv, blocks.block_q_dq) == (384, 384, 384)
    kv = (blocks.block_kv, blocks.block_kv_compute, blocks.block_kv_dkv,
          blocks.block_kv_dkv_compute, blocks.block_kv_dq)
    assert kv == (128,) * 5


def _sharded_case(mesh, spec):
    qkv, cotangent = _inputs(8, 1, 256, 77, 64, seed=3)
    sharding = NamedSharding(mesh, spec)
    return [jax.device_put(x, sharding) for x in qkv], qkv, cotangent


@pytest.mark.parametrize(
    ("axis_types", "shape"), [("explicit", (2, 4)), ("auto", (1, 8))]
)
def test_mesh_splits_the_batch_with_shard_map(axis_types, shape, monkeypatch):
    if axis_types == "explicit":
        mesh = jax.make_mesh(shape, ("data", "fsdp"),
                             axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    else:
        mesh = Mesh(np.array(jax.devices()).reshape(shape), ("data", "fsdp"))
    sharded, qkv, cotangent = _sharded_case(mesh, P(("data", "fsdp")))
    kernel_batches = []  # the batch each kernel call sees, recorded at trace time
    per_device = splash_module._splash_per_device

    def recording(q, *args, **kwargs):
        kernel_batches.append(q.shape[0])
        return per_device(q, *args, **kwargs)

    monkeypatch.setattr(splash_module, "_splash_per_device", recording)

    def fn(q, k, v):
        return splash_attention(q, k, v, mesh=mesh)

    assert "shard_map" in str(jax.make_jaxpr(fn)(*qkv))
    out, grads = _value_and_grads(fn, sharded, cotangent)
    assert kernel_batches and set(kernel_batches) == {1}  # 8 examples over 8 devices
    want_out, want_grads = _value_and_grads(_xla, qkv, cotangent)
    assert out.sharding.shard_shape(out.shape)[0] == 1
    assert _rel(out, want_out) <= FP32_TOL
    assert max(_rel(g, w) for g, w in zip(grads, want_grads, strict=True)) <= FP32_TOL


def test_context_mesh_is_used_when_no_mesh_is_passed():
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
    sharded, qkv, _ = _sharded_case(mesh, P(("data", "fsdp")))
    with jax.set_mesh(mesh):
        assert "shard_map" in str(jax.make_jaxpr(splash_attention)(*qkv))
        out = jax.jit(splash_attention)(*sharded)
    assert _rel(out, _xla(*qkv)) <= FP32_TOL


def test_no_shard_map_without_a_batch_split():
    (q, k, v), _ = _inputs(2, 1, 128, 77, 64)
    tensor_only = Mesh(np.array(jax.devices()).reshape(1, 8), ("data", "tensor"))
    odd_batch = Mesh(np.array(jax.devices()).reshape(1, 8), ("data", "fsdp"))  # 8 ∤ 2
    for mesh in (None, tensor_only, odd_batch):
        jaxpr = str(jax.make_jaxpr(lambda q, k, v, m=mesh: splash_attention(q, k, v, mesh=m))(
            q, k, v))
        assert "shard_map" not in jaxpr and "pallas_call" in jaxpr
    out = jax.jit(lambda q, k, v: splash_attention(q, k, v, mesh=odd_batch))(q, k, v)
    assert _rel(out, _xla(q, k, v)) <= FP32_TOL


def test_batch_axes_skip_axes_that_do_not_divide_the_batch():
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
    assert splash_module._batch_axes(mesh, 8) == ("data", "fsdp")
    assert splash_module._batch_axes(mesh, 2) == ("data",)
    assert splash_module._batch_axes(mesh, 1) == ()
