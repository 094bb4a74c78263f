"""The torch side of the GPU suite: diffusers PyTorch doing the same work."""

import time
from pathlib import Path

from gpu_suite_models import GUIDANCE, model_configs, model_spec
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
