"""The first-stage task for the loop (config.trainer = "autoencoder"), and the published configs.

config.model:
    init_from   a checkpoint `load_checkpoint` reads: fine-tune its first stage (e.g. the SD VAE)
    spec        else: spec_to_dict(ModelSpec(first_stage=...)) (random init)
config.loss:    AutoencoderLossConfig fields (the kind follows the architecture), plus
    lpips_weights  the file `python -m ldm_jax.training.lpips_weights` writes; needed when
                   perceptual_weight > 0 (set perceptual_weight=0 to train without LPIPS)
config.optimizer (autoencoder) and optional config.disc_optimizer (default: the same settings);
config.ema.decay (0: no EMA); config.sample.num_images: originals over reconstructions.
`task.first_stage_checkpoint(state)` is the trained first stage (EMA weights when kept) as a
LatentDiffusionCheckpoint: usable by the LDM configs (model.init_from) and exportable in CompVis
layout (`save_pretrained(path, format="compvis")`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ldm_jax.checkpoints import LatentDiffusionCheckpoint
from ldm_jax.models.attention_dispatch import implementation_from_name
from ldm_jax.presets.autoencoders import AUTOENCODER_PRESETS
from ldm_jax.spec import ModelSpec, spec_to_dict
from ldm_jax.training import autoencoder_step as S
from ldm_jax.training.autoencoder_loss import AutoencoderLossConfig
from ldm_jax.training.base_config import base_config, train_config
from ldm_jax.training.discriminator import NLayerDiscriminator
from ldm_jax.training.ldm_task import GlobalBatches, resolve_model
from ldm_jax.training.lpips import LPIPS
from ldm_jax.training.lpips_weights import load_lpips_params
from ldm_jax.training.optimizer import make_optimizer
from ldm_jax.training.setup import mesh_rules_and_batch
from ldm_jax.training.sharding import batch_sharding, data_parallel_size, gather_to_host

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# CompVis configs/autoencoder/*.yaml and models/first_stage_models/*/config.yaml loss settings.
PUBLISHED_LOSSES = {
    "kl-f4": dict(disc_start=50001, kl_weight=1e-6, disc_weight=0.5),
    "kl-f8": dict(disc_start=50001, kl_weight=1e-6, disc_weight=0.5),
    "kl-f16": dict(disc_start=50001, kl_weight=1e-6, disc_weight=0.5),
    "kl-f32": dict(disc_start=50001, kl_weight=1e-6, disc_weight=0.5),
    "vq-f4": dict(disc_start=0, disc_weight=0.75, codebook_weight=1.0),
    "vq-f8": dict(disc_start=1, disc_weight=0.6, codebook_weight=1.0, disc_num_layers=2),
    "vq-f16": dict(disc_start=250001, disc_weight=0.75, codebook_weight=1.0, disc_num_layers=2),
}
_LOSS_DEFAULTS = dict(
    disc_start=50001, kl_weight=1e-6, codebook_weight=1.0, disc_weight=0.5, disc_factor=1.0,
    perceptual_weight=1.0, disc_loss="hinge", disc_num_layers=3, disc_ndf=64, logvar_init=0.0,
    learn_logvar=False, lpips_weights="",
)
BASE_LEARNING_RATE = 4.5e-6  # CompVis base_learning_rate, scaled by the global batch
# the patch-GAN's metrics: all zero or untrained noise while the discriminator is off
GAN_METRICS = frozenset({"g_loss", "d_weight", "disc_factor", "disc_loss", "logits_real",
                         "logits_fake", "disc_grad_norm"})


def hidden_metrics(loss: AutoencoderLossConfig, step: int) -> frozenset:
    """The step's metrics that the config makes zero, constant or duplicate (not worth showing;
    metrics.jsonl keeps them): the GAN terms up to disc_start (metrics of `step` come from the
    state at step - 1) or with disc_factor 0, a logvar that is not trained, and rec_loss when
    it is l1_loss (no perceptual term). VQ metrics only exist for VQ models."""
    hidden = set()
    if step <= loss.disc_start or loss.disc_factor == 0:
        hidden |= GAN_METRICS
    if not loss.learn_logvar:
        hidden.add("logvar")
    if loss.perceptual_weight == 0:
        hidden.add("rec_loss")
    return frozenset(hidden)


def loss_config(**overrides) -> ml_collections.ConfigDict:
    unknown = sorted(set(overrides) - set(_LOSS_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown config.loss keys {unknown}; allowed: {sorted(_LOSS_DEFAULTS)}")
    return ml_collections.ConfigDict({**_LOSS_DEFAULTS, **overrides})


def published_config(name: str, global_batch_size: int = 64) -> ml_collections.ConfigDict:
    """The config of a published first stage: its architecture and loss, CompVis' optimizer
    (Adam, betas 0.5/0.9, lr 4.5e-6 x global batch), 256 px crops."""
    if name not in PUBLISHED_LOSSES:
        raise ValueError(f"unknown first stage {name!r}; allowed: {sorted(PUBLISHED_LOSSES)}")
    c = base_config("autoencoder")
    c.workdir_default = f"runs/autoencoder_{name}"
    c.model.spec = spec_to_dict(ModelSpec(first_stage=AUTOENCODER_PRESETS[name]))
    c.loss = loss_config(**PUBLISHED_LOSSES[name], lpips_weights="lpips.safetensors")
    c.optimizer.update(dict(learning_rate=BASE_LEARNING_RATE * global_batch_size, b1=0.5, b2=0.9,
                            weight_decay=0.0, grad_clip=0.0))
    c.ema.decay = 0.0  # CompVis' first stages keep no EMA
    c.data.update(dict(source="folder", image_size=256, global_batch_size=global_batch_size,
                       min_scale=0.5, crop="random"))
    c.train = train_config(num_steps=500_000, log_every=100, checkpoint_every=5000,
                           sample_every=5000)
    c.sample.num_images = 8
    return c


def _plain(value) -> dict:
    return value.to_dict() if hasattr(value, "to_dict") else dict(value)


def _resolve_first_stage(model_cfg):
    spec, params, _ = resolve_model(model_cfg)
    return spec.first_stage, None if params is None else params.get("first_stage")


class AutoencoderTask:
    def __init__(self, config):
        self.config = config
        self.mesh, self.rules, self.global_batch_size = mesh_rules_and_batch(config)
        self.first_stage, self.init_params = _resolve_first_stage(config.model)
        loss_values = loss_config(**_plain(config.get("loss", None) or {})).to_dict()
        lpips_path = loss_values.pop("lpips_weights")
        self.loss = AutoencoderLossConfig(kind=S.loss_kind(self.first_stage), **loss_values)
        self.lpips_params = None
        if self.loss.perceptual_weight > 0:
            if not lpips_path:
                raise ValueError(
                    "loss.perceptual_weight > 0 needs loss.lpips_weights: convert the LPIPS/VGG16 "
                    "weights once with `python -m ldm_jax.training.lpips_weights --vgg16 "
                    "vgg16.pth --heads vgg.pth --out lpips.safetensors`, or train without the "
                    "perceptual term (--config.loss.perceptual_weight=0)"
                )
            self.lpips_params = load_lpips_params(lpips_path)
        steps = int(config.train.num_steps)
        gen_tx, _ = make_optimizer(config.optimizer, steps)
        disc_tx, _ = make_optimizer(config.get("disc_optimizer", None) or config.optimizer, steps)
        dtype = config.get("compute_dtype", "float32")
        if dtype not in _DTYPES:
            raise ValueError(f"unknown compute_dtype {dtype!r}; allowed: {sorted(_DTYPES)}")
        attention = implementation_from_name(config.get("attention", None))
        self.model = S.build_autoencoder(self.first_stage, _DTYPES[dtype], attention)
        disc = NLayerDiscriminator(self.loss.disc_num_layers, self.loss.disc_ndf, _DTYPES[dtype])
        size = int(config.data.image_size)
        decay = float(config.ema.decay)
        self._init_fn = S.init_state_fn(self.model, disc, self.loss, gen_tx, disc_tx,
                                        (size, size, self.first_stage.in_channels), decay > 0)
        lpips = LPIPS() if self.loss.perceptual_weight > 0 else None
        self._pure = S.make_train_step(self.model, disc, self.loss, gen_tx, disc_tx,
                                       ema_max_decay=decay if decay > 0 else None, lpips=lpips)
        self.train_step = None
        self._sample_images = None

    def init_state(self, rng):
        state, shardings = S.create_state(self._init_fn, self.mesh, self.rules, rng,
                                           self.init_params)
        self.init_params = None  # on the devices now
        self.train_step = S.sharded_train_step(self._pure, shardings, self.mesh, self.lpips_params)
        return state

    def make_iterator(self) -> GlobalBatches:
        return GlobalBatches(self._local_batches(), batch_sharding(self.mesh))

    def _local_batches(self):
        from ldm_jax.data import make_train_dataset  # noqa: PLC0415

        return make_train_dataset(self.config.data, None, self.global_batch_size,
                                  int(self.config.seed),
                                  data_parallel_size=data_parallel_size(self.mesh))

    def hidden_metrics(self, step: int) -> frozenset:
        return hidden_metrics(self.loss, step)

    def trained_params(self, state):
        """The autoencoder's EMA weights when kept, else its weights (host numpy)."""
        return gather_to_host(state.ema_params if state.ema_params is not None
                           else state.params["autoencoder"])

    def first_stage_checkpoint(self, state) -> LatentDiffusionCheckpoint:
        return LatentDiffusionCheckpoint(ModelSpec(first_stage=self.first_stage),
                                         {"first_stage": self.trained_params(state)})

    def sample(self, state, rng):
        """uint8 grid: a fixed batch of training images (top) over their reconstructions."""
        del rng  # reconstructions use the posterior mode
        n = int(self.config.get("sample", {}).get("num_images", 0))
        if n <= 0:
            return None
        if self._sample_images is None:
            with self._local_batches() as batches:
                self._sample_images = np.asarray(next(batches)["image"][:n])
        params = self.trained_params(state)
        x = jnp.asarray(self._sample_images)
        recon = jax.jit(lambda p, x: self.model.apply({"params": p}, x)[0])(params, x)
        both = np.concatenate([self._sample_images, np.asarray(recon, np.float32)], axis=1)
        rows = np.concatenate(list(both), axis=1)  # [2H, n*W, 3]
        return np.round((np.clip(rows, -1, 1) + 1) * 127.5).astype(np.uint8)


def make_task(config) -> AutoencoderTask:
    return AutoencoderTask(config)
