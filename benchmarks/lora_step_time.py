"""Train-step time of LoRA vs full fine-tuning on CPU for a tiny model (configs/ldm_tiny.py's
SD-1-layout network): the same jitted LDM step, the UNet trained whole or rank-R adapters on its
attention projections (every network frozen). Prints one table row per mode: trained parameters,
state bytes, median ms per step, and the ratio to full fine-tuning.

    python benchmarks/lora_step_time.py [--rank 4] [--batch 8] [--steps 20] [--devices 1]
"""

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="global batch (32 px images)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    parser.add_argument("--devices", type=int, default=1, help="fake CPU devices (fsdp axis)")
    return parser.parse_args(argv)


def step_times(spec, lora, batch_size: int, steps: int):
    """(trained params, state bytes, [seconds per step]) of the LDM step with `lora` (or None)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ldm_jax.training.ldm_step import LDMTrainConfig, init_ldm_state, make_ldm_train_step
    from ldm_jax.training.optimizer import make_optimizer
    from ldm_jax.training.sharding import batch_sharding, make_mesh

    mesh = make_mesh(("data", "fsdp", "tensor"), (1, -1, 1))
    cfg = LDMTrainConfig(lora=lora, cond_drop_prob=0.1)
    tx, schedule = make_optimizer(dict(learning_rate=1e-4))
    length = spec.cond_stage.config.max_length
    step = make_ldm_train_step(spec, cfg, tx, schedule, mesh, null_tokens=np.zeros(length))
    state, frozen = init_ldm_state(spec, cfg, tx, mesh)
    sharding = batch_sharding(mesh)
    rng = np.random.default_rng(0)
    batch = {
        "image": jax.device_put(rng.uniform(-1, 1, (batch_size, 32, 32, 3)).astype(np.float32),
                                sharding),
        "tokens": jax.device_put(rng.integers(0, 49408, (batch_size, length), dtype=np.int32),
                                 sharding),
    }  # fmt: skip
    key = jax.random.key(0)
    state, metrics = step(state, frozen, batch, key)  # compile + first step
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, frozen, batch, key)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    trained = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(state.params))
    state_bytes = sum(a.nbytes for a in jax.tree.leaves(state) if isinstance(a, jnp.ndarray))
    return trained, state_bytes, times


def main(argv=None) -> None:
    args = _parse(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={args.devices}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import jax
    import ml_collections
    from ldm_tiny import TINY_SPEC

    from ldm_jax.training.lora_setup import lora_from_config

    lora = lora_from_config(ml_collections.ConfigDict(dict(
        rank=args.rank, alpha=float(args.rank), unet_targets=("to_q", "to_k", "to_v", "to_out.0"),
        text_encoder_targets=(), export_formats=())), TINY_SPEC)  # fmt: skip
    print(f"jax {jax.__version__}, {jax.device_count()} CPU device(s), global batch {args.batch} "
          f"(32 px), {args.steps} timed steps, configs/ldm_tiny.py's network, fp32")
    rows = {}
    for name, mode in (("full", None), (f"LoRA r{args.rank}", lora)):
        rows[name] = step_times(TINY_SPEC, mode, args.batch, args.steps)
    full = statistics.median(rows["full"][2])
    print("| trained | trained params | state MiB | median ms/step | vs full |")
    print("|---|---|---|---|---|")
    for name, (trained, state_bytes, times) in rows.items():
        median = statistics.median(times)
        print(f"| {name} | {trained:,} | {state_bytes / 2**20:.2f} | {1e3 * median:.1f} "
              f"| {median / full:.2f}x |")


if __name__ == "__main__":
    main()
