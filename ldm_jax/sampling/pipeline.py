"""Latent diffusion sampling: conditioning -> guided sampler -> first-stage decoder -> image.

Every task of tasks.py (text-to-image, unconditional, class-conditional, image-to-image,
SD and LDM inpainting, super-resolution) runs through the same call and the same jitted function.

```python
from ldm_jax.sampling.pipeline import LatentDiffusionPipeline

pipe = LatentDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
out = pipe("a photo of a cat", num_inference_steps=25, sampler="dpm++_2m_karras",
           num_images_per_prompt=2)  # seed=None: fresh randomness
out.images[0].save("cat.png"); out.seeds  # PIL images; the seed of each
pipe("a watercolour of a cat", image=out.images[0], strength=0.75, seed=out.seeds[0])  # img2img
pipe.save_pretrained("sd15-orbax", format="orbax")  # or "diffusers" (default), "compvis"
# other checkpoints: pipe(batch_size=4) (unconditional), pipe(class_labels=[207, 360]) (cin256),
# pipe("a bench", image=photo, mask_image=mask) (inpainting), pipe(low_res_image=small) (LDM SR)
```

Performance: text encoding, the whole sampler loop (one ``lax.scan``) and the VAE decode run as ONE
jitted pure function whose network parameters are arguments (swapping weights of the same shapes
does not recompile; nothing is constant-folded). Prompts are always tokenized to the encoder's full
length (77), so new prompts, seeds, class labels, init images and masks reuse the compiled
function, and the guidance scale, guidance rescale and clip_skip are traced values; a new batch
size, image size, step count (or img2img step count ``int(N * strength)``), sampler or eta
compiles once more. The batch (noise, tokens, labels, images, masks) is sharded over all local
devices (``NamedSharding`` over a 1-D ``Mesh(("data",))``); on accelerators a batch the device
count does not divide is padded (``pad_batch``), elsewhere it is replicated.

Compilation of a full-size model takes tens of seconds; JAX's persistent compilation cache keeps
compiled executables on disk across processes: ``enable_compilation_cache("~/.cache/ldm_jax")`` (or
``compilation_cache_dir=`` of the constructor) sets ``jax.config.jax_compilation_cache_dir``.

Timesteps follow the diffusers scheduler of the chosen sampler (``sampler_options.SAMPLER_TABLE``)
with the settings of the model description (``spec.diffusion``): ``timestep_spacing``
("leading"), ``steps_offset`` (1 in the Stable Diffusion configs) and ``set_alpha_to_one`` (DDIM
and PLMS end at abar = 1, or at abar_0: the Stable Diffusion release configs and CompVis); see
``ldm_jax.diffusion.sampler_plans``. The checkpoint loaders fill them (a diffusers folder from its
``scheduler/`` config); to sample with others, build the pipeline from a checkpoint whose spec has
them::

    diffusion = dataclasses.replace(ckpt.spec.diffusion, timestep_spacing="trailing")
    ckpt.spec = dataclasses.replace(ckpt.spec, diffusion=diffusion)
    pipe = LatentDiffusionPipeline(ckpt)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ldm_jax.checkpoints import LatentDiffusionCheckpoint, save_checkpoint
from ldm_jax.compile_options import compiler_options
from ldm_jax.diffusion import SAMPLERS, classifier_free_guidance, sampler_plans
from ldm_jax.images import to_pil as images_to_pil
from ldm_jax.latent_diffusion import apply_unet, schedule_from_spec
from ldm_jax.models.attention_dispatch import implementation_from_name
from ldm_jax.models.factory import network_modules
from ldm_jax.sampler_options import (
    canonical_sampler,
    check_eta,
    check_guidance,
    check_guidance_rescale,
    check_strength,
)
from ldm_jax.sampling import inputs as pipeline_inputs
from ldm_jax.sampling import tasks as pipeline_tasks
from ldm_jax.sampling.adapters import AdapterMixin
from ldm_jax.sampling.output import PipelineOutput, check_output_type, image_seeds
from ldm_jax.sampling.sdxl_inputs import sdxl_time_inputs
from ldm_jax.sampling.tasks import TEXT_CONDITIONINGS, model_task

__all__ = ["TEXT_CONDITIONINGS", "LatentDiffusionPipeline", "PipelineOutput", "sampler_iterations"]


def enable_compilation_cache(cache_dir: str | os.PathLike) -> None:
    """Turn on JAX's persistent compilation cache (``jax_compilation_cache_dir``) there."""
    path = Path(cache_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))


