"""Writing trained LoRA adapters (the training tree) as kohya and diffusers / PEFT files: they read
back through our reader as the adapters' own deltas, and diffusers + peft (`load_lora_weights` +
`fuse_lora`) merge them into exactly base + delta, for SD 1.x-, SD 2.x- and SDXL-like tiny
pipelines (both SDXL text encoders); bad adapters and destinations get one clear error."""

import json

import jax
import numpy as np
import pytest
import safetensors.numpy
from support.lora_adapters import adapted_kernels, adapter_deltas, random_adapters
from support.lora_files import sd2_like_pipeline
from support.tiny_pipelines import sd_pipeline, sdxl_pipeline

from ldm_jax.checkpoints import LatentDiffusionCheckpoint
from ldm_jax.checkpoints.errors import DestinationExistsError
from ldm_jax.checkpoints.key_table import flatten_params
from ldm_jax.checkpoints.lora import lora_state_dict, lora_targets, read_lora, save_lora
from ldm_jax.checkpoints.lora.write import adapter_modules

WEIGHT_BAR = 1e-6  # max |diffusers fuse_lora - (base + delta)| over every weight, float32
ALPHA = 3.0  # with ranks 2, 3, 4: alpha / r = 1.5, 1, 0.75
MODELS = {"sd1": sd_pipeline, "sd2": sd2_like_pipeline, "sdxl": sdxl_pipeline}
FORMATS = ("kohya", "peft")


def _numpy(params) -> dict:
    return {k: np.asarray(v) for k, v in flatten_params(jax.device_get(params)).items()}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """model -> (root, spec, flat base params, adapters, {fmt: exported file}); each built once."""
    cache = {}

    def get(model: str):
        if model not in cache:
            root = tmp_path_factory.mktemp(f"lora_export_{model}")
            MODELS[model]().save_pretrained(root / "base")
            checkpoint = LatentDiffusionCheckpoint.from_pretrained(root / "base")
            adapters = random_adapters(checkpoint.spec, checkpoint.params, seed=len(cache))
            files = {
                fmt: save_lora(root / f"{fmt}.safetensors", checkpoint.spec, adapters, ALPHA, fmt)
                for fmt in FORMATS
            }
            cache[model] = (root, checkpoint.spec, checkpoint.params, adapters, files)
        return cache[model]

    return get


def test_every_adaptable_kernel_has_one_diffusers_module(bases):
    _, spec, _, _, _ = bases("sdxl")
    targets = lora_targets(spec)
    inverse = adapter_modules(spec)
    assert len(inverse) == len({(t.network, *t.flax_path) for t in targets.values()})
    for where, target in inverse.items():
        assert targets[f"{target.component}.{target.module}"] == target
        assert where == (target.network, *target.flax_path)
        assert not target.module.startswith(("input_blocks", "middle_block", "output_blocks"))
    assert {t.component for t in inverse.values()} == {"unet", "text_encoder", "text_encoder_2"}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_reads_back_as_the_adapters_deltas(bases, model, fmt):
    _, spec, params, adapters, files = bases(model)
    lora = read_lora(files[fmt], spec, params)
    ours = {(layer.target.network, *layer.target.flax_path): layer.delta() for layer in lora.layers}
    expected = adapter_deltas(adapters, ALPHA)
    assert ours.keys() == expected.keys() == set(adapted_kernels(spec))
    error = max(float(np.abs(ours[k] - expected[k]).max()) for k in expected)
    print(f"{model} {fmt}: max |read_lora delta - (alpha/r) down@up| = {error:.2e}")
    assert error <= WEIGHT_BAR


def test_covers_linear_conv_and_1x1_conv_layers(bases):
    """The adapters exercise every factor layout: linear, 3x3 conv (LoCon), 1x1 conv proj_in."""
    _, spec, params, _, files = bases("sd1")
    tensors = safetensors.numpy.load_file(str(files["kohya"]))
    proj_in = "lora_unet_down_blocks_0_attentions_0_proj_in"
    conv1 = "lora_unet_down_blocks_0_resnets_0_conv1"
    q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert tensors[f"{proj_in}.lora_down.weight"].shape[2:] == (1, 1)
    assert tensors[f"{conv1}.lora_down.weight"].shape[2:] == (3, 3)
    assert tensors[f"{conv1}.lora_up.weight"].shape[2:] == (1, 1)
    assert tensors[f"{q}.lora_down.weight"].ndim == 2
    assert tensors[f"{q}.alpha"].shape == () and float(tensors[f"{q}.alpha"]) == ALPHA
    sd2 = safetensors.numpy.load_file(str(bases("sd2")[4]["peft"]))
    assert sd2["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"].ndim == 2  # linear


