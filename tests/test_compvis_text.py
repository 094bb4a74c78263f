"""CompVis conditioning-encoder key tables (SD 1.x CLIP, SD 2.x OpenCLIP, LDM BERTEmbedder,
ClassEmbedder, SpatialRescaler), checked against diffusers' converters and numerically."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_open_clip_checkpoint,
)
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import (
    LDMBertConfig as DiffusersLDMBertConfig,
)
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel
from references.torch_reference import randomize_

from ldm_jax.checkpoints.compvis.text import (
    compvis_class_embedder_table,
    compvis_clip_table,
    compvis_cond_stage_table,
    compvis_ldm_bert_table,
    compvis_openclip_table,
    compvis_spatial_rescaler_table,
)
from ldm_jax.checkpoints.diffusers.ldm_bert import ldm_bert_abstract_params, ldm_bert_key_table
from ldm_jax.checkpoints.errors import CheckpointMismatchError
from ldm_jax.checkpoints.key_table import flatten_params
from ldm_jax.checkpoints.transformers_clip import clip_text_abstract_params, clip_text_key_table
from ldm_jax.models.clip_text import CLIPTextConfig
from ldm_jax.models.conditioning import (
    ClassEmbedderConfig,
    SpatialRescaler,
    SpatialRescalerConfig,
)
from ldm_jax.models.ldm_bert import LDMBertConfig
from ldm_jax.models.params import abstract_params
from ldm_jax.presets.text_encoders import clip_text_preset
from ldm_jax.spec import CondStageSpec

CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."


def _clip(activation: str, layers: int = 3):
    cfg = CLIPTextConfig(
        vocab_size=99,
        max_length=16,
        width=32,
        num_layers=layers,
        num_heads=4,
        mlp_dim=37,
        activation=activation,
    )
    hf = transformers.CLIPTextConfig(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=16,
        hidden_act=activation,
    )
    model = transformers.CLIPTextModel(hf).eval()
    randomize_(model, 0)
    state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
    params = clip_text_key_table(cfg).to_flax(state_dict, clip_text_abstract_params(cfg))
    return cfg, model, state_dict, params


def _with_text_model(state_dict):
    """transformers >= 5.6 saves without `text_model.`; the single-file converters add it."""
    return {
        k if k.startswith("text_model.") else "text_model." + k: v for k, v in state_dict.items()
    }


def _assert_same(converted, original):
    assert converted.keys() == original.keys()
    for key, value in original.items():
        np.testing.assert_array_equal(np.asarray(converted[key]), value, err_msg=key)


def _assert_round_trip(table, compvis, params):
    again = table.to_torch(table.to_flax(compvis, params))
    assert again.keys() == compvis.keys()
    for key, value in compvis.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)


def test_sd1_clip_table_is_what_diffusers_reads_from_a_single_file():
    cfg, _, original, params = _clip("quick_gelu")
    table = compvis_clip_table(cfg)
    compvis = table.to_torch(params)
    assert "text_model.encoder.layers.2.mlp.fc2.weight" in compvis
    converted = convert_ldm_clip_checkpoint({CLIP_PREFIX + k: v for k, v in compvis.items()})
    _assert_same(converted, _with_text_model(original))
    _assert_round_trip(table, compvis, params)
    # Files written by older transformers carry the position_ids buffer: accepted, ignored.
    position_ids = {"text_model.embeddings.position_ids": np.arange(16)[None]}
    table.to_flax(compvis | position_ids, params)


def test_sd2_openclip_table_is_what_diffusers_reads_from_a_single_file():
    cfg, model, original, params = _clip("gelu")
    table = compvis_openclip_table(cfg)
    compvis = table.to_torch(params)
    assert compvis["transformer.resblocks.1.attn.in_proj_weight"].shape == (96, 32)
    unused = {"text_projection": np.eye(32, dtype=np.float32), "logit_scale": np.float32(4.6)}
    checkpoint = {OPENCLIP_PREFIX + k: torch.tensor(v) for k, v in (compvis | unused).items()}
    converted = convert_open_clip_checkpoint(model, checkpoint)
    converted.pop("text_projection.weight", None)  # CLIPTextModelWithProjection only
    _assert_same({k: v.numpy() for k, v in converted.items()}, _with_text_model(original))
    _assert_round_trip(table, compvis, params)
    table.to_flax(compvis | unused, params)  # the contrastive head is accepted and ignored


def test_openclip_fused_in_proj_runs_in_torch_multihead_attention(parity):
    """open_clip's attention is torch.nn.MultiheadAttention: our exported in_proj must make it
    compute what the HF layer (q_proj/k_proj/v_proj) computes."""
    cfg, model, _, params = _clip("gelu")
    compvis = compvis_openclip_table(cfg).to_torch(params)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    names = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
    mha.load_state_dict(
        {n: torch.tensor(compvis[f"transformer.resblocks.0.attn.{n}"]) for n in names}
    )
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(0))
    causal = torch.full((7, 7), float("-inf")).triu(1)
    layer = getattr(model, "text_model", model).encoder.layers[0]  # transformers 4.x / 5.x
    with torch.no_grad():
        ours, _ = mha(x, x, x, need_weights=False, attn_mask=causal)
        expected = layer.self_attn(x, attention_mask=causal[None, None])[0]
    parity("compvis openclip table: fused in_proj (nn.MultiheadAttention)", ours, expected)


@pytest.mark.parametrize("preset, layers", [("clip-vit-l-14", 12), ("openclip-vit-h-14", 24)])
def test_full_size_text_tables_match_the_published_layouts(preset, layers):
    """Shapes only (meta tensors): CLIP ViT-L/14 (SD 1.x) and all 24 OpenCLIP ViT-H/14 blocks
    (SD 2.x; diffusers' converter drops block 23 and ships a 23-layer text encoder)."""
    cfg = clip_text_preset(preset)
    abstract = clip_text_abstract_params(cfg)
    openclip = preset.startswith("openclip")
    table = compvis_openclip_table(cfg) if openclip else compvis_clip_table(cfg)
    table.check_covers(abstract)
    flat = flatten_params(abstract)
    compvis = {}
    for e in table.entries:
        paths = getattr(e, "flax_paths", None) or (e.flax_path,)
        shapes = [e.transform.torch_shape(flat[p].shape) for p in paths]
        shape = (sum(s[0] for s in shapes), *shapes[0][1:])
        compvis[e.torch_key] = torch.empty(shape, device="meta")
    # HF CLIP: 16 tensors a block; open_clip fuses q/k/v weights and biases into 2 of them.
    assert len(compvis) == {"clip-vit-l-14": 196, "openclip-vit-h-14": 292}[preset]
    hf = transformers.CLIPTextConfig(
        hidden_size=cfg.width,
        intermediate_size=cfg.mlp_dim,
        num_attention_heads=cfg.num_heads,
        num_hidden_layers=layers - 1 if openclip else layers,
        hidden_act=cfg.activation,
    )
    with torch.device("meta"):
        model = transformers.CLIPTextModel(hf)
    expected = {k: tuple(v.shape) for k, v in _with_text_model(model.state_dict()).items()}
    if openclip:
        checkpoint = {OPENCLIP_PREFIX + k: v for k, v in compvis.items()}
        converted = convert_open_clip_checkpoint(model, checkpoint)
    else:
        converted = convert_ldm_clip_checkpoint({CLIP_PREFIX + k: v for k, v in compvis.items()})
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    if not openclip:
        assert sum(int(np.prod(s)) for s in expected.values()) == 123_060_480


def _xtransformers_forward(sd, cfg: LDMBertConfig, ids):
    """CompVis BERTEmbedder forward (x_transformer.py TransformerWrapper(Encoder), pre-norm,
    return_embeddings=True) over CompVis-named tensors."""

    def w(k):
        return torch.tensor(sd[k])

    def lin(p, x, bias=True):
        return F.linear(x, w(f"{p}.weight"), w(f"{p}.bias") if bias else None)

    def ln(p, x):
        return F.layer_norm(x, x.shape[-1:], w(f"{p}.weight"), w(f"{p}.bias"))

    t = "transformer."
    x = F.embedding(ids, w(f"{t}token_emb.weight"))
    x = x + w(f"{t}pos_emb.emb.weight")[: ids.shape[1]][None]
    for i in range(cfg.num_layers):
        a, f = f"{t}attn_layers.layers.{2 * i}", f"{t}attn_layers.layers.{2 * i + 1}"
        y = ln(f"{a}.0", x)
        q, k, v = (
            lin(f"{a}.1.to_{n}", y, bias=False).unflatten(-1, (cfg.num_heads, -1)).transpose(1, 2)
            for n in "qkv"
        )
        dots = torch.einsum("bhid,bhjd->bhij", q, k) * cfg.head_dim**-0.5
        out = torch.einsum("bhij,bhjd->bhid", dots.softmax(-1), v).transpose(1, 2).flatten(2)
        x = lin(f"{a}.1.to_out", out) + x
        y = F.gelu(lin(f"{f}.1.net.0.0", ln(f"{f}.0", x)))
        x = lin(f"{f}.1.net.2", y) + x
    return ln(f"{t}norm", x)


def test_ldm_bert_table_runs_as_the_compvis_x_transformer(parity):
    """diffusers LDMBertModel weights -> ours -> CompVis BERTEmbedder keys, run with
    x-transformers' semantics: the same last hidden state (dropout off, as at inference)."""
    cfg = LDMBertConfig(
        vocab_size=101, max_length=16, width=32, num_layers=3, num_heads=4, head_dim=12, mlp_dim=40
    )
    model = LDMBertModel(
        DiffusersLDMBertConfig(
            vocab_size=101,
            max_position_embeddings=16,
            encoder_layers=3,
            encoder_ffn_dim=40,
            encoder_attention_heads=4,
            head_dim=12,
            d_model=32,
        )
    ).eval()
    randomize_(model, 0)
    state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
    params = ldm_bert_key_table(cfg).to_flax(state_dict, ldm_bert_abstract_params(cfg))
    table = compvis_ldm_bert_table(cfg)
    compvis = table.to_torch(params)
    assert compvis["transformer.attn_layers.layers.5.1.net.0.0.weight"].shape == (40, 32)
    assert compvis["transformer.to_logits.weight"].shape == (101, 32)
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 101, size=(2, 16)))
    with torch.no_grad():
        ours = _xtransformers_forward(compvis, cfg, ids)
        expected = model(ids).last_hidden_state
    parity("compvis ldm_bert table: x-transformers forward", ours, expected)
    _assert_round_trip(table, compvis, params)
    # A headless model reads the same file; the logits head is then ignorable.
    headless = LDMBertConfig(**{**cfg.__dict__, "logits_head": False})
    head_params = ldm_bert_abstract_params(headless)
    compvis_ldm_bert_table(headless).to_flax(compvis, head_params)


