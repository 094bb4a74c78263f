"""The sharded autoencoder step on 8 fake CPU devices: reconstruction improves on a fixed batch,
the adaptive weight equals a brute-force gradient through the whole model, resume is exact, and the
trained weights are a first stage that exports in CompVis layout."""

import io
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ldm_jax.checkpoints import LatentDiffusionCheckpoint, load_checkpoint
from ldm_jax.models.autoencoder import AutoencoderConfig
from ldm_jax.models.vq import VQConfig
from ldm_jax.presets.autoencoders import AUTOENCODER_PRESETS
from ldm_jax.spec import ModelSpec, spec_to_dict
from ldm_jax.training import autoencoder_loss as L
from ldm_jax.training import autoencoder_step as S
from ldm_jax.training import loop
from ldm_jax.training.autoencoder_task import PUBLISHED_LOSSES, make_task
from ldm_jax.training.checkpointing import Checkpointer
from ldm_jax.training.discriminator import NLayerDiscriminator
from ldm_jax.training.lpips import LPIPS
from ldm_jax.training.lpips_weights import LPIPSWeightsError
from ldm_jax.training.sharding import batch_sharding, make_mesh

SIZE = 16
KL = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=SIZE, z_channels=4,
                       embed_dim=4)
VQ = VQConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=SIZE, z_channels=4, embed_dim=4,
              n_embed=32)


def _adam():
    return optax.adam(1e-3, b1=0.5, b2=0.9)


def _setup(config, loss, lpips_params=None, ema=None):
    mesh = make_mesh(("data", "fsdp", "tensor"), (1, -1, 1))
    assert mesh.size == 8
    model = S.build_autoencoder(config)
    disc = NLayerDiscriminator(n_layers=loss.disc_num_layers, ndf=loss.disc_ndf)
    init = S.init_state_fn(model, disc, loss, _adam(), _adam(), (SIZE, SIZE, 3), ema is not None)
    state, shardings = S.create_state(init, mesh, rng=jax.random.key(0))
    lpips = LPIPS() if loss.perceptual_weight > 0 else None
    pure = S.make_train_step(model, disc, loss, _adam(), _adam(), ema_max_decay=ema, lpips=lpips)
    step = S.sharded_train_step(pure, shardings, mesh, lpips_params)
    x = np.random.default_rng(0).uniform(-1, 1, (8, SIZE, SIZE, 3)).astype(np.float32)
    batch = {"image": jax.device_put(x, batch_sharding(mesh))}
    return dict(mesh=mesh, model=model, disc=disc, state=state, shardings=shardings, step=step,
                batch=batch, init=init, pure=pure, loss=loss, initial=jax.device_get(state))


def _fresh(setup):
    """The step-0 state again, placed with its shardings (the step donates its input)."""
    return jax.device_put(setup["initial"], setup["shardings"])


def _run(setup, state, n, first=0):
    history = []
    for i in range(first, first + n):
        state, metrics = setup["step"](state, setup["batch"], jax.random.key(100 + i))
        history.append(jax.device_get(metrics))
    return state, history


def _brute_force_d_weight(setup, state, loss, rng):
    """jax.grad w.r.t. the decoder's conv_out kernel through the whole autoencoder (no capture)."""
    model, disc, x = setup["model"], setup["disc"], setup["batch"]["image"]
    params = state.params["autoencoder"]
    sample_rng, _ = jax.random.split(rng)

    def recon_of(kernel):
        conv_out = {**params["decoder"]["conv_out"], "kernel": kernel}
        p = {**params, "decoder": {**params["decoder"], "conv_out": conv_out}}
        args = (sample_rng,) if loss.kind == "kl" else ()
        return model.apply({"params": p}, x, *args)[0]

    def nll(kernel):
        return L.nll_loss(loss, L.rec_loss(x, recon_of(kernel), None, 0.0), 0.0)

    def g(kernel):
        variables = {"params": state.disc_params, "batch_stats": state.disc_batch_stats}
        logits, _ = disc.apply(variables, recon_of(kernel), mutable=["batch_stats"])
        return L.generator_adversarial_loss(logits)

    kernel = params["decoder"]["conv_out"]["kernel"]
    return L.adaptive_weight(jax.grad(nll)(kernel), jax.grad(g)(kernel), loss.disc_weight)