def test_metadata(bases):
    _, spec, _, adapters, files = bases("sdxl")
    with safetensors.safe_open(str(files["peft"]), "np") as f:
        header, keys = f.metadata(), set(f.keys())
    config = json.loads(header["lora_adapter_metadata"])
    for component in ("unet", "text_encoder", "text_encoder_2"):
        assert config[f"{component}.lora_alpha"] == ALPHA
        assert config[f"{component}.rank_pattern"]  # ranks 2, 3, 4: the others than r
        assert {config[f"{component}.r"], *config[f"{component}.rank_pattern"].values()} == {
            2, 3, 4,
        }  # fmt: skip
    te2 = config["text_encoder_2.target_modules"]
    assert "encoder.layers.0.self_attn.q_proj" in te2  # matches with or without text_model.
    assert "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in keys
    with safetensors.safe_open(str(files["kohya"]), "np") as f:
        header, keys = f.metadata(), set(f.keys())
    assert header["ss_network_module"] == "networks.lora"
    assert header["ss_network_dim"] == "Dynamic" and float(header["ss_network_alpha"]) == ALPHA
    assert {k.split("_text_model_")[0] for k in keys if "text_model" in k} == {
        "lora_te1", "lora_te2",
    }  # fmt: skip
    uniform = random_adapters(spec, bases("sdxl")[2], seed=9, ranks=(4,))
    _, header = lora_state_dict(spec, uniform, 2, "kohya")
    assert header["ss_network_dim"] == "4" and header["ss_network_alpha"] == "2.0"


def test_half_precision_factors(bases, tmp_path):
    _, spec, params, adapters, _ = bases("sd1")
    tensors, _ = lora_state_dict(spec, adapters, ALPHA, "peft", dtype=np.float16)
    assert {v.dtype for v in tensors.values()} == {np.dtype(np.float16)}
    tensors, _ = lora_state_dict(spec, adapters, ALPHA, "kohya", dtype="float16")
    alphas = {v.dtype for k, v in tensors.items() if k.endswith(".alpha")}
    assert alphas == {np.dtype(np.float32)}  # alpha is not rounded to the factors' dtype
    assert {v.dtype for k, v in tensors.items() if k.endswith(".weight")} == {np.dtype("float16")}
    path = save_lora(tmp_path / "bf16.safetensors", spec, adapters, ALPHA, dtype="bfloat16")
    expected = adapter_deltas(adapters, ALPHA)
    for layer in read_lora(path, spec, params).layers:
        delta = expected[(layer.target.network, *layer.target.flax_path)]
        assert np.abs(layer.delta() - delta).max() <= 2e-2 * np.abs(delta).max()  # bf16: 8 bits


@pytest.mark.parametrize("model", MODELS)
def test_diffusers_fuses_base_plus_delta(bases, model, tmp_path):
    root, _, params, adapters, files = bases(model)
    base = _numpy(params)
    expected = dict(base)
    for kernel, delta in adapter_deltas(adapters, ALPHA).items():  # float64 sum, then cast
        expected[kernel] = (base[kernel].astype(np.float64) + delta).astype(base[kernel].dtype)
    for fmt in FORMATS:
        pipe = MODELS[model]()
        pipe.load_lora_weights(str(files[fmt]))
        pipe.fuse_lora(lora_scale=1.0)
        pipe.unload_lora_weights()  # keeps the fused weights, drops the peft layers
        pipe.save_pretrained(tmp_path / fmt)
        reference = _numpy(LatentDiffusionCheckpoint.from_pretrained(tmp_path / fmt).params)
        assert reference.keys() == expected.keys()
        error = max(float(np.abs(reference[k] - expected[k]).max()) for k in expected)
        moved = max(float(np.abs(reference[k] - base[k]).max()) for k in expected)
        print(f"{model} {fmt}: max |diffusers fuse_lora - (base + delta)| = {error:.2e}")
        assert error <= WEIGHT_BAR < 0.05 < moved


# --- errors: one clear ValueError naming the adapter; destinations never half-written


def _flat(adapters) -> dict:
    return dict(flatten_params(adapters))


def _nested(flat: dict) -> dict:
    import flax  # noqa: PLC0415

    return flax.traverse_util.unflatten_dict(flat)


