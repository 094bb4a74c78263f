"""Per-device memory of the Stable Diffusion 1.5 (or, with --model sdxl, SDXL base) train step
under FSDP, from XLA's compiler.

Builds the SD 1.5 networks (UNet "sd-v1" trained; CLIP ViT-L/14 text + SD VAE frozen) abstractly,
lowers the sharded LDM train step with ShapeDtypeStruct inputs only (no parameter is ever
materialised) on N fake CPU devices, compiles it and prints `compiled.memory_analysis()` per device:
arguments (state + frozen params + batch shards), outputs, aliased (the donated state), temporaries,
and their total = arguments + outputs - aliased + temporaries. One row per input kind (512 px images
encoded by the VAE inside the step, or precomputed latents) x remat policy x compute dtype.

Two things make the CPU figure mean what a TPU would see:
- attention: the default dispatcher (`attention="auto"`) takes the blocked (flash-style) path for
  the 64x64 and 32x32 levels on CPU, standing in for cuDNN / splash on an accelerator: no
  [B, N, T, S] logits, and a backward pass that recomputes its tiles;
- the scheduler: XLA:CPU's default scheduler optimises for concurrency and keeps the forward
  pass's values alive as long as it likes, so remat showed no saving (78.0 vs 78.1 GiB). With
  `--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED` (`--scheduler memory`, the
  default here) the saving shows, as on TPU/GPU whose schedulers minimise peak memory.
A second, backend-independent figure is printed per row: the bytes the forward pass keeps for the
backward pass (the jaxpr's residuals of the UNet loss at the per-device batch,
`jax._src.ad_checkpoint.saved_residuals`), which is what remat policies change.

    python benchmarks/train_memory.py [--devices 8] [--per-device-batch 8] [--resolution 512]
        [--inputs latents,image] [--remat none,blocks,save_dots_no_batch] [--dtypes bfloat16]
        [--scheduler memory|concurrency] [--attention auto] [--model sd15|sdxl] [--tiny]
        [--lora 0,16]

--lora R: LoRA training of rank R on the UNet's attention projections (to_q, to_k, to_v,
to_out.0; configs/lora_sd15.py) instead of the UNet itself: every network frozen (sharded the
same way), only the adapters and their AdamW moments (and EMA) in the state; 0 = full
fine-tuning. A comma list gives one row each.

SDXL (--model sdxl): the sdxl-base preset (UNet 2.57 B trained; CLIP ViT-L + OpenCLIP bigG and
the VAE frozen) at 1024 px, tokens [B, 2, 77] and the size/crop ids in the batch, as
configs/sdxl_finetune.py trains it.
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
    parser.add_argument("--resolution", type=int, default=None,
                        help="image size (latents / 8); default 512 (sd15), 1024 (sdxl)")
    parser.add_argument("--inputs", default="latents,image")
    parser.add_argument("--remat", default="none,blocks,save_dots_no_batch")
    parser.add_argument("--dtypes", default="bfloat16")
    parser.add_argument("--scheduler", choices=("memory", "concurrency"), default="memory",
                        help="XLA:CPU scheduler (memory: the one whose peak reflects remat)")
    parser.add_argument("--attention", default="auto", help="attention implementation")
    parser.add_argument("--tiny", action="store_true", help="tiny networks (a smoke test)")
    parser.add_argument("--lora", default="0",
                        help="LoRA ranks to measure (0 = full fine-tuning), e.g. 0,16")
    parser.add_argument("--args-only", action="store_true",
                        help="no compile: per-device bytes of the sharded state and frozen params "
                             "from their shardings (seconds, where a full SDXL compile takes long)")
    parser.add_argument("--model", choices=("sd15", "sdxl"), default="sd15",
                        help="sd15: SD 1.5 (UNet sd-v1); sdxl: the sdxl-base preset (both text "
                             "encoders frozen, size/crop time ids, resolution default 1024)")
    return parser.parse_args(argv)


def sd15_spec():
    from ldm_jax.presets.autoencoders import SD_VAE
    from ldm_jax.presets.text_encoders import CLIP_TEXT_PRESETS
    from ldm_jax.presets.unets import UNET_PRESETS
    from ldm_jax.spec import CondStageSpec, ModelSpec

    clip = CondStageSpec("clip", CLIP_TEXT_PRESETS["clip-vit-l-14"])
    return ModelSpec(first_stage=SD_VAE, unet=UNET_PRESETS["sd-v1"], cond_stage=clip)


def sdxl_spec():
    from ldm_jax.presets.sdxl import SDXL_PRESETS

    return SDXL_PRESETS["sdxl-base"]


def tiny_spec(model: str = "sd15"):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from support.tiny_specs import MICRO_SDXL, SD1_LIKE

    return MICRO_SDXL if model == "sdxl" else SD1_LIKE


def text_inputs(spec, batch: int, sharding) -> tuple:
    """The batch's text entries (ShapeDtypeStructs) and the null tokens for dropout: tokens
    [B, T] for a CLIP tower; SDXL: tokens [B, 2, T] and the size/crop ids [B, 2]."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    cond = spec.cond_stage
    if cond.kind != "sdxl":
        length = cond.config.max_length
        tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=sharding)
        return {"tokens": tokens}, np.zeros(length, np.int32)
    encoders, length = len(cond.config.text_encoders), cond.config.text_encoders[0].max_length
    pair = jax.ShapeDtypeStruct((batch, 2), jnp.int32, sharding=sharding)
    tokens = jax.ShapeDtypeStruct((batch, encoders, length), jnp.int32, sharding=sharding)
    entries = {"tokens": tokens, "original_size": pair, "crop_top_left": pair}
    return entries, np.zeros((encoders, length), np.int32)


