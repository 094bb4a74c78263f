"""LoRA files: the spellings each format allows, .ckpt files, several adapters, and one clear
error (naming the key) for files that do not fit, with the params left untouched."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from support.lora_files import kohya_name, random_factors, write_kohya
from support.tiny_pipelines import sd_pipeline
from support.tiny_specs import TINY_SDXL

from ldm_jax.checkpoints.errors import UnsupportedLoRAError
from ldm_jax.checkpoints.key_table import flatten_params
from ldm_jax.checkpoints.lora import lora_targets
from ldm_jax.sampling.pipeline import LatentDiffusionPipeline

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "down_blocks.0.resnets.0.conv1"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_files")
    torch_pipe = sd_pipeline()
    torch_pipe.save_pretrained(root / "base")
    factors = random_factors(torch_pipe, 0)
    write_kohya(root / "kohya.safetensors", factors)
    pipe = LatentDiffusionPipeline.from_pretrained(root / "base")
    return root, factors, pipe


def _tensors(path) -> dict:
    return safetensors.numpy.load_file(str(path))


def _params(pipe) -> dict:
    return {k: np.asarray(v) for k, v in flatten_params(jax.device_get(pipe.params)).items()}


def _merged(pipe, path, **kwargs) -> dict:
    pipe.load_lora(path, name="probe", **kwargs)
    try:
        return _params(pipe)
    finally:
        pipe.unload_lora("probe")


def _write(path, tensors) -> str:
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path)
    return str(path)


def test_other_spellings_and_ckpt_give_the_same_merge(setup, tmp_path):
    """Older diffusers names (`.lora.down.weight` + `.alpha`), PEFT text-encoder names with and
    without `text_model.`, and a pickled .pt file all merge exactly as the kohya file."""
    root, factors, pipe = setup
    reference = _merged(pipe, root / "kohya.safetensors")
    old, peft_text = {}, {}
    for (component, module), (down, up, alpha) in factors.items():
        name = f"{component}.{module}"
        old |= {f"{name}.lora.down.weight": down, f"{name}.lora.up.weight": up,
                f"{name}.alpha": np.float32(alpha)}  # fmt: skip
        if component == "text_encoder":
            peft_text |= {
                f"text_encoder.text_model.{module}.lora_A.weight": down,
                f"text_encoder.text_model.{module}.lora_B.weight": up,
                f"text_encoder.text_model.{module}.alpha": np.float32(alpha),
            }
    old_merged = _merged(pipe, _write(tmp_path / "old.safetensors", old))
    for key in reference:
        np.testing.assert_array_equal(old_merged[key], reference[key])
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in old.items()}, tmp_path / "old.pt")
    pt_merged = _merged(pipe, tmp_path / "old.pt")
    for key in reference:
        np.testing.assert_array_equal(pt_merged[key], reference[key])
    text_merged = _merged(pipe, _write(tmp_path / "text.safetensors", peft_text))
    layer = ("cond_stage", "layers_1", "fc2", "kernel")
    np.testing.assert_array_equal(text_merged[layer], reference[layer])
    # 1x1 conv layers (SD 1.x proj_in) from linear-shaped factors
    squeezed = _tensors(root / "kohya.safetensors")
    proj = kohya_name("unet", "mid_block.attentions.0.proj_in")
    for role in ("down", "up"):
        squeezed[f"{proj}.lora_{role}.weight"] = squeezed[f"{proj}.lora_{role}.weight"][..., 0, 0]
    squeezed_merged = _merged(pipe, _write(tmp_path / "squeezed.safetensors", squeezed))
    layer = ("unet", "middle_attn", "proj_in", "kernel")
    assert not np.array_equal(reference[layer], _params(pipe)[layer])
    np.testing.assert_array_equal(squeezed_merged[layer], reference[layer])


def test_bfloat16_params_stay_bfloat16(setup):
    root, _, pipe = setup
    reference = _merged(pipe, root / "kohya.safetensors")
    low = LatentDiffusionPipeline.from_pretrained(root / "base", dtype=jnp.bfloat16)
    low.load_lora(root / "kohya.safetensors")
    merged = _params(low)
    for layer in (
        ("unet", "middle_attn", "proj_in", "kernel"),
        ("cond_stage", "layers_0", "attn", "q", "kernel"),
    ):
        assert merged[layer].dtype == jnp.bfloat16
        np.testing.assert_allclose(merged[layer].astype(np.float32), reference[layer], atol=2e-2)


def test_several_adapters_add_and_unload_bit_exactly(setup, tmp_path):
    root, _, pipe = setup
    base = _params(pipe)
    other = tmp_path / "other.safetensors"
    write_kohya(other, random_factors(sd_pipeline(), 7, ranks=(4,)))
    one = {k: v - base[k] for k, v in _merged(pipe, root / "kohya.safetensors").items()}
    two = {k: v - base[k] for k, v in _merged(pipe, other).items()}
    pipe.load_lora(root / "kohya.safetensors", scale=0.5)
    pipe.load_lora(other, scale=-1.5, name="second")
    assert pipe.loras == {"kohya": 0.5, "second": -1.5}
    both = _params(pipe)
    error = max(np.abs(both[k] - base[k] - (0.5 * one[k] - 1.5 * two[k])).max() for k in base)
    assert error < 1e-5
    pipe.set_lora_scales({"second": 0.0})
    half = _params(pipe)
    assert max(np.abs(half[k] - base[k] - 0.5 * one[k]).max() for k in base) < 1e-6
    pipe.unload_lora("kohya")
    assert pipe.loras == {"second": 0.0}
    pipe.unload_lora()
    after = _params(pipe)
    assert all(np.array_equal(after[k], base[k]) for k in base)  # bit-exact


def test_api_checks(setup):
    root, _, pipe = setup
    with pytest.raises(ValueError, match="finite"):
        pipe.load_lora(root / "kohya.safetensors", scale=float("nan"))
    pipe.load_lora(root / "kohya.safetensors")
    try:
        with pytest.raises(ValueError, match="loaded already"):
            pipe.load_lora(root / "kohya.safetensors")
        with pytest.raises(ValueError, match="no LoRA named"):
            pipe.set_lora_scales({"nope": 1.0})
        with pytest.raises(ValueError, match="no LoRA named"):
            pipe.unload_lora("nope")
    finally:
        pipe.unload_lora()


def _bad(setup, tmp_path, edit):
    """Write the kohya file with `edit(tensors)` applied; return its path and the base params."""
    root, _, pipe = setup
    tensors = _tensors(root / "kohya.safetensors")
    edit(tensors)
    return _write(tmp_path / "bad.safetensors", tensors), pipe


def _raises(pipe, path, match, **kwargs):
    before = pipe.params
    with pytest.raises(UnsupportedLoRAError, match=match):
        pipe.load_lora(path, **kwargs)
    assert pipe.params is before and pipe.loras == {}


def test_keys_of_another_architecture(setup, tmp_path):
    sdxl_key = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"
    lacking = kohya_name("unet", "down_blocks.3.attentions.0.proj_in") + ".lora_up.weight"
    loha = kohya_name("unet", ATTN) + ".hada_w1_a"

    def edit(t):
        t[sdxl_key] = t[lacking] = t[loha] = np.zeros((2, 2), np.float32)

    path, pipe = _bad(setup, tmp_path, edit)
    _raises(pipe, path, "3 keys name no layer.*hada_w1_a.*SDXL's second text encoder")
    _raises(pipe, path, "down_blocks_3_attentions_0_proj_in")
    with pytest.warns(UserWarning, match="lora_te2_"):
        pipe.load_lora(path, strict=False, name="lenient")
    assert pipe.loras == {"lenient": 1.0}
    pipe.unload_lora()


@pytest.mark.parametrize(
    "case, match",
    [
        ("rank", r"attn1_to_q.lora_down.weight \(\d, 32\).*do not make a rank-r update"),
        ("target", r"conv1.lora_down.weight \(2, 16, 3, 3\).*weight \(32, 32, 3, 3\)"),
        ("nan", "attn1_to_q.lora_up.weight holds NaN"),
        ("inf", "attn1_to_q.alpha holds NaN or infinite"),
        ("missing", "has no up factor"),
    ],
)
def test_bad_files_name_the_key(setup, tmp_path, case, match):
    attn, conv = kohya_name("unet", ATTN), kohya_name("unet", CONV)

    def edit(t):
        if case == "rank":  # down of rank r + 1 beside an up of rank r
            rank = t[f"{attn}.lora_up.weight"].shape[1]
            t[f"{attn}.lora_down.weight"] = np.ones((rank + 1, 32), np.float32)
        elif case == "target":  # a conv LoRA for 16 input channels where the layer has 32
            t[f"{conv}.lora_down.weight"] = np.ones((2, 16, 3, 3), np.float32)
            t[f"{conv}.lora_up.weight"] = np.ones((32, 2, 1, 1), np.float32)
        elif case == "nan":
            t[f"{attn}.lora_up.weight"][0, 0] = np.nan
        elif case == "inf":
            t[f"{attn}.alpha"] = np.float32(np.inf)
        else:
            del t[f"{attn}.lora_up.weight"]

    path, pipe = _bad(setup, tmp_path, edit)
    _raises(pipe, path, match)


def test_sdxl_names_and_unreadable_files(setup, tmp_path):
    _, _, pipe = setup
    sdxl = lora_targets(TINY_SDXL)  # both encoders, both spellings (parity: test_lora_sdxl.py)
    te2 = sdxl["lora_te2_text_model_encoder_layers_2_mlp_fc1"]
    assert te2.flax_path == ("encoder_1", "layers_2", "fc1", "kernel")
    assert sdxl["text_encoder_2.encoder.layers.2.mlp.fc1"] is te2
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    _raises(pipe, tmp_path / "junk.safetensors", "cannot read LoRA file")
    _raises(pipe, tmp_path / "absent.safetensors", "does not exist")


# kohya's CompVis (SGM) spelling of UNet modules <-> the diffusers one, for the tiny UNet
COMPVIS_NAMES = {
    "input_blocks_1_1_transformer_blocks_0_attn1_to_q": ATTN.replace(".", "_"),
    "input_blocks_1_0_in_layers_2": CONV.replace(".", "_"),
    "input_blocks_2_0_op": "down_blocks_0_downsamplers_0_conv",
    "input_blocks_3_0_skip_connection": "down_blocks_1_resnets_0_conv_shortcut",
    "middle_block_1_proj_in": "mid_block_attentions_0_proj_in",
    "output_blocks_1_1_conv": "up_blocks_0_upsamplers_0_conv",
    "output_blocks_0_0_emb_layers_1": "up_blocks_0_resnets_0_time_emb_proj",
    "output_blocks_3_1_transformer_blocks_0_ff_net_2": (
        "up_blocks_1_attentions_1_transformer_blocks_0_ff_net_2"
    ),
}


def test_compvis_module_names(setup, tmp_path):
    root, _, pipe = setup
    tensors = _tensors(root / "kohya.safetensors")
    reference = _merged(pipe, root / "kohya.safetensors")
    renamed = dict(tensors)
    for compvis, diffusers_name in COMPVIS_NAMES.items():
        for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
            renamed[f"lora_unet_{compvis}{suffix}"] = renamed.pop(
                f"lora_unet_{diffusers_name}{suffix}"
            )
    merged = _merged(pipe, _write(tmp_path / "compvis.safetensors", renamed))
    assert all(np.array_equal(merged[k], reference[k]) for k in reference)
