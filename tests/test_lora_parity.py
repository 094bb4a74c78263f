"""LoRA merging against diffusers + peft (`load_lora_weights` + `fuse_lora`) on the tiny SD models:
every UNet and text-encoder weight (images: test_lora_images.py)."""

import jax
import numpy as np
import pytest
from support.lora_files import (
    apply_factors,
    lora_modules,
    random_factors,
    sd2_like_pipeline,
    write_kohya,
    write_peft,
)
from support.tiny_pipelines import sd_pipeline

from ldm_jax.checkpoints.key_table import flatten_params
from ldm_jax.sampling.pipeline import LatentDiffusionPipeline

WEIGHT_BAR = 1e-6  # max |ours - diffusers| over every merged weight
SCALE = 0.7
PEFT_ALPHAS = {"unet": 6.0, "text_encoder": 2.0}
PEFT_PATTERN = {"unet": {"mid_block.attentions.0.proj_in": 1.5}}  # PEFT's alpha_pattern rule


def _params_of(torch_pipe, folder) -> dict:
    """A torch pipeline's weights as our params (through the diffusers folder loader)."""
    torch_pipe.save_pretrained(folder)
    return LatentDiffusionPipeline.from_pretrained(folder).params


def _fused(make, lora_file, scale, folder):
    pipe = make()
    pipe.load_lora_weights(str(lora_file))
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()  # keeps the fused weights, drops the peft layers
    return pipe, _params_of(pipe, folder)


def _max_error(ours, reference) -> float:
    a, b = flatten_params(jax.device_get(ours)), flatten_params(reference)
    assert a.keys() == b.keys()
    return max(float(np.abs(np.asarray(a[k]) - np.asarray(b[k])).max()) for k in a)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """(base folder, kohya file, PEFT file, factors of each) for the tiny SD1-style model."""
    root = tmp_path_factory.mktemp("lora")
    pipe = sd_pipeline()
    pipe.save_pretrained(root / "base")
    # uniform alpha: diffusers 0.42.1 mis-scales kohya files whose alphas differ (see below)
    kohya = random_factors(pipe, 0, ranks=(2, 3), alpha=2.5)
    write_kohya(root / "kohya.safetensors", kohya)
    peft = random_factors(pipe, 1, ranks=(3,))
    write_peft(root / "peft.safetensors", peft, PEFT_ALPHAS, PEFT_PATTERN)
    return root, kohya, peft


def test_covers_attention_ff_conv_and_text_layers():
    modules = lora_modules(sd_pipeline())
    unet = modules["unet"]
    for part in ("attn1.to_q", "attn2.to_out.0", "ff.net.0.proj", "proj_in", "resnets.0.conv1",
                 "conv_shortcut", "downsamplers.0.conv", "time_emb_proj"):  # fmt: skip
        assert any(part in m for m in unet), part
    assert len(modules["text_encoder"]) == 12  # 2 layers x q k v out fc1 fc2


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_merged_weights_match_diffusers(sd, fmt, tmp_path):
    root, _, _ = sd
    lora_file = root / f"{fmt}.safetensors"
    _, reference = _fused(sd_pipeline, lora_file, SCALE, tmp_path / "fused")
    pipe = LatentDiffusionPipeline.from_pretrained(root / "base")
    base = pipe.params
    pipe.load_lora(lora_file, scale=SCALE)
    error = _max_error(pipe.params, reference)
    print(f"LoRA {fmt}: max |merged ours - diffusers fuse_lora| = {error:.2e}")
    assert error <= WEIGHT_BAR
    changed = _max_error(base, reference)
    assert changed > 0.05  # the LoRA moves the weights far beyond the bar


def test_per_module_alphas_match_kohya_formula(sd, tmp_path):
    """Alphas that differ per module (as kohya trainers write): ours against the formula applied
    to the torch weights. diffusers 0.42.1 gets these wrong: its alpha_pattern keys for kohya
    attention and text-encoder layers match no module, so those layers take the common alpha."""
    root, _, _ = sd
    pipe = sd_pipeline()
    factors = random_factors(pipe, 2, ranks=(2, 3))  # alphas rank + 1 / rank + 2
    write_kohya(tmp_path / "alphas.safetensors", factors)
    apply_factors(pipe, factors, SCALE)
    reference = _params_of(pipe, tmp_path / "reference")
    ours = LatentDiffusionPipeline.from_pretrained(root / "base")
    ours.load_lora(tmp_path / "alphas.safetensors", scale=SCALE)
    error = _max_error(ours.params, reference)
    print(f"LoRA kohya per-module alphas: max |ours - formula| = {error:.2e}")
    assert error <= WEIGHT_BAR


def test_linear_projection_model_matches_diffusers(tmp_path):
    """SD 2.x-style linear proj_in / proj_out: the LoRA factors are linear there."""
    pipe = sd2_like_pipeline()
    pipe.save_pretrained(tmp_path / "base")
    factors = random_factors(pipe, 3, ranks=(2, 4), alpha=3.0)
    proj = factors["unet", "mid_block.attentions.0.proj_in"]
    assert proj[0].ndim == 2  # linear factors
    write_kohya(tmp_path / "kohya.safetensors", factors)
    _, reference = _fused(sd2_like_pipeline, tmp_path / "kohya.safetensors", 1.3, tmp_path / "f")
    ours = LatentDiffusionPipeline.from_pretrained(tmp_path / "base")
    assert ours.spec.unet.use_linear_in_transformer
    ours.load_lora(tmp_path / "kohya.safetensors", scale=1.3)
    error = _max_error(ours.params, reference)
    print(f"LoRA kohya, linear projections: max |ours - diffusers| = {error:.2e}")
    assert error <= WEIGHT_BAR