def lora_training(spec, rank: int):
    """The LoRATraining of configs/lora_sd15.py's targets at `rank` (None for 0: full)."""
    import ml_collections

    from ldm_jax.training.lora_setup import lora_from_config

    if rank == 0:
        return None
    targets = ("to_q", "to_k", "to_v", "to_out.0")
    config = ml_collections.ConfigDict(dict(rank=rank, alpha=float(rank), unet_targets=targets,
                                            text_encoder_targets=(), export_formats=()))
    return lora_from_config(config, spec)


def compile_step(spec, mesh, inputs: str, remat: str, dtype: str, batch: int, resolution: int,
                 attention: str = "auto", lora_rank: int = 0):
    """(the LDM train step compiled from ShapeDtypeStructs only, compile seconds, its cfg)."""
    import jax
    import jax.numpy as jnp

    from ldm_jax.training.ldm_step import (
        LDMTrainConfig,
        ldm_state_shardings,
        make_ldm_train_step,
    )
    from ldm_jax.training.optimizer import make_optimizer
    from ldm_jax.training.sharding import batch_sharding

    cfg = LDMTrainConfig(compute_dtype=dtype, remat=remat, cond_drop_prob=0.1,
                         attention=None if attention == "auto" else attention,
                         lora=lora_training(spec, lora_rank))
    tx, schedule = make_optimizer(dict(learning_rate=1e-4))
    sharding = batch_sharding(mesh)
    text, null = text_inputs(spec, batch, sharding)
    step = make_ldm_train_step(spec, cfg, tx, schedule, mesh, null_tokens=null)
    state, frozen = ldm_state_shardings(spec, cfg, tx, mesh)
    f = spec.first_stage.downsample_factor
    if inputs == "image":
        x = jax.ShapeDtypeStruct((batch, resolution, resolution, 3), jnp.float32, sharding=sharding)
    else:
        size = resolution // f
        x = jax.ShapeDtypeStruct((batch, size, size, spec.first_stage.embed_dim), jnp.float32,
                                 sharding=sharding)  # fmt: skip
    rng = jax.eval_shape(lambda: jax.random.key(0))
    start = time.perf_counter()
    compiled = step.lower(state, frozen, {inputs: x, **text}, rng).compile()
    return compiled, time.perf_counter() - start, cfg


def memory_row(compiled, **fields) -> dict:
    """compiled.memory_analysis() / cost_analysis() per device, in GiB and TFLOP."""
    mem = compiled.memory_analysis()
    args, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
    alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return dict(
        args=args / GIB,
        out=out / GIB,
        alias=alias / GIB,
        temp=temp / GIB,
        total=(args + out - alias + temp) / GIB,
        tflops=float((cost or {}).get("flops", float("nan"))) / 1e12,
        **fields,
    )


