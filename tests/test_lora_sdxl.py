"""SDXL LoRAs (both text encoders and the UNet) merged as diffusers + peft `fuse_lora` does, on
the tiny SDXL base pipeline, in both formats."""

import jax
import numpy as np
import pytest
from support.lora_files import random_factors, write_kohya, write_peft
from support.tiny_pipelines import sdxl_pipeline

from ldm_jax.checkpoints import LatentDiffusionCheckpoint
from ldm_jax.checkpoints.key_table import flatten_params
from ldm_jax.checkpoints.lora import merged_kernels, read_lora, replace_leaves

WEIGHT_BAR = 1e-6
SCALE = 0.6


def params_of(folder) -> tuple:
    checkpoint = LatentDiffusionCheckpoint.from_pretrained(folder)
    return checkpoint.spec, checkpoint.params


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_sdxl")
    sdxl_pipeline().save_pretrained(root / "base")
    return root


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_sdxl_merge_matches_diffusers(base, fmt, tmp_path):
    pipe = sdxl_pipeline()
    lora_file = tmp_path / f"{fmt}.safetensors"
    if fmt == "kohya":
        factors = random_factors(pipe, 4, ranks=(2, 3), alpha=1.5)
        write_kohya(lora_file, factors, sdxl=True)
    else:
        factors = random_factors(pipe, 5, ranks=(2,))
        alphas = {"unet": 3.0, "text_encoder": 1.0, "text_encoder_2": 4.0}
        write_peft(lora_file, factors, alphas)
    components = {c for c, _ in factors}
    assert components == {"unet", "text_encoder", "text_encoder_2"}
    pipe.load_lora_weights(str(lora_file))
    pipe.fuse_lora(lora_scale=SCALE)
    pipe.unload_lora_weights()
    pipe.save_pretrained(tmp_path / "fused")
    _, reference = params_of(tmp_path / "fused")

    spec, params = params_of(base / "base")
    lora = read_lora(lora_file, spec, params)
    assert len(lora.layers) == len(factors)
    flat = flatten_params(params)
    merged = replace_leaves(params, merged_kernels(flat.__getitem__, [(lora, SCALE)]))
    ours, theirs = flatten_params(jax.device_get(merged)), flatten_params(reference)
    assert ours.keys() == theirs.keys()
    error = max(float(np.abs(np.asarray(ours[k]) - np.asarray(theirs[k])).max()) for k in ours)
    moved = max(float(np.abs(np.asarray(flat[k]) - np.asarray(theirs[k])).max()) for k in ours)
    print(f"SDXL LoRA {fmt}: max |ours - diffusers fuse_lora| = {error:.2e} (moved {moved:.2f})")
    assert error <= WEIGHT_BAR < 0.05 < moved
    for encoder in ("encoder_0", "encoder_1"):  # both text encoders were adapted
        layer = ("cond_stage", encoder, "layers_0", "attn", "q", "kernel")
        assert not np.array_equal(ours[layer], np.asarray(flat[layer]))