class LatentDiffusionPipeline(AdapterMixin):
    """Sampling with a latent diffusion checkpoint (any task of tasks.py)."""

    def __init__(
        self,
        checkpoint: LatentDiffusionCheckpoint,
        *,
        dtype=jnp.float32,
        compilation_cache_dir: str | os.PathLike | None = None,
        attention: str | None = None,
        pad_batch: bool | None = None,
    ):
        """`attention`: the attention implementation of every network ("xla", "cudnn",
        "blocked", "splash"); None / "auto" chooses per call by backend, dtype and shape
        (cuDNN flash attention on NVIDIA GPUs in bf16/fp16, splash on TPU).

        `pad_batch`: compute a batch that the local device count does not divide padded up to
        a multiple of it (the padding is discarded), so e.g. 4 images on an 8-core TPU run one
        per core instead of all 4 on every core. None: on accelerators, not on CPU (where the
        devices share the same cores)."""
        spec = checkpoint.spec
        self.task = model_task(spec)
        if self.task.conditioning == "text" and checkpoint.tokenizer is None:
            raise ValueError("the checkpoint has no tokenizer; pass tokenizer= when loading it")
        if compilation_cache_dir is not None:
            enable_compilation_cache(compilation_cache_dir)
        self.spec = spec
        self.tokenizer = checkpoint.tokenizer
        # the Flax modules, keyed as the params: {"unet", "first_stage"[, "cond_stage"]}
        modules = network_modules(spec, dtype, implementation_from_name(attention))
        self.modules = {name: module for name, (module, _) in modules.items()}
        self.unet = self.modules["unet"]
        self.first_stage = self.modules["first_stage"]
        self.cond_stage = self.modules.get("cond_stage")
        self.schedule = schedule_from_spec(spec.diffusion)
        self.mesh = Mesh(np.array(jax.local_devices()), ("data",))
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self.params = jax.device_put(checkpoint.params, replicated)
        if pad_batch is None:
            pad_batch = jax.default_backend() != "cpu"
        self.pad_batch = bool(pad_batch)
        self._step_callback = None  # the current call's (callback, timesteps), read by _host_step
        self._batch = 0  # the current call's batch before padding
        self._generate = jax.jit(
            self._generate_fn,
            static_argnames=(
                "plan", "eta", "guided", "output", "with_callback", "from_image", "from_latents"
            ),
            compiler_options=compiler_options(),
        )

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id,
        dtype=jnp.float32,
        *,
        compilation_cache_dir=None,
        attention: str | None = None,
        pad_batch: bool | None = None,
        config=None,
        use_ema: bool = False,
        prediction_type: str | None = None,
        tokenizer=None,
    ) -> LatentDiffusionPipeline:
        """Load a checkpoint to sample: a CompVis ``.safetensors``/``.ckpt`` file, a diffusers
        folder, an ldm_jax orbax folder or a hub id (a diffusers repo, downloaded once).

        Params are stored and computed in ``dtype``; the timestep settings are the spec's (a
        diffusers folder's ``scheduler/`` config). Loader options:

        - ``config``: the CompVis yaml (path or parsed mapping) of a single file whose
          architecture the keys do not settle (LDM zoo models);
        - ``use_ema``: a non-pruned CompVis file's EMA UNet weights (``model_ema.*``);
        - ``prediction_type``: "epsilon" or "v_prediction", overriding the file's (SD 2.x
          768-v single files need it);
        - ``tokenizer``: a tokenizer folder or hub id instead of the checkpoint's.

        ``compilation_cache_dir``, ``attention``, ``pad_batch``: as the constructor's.
        """
        checkpoint = LatentDiffusionCheckpoint.from_pretrained(
            path_or_hub_id, dtype=dtype, config=config, use_ema=use_ema,
            prediction_type=prediction_type, tokenizer=tokenizer,
        )  # fmt: skip
        return cls(checkpoint, dtype=dtype, compilation_cache_dir=compilation_cache_dir,
                   attention=attention, pad_batch=pad_batch)

    def save_pretrained(self, destination, *, format: str = "diffusers",  # noqa: A002
                        overwrite: bool = False) -> Path:  # fmt: skip
        """Write the spec, params (in their current dtype) and tokenizer as "diffusers" (folder),
        "compvis" (.safetensors file) or "orbax" (folder), as ``save_checkpoint`` does. Loaded
        LoRAs are written merged; loaded textual inversions are refused (their tokens would be
        written as ordinary vocabulary entries and split apart when read back)."""
        if getattr(self, "_ti_base", None) is not None:
            raise ValueError(
                "save_pretrained with textual inversions loaded would write a tokenizer that "
                "splits their tokens: call unload_textual_inversion() first"
            )
        checkpoint = LatentDiffusionCheckpoint(
            self.spec, jax.device_get(self.params), self.tokenizer
        )
        return save_checkpoint(checkpoint, destination, format=format, overwrite=overwrite)

    @property
    def vae_scale_factor(self) -> int:
        return int(self.spec.first_stage.downsample_factor)

    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        *,
        negative_prompt: str | Sequence[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1,
        sampler: str = "ddim",
        eta: float = 0.0,
        seed=None,
        rng=None,
        latents=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        pooled_prompt_embeds=None,
        negative_pooled_prompt_embeds=None,
        output_type: str = "pil",
        callback_on_step_end=None,
        clip_skip: int | None = None,
        guidance_rescale: float = 0.0,
        batch_size: int | None = None,
        class_labels=None,
        image=None,
        strength: float | None = None,
        mask_image=None,
        low_res_image=None,
        prompt_2: str | Sequence[str] | None = None,
        negative_prompt_2: str | Sequence[str] | None = None,
        original_size=None,
        crops_coords_top_left=None,
        target_size=None,
        negative_original_size=None,
        negative_crops_coords_top_left=None,
        negative_target_size=None,
        aesthetic_score: float | None = None,
        negative_aesthetic_score: float | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
    ) -> PipelineOutput:
        """Sample; returns a ``PipelineOutput`` (``.images`` per ``output_type``, ``.seeds``).

        What to pass depends on the checkpoint (``self.task``, see tasks.py): ``prompt`` or
        ``prompt_embeds`` (text models), ``class_labels`` (class models), ``batch_size``
        (unconditional / LDM inpainting / SR; default 1), ``image`` + ``mask_image`` (inpainting,
        white = repaint), ``low_res_image`` (super-resolution: the output is the vae factor times
        larger), and ``image`` + ``strength`` in (0, 1] for image-to-image (diffusers semantics:
        the image is encoded, noised to the first of the last ``int(N * strength)`` steps, which
        are then run). Images are PIL, uint8 or float [0, 1] arrays of exactly the output size
        (default: the image's size); one image serves the whole batch. Each prompt (class label,
        or the unconditional batch) gives ``num_images_per_prompt`` images, next to each other.

        ``sampler``: a name of ``ldm_jax.sampler_options.SAMPLER_TABLE`` or an alias (diffusers'
        scheduler class names), run with the timesteps its diffusers scheduler would use under
        the spec's settings (see ``ldm_jax.diffusion.sampler_plans``). ``eta``: DDIM only.

        Guidance applies to text (``negative_prompt``, default "", or ``negative_prompt_embeds``)
        and class models (the null class) when ``guidance_scale > 1``; unconditional, LDM
        inpainting and SR models ignore it. ``guidance_rescale`` in [0, 1] (diffusers' semantics,
        Lin et al. 2024; 0.7 for zero-terminal-SNR v-models) rescales the guided prediction's std
        towards the conditional one's. ``prompt_embeds`` / ``negative_prompt_embeds`` [B, S, D]
        replace the text encoder's output; ``clip_skip`` (CLIP/OpenCLIP) takes the text
        encoder's output that many layers before the spec's (diffusers' semantics).

        ``seed``: an int (image i gets seed + i), a list (one per image) or None (fresh
        randomness; the seeds used are in ``.seeds``); see ``ldm_jax.sampling.output``. ``rng``
        (a jax key for the whole batch) replaces the seeds. ``latents`` [B, h, w, C] (NHWC;
        h = H / vae factor) are the initial noise x_T (image-to-image: the noise added to the
        image latents).

        SDXL (base and refiner, diffusers' StableDiffusionXLPipeline / Img2ImgPipeline
        semantics): ``prompt_2`` / ``negative_prompt_2`` go to the second text encoder (default:
        ``prompt`` / ``negative_prompt``); with the spec's ``force_zeros_for_empty_prompt`` (base)
        ``negative_prompt=None`` gives zero negative embeddings, ``""`` is encoded. The
        micro-conditioning (traced: new values never recompile) ``original_size``,
        ``crops_coords_top_left``, ``target_size`` ((height, width) / (top, left); default the
        output size, (0, 0), the output size), ``aesthetic_score`` (refiner, 6.0) and the
        ``negative_*`` ones (see ``sdxl_inputs.sdxl_time_inputs``). Embeddings (diffusers'
        encode_prompt outputs) instead of texts: ``prompt_embeds`` [B, S, sum of the encoders'
        widths] with ``pooled_prompt_embeds`` [B, projection dim] (and the ``negative_`` pair;
        absent: zeros or the encoded ``negative_prompt`` as above; see
        ``sdxl_inputs.sdxl_text_inputs``). Base -> refiner hand-off:
        ``denoising_end`` in (0, 1) stops once the timesteps fall below (1 - denoising_end) T
        (with ``output_type="latent"`` the latents come back in the sampler's own space);
        ``denoising_start`` continues such latents, given as ``image`` [B, h, w, C] (NHWC),
        from that point (``strength`` is then ignored, as in diffusers). Every sampler cuts
        where diffusers cuts its scheduler (``sampler_plans.denoising_window``: Heun's
        refiner re-runs the base's last step, as diffusers' order-2 rule does; PLMS takes
        ``denoising_end`` only); both calls take the same sampler and steps.

        ``callback_on_step_end(step, timestep, latents)`` runs on the host after every sampler
        iteration (``sampler_iterations`` of them; ``timestep`` the network's, a float for the
        Karras samplers; latents a numpy array, in the sampler's own space).

        Changing prompts, seeds, guidance scale, guidance rescale, clip_skip, callbacks or
        images never recompiles; a new batch or image size, step count, sampler or output type
        (latent or not) compiles once more. Every argument is checked before anything compiles
        (ValueError naming it).
        """
        sampler = canonical_sampler(sampler)  # aliases share one compiled function
        guidance_scale, eta = check_guidance(guidance_scale), check_eta(eta)
        guidance_rescale = check_guidance_rescale(guidance_rescale)
        output_type = check_output_type(output_type)
        if eta and sampler != "ddim":
            raise ValueError(f"eta applies to the ddim sampler only (this is {sampler}); pass 0")
        if strength is not None:
            strength = check_strength(strength)
        steps = int(num_inference_steps)
        if steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        per_prompt = pipeline_inputs.check_images_per_prompt(num_images_per_prompt)
        skip = pipeline_inputs.check_clip_skip(self.spec, clip_skip)
        inputs, guided = pipeline_inputs.condition_inputs(
            self.task, self.spec, self.tokenizer, prompt, negative_prompt, class_labels,
            batch_size, guidance_scale, prompt_embeds, negative_prompt_embeds,
            prompt_2=prompt_2, negative_prompt_2=negative_prompt_2,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
        )  # fmt: skip
        if inputs:
            batch = next(iter(inputs.values())).shape[0]
        else:
            batch = 1 if batch_size is None else int(batch_size)
        if batch < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        inputs = {key: np.repeat(value, per_prompt, axis=0) for key, value in inputs.items()}
        batch *= per_prompt
        start_latents = None
        if denoising_start is not None:  # continue given latents: no image to encode
            start_latents = self._start_latents(image, batch, height, width)
            image, strength = None, None
            height, width = (n * self.vae_scale_factor for n in start_latents.shape[1:3])
        h, w, image_inputs = pipeline_inputs.image_inputs(
            self.task, self.spec, batch, height, width, image, strength, mask_image, low_res_image
        )
        inputs |= image_inputs
        if start_latents is not None:
            inputs["start"] = start_latents
        f = self.vae_scale_factor
        micro = dict(
            original_size=original_size, crops_coords_top_left=crops_coords_top_left,
            target_size=target_size, negative_original_size=negative_original_size,
            negative_crops_coords_top_left=negative_crops_coords_top_left,
            negative_target_size=negative_target_size, aesthetic_score=aesthetic_score,
            negative_aesthetic_score=negative_aesthetic_score,
        )  # fmt: skip
        inputs |= sdxl_time_inputs(self.spec, batch, h * f, w * f, guided, micro)
        shape = (batch, h, w, self.spec.unet.out_channels)
        if latents is not None:
            latents = np.asarray(latents, np.float32)
            if latents.shape != shape:
                raise ValueError(
                    f"latents must have shape {shape} (batch, height / {self.vae_scale_factor}, "
                    f"width / {self.vae_scale_factor}, channels; NHWC), got {latents.shape}"
                )
        seeds = None if rng is not None else image_seeds(seed, batch)

        first_step = 0
        from_image = strength is not None and self.task.takes_init_image
        if strength is not None:  # img2img, or SD inpainting starting from the noised image
            first_step = pipeline_inputs.strength_slice(steps, strength)
            from_image = from_image or float(strength) < 1.0  # diffusers: 1 = pure noise
        plan = self._plan(sampler, steps, first_step, from_image or start_latents is not None)
        if denoising_start is not None or denoising_end is not None:
            plan = sampler_plans.denoising_window(
                plan, self.schedule, self.schedule.num_train_timesteps, denoising_start,
                denoising_end,
            )  # fmt: skip

        padded = self._padded_batch(batch)
        inputs = {key: _pad(value, padded) for key, value in inputs.items()}
        if seeds is not None:
            keys = jnp.stack([jax.random.PRNGKey(s) for s in _pad(np.asarray(seeds), padded)])
            noise_keys, sample_rng = jnp.unstack(jax.vmap(jax.random.split)(keys), axis=1)
            if latents is None:
                draw = jax.vmap(lambda key: jax.random.normal(key, shape[1:], jnp.float32))
                latents = draw(noise_keys)
        else:  # one key for the batch (the training loop's sample grids)
            noise_rng, sample_rng = jax.random.split(rng)
            if latents is None:
                latents = jax.random.normal(noise_rng, shape, jnp.float32)
        inputs["noise"] = _pad(np.asarray(latents, np.float32), padded)

        inputs = jax.device_put(inputs, self._batch_sharding(padded))
        callback = callback_on_step_end
        visited = sampler_plans.visited_timesteps(plan, self.schedule) if callback else None
        self._step_callback = None if callback is None else (callback, visited)
        try:
            result = self._generate(
                self.params,
                inputs,
                self.schedule,
                jnp.asarray(plan.timesteps),
                None if plan.prev_timesteps is None else jnp.asarray(plan.prev_timesteps),
                jnp.float32(guidance_scale),
                jnp.float32(guidance_rescale),
                jnp.int32(skip),
                sample_rng,
                plan=(plan.name, plan.options),
                eta=float(eta),
                guided=guided,
                output="latent" if output_type == "latent" else "float",
                with_callback=callback is not None,
                from_image=from_image,
                from_latents=start_latents is not None,
            )
            result = np.asarray(result)[:batch]
            if callback is not None:
                jax.effects_barrier()  # every host callback has run before the call returns
        finally:
            self._step_callback = None
        if output_type in ("pil", "uint8"):
            result = np.round(result * 255).astype(np.uint8)
        if output_type == "pil":
            result = images_to_pil(result)
        return PipelineOutput(result, seeds, visited)

    def _start_latents(self, image, batch: int, height, width) -> np.ndarray:
        """denoising_start's latents (given as ``image``): float32 [batch, h, w, C], NHWC."""
        if not self.task.takes_init_image:
            raise ValueError(f"denoising_start does not apply to {self.task.name} checkpoints")
        channels = self.spec.unet.out_channels
        array = None if image is None else np.asarray(image)
        if array is None or array.ndim != 4 or array.shape[-1] != channels:
            raise ValueError(
                f"denoising_start continues latents: pass image= as latents [B, h, w, {channels}] "
                f"(NHWC; a denoising_end call with output_type='latent'), got "
                f"{None if array is None else array.shape}"
            )
        if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
            raise ValueError("the latents (image=) must hold finite floats")
        f = self.vae_scale_factor
        sizes = zip(("height", "width"), (height, width), array.shape[1:3], strict=True)
        for name, value, n in sizes:
            if value is not None and int(value) != n * f:
                raise ValueError(f"{name} {value} does not match the latents' ({n} x {f})")
        if array.shape[0] not in (1, batch):
            raise ValueError(f"image holds {array.shape[0]} latents but the batch is {batch}")
        return np.repeat(array.astype(np.float32), batch // array.shape[0], axis=0)

    @staticmethod
    def to_pil(images) -> list:
        """uint8 [B, H, W, 3] (or float in [0, 1]) images as a list of PIL images."""
        return images_to_pil(images)

    # --- internals

    def _host_step(self, i, x) -> None:
        """The one host function the compiled sampler calls; forwards to the call's callback
        with the iteration's timestep (the padded batch entries cut off)."""
        if self._step_callback is not None:
            callback, visited = self._step_callback
            i = int(i)
            callback(i, visited[i].item(), np.asarray(x)[: self._batch])

    def _padded_batch(self, batch: int) -> int:
        """The batch actually computed: padded to a multiple of the device count where that
        spreads the work (else each device would compute the whole batch)."""
        self._batch = batch
        n = self.mesh.size
        if not self.pad_batch or batch % n == 0 or batch == 1:
            return batch
        return -(-batch // n) * n

    def _batch_sharding(self, batch: int) -> NamedSharding:
        if batch % self.mesh.size == 0:
            return NamedSharding(self.mesh, PartitionSpec("data"))
        return NamedSharding(self.mesh, PartitionSpec())

    def _plan(self, sampler: str, steps: int, first_step: int = 0, from_image: bool = False):
        return sampler_plans.sampler_plan(
            sampler, self.spec.diffusion, self.schedule.num_train_timesteps, steps, first_step,
            from_image=from_image,
        )  # fmt: skip

    def timesteps(self, sampler: str, num_inference_steps: int) -> np.ndarray:
        """The network's timestep at each sampler iteration of a text-to-image call (from the
        spec's timestep settings, as the sampler's diffusers scheduler would visit them)."""
        plan = self._plan(canonical_sampler(sampler), int(num_inference_steps))
        return sampler_plans.visited_timesteps(plan, self.schedule)

    def _generate_fn(
        self, params, inputs, schedule, t_N, prev_N, scale, rescale, clip_skip, rng, *, plan,
        eta, guided, output, with_callback=False, from_image=False, from_latents=False,
    ):  # fmt: skip
        """The pure sampling function: (params, inputs, timesteps, ...) -> images or latents."""
        spec, modules, task = self.spec, self.modules, self.task
        name, options = plan
        cond, uncond = pipeline_tasks.conditioning(
            spec, modules, params, task, inputs, guided, clip_skip
        )

        def apply_fn(x_t, t_B, c):
            return apply_unet(modules["unet"], params["unet"], x_t, t_B, c)

        if guided:
            denoise = classifier_free_guidance(apply_fn, cond, uncond, scale, rescale)
        else:
            denoise = classifier_free_guidance(apply_fn, cond, uncond, 1.0)
        plan = sampler_plans.SamplerPlan(name, None, None, options)
        abar = sampler_plans.start_abar(plan, schedule, t_N, prev_N) if from_image else None
        x_T = pipeline_tasks.initial_latents(spec, modules, params, inputs, abar)
        if from_latents:  # SDXL refiner hand-off: the latents of a denoising_end run
            x_T = sampler_plans.start_from_latents(plan, schedule, t_N, prev_N, inputs["start"])
        options = dict(options)
        if name == "ddim":
            options["eta"] = eta
        if prev_N is not None:
            options["prev_timesteps"] = prev_N
        x0 = SAMPLERS[name](
            denoise,
            x_T,
            schedule,
            t_N,
            prediction_type=spec.diffusion.prediction_type,
            rng=rng,
            callback=self._host_step if with_callback else None,
            **options,
        )
        if output == "latent":
            return x0
        return pipeline_tasks.decode(spec, modules, params, task, inputs, x0)


def _pad(array, batch: int):
    """``array`` with its last entry repeated up to ``batch`` rows (the padding is discarded)."""
    missing = batch - array.shape[0]
    if missing <= 0:
        return array
    return np.concatenate([array, np.repeat(array[-1:], missing, axis=0)])


def sampler_iterations(sampler: str, num_inference_steps: int, strength=None) -> int:
    """How many times ``callback_on_step_end`` runs: N visited steps (``int(N * strength)`` with
    strength), or one more for PLMS (N >= 2)."""
    steps = int(num_inference_steps)
    if strength is not None:
        steps -= pipeline_inputs.strength_slice(steps, strength)
    return steps + 1 if canonical_sampler(sampler) == "plms" and steps >= 2 else steps
