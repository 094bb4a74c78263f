"""The whole-checkpoint key table of CompVis / Stability-AI single files, and their EMA weights.

A LatentDiffusion `state_dict` (ldm/models/diffusion/ddpm.py) holds the UNet under
`model.diffusion_model.`, the first stage under `first_stage_model.`, the conditioning encoder
under `cond_stage_model.` (SGM's DiffusionEngine, SDXL: `conditioner.embedders.<i>.`), the
noise-schedule buffers at the top level, and, in non-pruned files, an EMA copy of the UNet under
`model_ema.` (ldm/modules/ema.py LitEma: every parameter name of the DiffusionWrapper with its
dots removed). A standalone first-stage `model.ckpt` holds the autoencoder keys at the top level
plus its training loss under `loss.`.

This module is the one place that names every key of those files that is not a parameter.
"""

from collections.abc import Iterator, Mapping
from typing import Any

from ldm_jax.checkpoints.compvis.autoencoder import compvis_first_stage_table
from ldm_jax.checkpoints.compvis.text import (
    CLIP_PREFIX,
    OPENCLIP_PREFIX,
    OPENCLIP_UNUSED,
    SGM_EMBEDDERS_PREFIX,
    SGM_OPENCLIP_UNUSED,
    compvis_cond_stage_table,
    sgm_conditioner_table,
)
from ldm_jax.checkpoints.compvis.unet import compvis_unet_table
from ldm_jax.checkpoints.errors import CheckpointMismatchError
from ldm_jax.checkpoints.key_table import KeyTable, listed
from ldm_jax.checkpoints.transformers_clip import TEXT_MODEL_PREFIX
from ldm_jax.spec import ModelSpec

UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
COND_STAGE_PREFIX = "cond_stage_model."
EMA_PREFIX = "model_ema."
# LatentDiffusion registers scale_factor as a buffer when scale_by_std=True; its value is the
# latent scaling of the checkpoint, so loaders read it (into DiffusionSpec.scale_factor) even
# though no network parameter comes from it.
SCALE_FACTOR_KEY = "scale_factor"
# Standalone first-stage training checkpoints: LPIPSWithDiscriminator / VQLPIPSWithDiscriminator
# (LPIPS VGG, patch discriminator incl. BatchNorm statistics, logvar). Their exact keys depend on
# the loss config, so they are recognised by this prefix; see `without_training_loss`.
TRAINING_LOSS_PREFIX = "loss."

# Non-parameter keys of a LatentDiffusion file, each with where it comes from.
DIFFUSION_BUFFERS: dict[str, str] = {
    **{
        name: "DDPM.register_schedule buffer (recomputed from DiffusionSpec)"
        for name in (
            "betas",
            "alphas_cumprod",
            "alphas_cumprod_prev",
            "sqrt_alphas_cumprod",
            "sqrt_one_minus_alphas_cumprod",
            "log_one_minus_alphas_cumprod",
            "sqrt_recip_alphas_cumprod",
            "sqrt_recipm1_alphas_cumprod",
            "posterior_variance",
            "posterior_log_variance_clipped",
            "posterior_mean_coef1",
            "posterior_mean_coef2",
        )
    },
    "lvlb_weights": "DDPM loss weights (a persistent buffer in early CompVis versions)",
    "logvar": "DDPM per-timestep log-variance of the loss (a parameter only if learn_logvar)",
    SCALE_FACTOR_KEY: "LatentDiffusion latent scale (buffer when scale_by_std); read by loaders",
    # SGM DiscreteDenoiser buffer (SDXL files; A1111 also saves it): the sigmas of the schedule
    "denoiser.sigmas": "SGM DiscreteDenoiser buffer (recomputed from DiffusionSpec)",
    EMA_PREFIX + "decay": "LitEma bookkeeping",
    EMA_PREFIX + "num_updates": "LitEma bookkeeping",
}

# Non-parameter keys of the conditioning encoders (also declared by their tables).
COND_STAGE_BUFFERS: dict[str, str] = {
    COND_STAGE_PREFIX
    + CLIP_PREFIX
    + TEXT_MODEL_PREFIX
    + "embeddings.position_ids": "HF CLIPTextModel buffer saved by transformers < 4.31",
    **{
        COND_STAGE_PREFIX + OPENCLIP_PREFIX + name: "OpenCLIP tensor Stable Diffusion never uses"
        for name in OPENCLIP_UNUSED
    },
    # SGM (SDXL): embedder 0 = CLIP-L (base), or bigG (refiner); embedder 1 = bigG (base)
    SGM_EMBEDDERS_PREFIX
    + "0."
    + CLIP_PREFIX
    + TEXT_MODEL_PREFIX
    + "embeddings.position_ids": "HF CLIPTextModel buffer saved by transformers < 4.31",
    **{
        f"{SGM_EMBEDDERS_PREFIX}{i}.{OPENCLIP_PREFIX}{name}": "OpenCLIP tensor SDXL never uses"
        for i in (0, 1)
        for name in SGM_OPENCLIP_UNUSED
    },
}

# Every named non-parameter key (EMA weights are named per UNet by `ema_key`).
COMPVIS_IGNORABLE: frozenset[str] = frozenset(DIFFUSION_BUFFERS) | frozenset(COND_STAGE_BUFFERS)


