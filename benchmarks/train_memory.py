"""Per-device memory of the Stable Diffusion 1.5 train step under FSDP, from XLA's compiler.

Builds the SD 1.5 networks (UNet "sd-v1" trained; CLIP ViT-L/14 text + SD VAE frozen) abstractly,
lowers the sharded LDM train step with ShapeDtypeStruct inputs only (no parameter is ever
materialised) on N fake CPU devices, compiles it and prints `compiled.memory_analysis()` per device:
arguments (state + frozen params + batch shards), outputs, aliased (the donated state), temporaries,
and their total = arguments + outputs - aliased + temporaries. One row per input kind (512 px images
encoded by the VAE inside the step, or precomputed latents) x remat x compute dtype.

    python benchmarks/train_memory.py [--devices 8] [--per-device-batch 8] [--resolution 512]
        [--inputs latents,image] [--remat none,blocks] [--dtypes float32]
"""

import argparse
import os
import sys
import time

GIB = 2**30


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8, help="fake CPU devices (fsdp axis)")
    parser.add_argument("--per-device-batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=512, help="image size (latents / 8)")
    parser.add_argument("--inputs", default="latents,image")
    parser.add_argument("--remat", default="none,blocks")
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--tiny", action="store_true", help="tiny networks (a smoke test)")
    return parser.parse_args(argv)


def sd15_spec():
    from ldm_jax.presets.autoencoders import SD_VAE
    from ldm_jax.presets.text_encoders import CLIP_TEXT_PRESETS
    from ldm_jax.presets.unets import UNET_PRESETS
    from ldm_jax.spec import CondStageSpec, ModelSpec

    clip = CondStageSpec("clip", CLIP_TEXT_PRESETS["clip-vit-l-14"])
    return ModelSpec(first_stage=SD_VAE, unet=UNET_PRESETS["sd-v1"], cond_stage=clip)


def tiny_spec():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from support.tiny_specs import SD1_LIKE

    return SD1_LIKE


def measure(spec, mesh, inputs: str, remat: str, dtype: str, batch: int, resolution: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ldm_jax.training.ldm_step import (
        LDMTrainConfig,
        ldm_state_shardings,
        make_ldm_train_step,
    )
    from ldm_jax.training.optimizer import make_optimizer
    from ldm_jax.training.sharding import batch_sharding

    cfg = LDMTrainConfig(compute_dtype=dtype, remat=remat, cond_drop_prob=0.1)
    tx, schedule = make_optimizer(dict(learning_rate=1e-4))
    clip = spec.cond_stage.config
    null = np.zeros(clip.max_length, np.int32)
    step = make_ldm_train_step(spec, cfg, tx, schedule, mesh, null_tokens=null)
    state, frozen = ldm_state_shardings(spec, cfg, tx, mesh)
    sharding = batch_sharding(mesh)
    f = spec.first_stage.downsample_factor
    if inputs == "image":
        x = jax.ShapeDtypeStruct((batch, resolution, resolution, 3), jnp.float32, sharding=sharding)
    else:
        size = resolution // f
        x = jax.ShapeDtypeStruct((batch, size, size, spec.first_stage.embed_dim), jnp.float32,
                                 sharding=sharding)  # fmt: skip
    tokens = jax.ShapeDtypeStruct((batch, clip.max_length), jnp.int32, sharding=sharding)
    start = time.perf_counter()
    compiled = step.lower(state, frozen, {inputs: x, "tokens": tokens}, jax.random.key(0)).compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    args, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
    alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return dict(
        inputs=inputs,
        remat=remat,
        dtype=dtype,
        args=args / GIB,
        out=out / GIB,
        alias=alias / GIB,
        temp=temp / GIB,
        total=(args + out - alias + temp) / GIB,
        tflops=float((cost or {}).get("flops", float("nan"))) / 1e12,
        compile_s=seconds,
    )


HEADER = (
    "| input | remat | compute | args GiB | outputs GiB | aliased GiB | temps GiB | total GiB "
    "| TFLOP/device/step | compile s |\n|---|---|---|---|---|---|---|---|---|---|"
)


def row(r: dict) -> str:
    return (
        f"| {r['inputs']} | {r['remat']} | {r['dtype']} | {r['args']:.2f} | {r['out']:.2f} "
        f"| {r['alias']:.2f} | {r['temp']:.2f} | {r['total']:.2f} | {r['tflops']:.2f} "
        f"| {r['compile_s']:.0f} |"
    )


def main(argv=None) -> None:
    args = _parse(argv)
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from ldm_jax.models.factory import abstract_checkpoint_params
    from ldm_jax.models.params import count_params
    from ldm_jax.training.sharding import make_mesh

    spec = tiny_spec() if args.tiny else sd15_spec()
    mesh = make_mesh(("data", "fsdp", "tensor"), (1, -1, 1))
    batch = args.per_device_batch * args.devices
    counts = {k: count_params(v) for k, v in abstract_checkpoint_params(spec).items()}
    print(
        f"jax {jax.__version__}, {jax.device_count()} fake CPU devices, mesh {dict(mesh.shape)}; "
        f"global batch {batch} ({args.per_device_batch}/device), {args.resolution} px; "
        f"params {counts} (UNet trained with AdamW + EMA, the rest frozen)",
        flush=True,
    )
    rows = []
    for inputs in args.inputs.split(","):
        for remat in args.remat.split(","):
            for dtype in args.dtypes.split(","):
                r = measure(spec, mesh, inputs, remat, dtype, batch, args.resolution)
                print(row(r), flush=True)
                rows.append(r)
    print("\n" + HEADER)
    for r in rows:
        print(row(r))


if __name__ == "__main__":
    main()
