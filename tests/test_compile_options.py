"""ldm_jax.compile_options: XLA:CPU keeps convolutions out of YNNPACK, dots and reductions in it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import compile_options
from ldm_jax.compile_options import CPU_COMPILER_OPTIONS, YNN_FUSION_FLAG, compiler_options

needs_cpu_support = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not compile_options._cpu_accepts_options(),
    reason="needs a CPU jaxlib that knows the YNNPACK fusion flag",
)


def _conv(x, w):
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def test_no_options_off_cpu():
    assert compiler_options("gpu") is None
    assert compiler_options("tpu") is None


@needs_cpu_support
def test_cpu_options_returned_and_xla_flags_win(monkeypatch):
    assert compiler_options("cpu") == CPU_COMPILER_OPTIONS
    monkeypatch.setenv("XLA_FLAGS", f"--{YNN_FUSION_FLAG}=individual_dot")
    assert compiler_options("cpu") is None


@needs_cpu_support
def test_convolution_leaves_ynnpack_and_dot_stays():
    # large enough for XLA's cost model to hand the convolution to YNNPACK (8x8x16 is not)
    x = jax.ShapeDtypeStruct((1, 16, 16, 64), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, 64, 64), jnp.float32)
    a = jax.ShapeDtypeStruct((64, 64), jnp.float32)

    def entry_ops(fn, *args, **jit_kwargs):  # the top-level computation's text
        hlo = jax.jit(fn, **jit_kwargs).lower(*args).compile().as_text()
        return hlo[hlo.index("ENTRY"):]

    # XLA's default sends the convolution to YNNPACK; with our options it is XLA's own op
    assert "__ynn_fusion" in entry_ops(_conv, x, w)
    ours = entry_ops(_conv, x, w, compiler_options=compiler_options("cpu"))
    assert "__ynn_fusion" not in ours and " convolution(" in ours
    assert "__ynn_fusion" in entry_ops(jnp.dot, a, a, compiler_options=compiler_options("cpu"))


@needs_cpu_support
def test_same_values_with_and_without_options():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 16, 32)) * 0.1, jnp.float32)
    expected = jax.jit(_conv)(x, w)
    got = jax.jit(_conv, compiler_options=compiler_options("cpu"))(x, w)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_unknown_option_is_not_passed(monkeypatch):
    monkeypatch.setattr(compile_options, "CPU_COMPILER_OPTIONS", {YNN_FUSION_FLAG: "NO_SUCH_TYPE"})
    compile_options._cpu_accepts_options.cache_clear()
    try:
        assert compiler_options("cpu") is None
    finally:
        monkeypatch.undo()
        compile_options._cpu_accepts_options.cache_clear()
