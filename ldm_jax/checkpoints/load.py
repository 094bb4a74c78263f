"""`read_checkpoint`: the one reader that turns user-supplied weights into `CheckpointContents`
(spec + params + tokenizer); `ldm_jax.checkpoints.load_checkpoint` wraps it.

Accepted: a CompVis / Stability-AI single file (`.safetensors`, or a pickled `.ckpt`/`.pt`/`.pth`/
`.bin` read weights-only), a diffusers pipeline folder (with `model_index.json`), or a Hugging Face
hub id `org/name` of such a folder (fetched only when no local path of that name exists and the
name does not look local, see `is_hub_id`; offline, only what is cached). Specs and configs in the
files are untrusted: checked by `ldm_jax.checkpoints.validate` before any shape is built.
"""

import dataclasses
import json
import re
import warnings
from pathlib import Path

from ldm_jax.checkpoints.compvis.checkpoint_table import (
    compvis_checkpoint_table,
    ema_state_dict,
    has_ema_weights,
    without_training_loss,
)
from ldm_jax.checkpoints.compvis.detect import CompVisArchitecture, detect_architecture
from ldm_jax.checkpoints.compvis.export import SPEC_METADATA_KEY
from ldm_jax.checkpoints.compvis.yaml_config import spec_from_yaml
from ldm_jax.checkpoints.contents import CheckpointContents
from ldm_jax.checkpoints.diffusers.folder import (
    FIRST_STAGE_FOLDERS,
    MODEL_INDEX,
    TEXT_FOLDERS,
    is_diffusers_folder,
    load_diffusers_folder,
    weight_files,
)
from ldm_jax.checkpoints.errors import (
    ArchitectureError,
    CheckpointFileError,
    CheckpointMismatchError,
)
from ldm_jax.checkpoints.files import (
    SAFETENSORS_SUFFIXES,
    TORCH_SUFFIXES,
    open_tensor_file,
    read_params,
)
from ldm_jax.checkpoints.orbax import SPEC_FILE, is_orbax_checkpoint, restore_orbax
from ldm_jax.checkpoints.tokenizer import tokenizer_for_spec
from ldm_jax.checkpoints.validate import check_against_tensors
from ldm_jax.models.factory import abstract_checkpoint_params
from ldm_jax.spec import (
    PREDICTION_TYPES,
    ModelSpec,
    spec_from_dict,
    validate_spec,
)

LOCAL_ACCEPTED = (
    f"a CompVis checkpoint file ({', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}), "
    f"a diffusers folder with {MODEL_INDEX}, or an ldm_jax orbax folder with {SPEC_FILE}"
)
ACCEPTED = f"{LOCAL_ACCEPTED}, or a Hugging Face hub id 'org/name'"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Names that are local paths even when nothing exists there (a missing one is "no such file").
# ldm_jax.cli.common.exists_or_hub_id applies the same rule without importing jax.
LOCAL_SUFFIXES = (*SAFETENSORS_SUFFIXES, *TORCH_SUFFIXES, ".yaml", ".yml")
_HUB_FOLDERS = ("unet", *FIRST_STAGE_FOLDERS, *TEXT_FOLDERS)


def read_checkpoint(
    path_or_id,
    *,
    dtype=None,
    prediction_type: str | None = None,
    config=None,
    use_ema: bool = False,
    tokenizer=None,
) -> CheckpointContents:
    """Load weights from a CompVis file, a diffusers folder or a hub id.

    dtype: cast every parameter while loading (e.g. jnp.bfloat16); None keeps the stored dtypes.
    prediction_type: "epsilon" or "v_prediction"; overrides what the file, yaml or scheduler
        says (SD 2.x 768-v single files need it, or their yaml).
    config: the original CompVis yaml config (path or parsed mapping), for single files whose
        architecture the keys do not settle (LDM zoo models).
    use_ema: load the UNet from a non-pruned CompVis file's EMA weights (`model_ema.*`).
    tokenizer: a tokenizer folder or hub id to use instead of the checkpoint's (a diffusers
        folder's `tokenizer/`; for CompVis files the packaged CLIP vocabulary). LDM
        text-to-image single files need it for their BERT (bert-base-uncased) vocabulary.
    """
    if prediction_type not in (None, *PREDICTION_TYPES):
        raise ValueError(
            f"unknown prediction_type {prediction_type!r}; allowed: {PREDICTION_TYPES}"
        )
    path = Path(path_or_id)
    if path.is_file():
        if path.suffix.lower() in (".yaml", ".yml"):
            raise CheckpointFileError(
                f"{path} is a config, not weights; pass it as config= with the checkpoint file"
            )
        return _load_compvis(path, dtype, prediction_type, config, use_ema, tokenizer)
    if path.is_dir() and is_orbax_checkpoint(path):
        if config is not None or use_ema:
            raise ValueError(
                "config= and use_ema= apply to CompVis single files, not orbax folders"
            )
        checkpoint = restore_orbax(path, dtype=dtype)
        spec = _with_prediction_type(checkpoint.spec, prediction_type, source=path / SPEC_FILE)
        tokenizer = tokenizer_for_spec(spec, tokenizer) if tokenizer else checkpoint.tokenizer
        return CheckpointContents(spec, checkpoint.params, tokenizer)
    if path.is_dir() and not is_diffusers_folder(path):
        raise CheckpointFileError(f"{path} is a folder without {MODEL_INDEX}; accepted: {ACCEPTED}")
    if not path.is_dir():
        if not is_hub_id(str(path_or_id)):
            raise CheckpointFileError(f"{path_or_id}: no such file or folder; accepted: {ACCEPTED}")
        path = download_from_hub(str(path_or_id))
    if config is not None or use_ema:
        raise ValueError(
            "config= and use_ema= apply to CompVis single files; a diffusers folder carries its "
            "configs and its (EMA or not) UNet"
        )
    spec, params, tokenizer_folder = load_diffusers_folder(path, dtype=dtype)
    spec = _with_prediction_type(spec, prediction_type, source=f"{path}/scheduler")
    return CheckpointContents(spec, params, tokenizer_for_spec(spec, tokenizer or tokenizer_folder))


