"""The JAX side of the GPU suite: ldm_jax programs, cuDNN-attention probe, timings."""

import os
import time
from pathlib import Path

from gpu_suite_models import GUIDANCE, PROMPT, WEIGHT_SCALE, model_configs, model_spec
from gpu_suite_timing import Results, gib, run_cases, time_groups


def run_jax(args) -> None:
    import flax
    import jax
    import jax.numpy as jnp
    import jaxlib
    import numpy as np
    import optax

    from ldm_jax.checkpoints import LatentDiffusionCheckpoint
    from ldm_jax.diffusion import make_schedule
    from ldm_jax.diffusion.schedules import q_sample
    from ldm_jax.models.autoencoder import AutoencoderKL
    from ldm_jax.models.clip_text import CLIPTextTransformer
    from ldm_jax.models.factory import abstract_checkpoint_params
    from ldm_jax.models.unet import UNet
    from ldm_jax.sampling.pipeline import LatentDiffusionPipeline
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
