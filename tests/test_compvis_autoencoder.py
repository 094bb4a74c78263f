"""CompVis first-stage key tables, checked against diffusers' own CompVis VAE converter.

diffusers AutoencoderKL / VQModel (random weights) -> our params (diffusers tables) -> CompVis
state dict (tables under test) -> diffusers' `convert_ldm_vae_checkpoint` must give back every
original tensor bit for bit. That converter knows the SD VAE only; the per-level attention of
kl-f16/kl-f32/vq-f8/vq-f16 is converted with its own attention helper, and the VQ codebook
(a plain copy in diffusers' VQModel) by hand.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers import VQModel as TorchVQModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_vae_checkpoint,
    update_vae_attentions_ldm_to_diffusers,
)

from ldm_jax.checkpoints.compvis.autoencoder import (
    compvis_autoencoder_table,
    compvis_first_stage_table,
    compvis_vq_table,
)
from ldm_jax.checkpoints.diffusers.autoencoder import (
    autoencoder_kl_table,
    diffusers_config,
    vq_model_table,
)
from ldm_jax.checkpoints.errors import CheckpointMismatchError
from ldm_jax.checkpoints.key_table import flatten_params
from ldm_jax.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm_jax.models.params import abstract_params
from ldm_jax.models.vq import VQConfig, VQModel
from ldm_jax.presets.autoencoders import AUTOENCODER_PRESETS, SD_VAE

PREFIX = "first_stage_model."
# SD-VAE-like at toy size (mid attention only), and with attention at level 1 (16 px).
KL = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=32)
KL_ATTN = dataclasses.replace(KL, attn_resolutions=(16,), z_channels=3, embed_dim=3)
VQ = VQConfig(
    ch=32,
    ch_mult=(1, 2),
    num_res_blocks=1,
    resolution=32,
    attn_resolutions=(16,),
    z_channels=4,
    embed_dim=3,
    n_embed=16,
)
VQ_NOATTN = dataclasses.replace(VQ, attn_resolutions=(), mid_attention=False)


def _module(cfg):
    return VQModel(cfg) if isinstance(cfg, VQConfig) else AutoencoderKL(cfg)


def _abstract(cfg):
    return abstract_params(_module(cfg), jnp.zeros((1, 32, 32, 3)))


def _diffusers(cfg, device=None):
    cls = TorchVQModel if isinstance(cfg, VQConfig) else TorchAutoencoderKL
    torch.manual_seed(0)
    with torch.device(device or "cpu"):
        model = cls(**diffusers_config(cfg))
    if device is None:
        with torch.no_grad():  # every tensor random: norms off 1, biases off 0
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return model


def _compvis_to_diffusers(compvis: dict, cfg: AutoencoderConfig, config: dict) -> dict:
    """diffusers' converter, plus level attention and the codebook, which it does not map."""
    converted = convert_ldm_vae_checkpoint(compvis, config)
    converted = {k: v for k, v in converted.items() if ".attn." not in k}  # left unconverted
    plain = {k.removeprefix(PREFIX): v for k, v in compvis.items()}
    for level in range(cfg.num_levels):
        up = cfg.num_levels - 1 - level  # diffusers runs up_blocks[0] first
        for old, new in (
            (f"encoder.down.{level}.attn", f"encoder.down_blocks.{level}.attentions"),
            (f"decoder.up.{level}.attn", f"decoder.up_blocks.{up}.attentions"),
        ):
            keys = [k for k in plain if k.startswith(old + ".")]
            update_vae_attentions_ldm_to_diffusers(keys, converted, plain, {"old": old, "new": new})
    if isinstance(cfg, VQConfig):
        converted["quantize.embedding.weight"] = plain["quantize.embedding.weight"]
    return converted