def test_kl_steps_with_lpips_and_gan():
    loss = L.AutoencoderLossConfig(kind="kl", disc_start=0, disc_num_layers=2, disc_ndf=16)
    zeros = jnp.zeros((1, SIZE, SIZE, 3))
    lpips_params = nn.meta.unbox(LPIPS().init(jax.random.key(1), zeros, zeros)["params"])
    # the real heads are non-negative; random ones could make the distance negative
    lpips_params = jax.tree.map(jnp.abs, lpips_params)
    setup = _setup(KL, loss, lpips_params, ema=0.999)
    state = setup["state"]
    kernel_sharding = state.params["autoencoder"]["encoder"]["conv_in"]["kernel"].sharding
    assert not kernel_sharding.is_fully_replicated  # fsdp-sharded over the 8 devices
    before = jax.device_get(state.params)
    state, history = _run(setup, state, 6)
    first, last = history[0], history[-1]
    for m in history:
        assert all(np.isfinite(v) for v in m.values())
        assert m["disc_factor"] == 1.0 and m["d_weight"] > 0 and m["p_loss"] > 0
    assert last["l1_loss"] < 0.9 * first["l1_loss"] and last["psnr"] > first["psnr"] + 0.5
    assert first["kl_loss"] > 0 and first["disc_loss"] > 0
    assert int(state.step) == 6 and float(state.params["logvar"]) == 0.0  # logvar not learned
    ema, params = (jax.device_get(t) for t in (state.ema_params, state.params["autoencoder"]))
    get = lambda t: t["decoder"]["conv_out"]["kernel"]  # noqa: E731
    assert not np.allclose(get(ema), get(params))
    assert not np.allclose(get(ema), get(before["autoencoder"]))


@pytest.fixture(scope="module")
def vq_setup():
    loss = L.AutoencoderLossConfig(kind="vq", disc_start=2, perceptual_weight=0.0,
                                   disc_num_layers=2, disc_ndf=16, disc_weight=0.75)
    return _setup(VQ, loss)


def test_vq_steps_reduce_reconstruction_error(vq_setup, parity):
    state = _fresh(vq_setup)
    state, history = _run(vq_setup, state, 2)
    # the step's adaptive weight (conv_out input captured) vs jax.grad through the whole model
    expected = _brute_force_d_weight(vq_setup, state, vq_setup["loss"], jax.random.key(102))
    state, more = _run(vq_setup, state, 4, first=2)
    history += more
    parity("ae step adaptive weight vs full-model jax.grad", history[2]["d_weight"], expected)
    for m in history[:2]:  # before disc_start: no adversarial term, no discriminator loss
        assert m["disc_factor"] == 0 and m["d_weight"] == 0 and m["disc_loss"] == 0
    for m in history[2:]:
        assert m["disc_factor"] == 1 and m["d_weight"] > 0 and m["disc_loss"] > 0
    assert history[-1]["l1_loss"] < 0.9 * history[0]["l1_loss"]
    for m in history:
        assert 1.0 <= m["perplexity"] <= 32 and 0 < m["codebook_usage"] <= 1
        assert m["quant_loss"] > 0 and "p_loss" not in m and "kl_loss" not in m


def test_resume_is_exact(vq_setup, tmp_path):
    state = _fresh(vq_setup)
    state, _ = _run(vq_setup, state, 2)
    checkpointer = Checkpointer(tmp_path / "ckpt", async_save=False)
    checkpointer.save(2, state, {"position": 2}, {"trainer": "autoencoder"})
    template = _fresh(vq_setup)
    straight, history = _run(vq_setup, state, 2, first=2)
    restored, data_state, _ = checkpointer.restore(2, template)
    checkpointer.close()
    assert data_state == {"position": 2} and int(restored.step) == 2
    resumed, resumed_history = _run(vq_setup, restored, 2, first=2)
    for a, b in zip(jax.tree.leaves(jax.device_get(straight)),
                    jax.tree.leaves(jax.device_get(resumed)), strict=True):
        np.testing.assert_array_equal(a, b)
    assert history == resumed_history