def compvis_checkpoint_table(
    spec: ModelSpec, *, first_stage_as_cond_stage: bool = False
) -> KeyTable:
    """Key table of a whole CompVis file for `spec`; Flax paths under "unet", "first_stage",
    "cond_stage".

    With `spec.unet=None` it is a standalone first-stage file: autoencoder keys at the top level
    (strip the training loss first with `without_training_loss`). The EMA copy of the UNet and
    the buffers above are accepted and ignored; use `ema_state_dict` to load the EMA weights.
    `first_stage_as_cond_stage` (CompVis `cond_stage_config: __is_first_stage__`, the LDM
    inpainting model) accepts the second copy of the first stage that PyTorch saves under
    `cond_stage_model.`.
    """
    first_stage = compvis_first_stage_table(spec.first_stage)
    if spec.unet is None:
        if spec.cond_stage is not None or first_stage_as_cond_stage:
            raise ValueError("a first-stage-only spec (unet=None) cannot have a cond stage")
        return first_stage.prefixed("", "first_stage")

    unet = compvis_unet_table(spec.unet).prefixed(UNET_PREFIX, "unet")
    tables = [unet, first_stage.prefixed(FIRST_STAGE_PREFIX, "first_stage")]
    ignorable = list(DIFFUSION_BUFFERS) + [ema_key(e.torch_key) for e in unet.entries]
    if spec.cond_stage is not None:
        if first_stage_as_cond_stage:
            raise ValueError(
                "the cond stage is either spec.cond_stage or the first stage, not both"
            )
        if spec.cond_stage.kind == "sdxl":  # SGM: conditioner.embedders.<i>.*
            tables.append(sgm_conditioner_table(spec.cond_stage.config))
        else:
            cond = compvis_cond_stage_table(spec.cond_stage)
            tables.append(cond.prefixed(COND_STAGE_PREFIX, "cond_stage"))
    elif first_stage_as_cond_stage:
        ignorable += [COND_STAGE_PREFIX + e.torch_key for e in first_stage.entries]
    return KeyTable.union(*tables, KeyTable([], ignorable))


def ema_key(key: str) -> str:
    """The LitEma key of a UNet key: `model.diffusion_model.input_blocks.0.0.weight` ->
    `model_ema.diffusion_modelinput_blocks00weight` (DiffusionWrapper names without dots)."""
    if not key.startswith(UNET_PREFIX):
        raise ValueError(f"EMA weights exist only for {UNET_PREFIX}* keys; got {key!r}")
    return EMA_PREFIX + key[len("model.") :].replace(".", "")


def has_ema_weights(state_dict: Mapping[str, Any]) -> bool:
    """Whether a file carries an EMA copy of the UNet (beyond LitEma's bookkeeping)."""
    return any(k.startswith(EMA_PREFIX) and k not in DIFFUSION_BUFFERS for k in state_dict)


class _EmaView(Mapping):
    """The state dict with the UNet keys reading the EMA tensors and no `model_ema.*` keys.

    Values are fetched on access, so a lazily loaded file stays lazy.
    """

    def __init__(self, base: Mapping[str, Any], sources: dict[str, str]):
        self._base = base
        self._sources = sources

    def __getitem__(self, key: str) -> Any:
        if key.startswith(EMA_PREFIX):
            raise KeyError(key)
        return self._base[self._sources.get(key, key)]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and not key.startswith(EMA_PREFIX) and key in self._base

    def __iter__(self) -> Iterator[str]:
        return (k for k in self._base if not k.startswith(EMA_PREFIX))

    def __len__(self) -> int:
        return sum(1 for _ in self)


def ema_state_dict(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """A view of a non-pruned CompVis file whose `model.diffusion_model.*` values are the EMA
    weights; every `model_ema.*` key is consumed.

    Raises CheckpointMismatchError listing the EMA keys that are missing for some UNet key, or
    present for none.
    """
    unet_keys = [k for k in state_dict if k.startswith(UNET_PREFIX)]
    sources = {k: ema_key(k) for k in unet_keys}
    if len(set(sources.values())) != len(sources):  # LitEma itself could not have saved this
        raise CheckpointMismatchError("UNet keys collide once their dots are removed (EMA names)")
    missing = [e for e in sources.values() if e not in state_dict]
    expected = set(sources.values()) | set(DIFFUSION_BUFFERS)
    unexpected = [k for k in state_dict if k.startswith(EMA_PREFIX) and k not in expected]
    if missing or unexpected:
        raise CheckpointMismatchError(
            "cannot use the EMA weights of this checkpoint:"
            + (f" {len(missing)} missing EMA keys: {listed(missing)}." if missing else "")
            + (
                f" {len(unexpected)} EMA keys match no UNet key: {listed(unexpected)}."
                if unexpected
                else ""
            )
        )
    return _EmaView(state_dict, sources)


class _FilteredView(Mapping):
    def __init__(self, base: Mapping[str, Any], drop_prefix: str):
        self._base = base
        self._drop = drop_prefix

    def __getitem__(self, key: str) -> Any:
        if key.startswith(self._drop):
            raise KeyError(key)
        return self._base[key]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and not key.startswith(self._drop) and key in self._base

    def __iter__(self) -> Iterator[str]:
        return (k for k in self._base if not k.startswith(self._drop))

    def __len__(self) -> int:
        return sum(1 for _ in self)


def without_training_loss(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """A standalone first-stage checkpoint without its `loss.*` keys (a lazy view)."""
    return _FilteredView(state_dict, TRAINING_LOSS_PREFIX)
