"""Loss-value parity with a PyTorch re-implementation of CompVis LPIPSWithDiscriminator and taming's
VQLPIPSWithDiscriminator / NLayerDiscriminator forward equations, on the same tensors and weights.

The "decoder" is its last layer only: reconstructions = conv_out(h) for fixed activations h, so the
adaptive weight is torch.autograd.grad w.r.t. conv_out.weight vs jax.grad w.r.t. its kernel.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from references.lpips_reference import reference_lpips

from ldm_jax.models.distributions import DiagonalGaussian
from ldm_jax.models.layers import conv
from ldm_jax.training import autoencoder_loss as L
from ldm_jax.training.discriminator import NLayerDiscriminator
from ldm_jax.training.lpips import LPIPS
from ldm_jax.training.lpips_weights import convert_lpips_state_dicts

F = torch.nn.functional

B, H, W, C_H = 2, 32, 32, 32


class TorchNLayerDiscriminator(torch.nn.Module):
    """taming.modules.discriminator.model.NLayerDiscriminator (BatchNorm, no actnorm)."""

    def __init__(self, input_nc=3, ndf=64, n_layers=3):
        super().__init__()
        nn = torch.nn
        seq = [nn.Conv2d(input_nc, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            seq += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        seq += [nn.Conv2d(ndf * mult, 1, 4, 1, 1)]
        self.main = nn.Sequential(*seq)

    def forward(self, x):
        return self.main(x)

    def load_flax(self, params, n_layers):
        convs = [m for m in self.main if isinstance(m, torch.nn.Conv2d)]
        norms = [m for m in self.main if isinstance(m, torch.nn.BatchNorm2d)]
        names = [f"conv_{i}" for i in range(n_layers + 1)] + ["conv_out"]
        with torch.no_grad():
            for module, name in zip(convs, names, strict=True):
                module.weight.copy_(_t(np.transpose(params[name]["kernel"], (3, 2, 0, 1))))
                if module.bias is not None:
                    module.bias.copy_(_t(params[name]["bias"]))
            for i, module in enumerate(norms, start=1):
                module.weight.copy_(_t(params[f"norm_{i}"]["scale"]))
                module.bias.copy_(_t(params[f"norm_{i}"]["bias"]))
        return self


def _t(a):
    return torch.from_numpy(np.array(a, dtype=np.float32))


def _nchw(a):
    return _t(np.transpose(np.asarray(a), (0, 3, 1, 2)))


def compvis_generator_and_disc(
    kind, cfg, x, h, head, disc, lpips, post, codebook_loss, logvar, step, disc_loss
):
    """CompVis LPIPSWithDiscriminator / taming VQLPIPSWithDiscriminator, optimizer_idx 0 and 1."""
    recon = head(h)
    rec_loss = torch.abs(x - recon)
    p_loss = lpips(x, recon)
    rec_loss = rec_loss + cfg.perceptual_weight * p_loss
    if kind == "kl":
        nll_loss = rec_loss / torch.exp(logvar) + logvar
        nll_loss = torch.sum(nll_loss) / nll_loss.shape[0]
        mean, lv = post
        kl = 0.5 * torch.sum(mean**2 + torch.exp(lv) - 1.0 - lv, dim=[1, 2, 3])
        regulariser = cfg.kl_weight * (torch.sum(kl) / kl.shape[0])
    else:
        nll_loss = torch.mean(rec_loss)
        regulariser = cfg.codebook_weight * codebook_loss
    logits_fake = disc(recon)
    g_loss = -torch.mean(logits_fake)
    nll_grads = torch.autograd.grad(nll_loss, head.weight, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, head.weight, retain_graph=True)[0]
    d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
    d_weight = torch.clamp(d_weight, 0.0, 1e4).detach() * cfg.disc_weight
    factor = cfg.disc_factor if step >= cfg.disc_start else 0.0
    loss = nll_loss + regulariser + d_weight * factor * g_loss
    logits_real = disc(x.detach())
    logits_fake = disc(recon.detach())
    if disc_loss == "hinge":
        d = 0.5 * (torch.mean(F.relu(1.0 - logits_real)) + torch.mean(F.relu(1.0 + logits_fake)))
    else:
        d = 0.5 * (torch.mean(F.softplus(-logits_real)) + torch.mean(F.softplus(logits_fake)))
    return {"loss": loss, "nll": nll_loss, "g": g_loss, "d_weight": d_weight, "d": factor * d}


def ours_generator_and_disc(kind, cfg, x, h, head_params, disc_vars, lpips_params, post, cb, step):
    head = conv(3, 3, name="conv_out", dtype=jnp.float32)
    disc = NLayerDiscriminator(cfg.disc_num_layers, cfg.disc_ndf)

    def d_logits(img, stats):
        return disc.apply(
            {"params": disc_vars["params"], "batch_stats": stats}, img, mutable=["batch_stats"]
        )

    def recon_of(kernel):
        return head.apply({"params": {**head_params, "kernel": kernel}}, h)

    def nll_of(kernel):
        recon = recon_of(kernel)
        p = LPIPS().apply({"params": lpips_params}, x, recon)
        return L.nll_loss(cfg, L.rec_loss(x, recon, p, cfg.perceptual_weight), 0.0)

    def g_of(kernel):
        return L.generator_adversarial_loss(d_logits(recon_of(kernel), disc_vars["batch_stats"])[0])

    kernel = head_params["kernel"]
    nll, nll_grad = jax.value_and_grad(nll_of)(kernel)
    g, g_grad = jax.value_and_grad(g_of)(kernel)
    d_weight = L.adaptive_weight(nll_grad, g_grad, cfg.disc_weight)
    regulariser = jnp.sum(DiagonalGaussian(*post).kl()) / B if kind == "kl" else cb
    factor = L.disc_factor(cfg, step)
    loss = L.generator_total(cfg, nll, regulariser, g, d_weight, factor)
    recon = recon_of(kernel)
    real, stats = d_logits(x, disc_vars["batch_stats"])
    fake, _ = d_logits(recon, stats["batch_stats"])
    d = L.discriminator_loss(cfg, real, fake, step)
    return {"loss": loss, "nll": nll, "g": g, "d_weight": d_weight, "d": d}


@pytest.fixture(scope="module")
def shared():
    lpips_torch, vgg16_sd, heads_sd = reference_lpips(seed=1)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (B, H, W, 3)).astype(np.float32)
    h = rng.standard_normal((B, H, W, C_H)).astype(np.float32)
    head_params = {
        "kernel": (0.05 * rng.standard_normal((3, 3, C_H, 3))).astype(np.float32),
        "bias": (0.1 * rng.standard_normal(3)).astype(np.float32),
    }
    post = tuple(rng.standard_normal((B, 4, 4, 4)).astype(np.float32) for _ in range(2))
    return dict(
        lpips_torch=lpips_torch,
        lpips_params=convert_lpips_state_dicts(vgg16_sd, heads_sd),
        x=x,
        h=h,
        head_params=head_params,
        post=post,
    )


@pytest.mark.parametrize(
    "kind, disc_loss, step",
    [("kl", "hinge", 5), ("kl", "hinge", 4), ("vq", "vanilla", 5)],
)
def test_losses_match_compvis_equations(shared, parity, kind, disc_loss, step):
    cfg = L.AutoencoderLossConfig(
        kind=kind, disc_start=5, disc_weight=0.6, kl_weight=1e-2, disc_loss=disc_loss,
        disc_ndf=8, codebook_weight=1.3,
    )
    disc_vars = nn.meta.unbox(
        NLayerDiscriminator(cfg.disc_num_layers, cfg.disc_ndf).init(
            jax.random.key(0), jnp.zeros((1, H, W, 3))
        )
    )
    codebook_loss = 0.37
    ours = ours_generator_and_disc(
        kind, cfg, jnp.asarray(shared["x"]), jnp.asarray(shared["h"]), shared["head_params"],
        disc_vars, shared["lpips_params"], shared["post"], codebook_loss, step,
    )
    head = torch.nn.Conv2d(C_H, 3, 3, padding=1)
    with torch.no_grad():
        head.weight.copy_(_t(np.transpose(shared["head_params"]["kernel"], (3, 2, 0, 1))))
        head.bias.copy_(_t(shared["head_params"]["bias"]))
    disc = TorchNLayerDiscriminator(3, cfg.disc_ndf, cfg.disc_num_layers).train()
    disc.load_flax(jax.device_get(disc_vars["params"]), cfg.disc_num_layers)
    reference = compvis_generator_and_disc(
        kind, cfg, _nchw(shared["x"]), _nchw(shared["h"]), head, disc, shared["lpips_torch"],
        tuple(_nchw(p) for p in shared["post"]), codebook_loss, torch.tensor(0.0), step, disc_loss,
    )
    factor_on = step >= cfg.disc_start
    for name in ("loss", "nll", "g", "d_weight", "d"):
        expected = reference[name].detach().numpy()
        if name == "d" and not factor_on:
            assert float(ours[name]) == 0.0 == float(expected)
            continue
        parity(f"ae loss {kind} {disc_loss} step{step}: {name}", ours[name], expected)
    assert float(ours["d_weight"]) > 0


def test_discriminator_forward_matches_taming(parity):
    disc = NLayerDiscriminator(n_layers=3, ndf=8)
    x = np.random.default_rng(2).standard_normal((4, 32, 32, 3)).astype(np.float32)
    variables = nn.meta.unbox(disc.init(jax.random.key(3), jnp.zeros((1, 32, 32, 3))))
    ours, _ = disc.apply(variables, jnp.asarray(x), mutable=["batch_stats"])
    assert ours.shape == (4, 2, 2, 1)
    ref = TorchNLayerDiscriminator(3, 8, 3).train()
    ref.load_flax(jax.device_get(variables["params"]), 3)
    with torch.no_grad():
        expected = ref(_nchw(x)).numpy().transpose(0, 2, 3, 1)
    parity("patch-gan discriminator logits (train-mode BN)", ours, expected)
    kernel = np.asarray(variables["params"]["conv_1"]["kernel"])
    assert 0.01 < kernel.std() < 0.03  # weights_init: N(0, 0.02)


def test_disc_factor_psnr_and_config_errors():
    cfg = L.AutoencoderLossConfig(disc_start=10, disc_factor=0.5)
    assert float(L.disc_factor(cfg, 9)) == 0.0 and float(L.disc_factor(cfg, 10)) == 0.5
    x = jnp.zeros((1, 4, 4, 3))
    assert float(L.psnr(x, x + 0.2)) == pytest.approx(-10 * np.log10(0.01), rel=1e-5)
    # the clamp: a huge ratio stops at 1e4 * disc_weight
    assert float(L.adaptive_weight(jnp.ones(3), jnp.zeros(3), 0.5)) == pytest.approx(5000.0)
    with pytest.raises(ValueError, match="allowed"):
        L.AutoencoderLossConfig(kind="gan")
    with pytest.raises(ValueError, match="allowed"):
        L.AutoencoderLossConfig(disc_loss="wgan")
    with pytest.raises(ValueError, match=">= 0"):
        L.AutoencoderLossConfig(perceptual_weight=-1.0)
