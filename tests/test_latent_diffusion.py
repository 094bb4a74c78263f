"""The LDM glue shared by the train step and the sampler: condition encoding, UNet input routing."""

import types

import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion.schedules import make_schedule
from ldm_jax.latent_diffusion import (
    UNetConditioning,
    apply_unet,
    encode_condition,
    schedule_from_spec,
    unet_conditioning,
)
from ldm_jax.models.clip_text import CLIPTextConfig
from ldm_jax.models.conditioning import ClassEmbedderConfig, SpatialRescalerConfig
from ldm_jax.models.ldm_bert import LDMBertConfig
from ldm_jax.spec import CondStageSpec, DiffusionSpec


class _Recorder:
    """A stand-in Flax module: `apply` records its arguments and returns `result(inputs)`."""

    def __init__(self, result):
        self.result, self.calls = result, []

    def apply(self, variables, *args, **kwargs):
        self.calls.append((variables, args, kwargs))
        return self.result(*args)


def test_schedule_from_spec_is_the_specs_schedule():
    d = DiffusionSpec(beta_schedule="linear", num_timesteps=100, linear_start=1e-4, linear_end=0.02)
    ours = schedule_from_spec(d)
    reference = make_schedule("linear", 100, 1e-4, 0.02)
    np.testing.assert_array_equal(ours.alphas_cumprod, reference.alphas_cumprod)
    assert ours.num_train_timesteps == 100


@pytest.mark.parametrize(
    ("kind", "config", "hidden_state"),
    [
        ("clip", CLIPTextConfig(), True),
        ("openclip", CLIPTextConfig(), True),
        ("ldm_bert", LDMBertConfig(), False),
        ("class", ClassEmbedderConfig(n_classes=3, embed_dim=4), False),
        ("spatial_rescaler", SpatialRescalerConfig(), False),
    ],
)
def test_encode_condition_takes_the_encoders_conditioning(kind, config, hidden_state):
    array = jnp.ones((2, 3, 4))
    out = types.SimpleNamespace(last_hidden_state=array) if hidden_state else array
    module = _Recorder(lambda ids: out)
    ids = jnp.zeros((2,), jnp.int32)
    encoded = encode_condition(CondStageSpec(kind, config), module, {"w": 1}, ids)
    assert encoded is array
    assert module.calls[0][0] == {"params": {"w": 1}} and module.calls[0][1][0] is ids


def test_unet_conditioning_routes_per_key():
    enc, cat, labels = jnp.ones((2, 3, 4)), jnp.ones((2, 8, 8, 1)), jnp.arange(2)
    routed = {
        key: unet_conditioning(key, encoded=enc, concat=cat, labels=labels)
        for key in (None, "crossattn", "concat", "hybrid", "adm")
    }
    assert routed[None] == UNetConditioning()
    assert routed["crossattn"] == UNetConditioning(context=enc)
    assert routed["concat"] == UNetConditioning(concat=cat)
    assert routed["hybrid"] == UNetConditioning(context=enc, concat=cat)
    assert routed["adm"] == UNetConditioning(y=enc)  # the encoded class vector
    assert unet_conditioning("adm", labels=labels) == UNetConditioning(y=labels)  # raw labels


def test_apply_unet_concatenates_spatial_inputs_along_channels():
    unet = _Recorder(lambda x, t, context, y: x)
    x_t = jnp.zeros((2, 8, 8, 4))
    c = UNetConditioning(context=jnp.ones((2, 3, 4)), y=None, concat=jnp.ones((2, 8, 8, 5)))
    out = apply_unet(unet, {"w": 2}, x_t, jnp.arange(2), c, deterministic=False)
    assert out.shape == (2, 8, 8, 9)
    np.testing.assert_array_equal(out[..., :4], 0.0)
    np.testing.assert_array_equal(out[..., 4:], 1.0)
    variables, (_, t_B, context, y), kwargs = unet.calls[0]
    assert variables == {"params": {"w": 2}} and context is c.context and y is None
    assert kwargs == {"deterministic": False}
    plain = apply_unet(unet, {"w": 2}, x_t, jnp.arange(2), UNetConditioning())
    assert plain is x_t  # nothing concatenated
