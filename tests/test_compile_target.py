"""compile_target: tracing for a TPU on a CPU host (deviceless AOT compiles, benchmarks/
tpu_memory.py) makes every backend-dependent choice the TPU one, and only inside the block."""

import jax
import jax.extend
import jax.numpy as jnp
import pytest

from ldm_jax.compile_options import compiler_options
from ldm_jax.models import splash_attention
from ldm_jax.models.attention import dot_product_attention
from ldm_jax.models.backend import compile_target, target_backend


def _traced_primitives(fn, *args) -> set[str]:
    jaxpr = jax.make_jaxpr(fn)(*args)
    names = set()

    def walk(j):
        for eqn in j.eqns:
            names.add(eqn.primitive.name)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    return names


def test_the_target_is_the_default_backend_outside_the_block():
    assert target_backend() == jax.default_backend() == "cpu"
    with compile_target("tpu"):
        assert target_backend() == "tpu"
        assert compiler_options() is None  # no XLA:CPU options for a TPU compile
        assert splash_attention._use_interpret(None) is False  # the real kernel, not interpret
    assert target_backend() == "cpu" and splash_attention._use_interpret(None) is True
    with pytest.raises(ValueError, match="allowed: cpu, gpu, tpu"):
        with compile_target("npu"):
            pass


def test_attention_traced_for_tpu_is_the_splash_kernel():
    q = jnp.zeros((1, 4096, 2, 64), jnp.bfloat16)  # SD's 64x64 level
    on_cpu = _traced_primitives(dot_product_attention, q, q, q)
    with compile_target("tpu"):
        mesh = jax.make_mesh((1,), ("fsdp",), devices=jax.devices()[:1])
        with jax.set_mesh(mesh):
            on_tpu = _traced_primitives(dot_product_attention, q, q, q)
    assert "pallas_call" in on_tpu and "pallas_call" not in on_cpu
