"""One-shot GPU benchmark suite: ldm_jax against diffusers PyTorch at Stable Diffusion 1.5 shapes.

Random weights with the shapes of the presets (UNet "sd-v1", VAE "kl-f8", CLIP ViT-L/14 text),
512x512 images (64x64x4 latents), bf16 compute. Measured, in priority order (a time guard skips
what no longer fits, so the most important rows come first):

- the bf16 matmul rate of this device (the peak that MFU is taken against), both frameworks;
- UNet train step (noise-prediction loss, forward + backward + AdamW, fp32 master weights, bf16
  compute), with and without rematerialisation;
- 50-step DDIM sampling with classifier-free guidance 7.5 at batch 1 and 8: text encoder, the
  guided loop and the VAE decode, uint8 images on the host (ours: `LatentDiffusionPipeline`;
  torch: the same loop as diffusers' StableDiffusionPipeline, DDIMScheduler, no tokenizer);
- UNet forward (batch 8 with cuDNN and with XLA attention as a before/after, batch 2);
- VAE decode and encode (batch 1, 512x512) and the CLIP text encoder (batch 1).

For each row: median seconds per call (groups of back-to-back calls, one sync per group), images
per second, compile seconds (ours: lower + compile; sampling: first call minus steady call), model
FLOPs from XLA's cost analysis of the same programs lowered for the CPU platform from abstract
inputs (`count_model_flops`, run by the driver alongside; a GPU lowering reports no FLOPs and a
compiled GPU program hides its cuDNN convolutions from the count), MFU of both sides against the
measured JAX matmul peak, XLA's memory estimate for the program (arguments + outputs + temporaries)
and peak device memory (JAX: the process' running peak; torch: per row). A probe first compiles
cuDNN flash attention (forward + gradient) at every UNet attention shape and falls back to XLA
attention everywhere if it fails. The two frameworks run one after the other in fresh processes
(JAX first unless --torch-first), each writing its JSON under --out after every row; the driver
prints one merged table with ours-over-torch speed ratios and writes results.json / results.md.
Every case together needs about 11 minutes on an H200 (JAX ~7, torch ~3, compile included): pick
rows with --only (run in the order given) to fit one call.

    # GPU (the device image has no diffusers: install the carried wheel first)
    PYTHONPATH=/tmp/site:. python3 benchmarks/gpu_suite.py --out $OUT --budget 470
    # CPU smoke test of every code path with tiny models
    python benchmarks/gpu_suite.py --tiny --out /tmp/gpu_suite
"""

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

PROMPT = "a photograph of an astronaut riding a horse"
GUIDANCE = 7.5
STEPS = 50
WEIGHT_SCALE = 0.02  # std of the random weights (larger overflows SD 1.5's deep stacks)
# XLA flags for the JAX process (appended to any XLA_FLAGS already set). The latency-hiding
# scheduler overlaps async work (collectives, copies) with compute; on one GPU it mostly orders
# async copies and is harmless.
XLA_GPU_FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true",)

# (case name, kind, batch, options); the order is the priority order.
CASES = (
    ("train_b{tb}", "train", "tb", {"remat": False}),
    ("sample_b1", "sample", 1, {}),
    ("sample_b8", "sample", 8, {}),
    ("unet_fwd_b8", "unet_fwd", 8, {}),
    ("unet_fwd_b8_xla_attn", "unet_fwd", 8, {"attention": "xla"}),
    ("train_b{tb}_remat", "train", "tb", {"remat": True}),
    ("vae_decode_b1", "vae_decode", 1, {}),
    ("unet_fwd_b2", "unet_fwd", 2, {}),
    ("vae_encode_b1", "vae_encode", 1, {}),
    ("clip_text_b1", "clip_text", 1, {}),
)
# Seconds a case needs (compile + runs) on an H200 (measured 2026-11-26) until one of its kind has
# run (then that one's wall time counts); the guard skips a case that no longer fits.
ESTIMATE_S = {
    "jax": {"train": 95, "sample": 55, "unet_fwd": 30, "vae_decode": 20, "vae_encode": 15,
            "clip_text": 8},
    "torch": {"train": 45, "sample": 20, "unet_fwd": 12, "vae_decode": 6, "vae_encode": 6,
              "clip_text": 3},
}  # fmt: skip


def case_list(train_batch: int) -> list[dict]:
    out = []
    for name, kind, batch, options in CASES:
        batch = train_batch if batch == "tb" else batch
        out.append({"name": name.format(tb=train_batch), "kind": kind, "batch": batch} | options)
    return out


