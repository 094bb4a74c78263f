"""LoRA training: a tiny SD-1-layout model trains rank-4 adapters (UNet attention + text-encoder
q/out) on 8 fake CPU devices with every network frozen; only the adapters (and their Adam moments)
are in the state and the checkpoints; a resumed run ends bit-exactly where the straight one did;
the last step writes the adapters as PEFT and kohya files that our reader and diffusers' (peft's)
load_lora_weights + fuse_lora merge onto the same weights the run samples with."""

import shutil
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support.tiny_specs import random_params

from ldm_jax.checkpoints import LatentDiffusionCheckpoint
from ldm_jax.checkpoints.key_table import flatten_params
from ldm_jax.checkpoints.lora import merged_kernels, read_lora
from ldm_jax.training import loop, metrics, tasks
from ldm_jax.training.config_checks import ConfigError, check_config
from ldm_jax.training.config_overrides import load_config
from ldm_jax.training.lora_adapters import LoRATraining, init_adapters, merge_adapters

ROOT = Path(__file__).resolve().parents[1]
RANK = 4


def lora_config(**lora):
    config = load_config(str(ROOT / "configs" / "ldm_tiny.py"))
    # out_proj among the text targets: diffusers 0.42.1 recognises a kohya file's text-encoder
    # part as such only when some key is an out_proj ("to_out_lora" after its conversion)
    config.lora.update({"rank": RANK, "alpha": 8.0,
                        "text_encoder_targets": ("q_proj", "out_proj"), **lora})
    config.optimizer.warmup_steps = 0
    config.ema.decay = 0.0  # the exported adapters are the trained ones
    config.train.update(dict(num_steps=2, log_every=1, checkpoint_every=1, sample_every=0,
                             async_checkpointing=False, progress_bar=False))
    return config


def pretrained_task(config):
    """The task with random (non-zero) base weights: at random init the UNet's zero-initialised
    output projections would give the attention adapters no gradient."""
    task = tasks.make_task(config)
    task.init_params = random_params(task.spec)
    return task


def losses(workdir):
    return {s: r["loss"] for s, r in metrics.read_jsonl(Path(workdir) / "metrics.jsonl").items()}


def _leaves(tree) -> dict:
    return flax.traverse_util.flatten_dict(jax.device_get(tree))