def measure(spec, mesh, inputs: str, remat: str, dtype: str, batch: int, resolution: int,
            attention: str = "auto", lora_rank: int = 0) -> dict:
    compiled, seconds, cfg = compile_step(spec, mesh, inputs, remat, dtype, batch, resolution,
                                          attention, lora_rank)
    return memory_row(
        compiled, inputs=inputs, trained=f"LoRA r{lora_rank}" if lora_rank else "full",
        remat=remat, dtype=dtype, compile_s=seconds,
        residuals=unet_residual_bytes(spec, cfg, batch // mesh.size, resolution) / GIB,
    )  # fmt: skip


def sharded_argument_bytes(spec, mesh, dtype: str, lora_rank: int = 0) -> dict:
    """Largest per-device bytes of the train state (params, AdamW moments, EMA: fp32) and the
    frozen params, from the shardings the FSDP rules give them (no compile, no memory)."""
    import numpy as np

    from ldm_jax.training.ldm_step import LDMTrainConfig, ldm_state_shardings
    from ldm_jax.training.optimizer import make_optimizer

    cfg = LDMTrainConfig(compute_dtype=dtype, lora=lora_training(spec, lora_rank))
    tx, _ = make_optimizer(dict(learning_rate=1e-4))
    state, frozen = ldm_state_shardings(spec, cfg, tx, mesh)

    def per_device(tree) -> int:
        import jax

        return sum(
            int(np.prod(a.sharding.shard_shape(a.shape))) * np.dtype(a.dtype).itemsize
            for a in jax.tree.leaves(tree) if hasattr(a, "sharding")
        )

    def whole(tree) -> int:
        import jax

        return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
                   for a in jax.tree.leaves(tree) if hasattr(a, "shape"))

    return {
        "state": per_device(state), "frozen": per_device(frozen),
        "state_whole": whole(state), "frozen_whole": whole(frozen),
    }