# --- the models --------------------------------------------------------------------------------
def model_configs(tiny: bool) -> dict:
    """{"unet", "vae", "text"} configs and the image size; `tiny` for the CPU smoke test."""
    if not tiny:
        from ldm_jax.presets.autoencoders import SD_VAE
        from ldm_jax.presets.text_encoders import CLIP_TEXT_PRESETS
        from ldm_jax.presets.unets import UNET_PRESETS

        return {
            "unet": UNET_PRESETS["sd-v1"],
            "vae": SD_VAE,
            "text": CLIP_TEXT_PRESETS["clip-vit-l-14"],
            "image": 512,
        }
    from ldm_jax.models.autoencoder import AutoencoderConfig
    from ldm_jax.models.clip_text import CLIPTextConfig
    from ldm_jax.models.unet import UNetConfig

    return {
        "unet": UNetConfig(
            in_channels=4,
            out_channels=4,
            model_channels=32,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_resolutions=(1, 2),
            num_heads=2,
            use_spatial_transformer=True,
            context_dim=64,
            legacy=False,
        ),
        "vae": AutoencoderConfig(
            ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=32, z_channels=4, embed_dim=4
        ),
        "text": CLIPTextConfig(
            vocab_size=49408, max_length=77, width=64, num_layers=2, num_heads=1, mlp_dim=128
        ),
        "image": 32,
    }


def model_spec(configs: dict):
    from ldm_jax.checkpoints.spec import CondStageSpec, DiffusionSpec, ModelSpec

    latent = configs["image"] // configs["vae"].downsample_factor
    return ModelSpec(
        first_stage=configs["vae"],
        unet=configs["unet"],
        cond_stage=CondStageSpec("clip", configs["text"]),
        diffusion=DiffusionSpec(latent_size=latent),
    )


def count_model_flops(tiny: bool, train_batch: int, steps: int) -> dict:
    """Model FLOPs of every case from XLA's cost analysis of the program lowered for the CPU
    platform from abstract inputs (nothing is allocated or compiled; XLA attention, no remat).

    GPU lowerings report no FLOPs, and a compiled GPU program's count depends on which kernels
    XLA picked; the lowered count is the arithmetic of the model itself. Sampling is
    steps x UNet(2B) + text encoder(2B) + VAE decode(B), every op being linear in the batch.
    """
    import jax
    import jax.numpy as jnp
    import optax

    from ldm_jax.checkpoints.networks import abstract_checkpoint_params
    from ldm_jax.diffusion import make_schedule
    from ldm_jax.diffusion.schedules import q_sample
    from ldm_jax.models.autoencoder import AutoencoderKL
    from ldm_jax.models.clip_text import CLIPTextTransformer
    from ldm_jax.models.unet import UNet

    configs = model_configs(tiny)
    spec = model_spec(configs)
    image, latent = configs["image"], spec.diffusion.latent_size
    ctx_len, ctx_dim = configs["text"].max_length, configs["unet"].context_dim
    bf16, f32 = jnp.bfloat16, jnp.float32
    abstract = abstract_checkpoint_params(spec)

    def cast(tree, dtype):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype), tree)

    def flops(fn, *args):
        lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cpu",))
        cost = lowered.cost_analysis()
        return float((cost[0] if isinstance(cost, list | tuple) else cost)["flops"])

    def sds(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype)

    unet = UNet(configs["unet"], dtype=bf16, attention_implementation="xla")
    u16, u32 = cast(abstract["unet"], bf16), cast(abstract["unet"], f32)

    def unet_fwd(b):
        return flops(
            lambda p, x, t, c: unet.apply({"params": p}, x, t, c),
            u16, sds((b, latent, latent, 4), f32), sds((b,), jnp.int32),
            sds((b, ctx_len, ctx_dim), bf16),
        )  # fmt: skip

    schedule = make_schedule()
    optimizer = optax.adamw(1e-5, weight_decay=1e-2)

    def train(p, opt_state, x0, ctx, rng):
        def loss_fn(p):
            k1, k2 = jax.random.split(rng)
            t = jax.random.randint(k1, (x0.shape[0],), 0, 1000)
            noise = jax.random.normal(k2, x0.shape, f32)
            pred = unet.apply({"params": p}, q_sample(schedule, x0, t, noise), t, ctx)
            return jnp.mean(jnp.square(pred.astype(f32) - noise))

        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    b = train_batch
    train_flops = flops(
        train, u32, jax.eval_shape(optimizer.init, u32), sds((b, latent, latent, 4), f32),
        sds((b, ctx_len, ctx_dim), bf16), jax.eval_shape(lambda: jax.random.key(0)),
    )  # fmt: skip
    text = CLIPTextTransformer(configs["text"], dtype=bf16)
    text_1 = flops(
        lambda p, i: text.apply({"params": p}, i).last_hidden_state,
        cast(abstract["cond_stage"], bf16), sds((1, ctx_len), jnp.int32),
    )  # fmt: skip
    vae = AutoencoderKL(configs["vae"], dtype=bf16)
    fs16 = cast(abstract["first_stage"], bf16)
    decode_1 = flops(
        lambda p, z: vae.apply({"params": p}, z, method="decode"),
        fs16, sds((1, latent, latent, 4), bf16),
    )  # fmt: skip
    encode_1 = flops(
        lambda p, x: vae.apply({"params": p}, x, method="encode").mean,
        fs16, sds((1, image, image, 3), bf16),
    )  # fmt: skip
    fwd_1 = unet_fwd(1)
    out = {
        "unet_fwd_b1": fwd_1,
        "unet_fwd_b8": unet_fwd(8),
        "train": train_flops,
        "text_b1": text_1,
        "vae_decode_b1": decode_1,
        "vae_encode_b1": encode_1,
    }
    for batch in (1, 8):
        out[f"sample_b{batch}"] = (
            steps * 2 * batch * fwd_1 + 2 * batch * text_1 + batch * decode_1
        )
    return out