@pytest.mark.slow  # ~60 s on 2 cores
def test_lora_trains_adapters_only_resumes_exactly_and_exports(tmp_path):
    config = lora_config()
    task = pretrained_task(config)
    lora = task.cfg.lora
    assert lora.networks == ("unet", "cond_stage")
    # 4 transformers (down, mid, 2 up at the attention level) x (self + cross) x q, k, v, out;
    # text: 2 layers x q, out
    unet_layers = [layer for layer in lora.layers if layer[0] == "unet"]
    assert len(unet_layers) == 4 * 2 * 4 and len(lora.layers) == len(unet_layers) + 2 * 2

    straight = loop.run(config, tmp_path / "straight", task)
    assert straight.step == 2
    loss = losses(tmp_path / "straight")
    assert sorted(loss) == [1, 2] and all(np.isfinite(v) for v in loss.values())

    # the state holds the adapters and nothing else; Adam's moments only for them
    params = _leaves(straight.state.params)
    assert {path[-1] for path in params} == {"lora_down", "lora_up"}
    assert {(path[0], *path[1:-1], "kernel") for path in params} == set(lora.layers)
    adapter_size = sum(a.size for a in params.values())
    opt_size = sum(np.size(a) for a in jax.tree.leaves(straight.state.opt_state))
    assert adapter_size * 2 <= opt_size < adapter_size * 2 + 16  # mu, nu (+ counters)
    assert any(np.abs(a).max() > 0 for p, a in params.items() if p[-1] == "lora_up")  # trained
    # frozen base, sharded like full fine-tuning (FSDP over the 8 devices)
    to_q = next(layer for layer in unet_layers if layer[-2] == "q")
    base_q = task.frozen["unet"]
    for part in to_q[1:]:
        base_q = base_q[part]
    assert len(base_q.sharding.device_set) == 8

    # resumed from the step-1 checkpoint in a fresh workdir: the same losses and adapters
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight", resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "2")
    shutil.rmtree(resumed_dir / "lora")
    (resumed_dir / "metrics.jsonl").write_text(
        (resumed_dir / "metrics.jsonl").read_text().splitlines(keepends=True)[0]
    )
    resumed = loop.run(config, resumed_dir, pretrained_task(config))  # a new process's task
    assert losses(resumed_dir) == loss
    for part in ("params", "ema_params", "opt_state"):
        a, b = (jax.device_get(getattr(r.state, part)) for r in (straight, resumed))
        jax.tree.map(np.testing.assert_array_equal, a, b)

    # the exports read back (our reader) onto the weights the run samples with
    trained = task.ema_checkpoint(straight.state).params
    base = jax.device_get(task.frozen)
    for fmt in ("peft", "kohya"):
        path = tmp_path / "straight" / "lora" / f"{fmt}.safetensors"
        adapter = read_lora(path, task.spec, base)
        assert len(adapter.layers) == len(lora.layers)
        merged = merged_kernels(lambda where: _at(base, where), [(adapter, 1.0)])
        for where, kernel in merged.items():
            np.testing.assert_allclose(kernel, _at(trained, where), atol=1e-6, rtol=0)


    # diffusers + peft read both exports and fuse them onto the base to the same weights
    from diffusers import StableDiffusionPipeline  # noqa: PLC0415

    LatentDiffusionCheckpoint(task.spec, base, task.tokenizer).save_pretrained(
        tmp_path / "base", format="diffusers"
    )
    ours = flatten_params(trained)
    for fmt in ("peft", "kohya"):
        pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "base", local_files_only=True)
        pipe.load_lora_weights(str(tmp_path / "straight" / "lora" / f"{fmt}.safetensors"))
        pipe.fuse_lora(lora_scale=1.0)
        pipe.unload_lora_weights()
        pipe.save_pretrained(tmp_path / f"fused_{fmt}")
        fused = flatten_params(LatentDiffusionCheckpoint.from_pretrained(tmp_path / f"fused_{fmt}")
                               .params)
        assert fused.keys() == ours.keys()
        error = max(float(np.abs(np.asarray(fused[k]) - np.asarray(ours[k])).max()) for k in ours)
        print(f"diffusers fuse_lora of the trained {fmt} export vs ours: {error:.2e}")
        assert error <= 1e-6


def _at(tree, where):
    for part in where:
        tree = tree[part]
    return np.asarray(tree)


def test_merge_is_the_base_at_init_and_w_plus_scaled_product_after():
    rng = np.random.default_rng(0)
    params = {"net": {"dense": {"kernel": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)},
                      "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 4, 2)), jnp.float32),
                               "bias": jnp.zeros(2)}}}
    lora = LoRATraining(rank=2, alpha=3.0,
                        layers=(("net", "dense", "kernel"), ("net", "conv", "kernel")))
    adapters = init_adapters(params, lora, jax.random.key(0))
    assert adapters["net"]["dense"]["lora_down"].shape == (6, 2)
    assert adapters["net"]["dense"]["lora_up"].shape == (2, 5)
    assert adapters["net"]["conv"]["lora_down"].shape == (3, 3, 4, 2)
    assert adapters["net"]["conv"]["lora_up"].shape == (1, 1, 2, 2)
    bound = 1 / np.sqrt(3 * 3 * 4)  # PEFT's kaiming_uniform(a=sqrt(5)) on fan_in = kh*kw*in
    assert 0 < np.abs(adapters["net"]["conv"]["lora_down"]).max() <= bound
    same = merge_adapters(params, adapters, lora.factor)  # up = 0: the base model exactly
    jax.tree.map(np.testing.assert_array_equal, same, params)

    adapters = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), adapters)
    merged = merge_adapters(params, adapters, lora.factor)
    for name in ("dense", "conv"):
        kernel = np.asarray(params["net"][name]["kernel"], np.float64)
        down = np.asarray(adapters["net"][name]["lora_down"], np.float64)
        up = np.asarray(adapters["net"][name]["lora_up"], np.float64)
        expected = kernel + 1.5 * np.einsum("...r,ro->...o", down, up.reshape(2, -1))
        np.testing.assert_allclose(merged["net"][name]["kernel"], expected, rtol=1e-5, atol=1e-5)
    assert merged["net"]["conv"]["bias"] is params["net"]["conv"]["bias"]


