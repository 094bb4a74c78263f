"""The JAX side of the GPU suite: ldm_jax as a user gets it (the library's train step, the
sampling pipeline, the networks with the default attention choice), timed."""

import os
import time
from pathlib import Path

from gpu_suite_models import (
    EMA_DECAY,
    GRAD_CLIP,
    GUIDANCE,
    LEARNING_RATE,
    PROMPT,
    WEIGHT_SCALE,
    model_configs,
    model_spec,
)
from gpu_suite_timing import Results, gib, run_cases, time_groups

# custom-call target prefix of jax's cuDNN fused attention (forward and backward) in compiled HLO
CUDNN_ATTENTION_TARGET = "__cudnn$fmha"


def compiled_report(compiled) -> dict:
    """XLA's memory estimate (arguments + outputs - aliased + temporaries) and the number of cuDNN
    fused-attention calls of a compiled program (0: XLA or blocked attention everywhere)."""
    out = {"xla_memory_gib": None, "cudnn_attention_calls": None}
    try:
        m = compiled.memory_analysis()
        total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                 - m.alias_size_in_bytes)  # fmt: skip
        out["xla_memory_gib"] = gib(total)
    except Exception:  # noqa: BLE001 - not every backend reports it
        pass
    try:
        out["cudnn_attention_calls"] = compiled.as_text().count(CUDNN_ATTENTION_TARGET)
    except Exception:  # noqa: BLE001
        pass
    return out