def looks_local(name: str) -> bool:
    """A checkpoint-suffixed or path-looking name (`.`, `/`, `~` first, or several `/`)."""
    return (
        name.lower().endswith(LOCAL_SUFFIXES)
        or name.startswith((".", "/", "~"))
        or name.count("/") != 1
        or "\\" in name
    )


def is_hub_id(name: str) -> bool:
    """Only a bare `org/name` that is no local path goes to the hub (the CLIs use this too)."""
    return (
        not looks_local(name)
        and _HUB_ID.fullmatch(name) is not None
        and not Path(name).expanduser().exists()
    )


# ------------------------------------------------------------------ CompVis single files


def _load_compvis(path: Path, dtype, prediction_type, config, use_ema, tokenizer):
    with open_tensor_file(path) as state_dict:
        if config is not None:
            arch = spec_from_yaml(config, state_dict)
        elif SPEC_METADATA_KEY in state_dict.extras:  # written by ldm_jax: the spec is exact
            spec = _metadata_spec(path, state_dict.extras[SPEC_METADATA_KEY])
            arch = CompVisArchitecture(spec, source="ldm_jax metadata")
        else:
            try:
                arch = detect_architecture(state_dict)
            except ArchitectureError as error:
                raise ArchitectureError(f"{path}: {error}") from None
        spec = arch.spec
        _check_spec(path, spec, state_dict)
        if spec.unet is not None and prediction_type is None and arch.source == "keys":
            if spec.cond_stage.kind == "openclip":
                warnings.warn(
                    f"{path.name}: Stable Diffusion 2.x; the file does not say whether the UNet "
                    "predicts epsilon (512px base models) or v (768-v models). Assuming "
                    "epsilon; pass prediction_type='v_prediction' or the yaml config for 768-v.",
                    stacklevel=3,
                )
        spec = _with_prediction_type(spec, prediction_type, config)
        if arch.source != "ldm_jax metadata":
            spec = _sd2_v_defaults(spec, config)
        source = state_dict
        if spec.unet is None:
            source = without_training_loss(state_dict)
        if use_ema:
            if spec.unet is None or not has_ema_weights(state_dict):
                raise CheckpointMismatchError(
                    f"{path} has no EMA weights (no model_ema.* UNet keys); load it without "
                    "use_ema=True"
                )
            source = ema_state_dict(state_dict)
        try:  # a spec whose fields pass but do not fit together is the file's fault
            table = compvis_checkpoint_table(
                spec, first_stage_as_cond_stage=arch.first_stage_as_cond_stage
            )
            abstract = abstract_checkpoint_params(spec)
        except (TypeError, ValueError, IndexError, KeyError, ArithmeticError) as error:
            raise ArchitectureError(f"{path}: unsupported architecture ({error})") from None
        try:
            params = read_params(table, source, abstract, dtype)
        except CheckpointMismatchError as error:
            how = (
                "the architecture of the yaml config"
                if arch.source == "yaml"
                else "the architecture detected from its keys and shapes (pass the original "
                "yaml config, config=..., if that is wrong)"
            )
            raise CheckpointMismatchError(f"{path} does not fit {how}: {error}") from None
    return CheckpointContents(spec, params, tokenizer_for_spec(spec, tokenizer))


