"""One sharded, jitted training step of a KL or VQ first stage with its patch-GAN discriminator.

Both updates happen in one jit (state donated): the autoencoder's (Adam on encoder, decoder, convs,
codebook, and logvar if learned) and then the discriminator's, on the same batch and on the
reconstructions of the generator pass (CompVis recomputes them with the just-updated autoencoder;
reusing them saves a forward pass and lags the discriminator's fakes by one update).

The adaptive weight needs |grad| of nll and of the adversarial term w.r.t. the decoder's conv_out
kernel. The step runs the autoencoder forward once (jax.vjp), then LPIPS and the discriminator as
functions of the reconstruction; their cotangents d nll/d x_hat and d g/d x_hat go through conv_out
alone (its input silu(norm_out(...)) is captured, see models/autoencoder.py `_output_head`) for
the weight, and the autoencoder's backward pass runs once, with d nll/d x_hat + d_weight *
disc_factor * d g/d x_hat. Before disc_start the adversarial backward pass is skipped.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from ldm_jax.compile_options import compiler_options
from ldm_jax.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm_jax.models.layers import conv
from ldm_jax.models.vq import VQConfig, VQModel
from ldm_jax.training import autoencoder_loss as L
from ldm_jax.training.bound_step import BoundStep
from ldm_jax.training.discriminator import NLayerDiscriminator
from ldm_jax.training.ema import ema_decay, update_ema
from ldm_jax.training.lpips import LPIPS
from ldm_jax.training.sharding import (
    DEFAULT_LOGICAL_RULES,
    batch_sharding,
    box_like,
    replicated,
    traced_on_mesh,
)
from ldm_jax.training.state import create_sharded_state

_LAST_LAYER_INPUT = ("decoder", "norm_out")


@flax.struct.dataclass
class AutoencoderTrainState:
    """params = {"autoencoder": first-stage params, "logvar": scalar}; ema_params is the
    autoencoder's EMA (None without EMA); disc_batch_stats are BatchNorm running statistics."""

    step: jax.Array
    params: Any
    opt_state: Any
    disc_params: Any
    disc_batch_stats: Any
    disc_opt_state: Any
    ema_params: Any


def build_autoencoder(
    config: AutoencoderConfig, dtype=jnp.float32, attention: str | None = None
) -> nn.Module:
    """AutoencoderKL for an AutoencoderConfig, VQModel for a VQConfig; `attention` is the
    attention implementation (None: chosen per call)."""
    model_class = VQModel if isinstance(config, VQConfig) else AutoencoderKL
    return model_class(config, dtype=dtype, attention_implementation=attention)


def loss_kind(config: AutoencoderConfig) -> str:
    return "vq" if isinstance(config, VQConfig) else "kl"


def init_state_fn(
    model: nn.Module,
    disc: NLayerDiscriminator,
    loss_cfg: L.AutoencoderLossConfig,
    gen_tx: optax.GradientTransformation,
    disc_tx: optax.GradientTransformation,
    image_shape: tuple[int, int, int],
    use_ema: bool,
) -> Callable:
    """init_fn(rng, initial_ae_params=None) -> boxed step-0 state, for create_sharded_state.

    `initial_ae_params` (plain tree, e.g. a checkpoint's first_stage) fine-tunes instead.
    """
    x = jnp.zeros((1, *image_shape), jnp.float32)

    def init_fn(rng, initial_ae_params=None):
        ae_rng, disc_rng = jax.random.split(rng)
        ae = model.init(ae_rng, x)["params"]
        if initial_ae_params is not None:
            ae = box_like(initial_ae_params, ae)
        disc_vars = disc.init(disc_rng, x, train=True)
        gen = {"autoencoder": ae, "logvar": jnp.asarray(loss_cfg.logvar_init, jnp.float32)}
        return AutoencoderTrainState(
            step=jnp.zeros((), jnp.int32),
            params=gen,
            opt_state=gen_tx.init(gen),
            disc_params=disc_vars["params"],
            disc_batch_stats=disc_vars["batch_stats"],
            disc_opt_state=disc_tx.init(disc_vars["params"]),
            ema_params=jax.tree.map(jnp.copy, ae) if use_ema else None,
        )

    return init_fn