def test_adapter_at_no_target_is_an_error(bases):
    _, spec, _, adapters, _ = bases("sd1")
    for where in (("unet", "no_such_block", "to_q"), ("first_stage", "decoder", "conv_out")):
        flat = _flat(adapters) | {
            (*where, "lora_down"): np.ones((4, 2), np.float32),
            (*where, "lora_up"): np.ones((2, 4), np.float32),
        }
        with pytest.raises(ValueError, match="/".join(where)):
            lora_state_dict(spec, _nested(flat), ALPHA, "peft")
    flat = _flat(adapters)
    one = next(k for k in flat if k[-1] == "lora_up")
    with pytest.raises(ValueError, match="no 'lora_up'"):
        lora_state_dict(spec, _nested({k: v for k, v in flat.items() if k != one}), 1, "kohya")
    with pytest.raises(ValueError, match="leaves are 'lora_down' and 'lora_up' only"):
        lora_state_dict(spec, _nested(flat | {(*one[:-1], "scale"): 1.0}), 1, "kohya")


def test_wrong_shapes_are_an_error(bases):
    _, spec, _, adapters, _ = bases("sd1")
    flat = _flat(adapters)
    conv = next(k for k in flat if k[-1] == "lora_down" and flat[k].ndim == 4)
    linear = next(k for k in flat if k[-1] == "lora_down" and flat[k].ndim == 2)
    down, up = flat[linear], flat[(*linear[:-1], "lora_up")]
    bad = {  # what is wrong -> the changed factor
        "rank of up": {(*linear[:-1], "lora_up"): np.ones((up.shape[0] + 1, up.shape[1]))},
        "fan-in": {linear: np.ones((down.shape[0] + 1, down.shape[1]))},
        "conv up kernel": {(*conv[:-1], "lora_up"): np.ones((3, 3, *flat[conv].shape[-1:], 8))},
        "conv as linear": {conv: flat[conv][0, 0]},
    }
    for change in bad.values():
        where = "/".join(next(iter(change))[:-1])
        with pytest.raises(ValueError, match=f"adapter {where}: .* rank-r update"):
            lora_state_dict(spec, _nested(flat | change), ALPHA, "peft")
    with pytest.raises(ValueError, match="NaN or infinite"):
        lora_state_dict(spec, _nested(flat | {linear: np.full_like(down, np.nan)}), 1, "peft")
    with pytest.raises(ValueError, match="infinite values in float16"):
        lora_state_dict(spec, _nested(flat | {linear: down * 1e6}), 1, "peft", dtype="float16")


def test_bad_requests_are_an_error(bases, tmp_path):
    _, spec, _, adapters, _ = bases("sd1")
    with pytest.raises(ValueError, match="allowed: kohya, peft"):
        lora_state_dict(spec, adapters, ALPHA, "lycoris")
    with pytest.raises(ValueError, match="float32, float16, bfloat16"):
        lora_state_dict(spec, adapters, ALPHA, "peft", dtype=np.int8)
    for alpha in (0, -1.0, float("nan"), "four"):
        with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
            lora_state_dict(spec, adapters, alpha, "peft")
    for name in ("lora.pt", "lora.ckpt", "lora"):
        with pytest.raises(ValueError, match="allowed: a path ending in .safetensors"):
            save_lora(tmp_path / name, spec, adapters, ALPHA)
    assert list(tmp_path.iterdir()) == []


def test_existing_destination_is_kept_unless_overwrite(bases, tmp_path):
    _, spec, params, adapters, _ = bases("sd1")
    path = tmp_path / "lora.safetensors"
    save_lora(path, spec, adapters, ALPHA, "kohya")
    before = path.read_bytes()
    with pytest.raises(DestinationExistsError, match="overwrite"):
        save_lora(path, spec, adapters, ALPHA, "peft")
    assert path.read_bytes() == before
    flat = _flat(adapters)
    linear = next(k for k in flat if k[-1] == "lora_down" and flat[k].ndim == 2)
    with pytest.raises(ValueError, match="NaN"):  # fails before writing: the old file stays
        save_lora(path, spec, _nested(flat | {linear: flat[linear] * np.nan}), 1, overwrite=True)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]  # no temporaries
    save_lora(path, spec, adapters, ALPHA, "peft", overwrite=True)
    assert path.read_bytes() != before
    assert any(layer.name.startswith("unet.") for layer in read_lora(path, spec, params).layers)
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    with pytest.raises(FileExistsError, match="replaces only a .safetensors file"):
        save_lora(folder, spec, adapters, ALPHA, overwrite=True)