def run_jax(args) -> None:
    import flax
    import jax
    import jax.numpy as jnp
    import jaxlib
    import numpy as np
    import optax

    from ldm_jax.checkpoints import LatentDiffusionCheckpoint
    from ldm_jax.models.autoencoder import AutoencoderKL
    from ldm_jax.models.factory import abstract_checkpoint_params
    from ldm_jax.models.unet import UNet
    from ldm_jax.sampling.pipeline import LatentDiffusionPipeline
    from ldm_jax.tokenizers.clip import CLIPTokenizer
    from ldm_jax.training.ldm_step import LDMTrainConfig, init_ldm_state, make_ldm_train_step
    from ldm_jax.training.optimizer import make_optimizer
    from ldm_jax.training.sharding import batch_sharding, make_mesh

    device = jax.local_devices()[0]
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
    vocab = configs["text"].vocab_size
    mesh = make_mesh(("data", "fsdp", "tensor"), (1, 1, 1), devices=jax.local_devices()[:1])

    def memory_peak():
        return (device.memory_stats() or {}).get("peak_bytes_in_use")

    # Random weights on the host: views into one block of normals (fast, no init compile).
    size = 2**22 if args.tiny else 2**26  # the largest leaf (CLIP's token table) is 38 M
    block = np.random.default_rng(0).standard_normal(size, dtype=np.float32) * WEIGHT_SCALE

    def host_params(abstract, dtype):
        offset = 0

        def leaf(s):
            nonlocal offset
            n = int(np.prod(s.shape))
            if n > block.size:
                raise ValueError(f"parameter of {n} elements exceeds the random block")
            start = offset % (block.size - n + 1)
            offset += 7919 * 64 + n
            return block[start : start + n].reshape(s.shape).astype(dtype, copy=False)

        return jax.tree.map(leaf, abstract)

    abstract = abstract_checkpoint_params(spec)
    params16_cache = {}

    def params16():
        """bf16 weights of every network on the device, made after the train rows (memory)."""
        if not params16_cache:
            # cast on the host (ml_dtypes): no per-shape convert kernels to compile on the device
            tree = {name: host_params(t, bf16) for name, t in abstract.items()}
            params16_cache.update(jax.device_put(tree))
        return params16_cache

    key = jax.random.key(0)

    def matmul_peak():
        n = 512 if args.tiny else 8192
        a = jax.random.normal(key, (4, n, n), bf16)
        b = jax.random.normal(jax.random.key(1), (n, n), bf16)
        matmul = jax.jit(lambda a, b: a @ b)
        jax.block_until_ready(matmul(a, b))
        timing = time_groups(lambda: matmul(a, b), jax.block_until_ready, group_s=0.3)
        tflops = 2 * 4 * n**3 / timing["s"] / 1e12
        return {"tflops": tflops, "shape": f"4x{n}x{n} @ {n}x{n} bf16"}

    results.add("matmul_peak", matmul_peak())
    print(f"[jax] started, params ready, matmul peak measured: {time.time() - args.started:.1f} s "
          "after the driver started", flush=True)  # fmt: skip

    def finish(case, timing, compile_s, compiled=None, peak_before=None):
        """A result row; model FLOPs and MFU are added by the driver (count_model_flops)."""
        peak_after = memory_peak()
        row = {
            "s": timing["s"],
            "images_per_s": case["batch"] / timing["s"],
            "compile_s": compile_s,
            "peak_memory_gib": gib(peak_after),
            # False: the process' peak was reached by an earlier row; this row's is at most that
            "peak_set_here": None if peak_after is None else peak_after > (peak_before or 0),
            "s_all": timing["s_all"],
        }
        return row | (compiled_report(compiled) if compiled is not None else {})

    def case_train(case):
        peak_before, batch = memory_peak(), case["batch"]
        cfg = LDMTrainConfig(compute_dtype="bfloat16", remat=case["remat"], ema_decay=EMA_DECAY)
        tx, schedule_fn = make_optimizer({"learning_rate": LEARNING_RATE, "grad_clip": GRAD_CLIP})
        start = time.perf_counter()
        init = {name: host_params(t, np.float32) for name, t in abstract.items()}
        state, frozen = init_ldm_state(spec, cfg, tx, mesh, rng=key, init_params=init)
        step = make_ldm_train_step(spec, cfg, tx, schedule_fn, mesh)
        setup_s = time.perf_counter() - start
        k1, k2 = jax.random.split(jax.random.fold_in(key, batch))
        if case["inputs"] == "image":  # encoded by the frozen VAE inside the step
            x = jax.random.uniform(k1, (batch, image, image, 3), f32, -1.0, 1.0)
        else:  # precomputed first-stage latents (before scaling)
            x = 5.0 * jax.random.normal(k1, (batch, latent, latent, 4), f32)
        tokens = jax.random.randint(k2, (batch, ctx_len), 0, vocab, jnp.int32)
        batch_arrays = jax.device_put({case["inputs"]: x, "tokens": tokens}, batch_sharding(mesh))
        start = time.perf_counter()
        compiled = step.lower(state, frozen, batch_arrays, key).compile()
        compile_s = time.perf_counter() - start
        holder = [state]

        def run_once():
            holder[0], metrics = compiled(holder[0], frozen, batch_arrays, key)
            return metrics["loss"]

        for _ in range(2):
            loss = jax.block_until_ready(run_once())
        timing = time_groups(run_once, jax.block_until_ready, group_s=1.0)
        row = finish(case, timing, compile_s, compiled, peak_before)
        for leaf in jax.tree.leaves((holder, frozen)):  # free the state before the next case
            if not leaf.is_deleted():
                leaf.delete()
        return row | {"inputs": case["inputs"], "remat": case["remat"], "loss": float(loss),
                      "setup_s": setup_s}  # fmt: skip

    def case_unet_fwd(case):
        peak_before, batch = memory_peak(), case["batch"]
        impl = case.get("attention")  # None: the library's choice, what users get
        unet = UNet(configs["unet"], dtype=bf16, attention_implementation=impl)
        fwd = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c))
        k1, k2 = jax.random.split(jax.random.fold_in(key, 8))
        x = jax.random.normal(k1, (batch, latent, latent, 4), f32)
        ctx = jax.random.normal(k2, (batch, ctx_len, ctx_dim), bf16)
        t = jnp.full((batch,), 500, jnp.int32)
        p = params16()["unet"]
        start = time.perf_counter()
        compiled = fwd.lower(p, x, t, ctx).compile()
        compile_s = time.perf_counter() - start
        jax.block_until_ready(compiled(p, x, t, ctx))
        timing = time_groups(lambda: compiled(p, x, t, ctx), jax.block_until_ready)
        return finish(case, timing, compile_s, compiled, peak_before) | {
            "attention": impl or "default"
        }

    def case_sample(case):
        peak_before, batch = memory_peak(), case["batch"]
        checkpoint = LatentDiffusionCheckpoint(
            spec, params16(), tokenizer=CLIPTokenizer.for_cond_stage("clip")
        )
        pipe = LatentDiffusionPipeline(checkpoint, dtype=bf16)  # its default attention

        def call():
            images = pipe(
                [PROMPT] * batch,
                height=image,
                width=image,
                num_inference_steps=args.steps,
                guidance_scale=GUIDANCE,
                seed=0,
                output_type="np",
            ).images  # a host numpy array: the call has finished when it returns
            assert images.shape == (batch, image, image, 3), images.shape
            return images

        start = time.perf_counter()
        call()
        first = time.perf_counter() - start
        timing = time_groups(call, lambda out: None, group_s=0.0, groups=3 if batch == 1 else 2)
        row = finish(case, timing, first - timing["s"], None, peak_before)
        return row | {"first_call_s": first}

    def case_vae_decode(case):
        peak_before = memory_peak()
        vae = AutoencoderKL(configs["vae"], dtype=bf16)
        fn = jax.jit(lambda p, z: vae.apply({"params": p}, z, method="decode"))
        z = jax.random.normal(key, (case["batch"], latent, latent, 4), bf16)
        p = params16()["first_stage"]
        start = time.perf_counter()
        compiled = fn.lower(p, z).compile()
        compile_s = time.perf_counter() - start
        jax.block_until_ready(compiled(p, z))
        timing = time_groups(lambda: compiled(p, z), jax.block_until_ready)
        return finish(case, timing, compile_s, compiled, peak_before)

    handlers = {
        "train": case_train,
        "sample": case_sample,
        "unet_fwd": case_unet_fwd,
        "vae_decode": case_vae_decode,
    }
    run_cases("jax", args, args.deadline, results, handlers)
