"""What the GPU suite measures: the cases, the SD 1.5-shaped model configs, and model FLOPs from
XLA's cost analysis of CPU-lowered programs."""

PROMPT = "a photograph of an astronaut riding a horse"
GUIDANCE = 7.5
STEPS = 50
WEIGHT_SCALE = 0.02  # std of the random weights (larger overflows SD 1.5's deep stacks)
LEARNING_RATE = 1e-5
EMA_DECAY = 0.9999
GRAD_CLIP = 1.0  # ldm_jax's optimizer default and diffusers' train_text_to_image max_grad_norm
# XLA flags for the JAX process (appended to any XLA_FLAGS already set). The latency-hiding
# scheduler overlaps async work (collectives, copies) with compute; on one GPU it mostly orders
# async copies and is harmless.
XLA_GPU_FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true",)
# --tiny only: CPU codegen without LLVM's expensive passes (the smoke test checks code paths, and
# compiling every program at full optimisation takes minutes on 2 cores)
XLA_TINY_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")

# (case name, kind, batch, options, {side: seconds}); the order is the priority order. The seconds
# are what a case needs (compile + runs) on an H200 (guessed from the 2026-11-26 run) until one
# of its kind has run (then that one's wall time counts); the time guard skips what won't fit.
CASES = (
    ("train_b{tb}", "train", "tb", {"inputs": "latents", "remat": "none"},
     {"jax": 100, "torch": 30}),
    ("train_b{tb}_images", "train", "tb", {"inputs": "image", "remat": "none"},
     {"jax": 110, "torch": 30}),
    ("sample_b1", "sample", 1, {}, {"jax": 45, "torch": 8}),
    ("sample_b8", "sample", 8, {}, {"jax": 60, "torch": 20}),
    ("unet_fwd_b8", "unet_fwd", 8, {}, {"jax": 30, "torch": 6}),
    ("vae_decode_b1", "vae_decode", 1, {}, {"jax": 20, "torch": 5}),
)  # fmt: skip
# optional rows (--attention IMPL ...): the UNet forward with one attention kernel forced
ATTENTION_CHOICES = ("xla", "cudnn", "blocked")
# the last rows: the latents train step under these remat policies (--remat; torch: diffusers'
# gradient checkpointing, which is "blocks")
DEFAULT_REMAT = ("blocks",)


def case_list(
    train_batch: int, attention: tuple[str, ...] = (), remat: tuple[str, ...] = DEFAULT_REMAT
) -> list[dict]:
    out = []
    for name, kind, batch, options, estimate in CASES:
        batch = train_batch if batch == "tb" else batch
        name = name.format(tb=train_batch)
        out.append({"name": name, "kind": kind, "batch": batch, "estimate": estimate} | options)
    for impl in attention:
        out.append({"name": f"unet_fwd_b8_attn_{impl}", "kind": "unet_fwd", "batch": 8,
                    "estimate": {"jax": 30, "torch": 0}, "attention": impl})  # fmt: skip
    for policy in remat:
        out.append({"name": f"train_b{train_batch}_remat_{policy}", "kind": "train",
                    "batch": train_batch, "estimate": {"jax": 110, "torch": 30},
                    "inputs": "latents", "remat": policy})  # fmt: skip
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
    import dataclasses

    from ldm_jax.presets.tiny import TINY_CLIP_TEXT, TINY_IMAGE_SIZE, TINY_UNET, TINY_VAE

    # one UNet level (still res block + self- and cross-attention, down- and up-path): the smoke
    # test compiles seven train/sample programs on CI's 2 cores
    unet = dataclasses.replace(TINY_UNET, channel_mult=(1,), attention_resolutions=(1,))
    text = dataclasses.replace(TINY_CLIP_TEXT, num_layers=1)
    return {"unet": unet, "vae": TINY_VAE, "text": text, "image": TINY_IMAGE_SIZE}


def model_spec(configs: dict):
    from ldm_jax.spec import CondStageSpec, DiffusionSpec, ModelSpec

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
    XLA picked; the lowered count is the arithmetic of the model itself. Every op is linear in
    the batch, so: train (latents) = UNet fwd + bwd + AdamW at the train batch + text encoder;
    train (images) = that + VAE encode; sampling = steps x UNet(2B) + text encoder(2B) + VAE
    decode(B).
    """
    import jax
    import jax.numpy as jnp
    import optax

    from ldm_jax.diffusion import make_schedule
    from ldm_jax.diffusion.schedules import q_sample
    from ldm_jax.models.autoencoder import AutoencoderKL
    from ldm_jax.models.clip_text import CLIPTextTransformer
    from ldm_jax.models.factory import abstract_checkpoint_params
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
    unet_train = flops(
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
        "unet_fwd_b8": unet_fwd(8),
        "train": unet_train + b * text_1,
        "train_images": unet_train + b * (text_1 + encode_1),
        "vae_decode_b1": decode_1,
    }
    for batch in (1, 8):
        out[f"sample_b{batch}"] = steps * 2 * batch * fwd_1 + 2 * batch * text_1 + batch * decode_1
    return out


def flops_key(case_name: str) -> str:
    """The key of count_model_flops' result for a case name."""
    if case_name.startswith("train_"):
        return "train_images" if "_images" in case_name else "train"
    if case_name.startswith("unet_fwd_b8"):
        return "unet_fwd_b8"
    return case_name