@pytest.mark.parametrize(
    "cfg, prefix",
    [(KL, PREFIX), (KL_ATTN, PREFIX), (VQ, ""), (VQ_NOATTN, "")],
    ids=["kl-sd-like", "kl-level-attention", "vq-standalone", "vq-no-attention"],
)
def test_diffusers_converter_reads_our_export_bit_exactly(cfg, prefix):
    """Inside an LDM file (prefix first_stage_model.) and as a standalone model.ckpt."""
    model = _diffusers(cfg)
    original = {k: v.numpy() for k, v in model.state_dict().items()}
    diffusers_table = (
        vq_model_table(cfg) if isinstance(cfg, VQConfig) else autoencoder_kl_table(cfg)
    )
    params = diffusers_table.to_flax(original, _abstract(cfg))
    table = compvis_first_stage_table(cfg)
    compvis = table.to_torch(params)
    torch_dict = {prefix + k: torch.tensor(v) for k, v in compvis.items()}
    converted = _compvis_to_diffusers(torch_dict, cfg, dict(model.config))
    assert converted.keys() == original.keys()
    for key, value in original.items():
        np.testing.assert_array_equal(converted[key].numpy(), value, err_msg=key)
    again = table.to_torch(table.to_flax(compvis, params))
    assert again.keys() == compvis.keys()
    for key, value in compvis.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)


def test_compvis_names_and_the_decoder_level_order():
    compvis = compvis_vq_table(VQ).to_torch(jax.tree.map(np.asarray, _random(VQ)))
    # The decoder's up.{level} is indexed by resolution: level 0 (full size, no upsample) has
    # the widest-to-narrowest nin_shortcut (64 -> 32) in its first block.
    assert compvis["decoder.up.0.block.0.nin_shortcut.weight"].shape == (32, 64, 1, 1)
    assert "decoder.up.0.upsample.conv.weight" not in compvis
    assert compvis["decoder.up.1.upsample.conv.weight"].shape == (64, 64, 3, 3)
    assert compvis["encoder.down.1.attn.0.q.weight"].shape == (64, 64, 1, 1)
    assert compvis["encoder.mid.attn_1.proj_out.weight"].shape == (64, 64, 1, 1)
    assert compvis["quantize.embedding.weight"].shape == (16, 3)
    assert compvis["quant_conv.weight"].shape == (3, 4, 1, 1)


def _random(cfg):
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), _abstract(cfg))


def test_table_kinds_and_mismatches_raise():
    with pytest.raises(ValueError, match="compvis_vq_table"):
        compvis_autoencoder_table(VQ)
    with pytest.raises(ValueError, match="VQConfig"):
        compvis_vq_table(KL)
    vq_file = compvis_vq_table(VQ).to_torch(_random(VQ))
    kl_shapes = _abstract(dataclasses.replace(KL, attn_resolutions=(16,)))
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys: quantize\.embedding"):
        compvis_autoencoder_table(dataclasses.replace(KL, attn_resolutions=(16,))).to_flax(
            vq_file, kl_shapes
        )
    no_attn = {k: v for k, v in vq_file.items() if ".attn" not in k}
    with pytest.raises(CheckpointMismatchError, match=r"missing keys: decoder\.mid\.attn_1"):
        compvis_vq_table(VQ).to_flax(no_attn, _abstract(VQ))


@pytest.mark.parametrize("name", sorted(AUTOENCODER_PRESETS))
def test_full_size_presets_match_the_diffusers_layout(name):
    """Every published first stage, shapes only (meta tensors): our CompVis table, read by the
    converter above, gives exactly the keys and shapes of the diffusers model."""
    cfg = AUTOENCODER_PRESETS[name]
    table = compvis_first_stage_table(cfg)
    abstract = abstract_params(_module(cfg), jnp.zeros((1, 64, 64, 3)))
    table.check_covers(abstract)
    flat = flatten_params(abstract)
    compvis = {
        PREFIX + e.torch_key: torch.empty(
            e.transform.torch_shape(flat[e.flax_path].shape), device="meta"
        )
        for e in table.entries
    }
    model = _diffusers(cfg, device="meta")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    converted = _compvis_to_diffusers(compvis, cfg, dict(model.config))
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    if cfg == SD_VAE:
        assert len(compvis) == 248  # tensors of the SD 1.x/2.x VAE (first_stage_model.*)
        assert sum(int(np.prod(s)) for s in expected.values()) == 83_653_863