def unet_residual_bytes(spec, cfg, per_device_batch: int, resolution: int) -> int:
    """Bytes of the values the UNet loss's forward pass keeps for its backward pass at one
    device's batch (arguments such as the params excluded): what remat policies trade."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax._src.ad_checkpoint import saved_residuals

    from ldm_jax.training.ldm_step import ldm_modules

    unet, _ = ldm_modules(spec, cfg)["unet"]
    u = spec.unet
    size = resolution // spec.first_stage.downsample_factor
    x = jax.ShapeDtypeStruct((per_device_batch, size, size, u.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((per_device_batch,), jnp.int32)
    context = jax.ShapeDtypeStruct((per_device_batch, 77, u.context_dim), jnp.float32)
    y = (None if u.adm_in_channels is None else  # SDXL's text_time vector
         jax.ShapeDtypeStruct((per_device_batch, u.adm_in_channels), jnp.float32))
    params = jax.eval_shape(unet.init, jax.random.key(0), x, t, context, y)["params"]
    params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, jnp.float32),
                          nn_unbox(params))

    def loss(params, x, t, context, y):
        out = unet.apply({"params": params}, x, t, context, y)
        return jnp.mean(jnp.square(out.astype(jnp.float32)))

    kept = saved_residuals(loss, params, x, t, context, y)
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
               for a, where in kept if "from the argument" not in where)


def block_transient_bytes(spec, dtype: str, per_device_batch: int, resolution: int) -> dict:
    """XLA:CPU temporaries of one first-level block's forward + backward at one device's batch
    (a ResBlock, and the SpatialTransformer at the largest latent): what recomputing the largest
    block costs on top of what the forward pass kept, when remat recomputes one block at a time."""
    import jax
    import jax.numpy as jnp

    from ldm_jax.models.attention import SpatialTransformer
    from ldm_jax.models.unet import attention_heads
    from ldm_jax.models.unet_blocks import ResBlock
    from ldm_jax.training.ldm_step import COMPUTE_DTYPES

    u = spec.unet
    d = COMPUTE_DTYPES[dtype]
    channels = u.model_channels * u.channel_mult[0]
    size = resolution // spec.first_stage.downsample_factor
    x = jax.ShapeDtypeStruct((per_device_batch, size, size, channels), jnp.float32)
    emb = jax.ShapeDtypeStruct((per_device_batch, u.time_embed_dim), jnp.float32)
    context = jax.ShapeDtypeStruct((per_device_batch, 77, u.context_dim or channels), jnp.float32)
    heads, head_dim = attention_heads(u, channels)
    blocks = {
        "ResBlock": (ResBlock(channels, u.use_scale_shift_norm, dtype=d), (x, emb)),
        "SpatialTransformer": (
            SpatialTransformer(heads, head_dim, depth=1, context_dim=u.context_dim, dtype=d),
            (x, context),
        ),
    }
    out = {}
    for name, (module, inputs) in blocks.items():
        params = jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]
        params = nn_unbox(params)

        def loss(params, *inputs, module=module):
            y = module.apply({"params": params}, *inputs)
            return jnp.mean(jnp.square(y.astype(jnp.float32)))

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, *inputs).compile()
        out[name] = compiled.memory_analysis().temp_size_in_bytes
    return out


def nn_unbox(tree):
    import flax.linen as nn

    return nn.meta.unbox(tree)


HEADER = (
    "| input | trained | remat | compute | args GiB | outputs GiB | aliased GiB | temps GiB "
    "| total GiB | kept for backward GiB | TFLOP/device/step | compile s |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def row(r: dict) -> str:
    return (
        f"| {r['inputs']} | {r['trained']} | {r['remat']} | {r['dtype']} | {r['args']:.2f} "
        f"| {r['out']:.2f} "
        f"| {r['alias']:.2f} | {r['temp']:.2f} | {r['total']:.2f} | {r['residuals']:.2f} "
        f"| {r['tflops']:.2f} "
        f"| {r['compile_s']:.0f} |"
    )


def main(argv=None) -> None:
    args = _parse(argv)
    flags = os.environ.get("XLA_FLAGS", "")
    flags += f" --xla_force_host_platform_device_count={args.devices}"
    if args.scheduler == "memory":
        flags += " --xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"
    os.environ["XLA_FLAGS"] = flags
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from ldm_jax.models.factory import abstract_checkpoint_params
    from ldm_jax.models.params import count_params
    from ldm_jax.training.sharding import make_mesh

    spec = tiny_spec(args.model) if args.tiny else {"sd15": sd15_spec, "sdxl": sdxl_spec}[
        args.model]()
    if args.resolution is None:
        args.resolution = 1024 if args.model == "sdxl" else 512
    mesh = make_mesh(("data", "fsdp", "tensor"), (1, -1, 1))
    batch = args.per_device_batch * args.devices
    counts = {k: count_params(v) for k, v in abstract_checkpoint_params(spec).items()}
    print(
        f"jax {jax.__version__}, {jax.device_count()} fake CPU devices, mesh {dict(mesh.shape)}, "
        f"{args.scheduler} scheduler, attention {args.attention}; "
        f"global batch {batch} ({args.per_device_batch}/device), {args.resolution} px; "
        f"params {counts} (UNet trained with AdamW + EMA, the rest frozen)",
        flush=True,
    )
    ranks = [int(r) for r in args.lora.split(",")]
    if args.args_only:
        for rank in ranks:
            b = sharded_argument_bytes(spec, mesh, args.dtypes.split(",")[0], rank)
            name = f"LoRA r{rank}" if rank else "full"
            print(f"{name}: per device: train state {b['state'] / GIB:.3f} GiB (whole "
                  f"{b['state_whole'] / GIB:.2f}), frozen params {b['frozen'] / GIB:.3f} GiB "
                  f"(whole {b['frozen_whole'] / GIB:.2f}); total "
                  f"{(b['state'] + b['frozen']) / GIB:.3f} GiB before gradients and activations")
        return
    rows = []
    for inputs in args.inputs.split(","):
        for remat in args.remat.split(","):
            for dtype in args.dtypes.split(","):
                for rank in ranks:
                    r = measure(spec, mesh, inputs, remat, dtype, batch, args.resolution,
                                args.attention, rank)
                    print(row(r), flush=True)
                    rows.append(r)
    print("\n" + HEADER)
    for r in rows:
        print(row(r))
    per_device = args.per_device_batch
    if spec.cond_stage.kind == "sdxl":  # its first level has no transformer: no derived bound
        return
    for dtype in args.dtypes.split(","):
        transients = block_transient_bytes(spec, dtype, per_device, args.resolution)
        largest = max(transients.values()) / GIB
        print(f"\none first-level block's forward + backward at {per_device} images, {dtype} "
              f"(XLA:CPU temporaries): " +
              ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in transients.items()))
        for r in rows:
            if r["dtype"] == dtype and r["remat"] != "none":
                state = r["args"] + r["out"] - r["alias"]
                derived = state + r["residuals"] + largest
                print(f"derived per-device peak, {r['inputs']} / remat {r['remat']}: state "
                      f"{state:.2f} + kept {r['residuals']:.2f} + largest block {largest:.2f} = "
                      f"{derived:.2f} GiB (XLA:CPU whole step: {r['total']:.2f})")


if __name__ == "__main__":
    main()
