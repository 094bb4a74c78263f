"""SDXL LoRAs with kohya's SGM (CompVis) UNet module names, against diffusers' own reading of
them."""

import jax
import numpy as np
import safetensors.numpy
from support.lora_files import random_factors, write_kohya
from support.tiny_pipelines import sdxl_pipeline
from test_lora_sdxl import SCALE, WEIGHT_BAR, params_of

from ldm_jax.checkpoints.compvis.unet import compvis_unet_table
from ldm_jax.checkpoints.diffusers.unet import diffusers_unet_table
from ldm_jax.checkpoints.key_table import flatten_params
from ldm_jax.checkpoints.lora import merged_kernels, read_lora, replace_leaves


def _sgm_names(spec) -> dict[str, str]:
    """kohya diffusers-path name -> kohya SGM-path name of every UNet kernel, through the two
    exact checkpoint tables (the same parameter on both sides)."""
    compvis = {e.flax_path: e.torch_key for e in compvis_unet_table(spec.unet).entries}
    names = {}
    for entry in diffusers_unet_table(spec.unet).entries:
        if entry.flax_path[-1] == "kernel":
            diffusers_name = entry.torch_key.removesuffix(".weight").replace(".", "_")
            sgm_name = compvis[entry.flax_path].removesuffix(".weight").replace(".", "_")
            names["lora_unet_" + diffusers_name] = "lora_unet_" + sgm_name
    return names


def test_sgm_unet_names_as_diffusers_reads_them(tmp_path):
    """kohya's SDXL trainer writes the UNet's SGM (CompVis) paths; diffusers maps them with its
    own block arithmetic (`_maybe_map_sgm_blocks_to_diffusers`): the fused weights agree."""
    pipe = sdxl_pipeline()
    factors = {k: v for k, v in random_factors(pipe, 6, alpha=2.0).items() if k[0] == "unet"}
    write_kohya(tmp_path / "diffusers_names.safetensors", factors, sdxl=True)
    pipe.save_pretrained(tmp_path / "base")
    spec, params = params_of(tmp_path / "base")
    sgm = _sgm_names(spec)
    tensors = safetensors.numpy.load_file(str(tmp_path / "diffusers_names.safetensors"))
    renamed = {}
    for key, value in tensors.items():
        module, _, suffix = key.partition(".")
        renamed[f"{sgm[module]}.{suffix}"] = value
    assert any(k.startswith("lora_unet_input_blocks_3_1_transformer_blocks_1_") for k in renamed)
    safetensors.numpy.save_file(renamed, str(tmp_path / "sgm.safetensors"))
    pipe.load_lora_weights(str(tmp_path / "sgm.safetensors"))
    pipe.fuse_lora(lora_scale=SCALE)
    pipe.unload_lora_weights()
    pipe.save_pretrained(tmp_path / "fused")
    _, reference = params_of(tmp_path / "fused")
    lora = read_lora(tmp_path / "sgm.safetensors", spec, params)
    flat = flatten_params(params)
    merged = replace_leaves(params, merged_kernels(flat.__getitem__, [(lora, SCALE)]))
    ours, theirs = flatten_params(jax.device_get(merged)), flatten_params(reference)
    error = max(float(np.abs(np.asarray(ours[k]) - np.asarray(theirs[k])).max()) for k in ours)
    print(f"SDXL LoRA kohya SGM names: max |ours - diffusers fuse_lora| = {error:.2e}")
    assert error <= WEIGHT_BAR
