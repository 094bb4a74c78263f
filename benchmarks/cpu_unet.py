"""CPU: ldm_jax's UNet forward against diffusers PyTorch's UNet2DConditionModel (fp32).

Stable Diffusion 1.5's UNet (preset "sd-v1", random weights) on [B, 64, 64, 4] latents with a
[B, 77, 768] context, the work of one sampling step at 512x512 without guidance (B=2: one guided
image). Each side runs in a fresh process (the two thread pools never compete), pinned to the same
threads; each does one warm-up call, then --repeats timed calls (median); --rounds N alternates
the two sides N times (a shared box's load drifts) and reports the median over rounds. Ours' first
call (trace + compile + run) is reported separately. Ours is jitted with ldm_jax's compile options
(ldm_jax/compile_options.py), its parameters already on the device like torch's weights.
XLA CPU flags are passed with --xla-flags; setting the YNNPACK flag there replaces ldm_jax's choice.

    python benchmarks/cpu_unet.py --rounds 3                        # both sides, SD 1.5 shapes
    # ours under XLA's own default (YNNPACK convolutions as well), the "before" of BENCHMARKS.md:
    python benchmarks/cpu_unet.py --side jax \
        --xla-flags=--xla_cpu_experimental_ynn_fusion_type=individual_dot,individual_convolution
    python benchmarks/cpu_unet.py --model tiny                      # a quick check of the script
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

WEIGHT_SCALE = 0.02


def unet_config(model: str):
    from ldm_jax.presets.tiny import TINY_UNET
    from ldm_jax.presets.unets import UNET_PRESETS

    return UNET_PRESETS["sd-v1"] if model == "sd15" else TINY_UNET


def measure_jax(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ldm_jax.compile_options import compiler_options
    from ldm_jax.models.params import abstract_params
    from ldm_jax.models.unet import UNet

    config = unet_config(args.model)
    impl = None if args.attention == "default" else args.attention
    unet = UNet(config, attention_implementation=impl)
    b, s = args.batch, args.latent
    x = jnp.zeros((b, s, s, 4), jnp.float32)
    ctx = jnp.zeros((b, 77, config.context_dim), jnp.float32)
    t = jnp.full((b,), 500, jnp.int32)
    abstract = abstract_params(unet, x[:1], t[:1], ctx[:1])
    rng = np.random.default_rng(0)
    # on the device once, as torch's weights live in its module (numpy leaves would be copied
    # into every call: ~0.7 s of a 10 s forward)
    params = jax.device_put(jax.tree.map(
        lambda a: WEIGHT_SCALE * rng.standard_normal(a.shape, dtype=np.float32), abstract
    ))
    x = jnp.asarray(rng.standard_normal(x.shape, dtype=np.float32))
    ctx = jnp.asarray(rng.standard_normal(ctx.shape, dtype=np.float32))
    options = compiler_options()
    fwd = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c), compiler_options=options)
    start = time.perf_counter()
    lowered = fwd.lower(params, x, t, ctx)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    flops = (lowered.cost_analysis() or {}).get("flops")
    times = []
    for _ in range(args.repeats + 1):  # the first call warms up
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, x, t, ctx))
        times.append(time.perf_counter() - start)
    return {
        "compile_s": compile_s,
        "times": times[1:],
        "warmup_s": times[0],
        "gflops": None if flops is None else flops / 1e9,
        "versions": f"jax {jax.__version__}",
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "compiler_options": options,
        "attention": args.attention,
    }


def measure_torch(args) -> dict:
    import diffusers
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0

    from ldm_jax.checkpoints.diffusers.unet import diffusers_unet_config

    config = unet_config(args.model)
    _, kwargs = diffusers_unet_config(config)
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**kwargs).eval()
    unet.set_attn_processor(AttnProcessor2_0())  # SDPA
    b, s = args.batch, args.latent
    x = torch.randn(b, 4, s, s)
    ctx = torch.randn(b, 77, config.context_dim)
    t = torch.full((b,), 500)
    times = []
    with torch.inference_mode():
        for _ in range(args.repeats + 1):
            start = time.perf_counter()
            unet(x, t, encoder_hidden_states=ctx)
            times.append(time.perf_counter() - start)
    return {
        "times": times[1:],
        "warmup_s": times[0],
        "versions": f"torch {torch.__version__}, diffusers {diffusers.__version__}",
        "threads": torch.get_num_threads(),
    }


def run_side(side: str, args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--measure", side]
    for name in ("model", "batch", "latent", "repeats", "attention"):
        command += [f"--{name}", str(getattr(args, name))]
    env = dict(os.environ)
    if side == "jax" and args.xla_flags:
        env["XLA_FLAGS"] = args.xla_flags
    env.setdefault("JAX_PLATFORMS", "cpu")
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"the {side} measurement failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("sd15", "tiny"), default="sd15")
    parser.add_argument("--side", choices=("both", "jax", "torch"), default="both")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--latent", type=int, default=64, help="latent height = width")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="alternate the sides this often")
    parser.add_argument(
        "--attention", default="default", help="ours' attention implementation (default: JAX's)"
    )
    parser.add_argument("--xla-flags", default="", help="XLA_FLAGS for ours' process")
    parser.add_argument("--measure", choices=("jax", "torch"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.measure:
        measure = measure_jax if args.measure == "jax" else measure_torch
        print(json.dumps(measure(args)))
        return
    sides = ("jax", "torch") if args.side == "both" else (args.side,)
    print(
        f"UNet {args.model}, batch {args.batch}, {args.latent}x{args.latent} latents, fp32, "
        f"median of {args.repeats} calls after one warm-up, {args.rounds} round(s); load average "
        f"before: {os.getloadavg()[0]:.1f}"
    )
    per_round = {side: [] for side in sides}  # each round's median seconds per forward
    for round_index in range(args.rounds):
        for side in sides:
            r = run_side(side, args)
            per_round[side].append(statistics.median(r["times"]))
            extra = ""
            if side == "jax":
                extra = (
                    f", compile {r['compile_s']:.1f} s, {r['gflops']:.0f} GFLOP, attention "
                    f"{r['attention']}, compiler_options={r['compiler_options']}, "
                    f"XLA_FLAGS={r['xla_flags']!r}"
                )
            print(
                f"round {round_index + 1} {side}: {per_round[side][-1]:.2f} s per forward "
                f"(calls {', '.join(f'{t:.2f}' for t in r['times'])}; warm-up "
                f"{r['warmup_s']:.2f}){extra}; {r['versions']}; load average "
                f"{os.getloadavg()[0]:.1f}",
                flush=True,
            )
    for side in sides:
        print(f"{side}: {statistics.median(per_round[side]):.2f} s per forward (median of rounds)")
    if len(sides) == 2:
        ratio = statistics.median(per_round["jax"]) / statistics.median(per_round["torch"])
        print(f"ours / torch seconds: {ratio:.2f} (< 1: ours faster)")


if __name__ == "__main__":
    main()