def test_class_embedder_and_spatial_rescaler_tables(parity):
    class_table = compvis_class_embedder_table(ClassEmbedderConfig(n_classes=7, embed_dim=5))
    weight = np.random.default_rng(0).standard_normal((7, 5)).astype(np.float32)
    params = class_table.to_flax({"embedding.weight": weight}, {"embedding": {"embedding": weight}})
    np.testing.assert_array_equal(params["embedding"]["embedding"], weight)

    cfg = SpatialRescalerConfig(n_stages=0, in_channels=6, out_channels=3, bias=True)
    conv = torch.nn.Conv2d(6, 3, 1, bias=True)
    compvis = {f"channel_mapper.{k}": v.detach().numpy() for k, v in conv.state_dict().items()}
    x = np.random.default_rng(1).standard_normal((2, 4, 4, 6)).astype(np.float32)
    table = compvis_spatial_rescaler_table(cfg)
    params = table.to_flax(compvis, abstract_params(SpatialRescaler(cfg), x))
    ours = SpatialRescaler(cfg).apply({"params": params}, x)
    with torch.no_grad():
        expected = conv(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    parity("compvis spatial rescaler table: channel_mapper", ours, expected)
    assert len(compvis_spatial_rescaler_table(SpatialRescalerConfig(out_channels=None))) == 0
    no_bias = compvis_spatial_rescaler_table(SpatialRescalerConfig(out_channels=3))
    assert [e.torch_key for e in no_bias.entries] == ["channel_mapper.weight"]


def test_cond_stage_dispatch_prefixes_and_errors():
    cfg = _clip("quick_gelu")[0]
    clip = compvis_cond_stage_table(CondStageSpec("clip", cfg))
    assert "transformer.text_model.final_layer_norm.bias" in clip.by_key
    assert "transformer.text_model.embeddings.position_ids" in clip.ignorable
    openclip = compvis_cond_stage_table(CondStageSpec("openclip", cfg))
    assert "model.ln_final.weight" in openclip.by_key and "model.logit_scale" in openclip.ignorable
    with pytest.raises(ValueError, match="needs a CLIPTextConfig"):
        compvis_cond_stage_table(CondStageSpec("clip", ClassEmbedderConfig()))
    # An SD 1.x CLIP state dict is not an OpenCLIP one: the mismatch names the keys.
    params = jax.tree.map(np.zeros_like, _clip("quick_gelu")[3])
    with pytest.raises(CheckpointMismatchError, match="token_embedding.weight"):
        compvis_openclip_table(cfg).to_flax(compvis_clip_table(cfg).to_torch(params), params)
    assert jnp.asarray(params["final_norm"]["bias"]).shape == (32,)