def create_state(init_fn, mesh, rules=DEFAULT_LOGICAL_RULES, rng=None, initial_ae_params=None):
    """(state, shardings) created directly in their shards (see state.create_sharded_state)."""
    rng = jax.random.key(0) if rng is None else rng
    if initial_ae_params is None:
        return create_sharded_state(lambda r: init_fn(r), mesh, rules, rng)
    return create_sharded_state(init_fn, mesh, rules, rng, initial_ae_params)


def _conv_out(model: nn.Module) -> nn.Conv:
    return conv(model.config.out_channels, 3, name="conv_out", dtype=model.dtype)


def make_train_step(
    model: nn.Module,
    disc: NLayerDiscriminator,
    loss_cfg: L.AutoencoderLossConfig,
    gen_tx: optax.GradientTransformation,
    disc_tx: optax.GradientTransformation,
    *,
    ema_max_decay: float | None = None,
    lpips: LPIPS | None = None,
) -> Callable:
    """Pure train_step(state, lpips_params, batch, rng) -> (state, metrics).

    batch = {"image": f32 [B, H, W, 3] in [-1, 1]}; lpips_params None when perceptual_weight = 0.
    """
    cfg = loss_cfg
    if cfg.kind != loss_kind(model.config):
        raise ValueError(f"loss kind {cfg.kind!r} does not fit a {type(model).__name__}")
    if cfg.perceptual_weight > 0 and lpips is None:
        raise ValueError("perceptual_weight > 0 needs the LPIPS network (lpips=LPIPS())")
    dropout = model.config.dropout > 0
    capture = lambda mdl, method: method == "__call__" and mdl.path == _LAST_LAYER_INPUT  # noqa: E731

    def train_step(state: AutoencoderTrainState, lpips_params, batch, rng):
        x = batch["image"].astype(jnp.float32)
        step = state.step
        factor = L.disc_factor(cfg, step)
        sample_rng, dropout_rng = jax.random.split(rng)

        def perceptual(recon):
            if cfg.perceptual_weight == 0:
                return None
            return lpips.apply({"params": lpips_params}, x, recon)

        def nll_of(recon, logvar):
            p = perceptual(recon)
            return L.nll_loss(cfg, L.rec_loss(x, recon, p, cfg.perceptual_weight), logvar), p

        def disc_logits(recon, stats):
            return disc.apply(
                {"params": state.disc_params, "batch_stats": stats},
                recon,
                train=True,
                mutable=["batch_stats"],
            )

        def reconstruct(ae_params):
            kwargs = dict(
                deterministic=not dropout,
                rngs={"dropout": dropout_rng},
                capture_intermediates=capture,
                mutable=["intermediates"],
            )
            if cfg.kind == "kl":
                (recon, posterior), inter = model.apply({"params": ae_params}, x, sample_rng,
                                                        **kwargs)
                regulariser = jnp.sum(posterior.kl()) / x.shape[0]
                extras = {"kl_loss": regulariser}
            else:
                (recon, quantized), inter = model.apply({"params": ae_params}, x, **kwargs)
                regulariser = quantized.loss
                used = jnp.bincount(quantized.indices.ravel(), length=model.config.n_embed) > 0
                extras = {
                    "quant_loss": regulariser,
                    "perplexity": quantized.perplexity,
                    "codebook_usage": jnp.mean(used.astype(jnp.float32)),
                }
            h = nn.silu(inter["intermediates"]["decoder"]["norm_out"]["__call__"][0])
            return (recon.astype(jnp.float32), regulariser), dict(h=h, **extras)

        def recon_losses(recon, logvar):
            nll, p = nll_of(recon, logvar)
            logits_fake, stats = disc_logits(recon, state.disc_batch_stats)
            return (nll, L.generator_adversarial_loss(logits_fake)), dict(p=p, stats=stats)

        # autoencoder forward once; LPIPS and discriminator seen as functions of the recon
        (recon, regulariser), ae_backward, extras = jax.vjp(
            reconstruct, state.params["autoencoder"], has_aux=True
        )
        logvar = state.params["logvar"]
        (nll, g_loss), losses_backward, aux = jax.vjp(recon_losses, recon, logvar, has_aux=True)
        one, zero = jnp.ones((), jnp.float32), jnp.zeros((), jnp.float32)
        d_nll, d_logvar = losses_backward((one, zero))

        def adaptive_weight():
            kernel = state.params["autoencoder"]["decoder"]["conv_out"]["kernel"]
            bias = state.params["autoencoder"]["decoder"]["conv_out"]["bias"]
            head = lambda k: _conv_out(model).apply(  # noqa: E731
                {"params": {"kernel": k, "bias": bias}}, extras["h"]
            ).astype(jnp.float32)
            _, kernel_vjp = jax.vjp(head, kernel)
            d_g, _ = losses_backward((zero, one))
            ratio = L.adaptive_weight(kernel_vjp(d_nll)[0], kernel_vjp(d_g)[0], cfg.disc_weight)
            return ratio, d_g

        # before disc_start the adversarial term has weight 0: skip its backward pass
        d_weight, d_g = jax.lax.cond(
            factor > 0, adaptive_weight, lambda: (zero, jnp.zeros_like(recon))
        )
        weight = cfg.codebook_weight if cfg.kind == "vq" else cfg.kl_weight
        (ae_grads,) = ae_backward((d_nll + (d_weight * factor) * d_g, weight * one))
        grads = {
            "autoencoder": ae_grads,
            "logvar": d_logvar if cfg.learn_logvar else jnp.zeros_like(d_logvar),
        }
        weighted = nll + weight * regulariser
        aux = dict(nll=nll, logvar=logvar, **aux, **extras)
        updates, opt_state = gen_tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        def disc_loss_fn(disc_params):
            variables = {"params": disc_params, "batch_stats": aux["stats"]["batch_stats"]}
            real, stats = disc.apply(variables, x, train=True, mutable=["batch_stats"])
            variables = {"params": disc_params, "batch_stats": stats["batch_stats"]}
            fake, stats = disc.apply(variables, recon, train=True, mutable=["batch_stats"])
            return L.discriminator_loss(cfg, real, fake, step), (stats, real, fake)

        (d_loss, (stats, real, fake)), d_grads = jax.value_and_grad(disc_loss_fn, has_aux=True)(
            state.disc_params
        )
        d_updates, disc_opt_state = disc_tx.update(d_grads, state.disc_opt_state, state.disc_params)
        ema = state.ema_params
        if ema is not None:
            if ema_max_decay is None:
                raise ValueError("the state keeps an EMA (use_ema=True): pass ema_max_decay")
            ema = update_ema(ema, params["autoencoder"], ema_decay(step + 1, ema_max_decay))
        new_state = AutoencoderTrainState(
            step=step + 1,
            params=params,
            opt_state=opt_state,
            disc_params=optax.apply_updates(state.disc_params, d_updates),
            disc_batch_stats=stats["batch_stats"],
            disc_opt_state=disc_opt_state,
            ema_params=ema,
        )
        rec = L.rec_loss(x, recon, aux["p"], cfg.perceptual_weight)
        metrics = dict(
            loss=weighted + d_weight * factor * g_loss,
            rec_loss=jnp.mean(rec),
            l1_loss=jnp.mean(jnp.abs(x - recon)),
            nll_loss=aux["nll"],
            g_loss=g_loss,
            d_weight=d_weight,
            disc_factor=factor,
            disc_loss=d_loss,
            logits_real=jnp.mean(real),
            logits_fake=jnp.mean(fake),
            logvar=aux["logvar"],
            psnr=L.psnr(x, recon),
            grad_norm=optax.tree.norm(grads),
            disc_grad_norm=optax.tree.norm(d_grads),
        )
        if aux["p"] is not None:
            metrics["p_loss"] = jnp.mean(aux["p"])
        for key in ("kl_loss", "quant_loss", "perplexity", "codebook_usage"):
            if key in aux:
                metrics[key] = aux[key]
        return new_state, metrics

    return train_step


def _image_batch(batch) -> dict:
    if "image" not in batch:
        raise ValueError(f"an autoencoder batch needs 'image'; got keys {sorted(batch)}")
    return {"image": batch["image"]}


def sharded_train_step(
    train_step: Callable, state_shardings, mesh, lpips_params=None
) -> BoundStep:
    """train_step jitted once with the state's shardings (state donated), called as
    step(state, batch, rng) with the frozen LPIPS params bound (the loop's interface); only the
    batch's "image" goes in."""
    if lpips_params is not None:
        lpips_params = jax.device_put(lpips_params, replicated(mesh))
    jitted = jax.jit(
        traced_on_mesh(train_step, mesh),
        in_shardings=(state_shardings, replicated(mesh), batch_sharding(mesh), replicated(mesh)),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=0,
        compiler_options=compiler_options(),
    )
    return BoundStep(jitted, lpips_params, _image_batch)
