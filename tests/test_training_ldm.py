"""The sharded LDM train step on 8 fake CPU devices, tiny class- and text-conditioned networks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from support.tiny_specs import random_params

from ldm_jax.models.autoencoder import AutoencoderConfig
from ldm_jax.models.clip_text import CLIPTextConfig
from ldm_jax.models.conditioning import ClassEmbedderConfig
from ldm_jax.models.unet import UNetConfig
from ldm_jax.spec import CondStageSpec, DiffusionSpec, ModelSpec
from ldm_jax.training import ldm_step
from ldm_jax.training.ema import ema_decay
from ldm_jax.training.ldm_step import (
    LDMTrainConfig,
    drop_tokens,
    init_ldm_state,
    ldm_modules,
    make_ldm_train_step,
)
from ldm_jax.training.optimizer import make_optimizer
from ldm_jax.training.sharding import make_mesh

# As small as the networks go (GroupNorm needs 32 channels): compile time dominates these tests.
VAE = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=16, mid_attention=False)
UNET = UNetConfig(
    model_channels=32,
    channel_mult=(1,),
    num_res_blocks=1,
    attention_resolutions=(1,),
    num_heads=1,
    use_spatial_transformer=True,
    context_dim=32,
    legacy=False,
)
CLASS_SPEC = ModelSpec(
    first_stage=VAE,
    unet=UNET,
    cond_stage=CondStageSpec("class", ClassEmbedderConfig(5, 32, null_class=4), trainable=True),
)
CLIP = CLIPTextConfig(vocab_size=100, max_length=8, width=32, num_layers=1, num_heads=1, mlp_dim=64)
TEXT_SPEC = ModelSpec(
    first_stage=VAE,
    unet=UNET,
    cond_stage=CondStageSpec("clip", CLIP),
    diffusion=DiffusionSpec(prediction_type="v_prediction"),
)
STEPS = 30


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(("data", "fsdp", "tensor"), (2, -1, 1))


@pytest.fixture(scope="module")
def class_run(mesh):
    """30 steps overfitting one fixed batch of latents, with what the tests inspect recorded."""
    cfg = LDMTrainConfig(scale_by_std=True, ema_decay=0.999)
    tx, schedule = make_optimizer(dict(learning_rate=1e-2, warmup_steps=3, weight_decay=0.0))
    pretrained = random_params(CLASS_SPEC)
    state, frozen = init_ldm_state(CLASS_SPEC, cfg, tx, mesh, init_params=pretrained)
    initial = jax.tree.map(np.asarray, state)  # the state is donated below
    traces, compiled = [], []  # traces of the step function / compiled variants after each call
    counted = ldm_step.diffusion_loss  # called once per trace of the step

    def counting_loss(*args, **kwargs):
        traces.append(1)
        return counted(*args, **kwargs)

    ldm_step.diffusion_loss = counting_loss
    step = make_ldm_train_step(CLASS_SPEC, cfg, tx, schedule, mesh)
    rng = np.random.default_rng(0)
    latents = jnp.asarray(3.0 * rng.standard_normal((8, 8, 8, 4)), jnp.float32)
    batch = {"latents": latents, "class_label": jnp.arange(8, dtype=jnp.int32) % 4}
    metrics, after_one = [], None
    for i in range(STEPS):
        state, m = step(state, frozen, batch, jax.random.key(1))
        metrics.append(jax.tree.map(float, m))
        if i == 0:
            after_one = jax.tree.map(np.asarray, state)
        compiled.append(step._cache_size())
    ldm_step.diffusion_loss = counted
    return dict(
        pretrained=pretrained,
        initial=initial,
        after_one=after_one,
        state=state,
        frozen=frozen,
        metrics=metrics,
        traces=len(traces),
        compiled=compiled,
        latents=latents,
        schedule=schedule,
    )


def test_params_optimizer_state_and_ema_are_sharded_over_fsdp(class_run):
    state = class_run["state"]
    # a 3x3 conv kernel [kh, kw, in, out]: output features split 4 ways over fsdp
    kernel = state.params["unet"]["conv_in"]["kernel"]
    assert kernel.sharding.spec[3] == "fsdp" and kernel.sharding.spec[:2] == (None, None)
    assert kernel.addressable_shards[0].data.shape == (3, 3, 4, 32 // 4)
    adam = state.opt_state[1][0]  # chain(clip, adamw) -> adamw's ScaleByAdamState
    for moment in (adam.mu, adam.nu):
        assert moment["unet"]["conv_in"]["kernel"].sharding == kernel.sharding
    assert state.ema_params["unet"]["conv_in"]["kernel"].sharding == kernel.sharding
    # frozen params sharded the same way; a 4-channel output (4 % 4 == 0) also split; norms not
    enc = class_run["frozen"]["first_stage"]["encoder"]["conv_in"]["kernel"]
    assert enc.sharding.spec[3] == "fsdp"
    assert state.params["unet"]["out_norm"]["scale"].sharding.spec == P(None)


def test_init_places_pretrained_values(class_run):
    initial, pretrained = class_run["initial"], class_run["pretrained"]
    np.testing.assert_array_equal(
        initial.params["unet"]["conv_in"]["kernel"], pretrained["unet"]["conv_in"]["kernel"]
    )
    np.testing.assert_array_equal(
        np.asarray(class_run["frozen"]["first_stage"]["quant_conv"]["kernel"]),
        pretrained["first_stage"]["quant_conv"]["kernel"],
    )
    assert "cond_stage" in initial.params  # the class embedder is trained jointly


def test_loss_falls_when_overfitting_one_batch(class_run):
    losses = [m["loss"] for m in class_run["metrics"]]
    assert all(np.isfinite(losses))
    # new noise and timesteps every step make single losses noisy: compare averages
    assert np.mean(losses[-10:]) < 0.75 * np.mean(losses[:5]), losses


def test_step_compiles_once(class_run):
    assert class_run["traces"] == 1
    assert class_run["compiled"] == [1] * STEPS


def test_metrics_learning_rate_and_scale_by_std(class_run):
    metrics, schedule = class_run["metrics"], class_run["schedule"]
    assert [m["learning_rate"] for m in metrics[:4]] == pytest.approx(
        [float(schedule(i)) for i in range(4)]
    )
    assert metrics[0]["learning_rate"] == pytest.approx(1e-2 / 3)
    assert metrics[0]["grad_norm"] > 0
    # 1 / std of the first batch's latents, kept in the state (exact resume)
    expected = 1.0 / np.std(np.asarray(class_run["latents"], np.float64))
    assert metrics[0]["scale_factor"] == pytest.approx(expected, rel=1e-5)
    assert float(class_run["state"].scale_factor) == pytest.approx(expected, rel=1e-5)
    assert class_run["initial"].scale_factor == 1.0


def test_ema_follows_the_warmup_formula(class_run):
    initial, after = class_run["initial"], class_run["after_one"]
    decay = float(ema_decay(1, 0.999))
    assert decay == pytest.approx(2 / 11)
    for path in (("unet", "conv_in", "kernel"), ("cond_stage", "embedding", "embedding")):
        start, params, ema = initial.params, after.params, after.ema_params
        for key in path:
            start, params, ema = start[key], params[key], ema[key]
        assert not np.allclose(params, start)  # the step moved it
        np.testing.assert_allclose(ema, decay * start + (1 - decay) * params, rtol=1e-5, atol=1e-7)
    assert int(class_run["state"].step) == STEPS


def test_remat_and_attention_options_reach_every_network():
    modules = ldm_modules(TEXT_SPEC, LDMTrainConfig(remat="save_dots", attention="blocked"))
    assert modules["unet"][0].remat == "save_dots"
    assert {m.attention_implementation for m, _ in modules.values()} == {"blocked"}
    modules = ldm_modules(TEXT_SPEC, LDMTrainConfig())
    assert modules["unet"][0].remat == "none"
    assert {m.attention_implementation for m, _ in modules.values()} == {None}
    with pytest.raises(ValueError, match="host memory, which needs a GPU or TPU"):
        ldm_modules(TEXT_SPEC, LDMTrainConfig(remat="offload_dots"))  # this backend is cpu


def test_text_step_from_images_in_bf16_keeps_fp32_master_params(mesh):
    null = np.zeros(CLIP.max_length, np.int32)
    cfg = LDMTrainConfig(compute_dtype="bfloat16", cond_drop_prob=0.5)
    tx, schedule = make_optimizer(dict(learning_rate=1e-3))
    state, frozen = init_ldm_state(TEXT_SPEC, cfg, tx, mesh, init_params=random_params(TEXT_SPEC))
    assert set(state.params) == {"unet"} and set(frozen) == {"first_stage", "cond_stage"}
    step = make_ldm_train_step(TEXT_SPEC, cfg, tx, schedule, mesh, null_tokens=null)
    rng = np.random.default_rng(1)
    batch = {
        "image": jnp.asarray(rng.uniform(-1, 1, (8, 16, 16, 3)), jnp.float32),
        "tokens": jnp.asarray(rng.integers(1, 100, (8, CLIP.max_length)), jnp.int32),
    }
    state, metrics = step(state, frozen, batch, jax.random.key(0))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    assert float(metrics["scale_factor"]) == pytest.approx(TEXT_SPEC.diffusion.scale_factor)
    dtypes = {leaf.dtype for leaf in jax.tree.leaves((state.params, state.ema_params))}
    assert dtypes == {jnp.dtype(jnp.float32)}


def test_text_dropout_replaces_rows_with_null_tokens_at_the_rate():
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 100, (4000, 8)), jnp.int32)
    null = np.full(8, 0, np.int32)
    dropped = np.asarray(drop_tokens(tokens, null, 0.25, jax.random.key(3)))
    is_null = (dropped == 0).all(axis=1)
    assert 0.22 < is_null.mean() < 0.28
    np.testing.assert_array_equal(dropped[~is_null], np.asarray(tokens)[~is_null])
    assert not np.asarray(drop_tokens(tokens, null, 0.0, jax.random.key(3)) == 0).all(1).any()


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="compute_dtype"):
        LDMTrainConfig(compute_dtype="float16")
    with pytest.raises(ValueError, match="remat 'everything'; allowed: none, blocks, save_dots"):
        LDMTrainConfig(remat="everything")
    with pytest.raises(ValueError, match="attention 'flash'; allowed: auto, xla, cudnn"):
        LDMTrainConfig(attention="flash")
    with pytest.raises(ValueError, match="null_tokens"):
        make_ldm_train_step(
            TEXT_SPEC,
            LDMTrainConfig(cond_drop_prob=0.1),
            *make_optimizer(dict(learning_rate=1e-3)),
            make_mesh(("data",), (-1,)),
        )


def test_config_from_the_shared_config_layout():
    import ml_collections  # noqa: PLC0415

    config = ml_collections.ConfigDict(
        dict(
            diffusion=dict(prediction_type="v", min_snr_gamma=5.0, cond_drop_prob=0.1),
            ema=dict(decay=0.999),
            optimizer=dict(grad_accum_steps=4),
            compute_dtype="bfloat16",
            remat="blocks",
            attention="auto",
        )
    )
    cfg = LDMTrainConfig.from_config(config)
    assert cfg.attention is None
    config.attention = "splash"
    assert LDMTrainConfig.from_config(config).attention == "splash"
    assert (cfg.prediction_type, cfg.min_snr_gamma, cfg.cond_drop_prob) == ("v", 5.0, 0.1)
    assert (cfg.ema_decay, cfg.grad_accum_steps) == (0.999, 4)
    assert (cfg.compute_dtype, cfg.remat, cfg.scale_by_std) == ("bfloat16", "blocks", False)


def test_mismatched_init_params_name_the_wrong_entries(mesh):
    params = random_params(CLASS_SPEC)
    del params["first_stage"]["quant_conv"]
    tx, _ = make_optimizer(dict(learning_rate=1e-3))
    with pytest.raises(ValueError, match="missing .*quant_conv"):
        init_ldm_state(CLASS_SPEC, LDMTrainConfig(), tx, mesh, init_params=params)
    with pytest.raises(ValueError, match="has networks"):
        init_ldm_state(CLASS_SPEC, LDMTrainConfig(), tx, mesh, init_params={"vae": {}})


def test_step_is_compiled_with_ldm_jax_compile_options(mesh, monkeypatch):
    # an option value XLA rejects: the step only fails to compile if the options reach its jit
    monkeypatch.setattr(ldm_step, "compiler_options",
                        lambda: {"xla_cpu_experimental_ynn_fusion_type": "NO_SUCH_TYPE"})
    cfg = LDMTrainConfig()
    tx, schedule = make_optimizer(dict(learning_rate=1e-3, warmup_steps=0, weight_decay=0.0))
    state, frozen = init_ldm_state(CLASS_SPEC, cfg, tx, mesh, init_params=random_params(CLASS_SPEC))
    step = make_ldm_train_step(CLASS_SPEC, cfg, tx, schedule, mesh)
    batch = {"latents": jnp.zeros((8, 8, 8, 4)), "class_label": jnp.zeros((8,), jnp.int32)}
    with pytest.raises(Exception, match="NO_SUCH_TYPE"):
        step(state, frozen, batch, jax.random.key(0))


def test_splash_attention_step_matches_xla_on_the_mesh(mesh):
    """The train step with attention="splash" (the TPU kernel, interpret mode on CPU) traced on
    the 8-device mesh: the kernel runs under shard_map over the batch axes (the step sets the
    abstract mesh) and gives the XLA step's loss and gradient norm."""
    null = np.zeros(CLIP.max_length, np.int32)
    tx, schedule = make_optimizer(dict(learning_rate=1e-3))
    params = random_params(TEXT_SPEC)
    rng = np.random.default_rng(2)
    batch = {
        "latents": jnp.asarray(rng.standard_normal((8, 8, 8, 4)), jnp.float32),
        "tokens": jnp.asarray(rng.integers(1, 100, (8, CLIP.max_length)), jnp.int32),
    }
    results = {}
    for attention in ("xla", "splash"):
        cfg = LDMTrainConfig(attention=attention)
        state, frozen = init_ldm_state(TEXT_SPEC, cfg, tx, mesh, init_params=params)
        step = make_ldm_train_step(TEXT_SPEC, cfg, tx, schedule, mesh, null_tokens=null)
        if attention == "splash":
            jaxpr = str(step.trace(state, frozen, batch, jax.random.key(0)).jaxpr)
            assert "shard_map" in jaxpr and "pallas_call" in jaxpr
        _, metrics = step(state, frozen, batch, jax.random.key(0))
        results[attention] = {k: float(v) for k, v in metrics.items()}
    for key in ("loss", "grad_norm"):
        assert results["splash"][key] == pytest.approx(results["xla"][key], rel=1e-5)