def test_trained_weights_are_a_first_stage_exportable_to_compvis(vq_setup, tmp_path):
    state = _fresh(vq_setup)
    state, _ = _run(vq_setup, state, 1)
    params = jax.device_get(state.params["autoencoder"])
    checkpoint = LatentDiffusionCheckpoint(ModelSpec(first_stage=VQ), {"first_stage": params})
    path = checkpoint.save_pretrained(tmp_path / "vq.safetensors", format="compvis")
    loaded = load_checkpoint(path)
    assert loaded.spec.first_stage == VQ and loaded.spec.unet is None
    for a, b in zip(jax.tree.leaves(loaded.params["first_stage"]), jax.tree.leaves(params),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    x = vq_setup["batch"]["image"]
    latents = vq_setup["model"].apply({"params": loaded.params["first_stage"]}, x, method="encode")
    assert latents.shape == (8, SIZE // 2, SIZE // 2, 4)


def test_bad_setups_are_clear_errors():
    loss = L.AutoencoderLossConfig(kind="kl")
    disc = NLayerDiscriminator()
    with pytest.raises(ValueError, match="does not fit"):
        S.make_train_step(S.build_autoencoder(VQ), disc, loss, _adam(), _adam(), lpips=LPIPS())
    with pytest.raises(ValueError, match="LPIPS"):
        S.make_train_step(S.build_autoencoder(KL), disc, loss, _adam(), _adam())
    step = S.sharded_train_step(lambda s, p, b, r: (s, {}), None, make_mesh(("data",), (-1,)))
    with pytest.raises(ValueError, match="'image'"):
        step(None, {"latents": np.zeros((8, 2, 2, 4))}, None)



def test_step_is_compiled_with_ldm_jax_compile_options(monkeypatch):
    # an option value XLA rejects: the step only fails to compile if the options reach its jit
    monkeypatch.setattr(S, "compiler_options",
                        lambda: {"xla_cpu_experimental_ynn_fusion_type": "NO_SUCH_TYPE"})
    step = S.sharded_train_step(lambda s, p, b, r: (s, {}), None, make_mesh(("data",), (-1,)))
    with pytest.raises(Exception, match="NO_SUCH_TYPE"):
        step(jnp.zeros(2), {"image": np.zeros((8, 2, 2, 3), np.float32)}, jax.random.key(0))

def _config(arg):
    from ldm_jax.training.config_overrides import load_config

    path = Path(__file__).resolve().parent.parent / "configs" / "autoencoder.py"
    return load_config(str(path), arg)


def test_autoencoder_config_names_the_allowed_arguments():
    allowed = "kl-f4, kl-f8, kl-f16, kl-f32, vq-f4, vq-f8, vq-f16, tiny"
    for arg in (None, "kl-f64"):
        with pytest.raises(ValueError, match=f"argument {arg!r}; allowed: {allowed} "):
            _config(arg)


@pytest.mark.parametrize("name", sorted(PUBLISHED_LOSSES))
def test_published_configs(name, tmp_path, monkeypatch):
    config = _config(name)
    assert config.trainer == "autoencoder" and config.optimizer.b1 == 0.5
    monkeypatch.chdir(tmp_path)  # no lpips.safetensors here: a clear error naming the fix
    with pytest.raises(LPIPSWeightsError, match="lpips_weights --vgg16"):
        make_task(config)
    config.loss.perceptual_weight = 0.0
    task = make_task(config)
    assert task.first_stage == AUTOENCODER_PRESETS[name]
    for key, value in PUBLISHED_LOSSES[name].items():
        assert getattr(task.loss, key) == value
    assert task.loss.kind == name[:2]


def test_autoencoder_task_runs_in_the_loop(tmp_path):
    config = _config("tiny")
    config.model.spec = spec_to_dict(ModelSpec(first_stage=KL))
    config.data.image_size = SIZE
    config.loss.update(dict(disc_start=1, disc_num_layers=2))
    config.train.update(dict(num_steps=2, log_every=1, checkpoint_every=0, sample_every=2,
                             async_checkpointing=False, progress_bar=False))
    config.sample.num_images = 4
    task = make_task(config)
    result = loop.run(config, tmp_path, task, stream=io.StringIO())
    assert result.step == 2 and result.metrics["disc_factor"] == 1.0
    assert {"kl_loss", "psnr", "d_weight", "disc_loss", "rec_loss"} <= set(result.metrics)
    grids = list((tmp_path / "samples").glob("*.png"))
    assert len(grids) == 1
    from PIL import Image

    assert Image.open(grids[0]).size == (4 * SIZE, 2 * SIZE)  # originals over reconstructions
    checkpointer = Checkpointer(tmp_path / "checkpoints", async_save=False)
    step, state, _, _ = checkpointer.restore_latest(task.init_state(jax.random.key(1)))
    checkpointer.close()
    first_stage = task.first_stage_checkpoint(state)  # EMA weights (ema.decay 0.99)
    assert step == 2 and first_stage.spec.first_stage == KL
    np.testing.assert_array_equal(
        jax.tree.leaves(first_stage.params["first_stage"])[0],
        jax.tree.leaves(jax.device_get(state.ema_params))[0],
    )