# --- small helpers shared by both measurement processes ------------------------------------------
class Results:
    """Rows of one process, rewritten atomically to a JSON file after every row."""

    def __init__(self, path: Path, info: dict):
        self.path, self.data = path, {"info": info, "rows": {}}
        self.save()

    def add(self, name: str, row: dict) -> None:
        self.data["rows"][name] = row
        self.save()
        print(f"[{self.path.stem}] {name}: {json.dumps(row)}", flush=True)

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


def time_groups(run_once, sync, *, group_s: float = 0.4, groups: int = 3) -> dict:
    """Median seconds per call over `groups` groups of back-to-back calls (one sync per group).

    Calls inside a group are not synchronised, so host dispatch overlaps device work as in a
    training loop; the caller has already warmed up (compiled) the call.
    """
    start = time.perf_counter()
    sync(run_once())
    single = time.perf_counter() - start
    per_group = max(1, min(20, int(group_s / max(single, 1e-6))))
    seconds = []
    for _ in range(groups):
        start = time.perf_counter()
        for _ in range(per_group):
            out = run_once()
        sync(out)
        seconds.append((time.perf_counter() - start) / per_group)
    return {"s": statistics.median(seconds), "s_all": seconds, "calls_per_group": per_group}


def gib(n) -> float | None:
    return None if n is None else round(n / 2**30, 3)


