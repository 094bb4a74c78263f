"""Latent diffusion sampling: conditioning -> guided sampler -> first-stage decoder -> image.

Every task of tasks.py (text-to-image, unconditional, class-conditional, image-to-image,
SD and LDM inpainting, super-resolution) runs through the same call and the same jitted function.

```python
from ldm_jax.sampling.pipeline import LatentDiffusionPipeline

pipe = LatentDiffusionPipeline.from_pretrained("v1-5-pruned-emaonly.safetensors")
images = pipe("a photo of a cat", num_inference_steps=50, guidance_scale=7.5, seed=0)  # uint8 NHWC
LatentDiffusionPipeline.to_pil(images)[0].save("cat.png")
pipe.save_pretrained("sd15-orbax", format="orbax")  # or "diffusers", "compvis"
pipe("a watercolour of a cat", image=images[0], strength=0.75)  # image-to-image
# other checkpoints: pipe(batch_size=4) (unconditional), pipe(class_labels=[207, 360]) (cin256),
# pipe("a bench", image=photo, mask_image=mask) (inpainting), pipe(low_res_image=small) (LDM SR)
```

Performance: text encoding, the whole sampler loop (one ``lax.scan``) and the VAE decode run as ONE
jitted pure function whose network parameters are arguments (swapping weights of the same shapes
does not recompile; nothing is constant-folded). Prompts are always tokenized to the encoder's full
length (77), so new prompts, class labels, init images and masks reuse the compiled function; a
new batch size, image size, step count (or img2img step count ``int(N * strength)``), sampler, eta
or output kind compiles once more. The guidance scale is a traced value. The batch (noise, tokens,
labels, images, masks) is sharded over all local devices (``NamedSharding`` over a 1-D
``Mesh(("data",))``) when it divides the device count, else every array is replicated.

Compilation of a full-size model takes tens of seconds; JAX's persistent compilation cache keeps
compiled executables on disk across processes: ``enable_compilation_cache("~/.cache/ldm_jax")`` (or
``compilation_cache_dir=`` of the constructor) sets ``jax.config.jax_compilation_cache_dir``.

Timesteps follow diffusers' DDIMScheduler with the settings of the model description
(``spec.diffusion``): ``timestep_spacing`` ("leading"), ``steps_offset`` (1 in the Stable
Diffusion configs) and the previous timestep ``t - T // N`` for DDIM and PLMS, ending at abar = 1
(``set_alpha_to_one=True``) or abar_0 (False: the Stable Diffusion release configs and CompVis).
The checkpoint loaders fill them (a diffusers folder from its ``scheduler/`` config); to sample
with others, build the pipeline from a checkpoint whose spec has them::

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
from ldm_jax.diffusion import (
    SAMPLERS,
    classifier_free_guidance,
    make_timesteps,
    strided_previous_timesteps,
)
from ldm_jax.images import to_pil as images_to_pil
from ldm_jax.latent_diffusion import apply_unet, schedule_from_spec
from ldm_jax.models.attention_dispatch import implementation_from_name
from ldm_jax.models.factory import network_modules
from ldm_jax.sampler_options import (
    canonical_sampler,
    check_eta,
    check_guidance,
    check_guidance_rescale,
    check_seed,
    check_strength,
)
from ldm_jax.sampling import inputs as pipeline_inputs
from ldm_jax.sampling import tasks as pipeline_tasks
from ldm_jax.sampling.tasks import TEXT_CONDITIONINGS, model_task

__all__ = ["TEXT_CONDITIONINGS", "LatentDiffusionPipeline", "sampler_iterations"]
OUTPUTS = ("uint8", "float")
# samplers whose previous timestep is diffusers' "t - T // N" (DDIMScheduler, PNDMScheduler)
_STRIDED_SAMPLERS = ("ddim", "plms")


def enable_compilation_cache(cache_dir: str | os.PathLike) -> None:
    """Turn on JAX's persistent compilation cache (``jax_compilation_cache_dir``) there."""
    path = Path(cache_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))


