"""VQModel vs diffusers VQModel (tiny, random weights); quantiser semantics; VQ presets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import VQModel as TorchVQModel
from references.torch_reference import nchw, nhwc, state_dict_numpy

from ldm_jax.checkpoints.diffusers.autoencoder import (
    config_from_diffusers,
    diffusers_config,
    vq_model_table,
)
from ldm_jax.checkpoints.errors import CheckpointMismatchError
from ldm_jax.checkpoints.key_table import flatten_params
from ldm_jax.models.params import abstract_params
from ldm_jax.models.vq import Quantized, VQConfig, VQModel
from ldm_jax.presets.autoencoders import AUTOENCODER_PRESETS

# Attention at level 1 on both paths; vq_embed_dim 3 != latent 4 so both 1x1 convs change width.
TINY = VQConfig(
    ch=32,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(16,),
    resolution=32,
    z_channels=4,
    embed_dim=3,
    n_embed=64,
)
# The vq-f4-noattn pattern: no attention anywhere, not even in the mid-blocks.
NO_ATTENTION = VQConfig(
    ch=32,
    ch_mult=(1, 2),
    num_res_blocks=2,
    resolution=32,
    z_channels=3,
    embed_dim=3,
    n_embed=32,
    mid_attention=False,
)
# Non-square on purpose: a swapped H/W would not go unnoticed.
X = np.random.default_rng(0).uniform(-1, 1, size=(2, 24, 16, 3)).astype(np.float32)


def _reference(**kwargs) -> TorchVQModel:
    torch.manual_seed(0)
    model = TorchVQModel(in_channels=3, out_channels=3, norm_num_groups=32, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():  # move norms and biases off their 1/0 initial values
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
        # Codes near real latents (diffusers' init is ~0): many codes get used, few near-ties.
        latents = (
            model.encode(nchw(X))
            .latents.permute(0, 2, 3, 1)
            .reshape(-1, model.quantize.vq_embed_dim)
        )
        picks = torch.randperm(latents.shape[0])[: model.quantize.n_e]
        codebook = latents[picks] + 0.05 * latents.std() * torch.randn_like(latents[picks])
        model.quantize.embedding.weight.copy_(codebook)
    return model


@pytest.fixture(scope="module")
def reference():
    return _reference(
        down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        vq_embed_dim=3,
        num_vq_embeddings=64,
        sample_size=32,
    )


def _ours(cfg, reference):
    model = VQModel(cfg)
    shapes = abstract_params(model, jnp.zeros((1, 16, 16, 3)))
    return model, {"params": vq_model_table(cfg).to_flax(state_dict_numpy(reference), shapes)}


@pytest.fixture(scope="module")
def ours(reference):
    return _ours(TINY, reference)


def test_config_translates_both_ways(reference):
    assert config_from_diffusers(reference.config) == TINY
    for key, value in diffusers_config(TINY).items():
        expected = reference.config[key]
        assert value == (tuple(expected) if isinstance(value, tuple) else expected), key


def test_encode_quantize_decode_parity(reference, ours, parity):
    model, variables = ours
    with torch.no_grad():
        h = reference.encode(nchw(X)).latents
        z_q, loss, (_, _, indices) = reference.quantize(h)
        decoded = reference.decode(h).sample
        unquantized = reference.decode(h, force_not_quantize=True).sample
    ours_h = model.apply(variables, X, method="encode")
    parity("vq.encode", ours_h, nhwc(h))
    quantized = model.apply(variables, ours_h, method="quantize")
    assert isinstance(quantized, Quantized)
    np.testing.assert_array_equal(quantized.indices, indices.numpy().reshape(2, 12, 8))
    parity("vq.quantize_z_q", quantized.z_q, nhwc(z_q))
    parity("vq.quantize_loss", quantized.loss, loss.numpy())
    parity("vq.decode", model.apply(variables, ours_h, method="decode"), nhwc(decoded))
    parity(
        "vq.decode_force_not_quantize",
        model.apply(variables, ours_h, True, method="decode"),
        nhwc(unquantized),
    )


def test_decode_indices_and_forward_parity(reference, ours, parity):
    model, variables = ours
    indices = np.random.default_rng(1).integers(0, TINY.n_embed, size=(2, 3, 2))
    with torch.no_grad():
        codes = reference.quantize.get_codebook_entry(
            torch.from_numpy(indices).reshape(-1), (2, 3, 2, 3)
        )
        from_indices = reference.decode(codes, force_not_quantize=True).sample
        forward = reference(nchw(X))
    parity(
        "vq.decode_indices",
        model.apply(variables, indices, method="decode_indices"),
        nhwc(from_indices),
    )
    reconstruction, quantized = jax.jit(model.apply)(variables, X)
    parity("vq.forward", reconstruction, nhwc(forward.sample))
    parity("vq.forward_loss", quantized.loss, forward.commit_loss.numpy())


def test_no_attention_model_parity(parity):
    reference = _reference(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=2,
        latent_channels=3,
        num_vq_embeddings=32,
        sample_size=32,
        mid_block_add_attention=False,
    )
    assert config_from_diffusers(reference.config) == NO_ATTENTION
    model, variables = _ours(NO_ATTENTION, reference)
    assert "attn_1" not in variables["params"]["encoder"]["mid"]
    with torch.no_grad():
        expected = reference(nchw(X)).sample
    parity("vq_noattn.forward", model.apply(variables, X)[0], nhwc(expected))


def test_straight_through_gradient_loss_and_perplexity(ours):
    model, variables = ours
    h = model.apply(variables, X, method="encode")
    weights = jax.random.normal(jax.random.key(0), h.shape)

    def objective(h):
        quantized = model.apply(variables, h, method="quantize")
        return jnp.sum(quantized.z_q * weights), quantized

    grad, quantized = jax.grad(objective, has_aux=True)(h)
    np.testing.assert_allclose(grad, weights, rtol=1e-6)  # d z_q / d z = identity
    codes = np.asarray(variables["params"]["quantize"]["codebook"]["embedding"])
    chosen = codes[np.asarray(quantized.indices)]
    np.testing.assert_array_equal(np.asarray(quantized.z_q), np.asarray(h + (chosen - h)))
    # legacy weighting: (1 + beta) * mean squared distance in the forward value
    np.testing.assert_allclose(quantized.loss, 1.25 * np.mean((chosen - h) ** 2), rtol=1e-5)
    usage = np.bincount(np.asarray(quantized.indices).ravel(), minlength=TINY.n_embed) / 192
    expected = np.exp(-np.sum(usage * np.log(usage + 1e-10)))
    np.testing.assert_allclose(quantized.perplexity, expected, rtol=1e-5)
    assert quantized.perplexity > 10  # the batch really spreads over many codes

    def codebook_loss(params):
        return model.apply({"params": params}, h, method="quantize").loss

    codebook_grad = jax.grad(codebook_loss)(variables["params"])["quantize"]["codebook"]
    used = np.zeros(TINY.n_embed, bool)
    used[np.asarray(quantized.indices).ravel()] = True
    grad_rows = np.abs(np.asarray(codebook_grad["embedding"])).sum(axis=1) > 0
    np.testing.assert_array_equal(grad_rows, used)  # only the chosen codes are pulled


def test_key_table_round_trip_is_bit_exact(reference, ours):
    state_dict = state_dict_numpy(reference)
    back = vq_model_table(TINY).to_torch(ours[1]["params"])
    assert back.keys() == state_dict.keys()
    for key, value in state_dict.items():
        assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key


def test_mismatched_state_dicts_are_rejected(reference):
    table = vq_model_table(TINY)
    shapes = abstract_params(VQModel(TINY), jnp.zeros((1, 16, 16, 3)))
    missing = state_dict_numpy(reference)
    del missing["quantize.embedding.weight"]
    with pytest.raises(CheckpointMismatchError, match="quantize.embedding.weight"):
        table.to_flax(missing, shapes)
    wrong_shape = state_dict_numpy(reference)
    wrong_shape["quantize.embedding.weight"] = np.zeros((65, 3), np.float32)
    with pytest.raises(CheckpointMismatchError, match="quantize/codebook/embedding needs"):
        table.to_flax(wrong_shape, shapes)


def test_bad_inputs_raise_value_errors(ours):
    model, variables = ours
    with pytest.raises(ValueError, match="multiples of the downsampling factor 2"):
        model.apply(variables, X[:, :, :15], method="encode")
    with pytest.raises(ValueError, match="expected 3 input channels"):
        model.apply(variables, X[..., :1], method="encode")
    with pytest.raises(ValueError, match=r"latents \[B, h, w, 3\]"):
        model.apply(variables, np.zeros((1, 4, 4, 4), np.float32), method="decode")
    with pytest.raises(ValueError, match="integer codebook indices"):
        model.apply(variables, np.zeros((1, 4, 4), np.float32), method="decode_indices")
    with pytest.raises(ValueError, match="integer codebook indices"):
        model.apply(variables, np.zeros((4, 4), np.int32), method="decode_indices")
    with pytest.raises(ValueError, match="double_z must be False"):
        VQConfig(double_z=True)
    with pytest.raises(ValueError, match="n_embed"):
        VQConfig(n_embed=0)


def test_bfloat16_runs_and_is_finite(ours):
    _, variables = ours
    reconstruction, quantized = VQModel(TINY, dtype=jnp.bfloat16).apply(variables, X)
    assert reconstruction.dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(reconstruction, np.float32)).all()
    assert np.isfinite(quantized.loss)


@pytest.mark.parametrize(
    "name", [n for n, c in AUTOENCODER_PRESETS.items() if isinstance(c, VQConfig)]
)
def test_vq_presets_match_diffusers_layout(name):
    """Full-size presets build abstractly and their table fits diffusers' model key for key."""
    cfg = AUTOENCODER_PRESETS[name]
    shapes = abstract_params(VQModel(cfg), jnp.zeros((1, 64, 64, 3)))
    with torch.device("meta"):  # shapes only, no memory
        model = TorchVQModel(**diffusers_config(cfg))
    torch_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    table = vq_model_table(cfg)
    table.check_covers(shapes)
    assert {e.torch_key for e in table.entries} == torch_shapes.keys()
    flat = flatten_params(shapes)
    for e in table.entries:
        assert e.transform.torch_shape(flat[e.flax_path].shape) == torch_shapes[e.torch_key], e
