"""The torch side of the GPU suite: diffusers PyTorch doing the same work (the train step of
diffusers' examples/text_to_image/train_text_to_image.py, StableDiffusionPipeline's loop)."""

import time
from pathlib import Path

from gpu_suite_models import (
    EMA_DECAY,
    GRAD_CLIP,
    GUIDANCE,
    LEARNING_RATE,
    model_configs,
    model_spec,
)
from gpu_suite_timing import Results, gib, run_cases, time_groups


def run_torch(args) -> None:
    import diffusers
    import torch
    import torch.nn.functional as F
    import transformers
    from diffusers.models.attention_processor import AttnProcessor2_0

    from ldm_jax.checkpoints.diffusers.autoencoder import diffusers_config
    from ldm_jax.checkpoints.diffusers.export import clip_transformers_config
    from ldm_jax.checkpoints.diffusers.unet import diffusers_unet_config

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    # bf16 compute on the GPU; on a CPU (the --tiny smoke test) fp32, as torch's CPU bf16
    # convolutions are slow fallbacks (seconds per tiny step)
    bf16 = torch.bfloat16 if cuda else torch.float32
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
    vocab = configs["text"].vocab_size
    _, unet_kwargs = diffusers_unet_config(configs["unet"])
    scale = spec.diffusion.scale_factor
    vae_kwargs = diffusers_config(configs["vae"]) | {"scaling_factor": scale}
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

    def token_ids(batch):
        return torch.randint(0, vocab, (batch, ctx_len), generator=gen, device=dev)

    @torch.inference_mode()
    def matmul_peak():  # for reference; MFU is taken against JAX's measurement
        n = 512 if args.tiny else 8192
        a, b = randn(4, n, n, dtype=bf16), randn(n, n, dtype=bf16)
        a @ b
        timing = time_groups(lambda: a @ b, sync, group_s=0.3)
        return {"tflops": 2 * 4 * n**3 / timing["s"] / 1e12}

    results.add("matmul_peak", matmul_peak())

    def row(case, timing, **extra):
        return {
            "s": timing["s"],
            "images_per_s": case["batch"] / timing["s"],
            "peak_memory_gib": peak(),
            "s_all": timing["s_all"],
        } | extra

    def new_unet(dtype):
        with dev:  # initialised on the device: seconds instead of a CPU init of 860 M params
            unet = diffusers.UNet2DConditionModel(**unet_kwargs).to(dtype)
        unet.set_attn_processor(AttnProcessor2_0())  # SDPA (flash attention on the GPU)
        return unet

    cache = {}

    def frozen(name):
        """bf16 eval-mode networks, made once: "vae", "text", "unet" (inference)."""
        if name not in cache:
            if name == "vae":
                with dev:
                    model = diffusers.AutoencoderKL(**vae_kwargs).to(bf16)
                model.set_attn_processor(AttnProcessor2_0())
            elif name == "text":
                with dev:
                    model = transformers.CLIPTextModel(text_config).to(bf16)
            else:
                model = new_unet(bf16)
            cache[name] = model.eval().requires_grad_(False)
        return cache[name]

    alphas = diffusers.DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    ).alphas_cumprod.to(dev)

    def case_train(case):
        if case["remat"] not in ("none", "blocks"):
            return {"skipped": "diffusers has one remat policy: gradient checkpointing (blocks)"}
        peak_reset()
        batch = case["batch"]
        vae, text = frozen("vae"), frozen("text")
        unet = new_unet(torch.float32).train()  # fp32 master weights, autocast to bf16
        if case["remat"] == "blocks":
            unet.enable_gradient_checkpointing()
        params = list(unet.parameters())
        ema = [p.detach().clone() for p in params]
        opt = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=1e-2, fused=cuda)
        if case["inputs"] == "image":
            x = torch.rand(batch, 3, image, image, generator=gen, device=dev, dtype=bf16) * 2 - 1
        else:  # precomputed first-stage latents (before scaling)
            x = 5.0 * randn(batch, 4, latent, latent)
        ids = token_ids(batch)

        def run_once():
            with torch.no_grad():  # the frozen encoders, as train_text_to_image.py
                if case["inputs"] == "image":
                    x0 = vae.encode(x).latent_dist.sample(generator=gen).float() * scale
                else:
                    x0 = x * scale
                ctx = text(ids)[0]
            t = torch.randint(0, 1000, (batch,), generator=gen, device=dev)
            noise = torch.randn(x0.shape, generator=gen, device=dev)
            a_t = alphas[t].view(-1, 1, 1, 1)
            x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise
            with torch.autocast(dev.type, dtype=bf16, enabled=cuda):
                pred = unet(x_t, t, encoder_hidden_states=ctx).sample
            loss = F.mse_loss(pred.float(), noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():  # diffusers' EMAModel.step (foreach)
                torch._foreach_lerp_(ema, params, 1 - EMA_DECAY)
            return loss

        for _ in range(2):
            loss = run_once()
        sync()
        timing = time_groups(run_once, sync, group_s=1.0)
        return row(case, timing, inputs=case["inputs"], remat=case["remat"],
                   loss=float(loss.detach()))  # fmt: skip

    def case_sample(case):
        peak_reset()
        batch = case["batch"]
        unet, vae, text = frozen("unet"), frozen("vae"), frozen("text")
        scheduler = diffusers.DDIMScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        )
        ids = token_ids(2 * batch)

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
        timing = time_groups(call, lambda _: None, group_s=0.0, groups=3 if batch == 1 else 2)
        return row(case, timing, first_call_s=first)

    def case_inference(case, fn):
        peak_reset()
        with torch.inference_mode():
            sync(fn())
            timing = time_groups(fn, sync)
        return row(case, timing)

    def case_unet_fwd(case):
        if case.get("attention"):
            return {"skipped": "JAX-only comparison row"}
        unet, batch = frozen("unet"), case["batch"]
        x = randn(batch, 4, latent, latent, dtype=bf16)
        ctx = randn(batch, ctx_len, ctx_dim, dtype=bf16)
        t = torch.full((batch,), 500, device=dev)
        return case_inference(case, lambda: unet(x, t, encoder_hidden_states=ctx).sample)

    def case_vae_decode(case):
        vae = frozen("vae")
        z = randn(case["batch"], 4, latent, latent, dtype=bf16)
        return case_inference(case, lambda: vae.decode(z).sample)

    handlers = {
        "train": case_train,
        "sample": case_sample,
        "unet_fwd": case_unet_fwd,
        "vae_decode": case_vae_decode,
    }
    run_cases("torch", args, args.deadline, results, handlers)