class LatentDiffusionPipeline:
    """Sampling with a latent diffusion checkpoint (any task of tasks.py)."""

    def __init__(
        self,
        checkpoint: LatentDiffusionCheckpoint,
        *,
        dtype=jnp.float32,
        compilation_cache_dir: str | os.PathLike | None = None,
        attention: str | None = None,
    ):
        """`attention`: the attention implementation of every network ("xla", "cudnn",
        "blocked", "splash"); None / "auto" chooses per call by backend, dtype and shape
        (cuDNN flash attention on NVIDIA GPUs in bf16/fp16, splash on TPU)."""
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
        self._step_callback = None  # the current call's callback, read by _host_step
        self._generate = jax.jit(
            self._generate_fn,
            static_argnames=("sampler", "eta", "guided", "output", "with_callback", "from_image"),
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
        **load_kwargs,
    ) -> LatentDiffusionPipeline:
        """Load a checkpoint (any ``LatentDiffusionCheckpoint.from_pretrained`` source) to sample.

        Params are stored and computed in ``dtype``; the timestep settings are the spec's.
        """
        checkpoint = LatentDiffusionCheckpoint.from_pretrained(
            path_or_hub_id, dtype=dtype, **load_kwargs
        )
        return cls(checkpoint, dtype=dtype, compilation_cache_dir=compilation_cache_dir,
                   attention=attention)

    def save_pretrained(self, destination, *, format: str, overwrite: bool = False) -> Path:  # noqa: A002
        """Write the spec, params (in their current dtype) and tokenizer as "diffusers" (folder),
        "compvis" (.safetensors file) or "orbax" (folder), as ``save_checkpoint`` does."""
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
        negative_prompt: str | Sequence[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        sampler: str = "ddim",
        eta: float = 0.0,
        seed: int = 0,
        rng=None,
        latents=None,
        output: str = "uint8",
        callback=None,
        *,
        batch_size: int | None = None,
        class_labels=None,
        image=None,
        strength: float | None = None,
        mask_image=None,
        low_res_image=None,
        guidance_rescale: float = 0.0,
    ) -> np.ndarray:
        """Images: uint8 [B, H, W, 3] (``output="float"``: float32 in [0, 1]).

        What to pass depends on the checkpoint (``self.task``, see tasks.py): ``prompt``
        (text models), ``class_labels`` (class models), ``batch_size`` (unconditional / LDM
        inpainting / SR; default 1), ``image`` + ``mask_image`` (inpainting, white = repaint),
        ``low_res_image`` (super-resolution: the output is the vae factor times larger), and
        ``image`` + ``strength`` in (0, 1] for image-to-image (diffusers semantics: the image is
        encoded, noised to the first of the last ``int(N * strength)`` timesteps, which are then
        run). Images are PIL, uint8 or float [0, 1] arrays of exactly the output size (default:
        the image's size); one image serves the whole batch.

        Guidance applies to text (``negative_prompt``, default "") and class models (the null
        class) when ``guidance_scale > 1``; unconditional, LDM inpainting and SR models ignore it.
        ``guidance_rescale`` in [0, 1] (diffusers' semantics, Lin et al. 2024; 0.7 for
        zero-terminal-SNR v-models) rescales the guided prediction's std towards the conditional
        one's; changing it never recompiles.
        ``latents`` [B, h, w, C] (NHWC; h = H / vae factor) are the initial noise x_T (for
        image-to-image: the noise added to the image latents), else drawn from ``rng`` or
        ``seed``; ``rng`` also drives the stochastic samplers (DDPM, DDIM with eta > 0).

        ``callback(i, x)`` (e.g. a progress bar) runs on the host after every sampler iteration
        with the iteration index (int) and the latents (numpy); see ``sampler_iterations``.
        Any callable reuses one compiled function.

        Checked before anything compiles (ValueError naming the argument): ``sampler`` is a key of
        ``ldm_jax.diffusion.SAMPLERS`` or an alias ("dpm++"), ``guidance_scale`` finite, ``eta`` in
        [0, 1] and for ddim only, ``seed`` an int in [0, 2**32 - 1] (PRNGKey's distinct seeds).
        """
        sampler = canonical_sampler(sampler)  # aliases ("dpm++") share one compiled function
        guidance_scale, eta = check_guidance(guidance_scale), check_eta(eta)
        guidance_rescale = check_guidance_rescale(guidance_rescale)
        if eta and sampler != "ddim":
            raise ValueError(f"eta applies to the ddim sampler only (this is {sampler}); pass 0")
        if strength is not None:
            strength = check_strength(strength)
        if rng is None:
            seed = check_seed(seed)
        if output not in OUTPUTS:
            raise ValueError(f"unknown output {output!r}; choose one of {OUTPUTS}")
        steps = int(num_inference_steps)
        if steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        inputs, guided = pipeline_inputs.condition_inputs(
            self.task, self.spec, self.tokenizer, prompt, negative_prompt, class_labels,
            batch_size, guidance_scale,
        )  # fmt: skip
        if inputs:
            batch = next(iter(inputs.values())).shape[0]
        else:
            batch = 1 if batch_size is None else int(batch_size)
        if batch < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        h, w, image_inputs = pipeline_inputs.image_inputs(
            self.task, self.spec, batch, height, width, image, strength, mask_image, low_res_image
        )
        inputs |= image_inputs
        shape = (batch, h, w, self.spec.unet.out_channels)

        rng = jax.random.PRNGKey(seed) if rng is None else rng
        noise_rng, sample_rng = jax.random.split(rng)
        if latents is None:
            latents = jax.random.normal(noise_rng, shape, jnp.float32)
        else:
            latents = jnp.asarray(latents, jnp.float32)
            if latents.shape != shape:
                raise ValueError(
                    f"latents must have shape {shape} (batch, height / {self.vae_scale_factor}, "
                    f"width / {self.vae_scale_factor}, channels; NHWC), got {latents.shape}"
                )
        inputs["noise"] = latents
        t_N, prev_N = self.timesteps(sampler, steps)
        from_image = strength is not None and self.task.takes_init_image
        if strength is not None:  # img2img, or SD inpainting starting from the noised image
            start = pipeline_inputs.strength_slice(steps, strength)
            t_N, prev_N = t_N[start:], None if prev_N is None else prev_N[start:]
            from_image = from_image or float(strength) < 1.0  # diffusers: 1 = pure noise

        data = self._batch_sharding(batch)
        inputs = jax.device_put(inputs, data)
        self._step_callback = callback
        try:
            images = self._generate(
                self.params,
                inputs,
                self.schedule,
                jnp.asarray(t_N),
                None if prev_N is None else jnp.asarray(prev_N),
                jnp.float32(guidance_scale),
                jnp.float32(guidance_rescale),
                sample_rng,
                sampler=sampler,
                eta=float(eta),
                guided=guided,
                output=output,
                with_callback=callback is not None,
                from_image=from_image,
            )
            images = np.asarray(images)
            if callback is not None:
                jax.effects_barrier()  # every host callback has run before the call returns
            return images
        finally:
            self._step_callback = None

    @staticmethod
    def to_pil(images) -> list:
        """uint8 [B, H, W, 3] (or float in [0, 1]) images as a list of PIL images."""
        return images_to_pil(images)

    # --- internals

    def _host_step(self, i, x) -> None:
        """The one host function the compiled sampler calls; forwards to the call's callback."""
        if self._step_callback is not None:
            self._step_callback(int(i), np.asarray(x))

    def _batch_sharding(self, batch: int) -> NamedSharding:
        if batch % self.mesh.size == 0:
            return NamedSharding(self.mesh, PartitionSpec("data"))
        return NamedSharding(self.mesh, PartitionSpec())

    def timesteps(self, sampler: str, num_inference_steps: int):
        """(t_N, prev_N or None): the training timesteps a call visits, from the spec's timestep
        settings (prev_N only for the samplers that step to ``t - T // N``: DDIM, PLMS)."""
        steps = int(num_inference_steps)
        sampler = canonical_sampler(sampler)
        cfg = self.spec.diffusion
        T = self.schedule.num_train_timesteps
        t_N = make_timesteps(steps, T, cfg.timestep_spacing, cfg.steps_offset)
        prev_N = None
        if sampler in _STRIDED_SAMPLERS:
            prev_N = strided_previous_timesteps(t_N, T, final=-1 if cfg.set_alpha_to_one else 0)
        return t_N, prev_N

    def _generate_fn(
        self, params, inputs, schedule, t_N, prev_N, scale, rescale, rng, *, sampler, eta, guided,
        output,
        with_callback=False, from_image=False,
    ):  # fmt: skip
        """The pure sampling function: (params, inputs, timesteps, ...) -> images."""
        spec, modules, task = self.spec, self.modules, self.task
        cond, uncond = pipeline_tasks.conditioning(spec, modules, params, task, inputs, guided)

        def apply_fn(x_t, t_B, c):
            return apply_unet(modules["unet"], params["unet"], x_t, t_B, c)

        if guided:
            denoise = classifier_free_guidance(apply_fn, cond, uncond, scale, rescale)
        else:
            denoise = classifier_free_guidance(apply_fn, cond, uncond, 1.0)
        x_T = pipeline_tasks.initial_latents(
            spec, modules, params, inputs, schedule, t_N[0], from_image
        )
        options = {"eta": eta} if sampler == "ddim" else {}
        x0 = SAMPLERS[sampler](
            denoise,
            x_T,
            schedule,
            t_N,
            prediction_type=spec.diffusion.prediction_type,
            rng=rng,
            prev_timesteps=prev_N,
            callback=self._host_step if with_callback else None,
            **options,
        )
        images = pipeline_tasks.decode(spec, modules, params, task, inputs, x0)
        if output == "uint8":
            return jnp.round(images * 255).astype(jnp.uint8)
        return images


def sampler_iterations(sampler: str, num_inference_steps: int, strength=None) -> int:
    """How many times ``callback`` runs: N visited steps (``int(N * strength)`` with strength),
    or one more for PLMS (N >= 2)."""
    steps = int(num_inference_steps)
    if strength is not None:
        steps -= pipeline_inputs.strength_slice(steps, strength)
    return steps + 1 if canonical_sampler(sampler) == "plms" and steps >= 2 else steps
