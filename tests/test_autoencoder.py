"""AutoencoderKL vs diffusers AutoencoderKL (tiny, random weights); posterior math; presets."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from references.torch_reference import nchw, nhwc, state_dict_numpy

from ldm_jax.checkpoints.diffusers.autoencoder import (
    autoencoder_kl_table,
    config_from_diffusers,
    diffusers_config,
)
from ldm_jax.checkpoints.errors import CheckpointMismatchError
from ldm_jax.checkpoints.key_table import flatten_params
from ldm_jax.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm_jax.models.distributions import DiagonalGaussian
from ldm_jax.models.params import abstract_params, count_params
from ldm_jax.models.vq import VQConfig
from ldm_jax.presets.autoencoders import AUTOENCODER_PRESETS, SD_VAE

# Level 1 (resolution 32 / 2 = 16) has attention after every resnet, on both paths.
TINY = AutoencoderConfig(
    ch=32,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(16,),
    resolution=32,
    z_channels=4,
    embed_dim=4,
)
SD_VAE_PARAMS = 83_653_863  # diffusers' AutoencoderKL for Stable Diffusion 1.x/2.x


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = TorchAutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    ).eval()
    with torch.no_grad():  # norms start at 1/0 and biases at 0: move them so the mapping matters
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def ours(reference):
    model = AutoencoderKL(TINY)
    shapes = abstract_params(model, jnp.zeros((1, 16, 16, 3)))
    params = autoencoder_kl_table(TINY).to_flax(state_dict_numpy(reference), shapes)
    return model, {"params": params}


# Non-square on purpose: a swapped H/W would not go unnoticed.
X = np.random.default_rng(0).uniform(-1, 1, size=(2, 24, 16, 3)).astype(np.float32)


def test_configs_translate_both_ways(reference):
    assert config_from_diffusers(reference.config) == TINY
    for key, value in diffusers_config(TINY).items():
        expected = reference.config[key]
        assert value == (tuple(expected) if isinstance(value, tuple) else expected), key


def test_posterior_parity(reference, ours, parity):
    model, variables = ours
    with torch.no_grad():
        dist = reference.encode(nchw(X)).latent_dist
    posterior = model.apply(variables, X, method="encode")
    parity("autoencoder_kl.posterior_mean", posterior.mean, nhwc(dist.mean))
    parity("autoencoder_kl.posterior_logvar", posterior.logvar, nhwc(dist.logvar))


def test_decode_parity(reference, ours, parity):
    model, variables = ours
    z = np.random.default_rng(1).normal(size=(2, 3, 2, 4)).astype(np.float32)
    with torch.no_grad():
        expected = reference.decode(nchw(z)).sample
    parity("autoencoder_kl.decode", model.apply(variables, z, method="decode"), nhwc(expected))


def test_forward_mode_parity(reference, ours, parity):
    model, variables = ours
    with torch.no_grad():
        expected = reference(nchw(X), sample_posterior=False).sample
    reconstruction, _ = jax.jit(model.apply)(variables, X)
    parity("autoencoder_kl.forward_mode", reconstruction, nhwc(expected))


def test_sampling_uses_rng_and_posterior_passes_through_jit(ours):
    model, variables = ours
    posterior = jax.jit(lambda v, x: model.apply(v, x, method="encode"))(variables, X)
    assert isinstance(posterior, DiagonalGaussian)
    rng = jax.random.key(3)
    expected = posterior.mean + jnp.exp(0.5 * posterior.logvar) * jax.random.normal(
        rng, posterior.mean.shape
    )
    np.testing.assert_allclose(posterior.sample(rng), expected, rtol=1e-6, atol=1e-6)
    sampled, _ = model.apply(variables, X, rng)
    mode, _ = model.apply(variables, X, rng, sample_posterior=False)
    decoded_sample = model.apply(variables, posterior.sample(rng), method="decode")
    np.testing.assert_allclose(sampled, decoded_sample, rtol=1e-5, atol=1e-5)
    assert not np.allclose(sampled, mode)


def test_kl_and_nll_match_diffusers_and_the_formula(parity):
    rng = np.random.default_rng(2)
    moments, other_moments = rng.normal(size=(2, 2, 3, 4, 8)).astype(np.float32)
    moments[..., 4:] *= 2.0
    ours, other = (
        DiagonalGaussian.from_moments(moments),
        DiagonalGaussian.from_moments(other_moments),
    )
    ref = DiagonalGaussianDistribution(nchw(moments))
    ref_other = DiagonalGaussianDistribution(nchw(other_moments))
    sample = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
    parity("gaussian.kl", ours.kl(), ref.kl().numpy())
    parity("gaussian.kl_other", ours.kl(other), ref.kl(ref_other).numpy())
    parity("gaussian.nll", ours.nll(sample), ref.nll(nchw(sample)).numpy())
    mean, logvar = moments[..., :4], moments[..., 4:]
    by_hand = 0.5 * (mean**2 + np.exp(logvar) - 1.0 - logvar).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(ours.kl(), by_hand, rtol=1e-5)
    # Closed forms: KL(N(1, 1) || N(0, 1)) = 1/2 per element; KL(q || q) = 0.
    unit = DiagonalGaussian(jnp.ones((1, 2, 2, 3)), jnp.zeros((1, 2, 2, 3)))
    np.testing.assert_allclose(unit.kl(), [6.0])
    np.testing.assert_allclose(ours.kl(ours), np.zeros(2), atol=1e-5)


def test_logvar_is_clamped_and_deterministic_posterior_has_no_spread():
    moments = jnp.concatenate(
        [jnp.zeros((1, 2, 2, 2)), jnp.array([100.0, -100.0]) * jnp.ones((1, 2, 2, 2))], -1
    )
    posterior = DiagonalGaussian.from_moments(moments)
    np.testing.assert_array_equal(posterior.logvar[0, 0, 0], [20.0, -30.0])
    fixed = DiagonalGaussian.from_moments(moments, deterministic=True)
    np.testing.assert_array_equal(fixed.sample(jax.random.key(0)), fixed.mean)
    np.testing.assert_array_equal(fixed.kl(), [0.0])


def test_key_table_round_trip_is_bit_exact(reference, ours):
    state_dict = state_dict_numpy(reference)
    _, variables = ours
    back = autoencoder_kl_table(TINY).to_torch(variables["params"])
    assert back.keys() == state_dict.keys()
    for key, value in state_dict.items():
        assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key


def test_mismatched_state_dicts_are_rejected(reference):
    table = autoencoder_kl_table(TINY)
    shapes = abstract_params(AutoencoderKL(TINY), jnp.zeros((1, 16, 16, 3)))
    missing = state_dict_numpy(reference)
    del missing["decoder.up_blocks.0.attentions.0.to_q.weight"]
    with pytest.raises(CheckpointMismatchError, match="to_q.weight"):
        table.to_flax(missing, shapes)
    wrong_shape = state_dict_numpy(reference)
    wrong_shape["quant_conv.weight"] = np.zeros((8, 8, 3, 3), np.float32)
    with pytest.raises(CheckpointMismatchError, match="quant_conv.weight"):
        table.to_flax(wrong_shape, shapes)
    no_attention = dataclasses.replace(TINY, attn_resolutions=())
    with pytest.raises(CheckpointMismatchError, match="unexpected keys"):
        autoencoder_kl_table(no_attention).to_flax(
            state_dict_numpy(reference), abstract_params(AutoencoderKL(no_attention), X[:1, :16])
        )


def test_bad_inputs_raise_value_errors(ours):
    model, variables = ours
    with pytest.raises(ValueError, match="multiples of the downsampling factor 2"):
        model.apply(variables, X[:, :23], method="encode")
    with pytest.raises(ValueError, match="expected 3 input channels"):
        model.apply(variables, np.zeros((1, 16, 16, 4), np.float32), method="encode")
    with pytest.raises(ValueError, match=r"latents \[B, h, w, 4\]"):
        model.apply(variables, np.zeros((1, 8, 8, 3), np.float32), method="decode")
    with pytest.raises(ValueError, match="double_z"):
        AutoencoderKL(VQConfig(n_embed=8)).init(jax.random.key(0), X[:1, :16])
    with pytest.raises(ValueError, match="embed_dim"):
        diffusers_config(AutoencoderConfig(z_channels=4, embed_dim=3))


def test_bfloat16_runs_and_is_finite(ours):
    _, variables = ours
    reconstruction, posterior = AutoencoderKL(TINY, dtype=jnp.bfloat16).apply(variables, X)
    assert reconstruction.dtype == jnp.bfloat16 and posterior.mean.dtype == jnp.float32
    assert np.isfinite(np.asarray(reconstruction, np.float32)).all()


def test_sd_vae_parameter_count():
    shapes = abstract_params(AutoencoderKL(SD_VAE), jnp.zeros((1, 64, 64, 3)))
    assert count_params(shapes) == SD_VAE_PARAMS


@pytest.mark.parametrize(
    "name", [n for n, c in AUTOENCODER_PRESETS.items() if not isinstance(c, VQConfig)]
)
def test_kl_presets_match_diffusers_layout(name):
    """Full-size presets build abstractly and their table fits diffusers' model key for key."""
    cfg = AUTOENCODER_PRESETS[name]
    shapes = abstract_params(AutoencoderKL(cfg), jnp.zeros((1, 64, 64, 3)))
    with torch.device("meta"):  # shapes only, no memory
        torch_shapes = {
            k: tuple(v.shape)
            for k, v in TorchAutoencoderKL(**diffusers_config(cfg)).state_dict().items()
        }
    assert_table_fits(autoencoder_kl_table(cfg), shapes, torch_shapes)


def assert_table_fits(table, flax_shapes, torch_shapes):
    """The table covers both sides exactly and every transformed shape matches."""
    table.check_covers(flax_shapes)
    assert {e.torch_key for e in table.entries} == torch_shapes.keys()
    flat = flatten_params(flax_shapes)
    for e in table.entries:
        assert e.transform.torch_shape(flat[e.flax_path].shape) == torch_shapes[e.torch_key], e