def test_gradients_reach_only_the_adapters():
    params = {"net": {"dense": {"kernel": jnp.ones((3, 2))}}}
    lora = LoRATraining(rank=1, alpha=1.0, layers=(("net", "dense", "kernel"),))
    adapters = jax.tree.map(jnp.ones_like, init_adapters(params, lora, jax.random.key(0)))

    def loss(a, p):
        return jnp.sum(merge_adapters(p, a, lora.factor)["net"]["dense"]["kernel"] ** 2)

    g_adapters, g_params = jax.grad(loss, argnums=(0, 1))(adapters, params)
    # d/dD sum((W + D U)^2) = 2 (W + D U) U^T: every entry 2 * 2 * 2 = 8
    np.testing.assert_allclose(g_adapters["net"]["dense"]["lora_down"], np.full((3, 1), 8.0))
    assert g_params["net"]["dense"]["kernel"].shape == (3, 2)  # exists, but is not in the state


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (dict(rank=-1), r"lora.rank=-1 must be an integer >= 0"),
        (dict(alpha=float("nan")), r"lora.alpha=nan must be a finite number >= 0"),
        (dict(unet_targets=("to_q", "")), r"lora.unet_targets=\('to_q', ''\) must be a tuple"),
        (dict(export_formats=("peft", "civitai")), r"allowed: a tuple of \('peft', 'kohya'\)"),
        (dict(unet_targets=(), text_encoder_targets=()), "needs lora.unet_targets or"),
    ],
)
def test_bad_lora_settings_are_one_config_error_before_any_work(override, message):
    config = lora_config(**override)
    with pytest.raises(ConfigError, match=message):
        check_config(config)


def test_lora_and_training_the_text_encoder_itself_is_refused():
    config = lora_config()
    config.model.train_cond_stage = True
    with pytest.raises(ConfigError, match="adapt the text encoder with lora.text_encoder_targets"):
        check_config(config)


def test_a_target_that_matches_no_module_is_named_with_examples():
    config = lora_config(unet_targets=("to_q", "attn9.to_q"))
    with pytest.raises(ConfigError, match=r"entry 'attn9.to_q' matches no module.*'to_k'"):
        tasks.make_task(config)


def test_a_model_without_a_clip_text_encoder_refuses_text_targets():
    from support.tiny_specs import UNCONDITIONAL_VQ  # noqa: PLC0415

    from ldm_jax.spec import spec_to_dict  # noqa: PLC0415

    config = lora_config(unet_targets=("to_q",))
    config.model.spec = spec_to_dict(UNCONDITIONAL_VQ)
    with pytest.raises(ConfigError, match="no CLIP text encoder LoRA can adapt"):
        tasks.make_task(config)


def test_the_lora_configs_pass_the_checks():
    for name in ("lora_sd15.py", "lora_sdxl.py"):
        config = load_config(str(ROOT / "configs" / name))
        check_config(config)
        assert config.lora.rank >= 1 and config.compute_dtype == "bfloat16"


@pytest.mark.slow  # ~40 s on 2 cores
def test_an_sdxl_lora_trains_both_text_encoders_and_exports_te1_te2(tmp_path):
    from support.tiny_specs import MICRO_SDXL  # noqa: PLC0415
    from test_training_sdxl import sdxl_config  # noqa: PLC0415

    config = sdxl_config()
    config.lora.update(dict(rank=2, alpha=2.0, unet_targets=("to_q", "to_v"),
                            text_encoder_targets=("q_proj", "out_proj")))
    config.train.num_steps = 1
    task = pretrained_task(config)
    networks = {layer[:2] for layer in task.cfg.lora.layers if layer[0] == "cond_stage"}
    assert networks == {("cond_stage", "encoder_0"), ("cond_stage", "encoder_1")}
    run = loop.run(config, tmp_path, task)
    assert np.isfinite(run.metrics["loss"])
    kohya = read_lora(tmp_path / "lora" / "kohya.safetensors", MICRO_SDXL,
                      jax.device_get(task.frozen))
    prefixes = {layer.name.split("_")[1] for layer in kohya.layers}
    assert prefixes == {"unet", "te1", "te2"}
    peft = read_lora(tmp_path / "lora" / "peft.safetensors", MICRO_SDXL,
                     jax.device_get(task.frozen))
    assert {layer.target.component for layer in peft.layers} == {
        "unet", "text_encoder", "text_encoder_2"}
    assert len(peft.layers) == len(kohya.layers) == len(task.cfg.lora.layers)
