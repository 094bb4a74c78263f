"""The backend the networks are traced for: jax's default one, or the target of a deviceless
ahead-of-time compile (a TPU topology lowered on a CPU host, benchmarks/tpu_memory.py).

Every backend-dependent choice in the networks (the attention kernel, Pallas interpret mode,
host-offload remat) asks `target_backend()`, so `with compile_target("tpu"):` around
`jit(...).lower(...)` traces the same program a TPU host would. jit caches traces by function and
arguments, not by this setting: lower a fresh jit (or new argument shapes) inside the block.
"""

import contextlib
import contextvars

import jax

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("compile_target", default=None)


def target_backend() -> str:
    """"cpu" | "gpu" | "tpu": the compile target when one is set, else jax.default_backend()."""
    return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def compile_target(platform: str):
    """Trace for `platform` ("tpu", "gpu", "cpu") within the block."""
    if platform not in ("cpu", "gpu", "tpu"):
        raise ValueError(f"compile target {platform!r}; allowed: cpu, gpu, tpu")
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)