def _metadata_spec(path: Path, text) -> ModelSpec:
    """The spec an ldm_jax export stored in the file's metadata, its every field checked."""
    try:
        spec = spec_from_dict(json.loads(text))
    except (ValueError, TypeError, RecursionError) as error:
        raise CheckpointFileError(
            f"{path}: the ldm_jax spec in its metadata ({SPEC_METADATA_KEY}) is invalid: {error}"
        ) from None
    if not isinstance(spec, ModelSpec):
        raise CheckpointFileError(
            f"{path}: the ldm_jax spec in its metadata ({SPEC_METADATA_KEY}) is a "
            f"{type(spec).__name__}; allowed: a ModelSpec object"
        )
    return spec


def _check_spec(path: Path, spec: ModelSpec, state_dict) -> None:
    """Field types and ranges, then the declared layers and widths against the file's tensors,
    before any shape is built from the spec."""
    try:
        validate_spec(spec)
    except ValueError as error:
        raise ArchitectureError(f"{path}: unsupported {error}") from None
    cond = spec.cond_stage and spec.cond_stage.config
    conds = cond.text_encoders if spec.cond_stage and spec.cond_stage.kind == "sdxl" else (cond,)
    for network in (spec.unet, spec.first_stage, *conds):
        if network is not None:
            check_against_tensors(network, state_dict, path)


def _with_prediction_type(spec: ModelSpec, prediction_type: str | None, source) -> ModelSpec:
    """The spec with the prediction type the caller asked for (warning if `source` said else)."""
    diffusion = spec.diffusion
    if prediction_type is not None and prediction_type != diffusion.prediction_type:
        if source is not None:
            warnings.warn(
                f"prediction_type={prediction_type!r} overrides {diffusion.prediction_type!r} "
                f"from {source}",
                stacklevel=3,
            )
        diffusion = dataclasses.replace(diffusion, prediction_type=prediction_type)
    return dataclasses.replace(spec, diffusion=diffusion)


def _sd2_v_defaults(spec: ModelSpec, config) -> ModelSpec:
    """SD 2.x v-prediction (768-v) single files: attention upcast as in diffusers'
    stable-diffusion-2(-1) config (no effect in fp32; keeps fp16/bf16 softmax stable), and,
    without a yaml to say so, 96x96 latents (v2-inference-v.yaml image_size)."""
    sd2 = spec.cond_stage is not None and spec.cond_stage.kind == "openclip"
    if spec.unet is None or not sd2 or spec.diffusion.prediction_type != "v_prediction":
        return spec
    diffusion = spec.diffusion
    if config is None:
        diffusion = dataclasses.replace(diffusion, latent_size=96)
    unet = dataclasses.replace(spec.unet, upcast_attention=True)
    return dataclasses.replace(spec, unet=unet, diffusion=diffusion)


# ------------------------------------------------------------------ hub ids


def _hub_patterns(folders, weights) -> list[str]:
    return [f"{f}/{w}" for f in folders for w in weights]


def download_from_hub(repo_id: str) -> Path:
    """A diffusers pipeline repo's networks, scheduler and tokenizer via huggingface_hub
    (safetensors weights; `.bin` only for components without them)."""
    from huggingface_hub import snapshot_download

    patterns = [MODEL_INDEX, "scheduler/*.json", "tokenizer/*", "tokenizer_2/*"]
    patterns += _hub_patterns(_HUB_FOLDERS, ("config.json", "*.safetensors.index.json"))
    patterns += _hub_patterns(
        _HUB_FOLDERS,
        (
            "diffusion_pytorch_model.safetensors",
            "model.safetensors",
            "diffusion_pytorch_model-*-of-*.safetensors",
            "model-*-of-*.safetensors",
        ),
    )
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns))
        lacking = [
            f for f in _HUB_FOLDERS if (folder / f).is_dir() and not _has_weights(folder / f)
        ]
        if lacking:
            bins = ("diffusion_pytorch_model.bin", "pytorch_model.bin", "*.bin.index.json")
            bins += ("diffusion_pytorch_model-*-of-*.bin", "pytorch_model-*-of-*.bin")
            folder = Path(snapshot_download(repo_id, allow_patterns=_hub_patterns(lacking, bins)))
    except Exception as error:  # noqa: BLE001 - every failure to fetch has the same remedy
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CheckpointFileError(
            f"{repo_id!r} is not a local file or folder, and fetching it from the Hugging Face "
            f"hub failed ({type(error).__name__}: {reason}). Offline, or for a private or "
            f"mistyped repo, pass a local path instead: {LOCAL_ACCEPTED}"
        ) from None
    if not is_diffusers_folder(folder):
        raise CheckpointFileError(
            f"hub repo {repo_id!r} is not a diffusers pipeline (no {MODEL_INDEX}); for a "
            "single-file checkpoint in a repo, download the file and pass its path"
        )
    return folder


def _has_weights(folder: Path) -> bool:
    try:
        weight_files(folder)
    except CheckpointFileError:
        return False
    return True
