"""CPU: one attention call at the UNet's shapes — XLA's, the blocked (flash-style) one, torch SDPA.

Self-attention of Stable Diffusion 1.5's 64x64 level (4096 tokens, 8 heads x 40) and 32x32 level
(1024 tokens, 8 heads x 80), and the 64x64 level's cross-attention (4096 queries x 77 text keys),
batch 2, fp32; best of --repeats calls after a warm-up, jitted with ldm_jax's compile options.
Also sweeps the blocked path's tile sizes (--tiles; a block longer than the sequence becomes the
whole sequence), which is how Q_BLOCK x K_BLOCK were chosen.

    python benchmarks/cpu_attention.py
    python benchmarks/cpu_attention.py --tiles 512x256,256x512,128x1024 --no-torch
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.compile_options import compiler_options
from ldm_jax.models.blocked_attention import blocked_attention

# label: (queries, keys, heads, head dim)
SHAPES = {
    "64x64 self": (4096, 4096, 8, 40),
    "32x32 self": (1024, 1024, 8, 80),
    "64x64 cross": (4096, 77, 8, 40),
}


def best_time(fn, inputs, repeats: int) -> float:
    """Best wall time of fn(*inputs) (jax results waited for), after one warm-up call."""

    def call():
        out = fn(*inputs)
        return out.block_until_ready() if hasattr(out, "block_until_ready") else out

    call()  # warm-up (compiles)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiles", default="512x256", help="q_block x k_block, comma separated")
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()
    tiles = [tuple(int(n) for n in tile.split("x")) for tile in args.tiles.split(",")]
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, batch 2, fp32, best of "
          f"{args.repeats}, compiler_options={compiler_options()}")
    print("| shape | path | seconds | max abs diff vs XLA |")
    print("|---|---|---|---|")
    options = compiler_options()
    for label, (queries, keys, heads, dim) in SHAPES.items():
        rng = np.random.default_rng(0)
        q = jnp.asarray(rng.standard_normal((2, queries, heads, dim)), jnp.float32)
        k, v = (jnp.asarray(rng.standard_normal((2, keys, heads, dim)), jnp.float32)
                for _ in range(2))
        xla = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"),
                      compiler_options=options)
        reference = xla(q, k, v)
        rows = [("XLA", xla)]
        for q_block, k_block in tiles:
            q_block, k_block = min(q_block, queries), min(k_block, keys)
            if queries % q_block == 0 and keys % k_block == 0:
                rows.append((f"blocked {q_block}x{k_block}", jax.jit(
                    lambda q, k, v, a=q_block, b=k_block: blocked_attention(
                        q, k, v, q_block=a, k_block=b), compiler_options=options)))
        for name, fn in rows:
            seconds = best_time(fn, (q, k, v), args.repeats)
            diff = float(jnp.abs(fn(q, k, v) - reference).max())
            print(f"| {label} | {name} | {seconds:.3f} | {diff:.1e} |", flush=True)
        if not args.no_torch:
            import torch  # noqa: PLC0415 - optional side

            tq, tk, tv = (torch.from_numpy(np.array(x)).permute(0, 2, 1, 3).contiguous()
                          for x in (q, k, v))
            sdpa = torch.nn.functional.scaled_dot_product_attention
            seconds = best_time(sdpa, (tq, tk, tv), args.repeats)
            out = sdpa(tq, tk, tv).permute(0, 2, 1, 3).numpy()
            diff = float(np.abs(out - np.asarray(reference)).max())
            print(f"| {label} | torch SDPA ({torch.get_num_threads()} threads) | {seconds:.3f} | "
                  f"{diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
