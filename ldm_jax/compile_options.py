"""XLA compile options that ldm_jax's jitted entry points pass on (today: CPU only).

XLA:CPU (jax 0.10) hands convolutions to YNNPACK by default. On this project's CPU box (2 AVX-512
cores) YNNPACK's 3x3 convolutions are 1.1-2.4x slower than XLA's own (Eigen) ones at Stable
Diffusion's shapes (64x64x320: 89 vs 72 ms; 16x16x1280: 106 vs 73 ms; 8x8x2560->1280: 106 vs
44 ms; benchmarks/cpu_convs.py), while its dots and reductions are the faster choice. Keeping
YNNPACK for dots and reductions only takes the SD 1.5 UNet forward from ~11.8 to ~9.9 s and the
built-in default's training from 18 min 41 s to 17 min 17 s (BENCHMARKS.md, "CPU: UNet forward").

Users who jit ldm_jax networks themselves can pass the same options:
``jax.jit(fn, compiler_options=compiler_options())``. An XLA_FLAGS setting of the same flag wins
(nothing is passed then), and a jaxlib that does not know the flag gets no options.
"""

import functools
import os

import jax

from ldm_jax.models.backend import target_backend

YNN_FUSION_FLAG = "xla_cpu_experimental_ynn_fusion_type"
# YNNPACK for single dots and reductions; convolutions stay with XLA's own emitter.
CPU_COMPILER_OPTIONS = {
    YNN_FUSION_FLAG: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
}


def compiler_options(backend: str | None = None) -> dict[str, str] | None:
    """Options for ``jax.jit(..., compiler_options=...)`` on ``backend`` (default: the compile
    target, ldm_jax.models.backend)."""
    if (backend or target_backend()) != "cpu":
        return None
    if YNN_FUSION_FLAG in os.environ.get("XLA_FLAGS", ""):
        return None  # the user's explicit choice
    return dict(CPU_COMPILER_OPTIONS) if _cpu_accepts_options() else None


@functools.cache
def _cpu_accepts_options() -> bool:
    """Whether this jaxlib knows the options (flag names and enum values change across versions)."""
    probe = jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS)
    try:
        probe.lower(jax.ShapeDtypeStruct((1,), "float32")).compile()
    except Exception:  # any refusal (unknown flag or enum value) means "not supported here"
        return False
    return True