# --- JAX ---------------------------------------------------------------------------------------
def run_jax(args) -> None:
    import flax
    import jax
    import jax.numpy as jnp
    import jaxlib
    import numpy as np
    import optax

    from ldm_jax.checkpoints.networks import abstract_checkpoint_params
    from ldm_jax.checkpoints.spec import LatentDiffusionCheckpoint
    from ldm_jax.diffusion import make_schedule
    from ldm_jax.diffusion.schedules import q_sample
    from ldm_jax.models.autoencoder import AutoencoderKL
    from ldm_jax.models.clip_text import CLIPTextTransformer
    from ldm_jax.models.unet import UNet
    from ldm_jax.pipeline import LatentDiffusionPipeline
    from ldm_jax.tokenizers.clip import CLIPTokenizer

    deadline = args.deadline
    device = jax.local_devices()[0]
    gpu = device.platform == "gpu"
    fast_attention = "cudnn" if gpu else "xla"  # cuDNN flash attention needs a GPU
    bf16, f32 = jnp.bfloat16, jnp.float32
    info = {
        "device": f"{device.platform}: {device.device_kind}",
        "versions": f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, flax "
        f"{flax.__version__}, optax {optax.__version__}",
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    results = Results(Path(args.out) / "jax.json", info)
    print(f"[jax] {info}", flush=True)

    configs = model_configs(args.tiny)
    spec = model_spec(configs)
    image, latent = configs["image"], spec.diffusion.latent_size
    ctx_len, ctx_dim = configs["text"].max_length, configs["unet"].context_dim

    def memory_peak():
        stats = device.memory_stats() or {}
        return stats.get("peak_bytes_in_use")

    def compiled_memory(compiled):
        try:
            m = compiled.memory_analysis()
            total = (
                m.argument_size_in_bytes
                + m.output_size_in_bytes
                + m.temp_size_in_bytes
                - m.alias_size_in_bytes
            )
            return gib(total)
        except Exception:  # noqa: BLE001 - not every backend reports it
            return None

    def compiled_flops(compiled) -> float | None:
        try:
            cost = compiled.cost_analysis()
            if isinstance(cost, list | tuple):
                cost = cost[0]
            return float((cost or {}).get("flops", 0.0))
        except Exception:  # noqa: BLE001
            return None

    # Random weights: views into one block of normals (fast to make, and no init compile).
    size = 2**22 if args.tiny else 2**26  # the largest leaf (CLIP's token table) is 38 M
    block = np.random.default_rng(0).standard_normal(size, dtype=np.float32) * WEIGHT_SCALE

    def random_params(abstract, dtype):
        offset = 0

        def leaf(s):
            nonlocal offset
            n = int(np.prod(s.shape))
            if n > block.size:
                raise ValueError(f"parameter of {n} elements exceeds the random block")
            start = offset % (block.size - n + 1)
            offset += 7919 * 64 + n
            return jax.device_put(block[start : start + n].reshape(s.shape).astype(dtype))

        return jax.tree.map(leaf, abstract)

    abstract = abstract_checkpoint_params(spec)
    t0 = time.perf_counter()
    # cast on the host (ml_dtypes): no per-shape convert kernels to compile on the device
    params16 = {name: random_params(tree, bf16) for name, tree in abstract.items()}
    jax.block_until_ready(params16)
    print(f"[jax] random params on device in {time.perf_counter() - t0:.1f} s", flush=True)
    schedule = make_schedule(
        spec.diffusion.beta_schedule,
        spec.diffusion.num_timesteps,
        spec.diffusion.linear_start,
        spec.diffusion.linear_end,
    )
    key = jax.random.key(0)

    # --- the matmul peak
    n = 512 if args.tiny else 8192
    a = jax.random.normal(key, (4, n, n), bf16)
    b = jax.random.normal(jax.random.key(1), (n, n), bf16)
    matmul = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(matmul(a, b))
    timing = time_groups(lambda: matmul(a, b), jax.block_until_ready, group_s=0.3)
    peak = 2 * 4 * n**3 / timing["s"]
    results.add("matmul_peak", {"tflops": peak / 1e12, "shape": f"4x{n}x{n} @ {n}x{n} bf16"})

    if fast_attention == "cudnn":
        fast_attention, probe = probe_cudnn_attention(configs, latent, ctx_len, args.probe_compare)
        results.add("cudnn_attention_probe", probe)

    def finish(case, compiled_obj, compile_s, timing):
        """A result row; model FLOPs and MFU are added by the driver (count_model_flops)."""
        row = {
            "s": timing["s"],
            "images_per_s": case["batch"] / timing["s"],
            "compile_s": compile_s,
            "compiled_gflops": None,
            "xla_memory_gib": None,
            "peak_memory_gib": gib(memory_peak()),
            "s_all": timing["s_all"],
        }
        if compiled_obj is not None:
            cf = compiled_flops(compiled_obj)
            row["compiled_gflops"] = None if cf is None else cf / 1e9
            row["xla_memory_gib"] = compiled_memory(compiled_obj)
        return row

    def latents_ctx(batch):
        k1, k2 = jax.random.split(jax.random.fold_in(key, batch))
        x = jax.random.normal(k1, (batch, latent, latent, 4), f32)
        return x, jax.random.normal(k2, (batch, ctx_len, ctx_dim), bf16)

    def case_unet_fwd(case):
        impl = case.get("attention", fast_attention)
        unet = UNet(configs["unet"], dtype=bf16, attention_implementation=impl)
        fwd = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c))
        x, ctx = latents_ctx(case["batch"])
        t = jnp.full((case["batch"],), 500, jnp.int32)
        start = time.perf_counter()
        lowered = fwd.lower(params16["unet"], x, t, ctx)
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start
        jax.block_until_ready(compiled(params16["unet"], x, t, ctx))
        timing = time_groups(
            lambda: compiled(params16["unet"], x, t, ctx), jax.block_until_ready
        )
        return finish(case, compiled, compile_s, timing) | {"attention": impl}

    def train_step_fn(unet, optimizer):
        """One noise-prediction step: t ~ U[0, T), eps target, AdamW on fp32 master weights."""

        def loss_fn(p, x0, ctx, rng):
            k1, k2 = jax.random.split(rng)
            t = jax.random.randint(k1, (x0.shape[0],), 0, schedule.num_train_timesteps)
            noise = jax.random.normal(k2, x0.shape, f32)
            pred = unet.apply({"params": p}, q_sample(schedule, x0, t, noise), t, ctx)
            return jnp.mean(jnp.square(pred.astype(f32) - noise))

        def step(p, opt_state, x0, ctx, rng):
            loss, grads = jax.value_and_grad(loss_fn)(p, x0, ctx, rng)
            updates, opt_state = optimizer.update(grads, opt_state, p)
            return optax.apply_updates(p, updates), opt_state, loss

        return step

    def case_train(case):
        impl, batch = fast_attention, case["batch"]
        config = configs["unet"]
        unet = UNet(config, dtype=bf16, use_checkpoint=case["remat"], attention_implementation=impl)
        optimizer = optax.adamw(1e-5, weight_decay=1e-2)
        train_step = jax.jit(train_step_fn(unet, optimizer), donate_argnums=(0, 1))
        p = random_params(abstract["unet"], f32)  # fp32 master weights, donated to the step
        opt_state = jax.jit(optimizer.init)(p)
        x0, ctx = latents_ctx(batch)
        start = time.perf_counter()
        lowered = train_step.lower(p, opt_state, x0, ctx, key)
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start
        state = [p, opt_state, 0]

        def run_once():
            state[2] += 1
            state[0], state[1], loss = compiled(
                state[0], state[1], x0, ctx, jax.random.fold_in(key, state[2])
            )
            return loss

        for _ in range(2):
            loss = jax.block_until_ready(run_once())
        timing = time_groups(run_once, jax.block_until_ready, group_s=1.0)
        row = finish(case, compiled, compile_s, timing)
        state.clear()  # free the state before the next case
        return row | {"attention": impl, "remat": case["remat"], "loss": float(loss)}

    def text_module():
        return CLIPTextTransformer(configs["text"], dtype=bf16)

    def vae_module():
        return AutoencoderKL(configs["vae"], dtype=bf16)

    def decode_fn():
        vae = vae_module()
        return jax.jit(lambda p, z: vae.apply({"params": p}, z, method="decode"))

    def case_sample(case):
        batch = case["batch"]
        checkpoint = LatentDiffusionCheckpoint(
            spec, params16, tokenizer=CLIPTokenizer.for_cond_stage("clip")
        )
        pipe = LatentDiffusionPipeline(checkpoint, dtype=bf16)
        # the pipeline builds its UNet with JAX's default attention; use the fast kernel here
        pipe.unet = pipe.unet.clone(attention_implementation=fast_attention)

        def call():
            images = pipe(
                [PROMPT] * batch,
                height=image,
                width=image,
                num_inference_steps=args.steps,
                guidance_scale=GUIDANCE,
                seed=0,
            )  # a host numpy array: the call has finished when it returns
            assert images.shape == (batch, image, image, 3), images.shape
            return images

        start = time.perf_counter()
        call()
        first = time.perf_counter() - start
        timing = time_groups(call, lambda out: None, group_s=0.0)
        row = finish(case, None, first - timing["s"], timing)
        return row | {"attention": fast_attention, "first_call_s": first}

    def case_simple(case, fn, inputs, p):
        start = time.perf_counter()
        compiled = fn.lower(p, *inputs).compile()
        compile_s = time.perf_counter() - start
        jax.block_until_ready(compiled(p, *inputs))
        timing = time_groups(lambda: compiled(p, *inputs), jax.block_until_ready)
        return finish(case, compiled, compile_s, timing)

    def case_vae_decode(case):
        z = jax.random.normal(key, (case["batch"], latent, latent, 4), bf16)
        return case_simple(case, decode_fn(), (z,), params16["first_stage"])

    def case_vae_encode(case):
        vae = vae_module()
        x = jax.random.normal(key, (case["batch"], image, image, 3), bf16)
        fn = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode").mean)
        return case_simple(case, fn, (x,), params16["first_stage"])

    def case_clip_text(case):
        ids = jax.random.randint(key, (case["batch"], ctx_len), 0, configs["text"].vocab_size)
        fn = jax.jit(lambda p, i: text_module().apply({"params": p}, i).last_hidden_state)
        return case_simple(case, fn, (ids,), params16["cond_stage"])

    handlers = {
        "unet_fwd": case_unet_fwd,
        "train": case_train,
        "sample": case_sample,
        "vae_decode": case_vae_decode,
        "vae_encode": case_vae_encode,
        "clip_text": case_clip_text,
    }
    run_cases("jax", args, deadline, results, handlers)


