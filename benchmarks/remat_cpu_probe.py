"""Why remat showed no saving in XLA:CPU's memory analysis, on a model small enough to reason about.

A 12-block residual MLP (x: 8192 x 512 fp32; each block x + gelu(x W1) W2 with a 4096-wide hidden
layer), differentiated with and without `jax.checkpoint` per block, compiled for CPU under each
XLA:CPU scheduler (`--xla_cpu_scheduler_type`), one fresh process per scheduler. Printed per row:
XLA's temporaries (`compiled.memory_analysis().temp_size_in_bytes`) and the bytes the jaxpr's
forward pass keeps for the backward pass (residuals other than the arguments, backend-independent).
Expected by hand: without remat each block keeps x, x W1 and gelu(x W1) (16 + 128 + 128 MiB), 12
blocks 3.2 GiB; with remat only x (16 MiB per block, 0.19 GiB) plus one block's recompute.

    python benchmarks/remat_cpu_probe.py
"""

import os
import subprocess
import sys

GIB = 2**30
SCHEDULERS = ("CPU_SCHEDULER_TYPE_DEFAULT", "CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED",
              "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED")
POLICIES = ("none", "blocks", "save_dots_no_batch")
LAYERS, TOKENS, WIDTH, HIDDEN = 12, 8192, 512, 4096


def measure(policy: str) -> tuple[float, float]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax._src.ad_checkpoint import saved_residuals

    def block(w, x):
        return x + jax.nn.gelu(x @ w[0]) @ w[1]

    if policy == "blocks":
        block = jax.checkpoint(block)
    elif policy == "save_dots_no_batch":
        policy_fn = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
        block = jax.checkpoint(block, policy=policy_fn)

    def loss(ws, x):
        for w in ws:
            x = block(w, x)
        return jnp.sum(x**2)

    f32 = jnp.float32
    ws = [(jax.ShapeDtypeStruct((WIDTH, HIDDEN), f32), jax.ShapeDtypeStruct((HIDDEN, WIDTH), f32))
          for _ in range(LAYERS)]
    x = jax.ShapeDtypeStruct((TOKENS, WIDTH), f32)
    temp = jax.jit(jax.grad(loss)).lower(ws, x).compile().memory_analysis().temp_size_in_bytes
    kept = sum(int(np.prod(a.shape)) * a.dtype.itemsize
               for a, where in saved_residuals(loss, ws, x) if "from the argument" not in where)
    return temp / GIB, kept / GIB


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--measure":
        for policy in POLICIES:
            temp, kept = measure(policy)
            print(f"| {sys.argv[2]} | {policy} | {temp:.2f} | {kept:.2f} |", flush=True)
        return
    import jax

    print(f"jax {jax.__version__}; {LAYERS} blocks, x {TOKENS}x{WIDTH}, hidden {HIDDEN}, fp32\n")
    print("| XLA:CPU scheduler | remat | temporaries GiB | kept for backward GiB |")
    print("|---|---|---|---|")
    for scheduler in SCHEDULERS:
        flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_scheduler_type={scheduler}"
        env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
        name = scheduler.removeprefix("CPU_SCHEDULER_TYPE_").lower()
        subprocess.run([sys.executable, __file__, "--measure", name], env=env, check=True)


if __name__ == "__main__":
    main()
