"""The first-stage training objective: CompVis LPIPSWithDiscriminator (KL autoencoders,
`ldm/modules/losses/contperceptual.py`) and taming's VQLPIPSWithDiscriminator (VQ autoencoders).

Generator (autoencoder) loss, with rec = |x - x_hat| + perceptual_weight * LPIPS(x, x_hat) per
element (LPIPS broadcast over pixels and channels, as CompVis adds its [B, 1, 1, 1] result):
    KL: sum(rec / exp(logvar) + logvar) / B + kl_weight * sum(KL(q(z|x) || N(0, I))) / B
    VQ: mean(rec) + codebook_weight * codebook_loss
    both: + d_weight * disc_factor * (-mean(D(x_hat)))
d_weight = clip(|grad nll| / (|grad g| + 1e-4), 0, 1e4) * disc_weight, the gradients taken w.r.t.
the decoder's last layer (conv_out kernel); disc_factor = 0 before `disc_start`, else its value.
Discriminator loss: disc_factor * hinge or vanilla loss on D(x) and D(x_hat).

Functions here take arrays and return scalars; the train step wires the networks to them.
"""

import dataclasses

import jax
import jax.numpy as jnp

DISC_LOSSES = ("hinge", "vanilla")
KINDS = ("kl", "vq")
# CompVis: d_weight = clamp(norm ratio, 0, 1e4); the ratio's denominator gets 1e-4.
_D_WEIGHT_EPS, _D_WEIGHT_MAX = 1e-4, 1e4


@dataclasses.dataclass(frozen=True)
class AutoencoderLossConfig:
    """Loss hyper-parameters; defaults are CompVis' kl-f8 (LPIPSWithDiscriminator) settings."""

    kind: str = "kl"
    disc_start: int = 50001
    kl_weight: float = 1e-6
    codebook_weight: float = 1.0
    disc_weight: float = 0.5
    disc_factor: float = 1.0
    perceptual_weight: float = 1.0
    disc_loss: str = "hinge"
    disc_num_layers: int = 3
    disc_ndf: int = 64
    logvar_init: float = 0.0
    # CompVis' LPIPSWithDiscriminator declares logvar a parameter, but AutoencoderKL's optimizer
    # never receives it, so it stays at logvar_init; True trains it with the autoencoder.
    learn_logvar: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown autoencoder loss kind {self.kind!r}; allowed: {KINDS}")
        if self.disc_loss not in DISC_LOSSES:
            raise ValueError(f"unknown disc_loss {self.disc_loss!r}; allowed: {DISC_LOSSES}")
        if self.perceptual_weight < 0 or self.disc_weight < 0 or self.disc_start < 0:
            raise ValueError(
                "perceptual_weight, disc_weight and disc_start must be >= 0; got "
                f"{self.perceptual_weight}, {self.disc_weight}, {self.disc_start}"
            )


def hinge_d_loss(logits_real, logits_fake) -> jax.Array:
    real = jnp.mean(jax.nn.relu(1.0 - logits_real))
    return 0.5 * (real + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real, logits_fake) -> jax.Array:
    return 0.5 * (
        jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake))
    )


def disc_factor(cfg: AutoencoderLossConfig, step) -> jax.Array:
    """taming's adopt_weight: 0 before disc_start, disc_factor from it on."""
    return jnp.where(jnp.asarray(step) < cfg.disc_start, 0.0, cfg.disc_factor).astype(jnp.float32)


def rec_loss(x_BHWC, recon_BHWC, perceptual_B, perceptual_weight: float) -> jax.Array:
    """Per-element |x - x_hat| + perceptual_weight * LPIPS (broadcast over H, W, C)."""
    rec = jnp.abs(x_BHWC.astype(jnp.float32) - recon_BHWC.astype(jnp.float32))
    if perceptual_B is None:
        return rec
    return rec + perceptual_weight * perceptual_B[:, None, None, None]


def nll_loss(cfg: AutoencoderLossConfig, rec_BHWC, logvar) -> jax.Array:
    """The reconstruction term: Gaussian-like nll summed per image (KL) or the mean (VQ)."""
    if cfg.kind == "vq":
        return jnp.mean(rec_BHWC)
    nll = rec_BHWC / jnp.exp(logvar) + logvar
    return jnp.sum(nll) / rec_BHWC.shape[0]


def generator_adversarial_loss(logits_fake) -> jax.Array:
    return -jnp.mean(logits_fake)


def adaptive_weight(nll_grad, g_grad, disc_weight: float) -> jax.Array:
    """|grad nll| / (|grad g| + 1e-4), clamped to [0, 1e4], times disc_weight (no gradient)."""
    ratio = jnp.linalg.norm(nll_grad.ravel()) / (jnp.linalg.norm(g_grad.ravel()) + _D_WEIGHT_EPS)
    return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, _D_WEIGHT_MAX) * disc_weight)


def generator_total(
    cfg: AutoencoderLossConfig, nll, regulariser, g_loss, d_weight, factor
) -> jax.Array:
    """nll + KL or codebook term + d_weight * disc_factor * g_loss.

    `regulariser` is sum(KL)/B for "kl" and the codebook loss for "vq".
    """
    weight = cfg.codebook_weight if cfg.kind == "vq" else cfg.kl_weight
    return nll + weight * regulariser + d_weight * factor * g_loss


def discriminator_loss(cfg: AutoencoderLossConfig, logits_real, logits_fake, step) -> jax.Array:
    loss_fn = hinge_d_loss if cfg.disc_loss == "hinge" else vanilla_d_loss
    return disc_factor(cfg, step) * loss_fn(logits_real, logits_fake)


def psnr(x_BHWC, recon_BHWC) -> jax.Array:
    """PSNR in dB of the clipped reconstruction, both images mapped from [-1, 1] to [0, 1]."""
    x = (x_BHWC.astype(jnp.float32) + 1.0) / 2.0
    y = (jnp.clip(recon_BHWC.astype(jnp.float32), -1.0, 1.0) + 1.0) / 2.0
    mse = jnp.mean(jnp.square(x - y))
    return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))