def _max_abs_diff(a, b) -> float:
    import jax.numpy as jnp

    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def probe_cudnn_attention(
    configs, latent: int, context_len: int, compare: bool
) -> tuple[str, dict]:
    """Compile and run cuDNN flash attention (forward and gradient) at every UNet attention shape
    (and compare with XLA's when asked); returns ("cudnn" | "xla", report). Any failure sends
    every case to "xla"."""
    import jax
    import jax.numpy as jnp

    from ldm_jax.models.attention import dot_product_attention
    from ldm_jax.models.unet import unet_layout

    layout = unet_layout(configs["unet"])
    shapes = set()
    levels = [b.level for b in layout.input_blocks if b.attention is not None]
    for level in set(levels) | {len(configs["unet"].channel_mult) - 1}:
        spec = next(
            (b.attention for b in layout.input_blocks if b.attention and b.level == level),
            layout.middle_attention,
        )
        tokens = (latent >> level) ** 2
        shapes.add((tokens, tokens, spec.num_heads, spec.head_dim))
        shapes.add((tokens, context_len, spec.num_heads, spec.head_dim))
    inputs = {}
    for t, s, n, h in sorted(shapes):
        keys = jax.random.split(jax.random.key(t + s + h), 3)
        inputs[f"T{t}_S{s}_N{n}_H{h}"] = tuple(
            jax.random.normal(kk, (2, length, n, h), jnp.bfloat16)
            for kk, length in zip(keys, (t, s, s), strict=True)
        )

    def loss(qkv, impl):  # every shape in one program: one compile per implementation
        outs = {name: dot_product_attention(*x, implementation=impl) for name, x in qkv.items()}
        return sum(jnp.sum(o.astype(jnp.float32) ** 2) for o in outs.values()), outs

    grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
    start = time.perf_counter()
    try:
        gc, oc = jax.block_until_ready(grad(inputs, "cudnn"))
    except Exception as error:  # noqa: BLE001 - fall back to XLA attention everywhere
        return "xla", {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    report = {"seconds": time.perf_counter() - start, "shapes": sorted(inputs)}
    if compare:  # one more compile: the XLA reference
        gx, ox = grad(inputs, "xla")
        for name in inputs:
            report[name] = {
                "max_abs_diff_out": _max_abs_diff(oc[name], ox[name]),
                "max_abs_diff_grad": max(map(_max_abs_diff, gc[name], gx[name])),
            }
    return "cudnn", report


def run_cases(side: str, args, deadline: float, results: Results, handlers: dict) -> None:
    took = {}  # kind -> wall seconds of the last case of that kind
    cases = case_list(args.train_batch)
    if args.only:  # in the order given
        by_name = {case["name"]: case for case in cases}
        cases = [by_name[name] for name in args.only if name in by_name]
    for case in cases:
        left = deadline - time.time()
        need = 0 if args.tiny else took.get(case["kind"], ESTIMATE_S[side][case["kind"]])
        if left < need:
            note = f"time guard: {left:.0f} s left, needs ~{need:.0f}"
            results.add(case["name"], {"skipped": note})
            continue
        start = time.perf_counter()
        try:
            row = handlers[case["kind"]](case)
        except Exception as error:  # noqa: BLE001 - record (e.g. out of memory) and go on
            traceback.print_exc()
            row = {"error": f"{type(error).__name__}: {str(error)[:400]}"}
        row["case_wall_s"] = time.perf_counter() - start
        row["batch"] = case["batch"]
        took[case["kind"]] = row["case_wall_s"]
        results.add(case["name"], row)


# --- PyTorch diffusers -------------------------------------------------------------------------
def run_torch(args) -> None:
    import diffusers
    import torch
    import torch.nn.functional as F
    import transformers
    from diffusers.models.attention_processor import AttnProcessor2_0

    from ldm_jax.checkpoints.diffusers_autoencoder import diffusers_config
    from ldm_jax.checkpoints.diffusers_unet import diffusers_unet_config
    from ldm_jax.checkpoints.export_diffusers import clip_transformers_config

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    bf16 = torch.bfloat16
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(0) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    info = {
        "device": name,
        "versions": f"torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"transformers {transformers.__version__}",
    }
    results = Results(Path(args.out) / "torch.json", info)
    print(f"[torch] {info}", flush=True)

    configs = model_configs(args.tiny)
    spec = model_spec(configs)
    image, latent = configs["image"], spec.diffusion.latent_size
    ctx_len, ctx_dim = configs["text"].max_length, configs["unet"].context_dim
    _, unet_kwargs = diffusers_unet_config(configs["unet"])
    vae_kwargs = diffusers_config(configs["vae"]) | {"scaling_factor": spec.diffusion.scale_factor}
    text_config = transformers.CLIPTextConfig(**clip_transformers_config(configs["text"]))

    def sync(_=None):
        if cuda:
            torch.cuda.synchronize()

    def peak_reset():
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak():
        return gib(torch.cuda.max_memory_allocated()) if cuda else None

    gen = torch.Generator(dev).manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen, device=dev, dtype=dtype)

    # --- the matmul peak (for reference; MFU is taken against JAX's measurement)
    n = 512 if args.tiny else 8192
    a, b = randn(4, n, n, dtype=bf16), randn(n, n, dtype=bf16)
    with torch.inference_mode():
        a @ b
        timing = time_groups(lambda: a @ b, sync, group_s=0.3)
    results.add("matmul_peak", {"tflops": 2 * 4 * n**3 / timing["s"] / 1e12})

    def row(case, timing, **extra):
        return {
            "s": timing["s"],
            "images_per_s": case["batch"] / timing["s"],
            "peak_memory_gib": peak(),
            "s_all": timing["s_all"],
        } | extra

    def new_unet(dtype):
        unet = diffusers.UNet2DConditionModel(**unet_kwargs).to(dev, dtype)
        unet.set_attn_processor(AttnProcessor2_0())  # SDPA
        return unet

    alphas = diffusers.DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    ).alphas_cumprod.to(dev)

    def case_train(case):
        peak_reset()
        batch = case["batch"]
        unet = new_unet(torch.float32).train()
        if case["remat"]:
            unet.enable_gradient_checkpointing()
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, weight_decay=1e-2, fused=cuda)
        x0, ctx = randn(batch, 4, latent, latent), randn(batch, ctx_len, ctx_dim)

        def run_once():
            t = torch.randint(0, 1000, (batch,), generator=gen, device=dev)
            noise = randn(*x0.shape)
            a_t = alphas[t].view(-1, 1, 1, 1)
            x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise
            with torch.autocast(dev.type, dtype=bf16):
                pred = unet(x_t, t, encoder_hidden_states=ctx).sample
            loss = F.mse_loss(pred.float(), noise)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        for _ in range(2):
            loss = run_once()
        sync()
        timing = time_groups(run_once, sync, group_s=1.0)
        return row(case, timing, remat=case["remat"], loss=float(loss.detach()))

    cache = {}

    def inference_models():
        if "unet" not in cache:
            cache["unet"] = new_unet(bf16).eval()
            vae = diffusers.AutoencoderKL(**vae_kwargs).to(dev, bf16).eval()
            vae.set_attn_processor(AttnProcessor2_0())
            cache["vae"] = vae
            cache["text"] = transformers.CLIPTextModel(text_config).to(dev, bf16).eval()
        return cache["unet"], cache["vae"], cache["text"]

    def case_sample(case):
        peak_reset()
        batch = case["batch"]
        unet, vae, text = inference_models()
        scheduler = diffusers.DDIMScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        )
        ids = torch.randint(0, 49407, (2 * batch, ctx_len), generator=gen, device=dev)

        @torch.inference_mode()
        def call():  # StableDiffusionPipeline's loop, minus the tokenizer
            ctx = text(ids).last_hidden_state
            scheduler.set_timesteps(args.steps, device=dev)
            lat = randn(batch, 4, latent, latent, dtype=bf16)
            for t in scheduler.timesteps:
                out = unet(torch.cat([lat, lat]), t, encoder_hidden_states=ctx).sample
                uncond, cond = out.chunk(2)
                lat = scheduler.step(uncond + GUIDANCE * (cond - uncond), t, lat).prev_sample
            x = vae.decode(lat / vae.config.scaling_factor).sample
            images = ((x.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
            return images.permute(0, 2, 3, 1).cpu().numpy()  # host, as ours

        start = time.perf_counter()
        call()
        first = time.perf_counter() - start
        timing = time_groups(call, lambda _: None, group_s=0.0)
        return row(case, timing, first_call_s=first)

    def case_inference(case, fn):
        peak_reset()
        with torch.inference_mode():
            sync(fn())
            timing = time_groups(fn, sync)
        return row(case, timing)

    def case_unet_fwd(case):
        if case.get("attention") == "xla":
            return {"skipped": "JAX-only before/after row"}
        unet, _, _ = inference_models()
        batch = case["batch"]
        x = randn(batch, 4, latent, latent, dtype=bf16)
        ctx = randn(batch, ctx_len, ctx_dim, dtype=bf16)
        t = torch.full((batch,), 500, device=dev)
        return case_inference(case, lambda: unet(x, t, encoder_hidden_states=ctx).sample)

    def case_vae_decode(case):
        _, vae, _ = inference_models()
        z = randn(case["batch"], 4, latent, latent, dtype=bf16)
        return case_inference(case, lambda: vae.decode(z).sample)

    def case_vae_encode(case):
        _, vae, _ = inference_models()
        x = randn(case["batch"], 3, image, image, dtype=bf16)
        return case_inference(case, lambda: vae.encode(x).latent_dist.mean)

    def case_clip_text(case):
        _, _, text = inference_models()
        ids = torch.randint(0, 49407, (case["batch"], ctx_len), generator=gen, device=dev)
        return case_inference(case, lambda: text(ids).last_hidden_state)

    handlers = {
        "unet_fwd": case_unet_fwd,
        "train": case_train,
        "sample": case_sample,
        "vae_decode": case_vae_decode,
        "vae_encode": case_vae_encode,
        "clip_text": case_clip_text,
    }
    run_cases("torch", args, args.deadline, results, handlers)


# --- driver ------------------------------------------------------------------------------------
def _fmt(value, digits=3):
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def flops_key(case_name: str) -> tuple[str, float]:
    """(key of count_model_flops' result, multiplier) for a case name."""
    if case_name.startswith("train_"):
        return "train", 1.0
    if case_name.startswith("unet_fwd_b8"):
        return "unet_fwd_b8", 1.0
    if case_name.startswith("unet_fwd_b"):
        return "unet_fwd_b1", float(case_name.removeprefix("unet_fwd_b").split("_")[0])
    if case_name == "clip_text_b1":
        return "text_b1", 1.0
    return case_name, 1.0


def add_model_flops(jax_data: dict, torch_data: dict, flops: dict) -> None:
    """Fill each row's model GFLOP and MFU, both sides against JAX's measured matmul peak."""
    peak = jax_data.get("rows", {}).get("matmul_peak", {}).get("tflops")
    for data in (jax_data, torch_data):
        for name, row in data.get("rows", {}).items():
            key, factor = flops_key(name)
            if "s" in row and key in flops and peak:
                row["gflops"] = factor * flops[key] / 1e9
                row["mfu"] = factor * flops[key] / row["s"] / (peak * 1e12)


def merged_table(jax_data: dict, torch_data: dict) -> str:
    jr, tr = jax_data.get("rows", {}), torch_data.get("rows", {})
    lines = [
        "| case | batch | ours s | ours img/s | compile s | GFLOP | MFU | XLA mem GiB "
        "| peak GiB | torch s | torch img/s | torch MFU | torch peak GiB | ours / torch speed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in [c for c in jr if c not in ("matmul_peak", "cudnn_attention_probe")]:
        o, t = jr[name], tr.get(name, {})
        if "s" not in o:
            note = o.get("skipped") or o.get("error", "?")
            lines.append(f"| {name} | {o.get('batch', '')} | {note} |" + " |" * 11)
            continue
        ratio = t["s"] and o["s"] and t["s"] / o["s"] if "s" in t else None
        tnote = t.get("skipped") or t.get("error")
        lines.append(
            f"| {name} | {o['batch']} | {_fmt(o['s'], 4)} | {_fmt(o['images_per_s'])} "
            f"| {_fmt(o.get('compile_s'))} | {_fmt(o.get('gflops'), 5)} "
            f"| {_fmt(100 * o['mfu'], 3) + '%' if 'mfu' in o else '–'} "
            f"| {_fmt(o.get('xla_memory_gib'))} "
            f"| {_fmt(o.get('peak_memory_gib'))} "
            f"| {_fmt(t.get('s'), 4) if 's' in t else (tnote or '–')} "
            f"| {_fmt(t.get('images_per_s'))} "
            f"| {_fmt(100 * t['mfu'], 3) + '%' if 'mfu' in t else '–'} "
            f"| {_fmt(t.get('peak_memory_gib'))} "
            f"| {_fmt(ratio)} |"
        )
    jp, tp = jr.get("matmul_peak", {}), tr.get("matmul_peak", {})
    head = (
        f"ours: {jax_data.get('info', {}).get('device')}; "
        f"{jax_data.get('info', {}).get('versions')}; XLA_FLAGS="
        f"{jax_data.get('info', {}).get('xla_flags')!r}\n"
        f"torch: {torch_data.get('info', {}).get('device')}; "
        f"{torch_data.get('info', {}).get('versions')}\n"
        f"measured bf16 matmul peak: JAX {_fmt(jp.get('tflops'), 4)} TFLOP/s, "
        f"torch {_fmt(tp.get('tflops'), 4)} TFLOP/s (MFU is against JAX's)\n"
        f"cuDNN attention probe: {json.dumps(jr.get('cudnn_attention_probe'))}\n\n"
    )
    return head + "\n".join(lines)


def run_child(side: str, args, deadline: float) -> None:
    command = [sys.executable, os.path.abspath(__file__), "--measure", side, "--out", args.out]
    command += ["--deadline", str(deadline), "--train-batch", str(args.train_batch)]
    command += ["--steps", str(args.steps), "--budget", str(args.budget)]
    command += ["--tiny"] if args.tiny else []
    command += ["--probe-compare"] if args.probe_compare else []
    command += ["--only", *args.only] if args.only else []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if side == "jax":
        env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), *XLA_GPU_FLAGS]).strip()
    else:
        env["JAX_PLATFORMS"] = "cpu"  # torch's process imports ldm_jax only for configs
    try:
        done = subprocess.run(command, env=env, timeout=max(1.0, deadline - time.time() + 15))
        print(f"[driver] {side} exited with {done.returncode}", flush=True)
    except subprocess.TimeoutExpired:
        print(f"[driver] {side} killed at its deadline", flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the JSON and markdown results")
    parser.add_argument("--tiny", action="store_true", help="tiny models: a CPU smoke test")
    parser.add_argument(
        "--budget", type=float, default=None, help="seconds for the whole run (470; tiny: 3000)"
    )
    parser.add_argument(
        "--jax-share", type=float, default=0.72, help="fraction of the budget for the JAX side"
    )
    parser.add_argument("--train-batch", type=int, default=None, help="default 16 (tiny: 2)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50; tiny: 3)")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--torch-first", action="store_true", help="run the torch side first")
    parser.add_argument(
        "--probe-compare", action="store_true", help="compare cuDNN attention with XLA's"
    )
    parser.add_argument("--only", nargs="*", help="run only these case names")
    parser.add_argument("--measure", choices=("jax", "torch", "flops"), help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.train_batch = args.train_batch or (2 if args.tiny else 16)
    args.steps = args.steps or (3 if args.tiny else STEPS)
    args.budget = args.budget or (3000.0 if args.tiny else 470.0)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.measure == "flops":
        flops = count_model_flops(args.tiny, args.train_batch, args.steps)
        (Path(args.out) / "flops.json").write_text(json.dumps(flops, indent=1))
        return
    if args.measure:
        (run_jax if args.measure == "jax" else run_torch)(args)
        return
    start = time.time()
    end = start + args.budget
    print(
        f"[driver] host {platform.node()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; budget {args.budget:.0f} s",
        flush=True,
    )
    # model FLOPs: lowering only, on the host CPU, while the children measure
    flops_command = [sys.executable, os.path.abspath(__file__), "--measure", "flops"]
    flops_command += ["--out", args.out, "--train-batch", str(args.train_batch)]
    flops_command += ["--steps", str(args.steps)] + (["--tiny"] if args.tiny else [])
    flops_child = subprocess.Popen(flops_command, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    if args.skip_torch:
        run_child("jax", args, end)
    elif args.torch_first:  # torch's short share first, then JAX until the end
        run_child("torch", args, start + (1 - args.jax_share) * args.budget)
        run_child("jax", args, end - 5)
    else:
        run_child("jax", args, start + args.jax_share * args.budget)
        run_child("torch", args, end - 5)

    def load(side):
        path = Path(args.out) / f"{side}.json"
        return json.loads(path.read_text()) if path.exists() else {}

    try:
        flops_child.wait(timeout=60)
    except subprocess.TimeoutExpired:
        flops_child.kill()
    flops_path = Path(args.out) / "flops.json"
    flops = json.loads(flops_path.read_text()) if flops_path.exists() else {}
    jax_data, torch_data = load("jax"), load("torch")
    add_model_flops(jax_data, torch_data, flops)
    table = merged_table(jax_data, torch_data)
    merged = {"jax": jax_data, "torch": torch_data, "wall_s": time.time() - start}
    (Path(args.out) / "results.json").write_text(json.dumps(merged, indent=1))
    (Path(args.out) / "results.md").write_text(table + "\n")
    print(table, flush=True)
    print(f"[driver] total wall {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
