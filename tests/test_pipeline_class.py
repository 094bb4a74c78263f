"""Class-conditional sampling (cin256-style) with guidance via the null class, against a reference
loop: diffusers' DDIMScheduler around our networks with the CompVis guidance equation."""

import dataclasses

import diffusers
import numpy as np
import pytest
from support.tiny_pipelines import reference_ddim
from support.tiny_specs import SD1_LIKE, random_params

from ldm_jax.checkpoints import LatentDiffusionCheckpoint
from ldm_jax.models.conditioning import ClassEmbedderConfig
from ldm_jax.models.factory import network_modules
from ldm_jax.sampling.pipeline import LatentDiffusionPipeline
from ldm_jax.spec import CondStageSpec

PIXEL_BAR = 2 / 255
CLASSES = ClassEmbedderConfig(n_classes=11, embed_dim=64, null_class=10)  # 10 labels + null
CLASS_SPEC = dataclasses.replace(
    SD1_LIKE,
    cond_stage=CondStageSpec("class", CLASSES, trainable=True),
    diffusion=dataclasses.replace(SD1_LIKE.diffusion, latent_size=8),
)


@pytest.fixture(scope="module")
def params():
    return random_params(CLASS_SPEC, seed=5)


def _reference(params, labels, x_T, scale, steps):
    """CompVis: uc = embed(null class); eps = eps_uc + scale * (eps_c - eps_uc); DDIM."""
    modules = network_modules(CLASS_SPEC)
    embed, unet, vae = (modules[k][0] for k in ("cond_stage", "unet", "first_stage"))
    c = embed.apply({"params": params["cond_stage"]}, np.asarray(labels, np.int32))
    uc = embed.apply({"params": params["cond_stage"]}, np.full(len(labels), 10, np.int32))

    def unet_fn(x, t):
        t_B = np.full((len(labels),), t, np.int32)
        e_c = unet.apply({"params": params["unet"]}, x, t_B, c)
        e_uc = unet.apply({"params": params["unet"]}, x, t_B, uc)
        return np.asarray(e_uc) + scale * (np.asarray(e_c) - np.asarray(e_uc))

    scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        set_alpha_to_one=False, steps_offset=1, clip_sample=False,
    )  # fmt: skip
    z = reference_ddim(unet_fn, x_T, scheduler, steps) / CLASS_SPEC.diffusion.scale_factor
    x = vae.apply({"params": params["first_stage"]}, z, method="decode")
    return np.clip(np.asarray(x) / 2 + 0.5, 0.0, 1.0)


def test_class_conditional_with_null_class_guidance(params, parity):
    pipe = LatentDiffusionPipeline(LatentDiffusionCheckpoint(CLASS_SPEC, params))
    assert pipe.task.name == "class-conditional"
    labels = [3, 7]
    x_T = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    reference = _reference(params, labels, x_T, scale=3.0, steps=4)
    ours = pipe(class_labels=labels, guidance_scale=3.0, num_inference_steps=4, latents=x_T,
                output_type="np").images  # fmt: skip
    diff = np.abs(ours - reference).max()
    print(f"class-conditional max abs pixel diff: {diff:.2e}")
    parity("pipeline class-conditional: null-class CFG 3, DDIM, 4 steps", ours, reference,
           PIXEL_BAR)  # fmt: skip
    assert ours.shape == (2, 16, 16, 3) and diff <= PIXEL_BAR
    # the label and the guidance scale reach the images (same compiled function)
    swapped = pipe(class_labels=[7, 3], guidance_scale=3.0, num_inference_steps=4, latents=x_T,
                   output_type="np").images  # fmt: skip
    assert np.abs(swapped - ours).max() > max(1e-4, 100 * diff)  # random weights: a small effect
    assert pipe._generate._cache_size() == 1
    assert pipe(class_labels=5, guidance_scale=1.0, num_inference_steps=1,
                output_type="uint8").images.shape == (1, 16, 16, 3)


def test_bad_class_inputs(params):
    pipe = LatentDiffusionPipeline(LatentDiffusionCheckpoint(CLASS_SPEC, params))
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 9\], got \[10, -1\]"):
        pipe(class_labels=[10, -1, 2])
    with pytest.raises(ValueError, match="class_labels must be an int or a non-empty list"):
        pipe(class_labels=[1.5])
    with pytest.raises(ValueError, match=r"checkpoint \(class-conditional\) needs class_labels"):
        pipe()
    with pytest.raises(ValueError, match="prompt does not apply.*takes class_labels"):
        pipe("a dog", class_labels=[1])
    no_null = dataclasses.replace(
        CLASS_SPEC, cond_stage=CondStageSpec("class", dataclasses.replace(CLASSES, null_class=None))
    )
    pipe = LatentDiffusionPipeline(LatentDiffusionCheckpoint(no_null, params))
    with pytest.raises(ValueError, match="needs a null class.*pass guidance_scale=1"):
        pipe(class_labels=[1], guidance_scale=3.0)


def test_pipeline_is_compiled_with_ldm_jax_compile_options(params, monkeypatch):
    import ldm_jax.sampling.pipeline  # noqa: PLC0415

    # an option value XLA rejects: sampling only fails if the options reach the pipeline's jit
    monkeypatch.setattr(ldm_jax.sampling.pipeline, "compiler_options",
                        lambda: {"xla_cpu_experimental_ynn_fusion_type": "NO_SUCH_TYPE"})
    pipe = LatentDiffusionPipeline(LatentDiffusionCheckpoint(CLASS_SPEC, params))
    with pytest.raises(Exception, match="NO_SUCH_TYPE"):
        pipe(class_labels=[1], num_inference_steps=1)
