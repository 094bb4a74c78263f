"""sample.py's SDXL base -> refiner hand-off (diffusers' "ensemble of expert denoisers").

    python sample.py --checkpoint SDXL_BASE --refiner SDXL_REFINER [--refiner-start 0.8] \
        --prompt "a lion" --sampler euler --steps 40

The base runs the steps of the first ``--refiner-start`` fraction of the noise schedule (the
pipeline's ``denoising_end``: its timesteps t >= round(T - f T)) and returns latents, in the
sampler's own space; the refiner continues them (``denoising_start=f``: the steps with t below
that cutoff) with the same prompt, negative prompt, seeds, sampler, steps, guidance and
micro-conditioning, and the images written are the refiner's. ``--aesthetic-score`` goes to the
refiner only (the base has no aesthetic-score time id); ``--lora`` / ``--textual-inversion`` go to
the base only (unless --refiner names the --checkpoint, which then runs both stages).

Everything that needs no model is checked before any loads: the fraction, the sampler (one
that resumes mid-schedule: WINDOW_SAMPLERS), the text-to-image flags, and, where the checkpoint's
config says so without reading weights (a diffusers folder's model_index.json, an orbax folder's
spec, a .safetensors header), that --checkpoint is an SDXL base and --refiner an SDXL refiner or
base (`sdxl_kind`); hub ids and pickled files are checked once loaded, before anything compiles,
as are the two windows (each stage must get at least one of the steps).
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from pathlib import Path

from ldm_jax.cli.common import (
    SAMPLERS,
    UsageError,
    load_pipeline,
    release_pipeline,
    require_checkpoint,
)
from ldm_jax.sampler_options import SAMPLER_INFO

DEFAULT_START = 0.8  # diffusers' SDXL documentation's high_noise_frac
# as ldm_jax.diffusion.sampler_plans.WINDOW_MODULES (no jax here; test_sample_cli_refiner.py
# checks they agree): the samplers whose run can stop and resume (denoising_start) mid-schedule
WINDOW_MODULES = ("ddim", "ddpm", "euler", "euler_ancestral", "heun", "dpm_solver",
                  "dpm_solver_sde", "unipc")  # fmt: skip
WINDOW_SAMPLERS = tuple(n for n, info in SAMPLER_INFO.items() if info.module in WINDOW_MODULES)
_OTHER_SAMPLERS = tuple(n for n in SAMPLER_INFO if n not in WINDOW_SAMPLERS)
# flags of tasks other than text-to-image: the hand-off takes a prompt only
_TASK_FLAGS = ("init_image", "mask", "strength", "class_label", "low_res_image")
_SGM = "conditioner.embedders."  # SDXL single files (ldm_jax.checkpoints.compvis.text)
_SGM_CLIP = _SGM + "0.transformer.text_model.embeddings.token_embedding.weight"  # base only
_UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"  # OIHW: [C, in_channels, 3, 3]
_ORBAX_SPEC = "ldm_spec.json"  # ldm_jax.checkpoints.orbax.SPEC_FILE
# sdxl_kind's answers, as the errors word them
KINDS = {
    "base": "an SDXL base",
    "refiner": "an SDXL refiner",
    "sdxl_other": "an SDXL model that is not text-to-image (e.g. inpainting)",
    "not_sdxl": "not an SDXL model",
}


def add_refiner_flags(parser) -> None:
    group = parser.add_argument_group(
        "SDXL base -> refiner (diffusers' ensemble of expert denoisers; --checkpoint: the base)"
    )
    group.add_argument(
        "--refiner",
        metavar="CHECKPOINT",
        help="an SDXL refiner (or base) checkpoint, given as --checkpoint is, that runs the last "
        "steps on the base's latents"
        + (f" (any --sampler but {', '.join(_OTHER_SAMPLERS)})" if _OTHER_SAMPLERS else ""),
    )
    group.add_argument(
        "--refiner-start",
        type=float,
        metavar="F",
        help=f"the fraction of the noise schedule in (0, 1) the base runs before the refiner "
        f"takes over (default {DEFAULT_START})",
    )


# --- checks before any model loads


def check_refiner_args(args, checkpoint_hint: str) -> None:
    """The --refiner flags against the others, without loading anything; UsageError."""
    if args.refiner is None:
        if args.refiner_start is not None:
            raise UsageError("--refiner-start needs --refiner (the checkpoint that takes over)")
        return
    start = DEFAULT_START if args.refiner_start is None else args.refiner_start
    if not (math.isfinite(start) and 0.0 < start < 1.0):
        raise UsageError(
            f"--refiner-start must be in (0, 1) (the base's fraction of the schedule), got {start}"
        )
    args.refiner_start = start
    sampler = SAMPLERS[args.sampler]
    if SAMPLER_INFO[sampler].module not in WINDOW_MODULES:
        raise UsageError(
            f"--refiner needs a sampler that can resume mid-schedule, one of "
            f"{', '.join(WINDOW_SAMPLERS)}; not {args.sampler}"
        )
    for flag in _TASK_FLAGS:
        if getattr(args, flag) is not None:
            raise UsageError(
                f"--{flag.replace('_', '-')} does not apply with --refiner: the base -> refiner "
                "hand-off is text-to-image (--prompt)"
            )
    if args.prompt is None:
        raise UsageError('--refiner needs --prompt (SDXL is text-to-image), e.g. --prompt "a cat"')
    require_checkpoint(args.refiner, hint=f"--refiner takes {checkpoint_hint}")
    _check_base_kind(args.checkpoint, sdxl_kind(args.checkpoint))
    _check_refiner_kind(args, sdxl_kind(args.refiner))


def _check_base_kind(checkpoint: str, kind: str | None) -> None:
    if kind is None or kind == "base":
        return
    if kind == "refiner":
        raise UsageError(
            f"--checkpoint {checkpoint} is an SDXL refiner; with --refiner the --checkpoint is "
            "the SDXL base that runs first (swap them?)"
        )
    raise UsageError(
        f"--refiner needs an SDXL base (text-to-image) as --checkpoint; {checkpoint} is "
        f"{KINDS[kind]}"
    )


def _check_refiner_kind(args, kind: str | None) -> None:
    if kind is None:
        return
    if kind not in ("refiner", "base"):
        raise UsageError(
            f"--refiner {args.refiner} is {KINDS[kind]}; it must be an SDXL refiner or base "
            "(text-to-image) to continue the base's latents"
        )
    if kind == "base" and args.aesthetic_score is not None:
        raise UsageError(
            f"--aesthetic-score applies to an SDXL refiner; --refiner {args.refiner} is an "
            "SDXL base (no aesthetic-score time id)"
        )


def sdxl_kind(checkpoint: str) -> str | None:
    """What a checkpoint is, from its configs or file header only (no weights read): a key of
    KINDS, or None when only loading tells (hub ids, pickled files, unreadable configs: loading
    then reports what is wrong)."""
    path = Path(checkpoint).expanduser()
    try:
        if path.is_dir() and (path / "model_index.json").is_file():
            return _diffusers_kind(path)
        if path.is_dir() and (path / _ORBAX_SPEC).is_file():  # an ldm_jax orbax folder
            return _orbax_kind(json.loads((path / _ORBAX_SPEC).read_text()))
        if path.is_file() and path.suffix.lower() == ".safetensors":
            return _safetensors_kind(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error):
        return None
    return None


def _kind(sdxl: bool, refiner: bool, in_channels, out_channels) -> str:
    if not sdxl:
        return "not_sdxl"
    if in_channels is not None and in_channels != out_channels:
        return "sdxl_other"  # channels concatenated to the latents: inpainting
    return "refiner" if refiner else "base"


def _diffusers_kind(folder: Path) -> str:
    """model_index.json lists a text_encoder_2 (ldm_jax.checkpoints.diffusers.sdxl's rule);
    requires_aesthetics_score: the refiner."""
    index = json.loads((folder / "model_index.json").read_text())
    entry = index.get("text_encoder_2")
    sdxl = isinstance(entry, list | tuple) and len(entry) == 2 and entry[1] is not None
    unet_config = folder / "unet" / "config.json"
    unet = json.loads(unet_config.read_text()) if unet_config.is_file() else {}
    in_channels = unet.get("in_channels")
    out_channels = unet.get("out_channels", in_channels)
    refiner = index.get("requires_aesthetics_score") is True
    return _kind(sdxl, refiner, in_channels, out_channels)


def _orbax_kind(spec: dict) -> str:
    """The spec JSON (ldm_jax.spec.spec_to_dict): an "sdxl" cond stage, refiner time ids."""
    cond = spec.get("cond_stage") or {}
    time_ids = (cond.get("config") or {}).get("time_ids") or ()
    unet = spec.get("unet") or {}
    sdxl = cond.get("kind") == "sdxl"
    in_channels = unet.get("in_channels")
    return _kind(sdxl, "aesthetic_score" in time_ids, in_channels, unet.get("out_channels"))


def _safetensors_kind(path: Path) -> str:
    """An SGM single file's keys (ldm_jax.checkpoints.compvis.detect): conditioner.embedders.*,
    a CLIP ViT-L at 0 in the base only."""
    with path.open("rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        if length > 100_000_000:
            raise ValueError("not a safetensors header")
        header = json.loads(file.read(length))
    sdxl = any(key.startswith(_SGM) for key in header)
    shape = header.get(_UNET_IN, {}).get("shape")
    in_channels = shape[1] if shape and len(shape) == 4 else None
    latent = 4 if in_channels else None  # SDXL's latent channels (the UNet's output)
    return _kind(sdxl, _SGM_CLIP not in header, in_channels, latent)


# --- loading, the checks that need the models, sampling


def spec_kind(spec) -> str:
    """sdxl_kind of a loaded model (its ModelSpec)."""
    from ldm_jax.sampling.tasks import model_task  # noqa: PLC0415 - imports jax

    cond, task = spec.cond_stage, model_task(spec)
    if cond is None or cond.kind != "sdxl":
        return "not_sdxl"
    if not task.takes_init_image or task.conditioning != "text":  # what denoising_start takes
        return "sdxl_other"
    return "refiner" if "aesthetic_score" in cond.config.time_ids else "base"


@dataclasses.dataclass
class HandOff:
    """The refiner pipeline and the number of steps each stage runs."""

    refiner: object  # LatentDiffusionPipeline
    base_steps: int
    refiner_steps: int

    @property
    def iterations(self) -> int:
        return self.base_steps + self.refiner_steps

    def __call__(self, base, args, call: dict, progress=None):
        """The refiner's uint8 images after the base's first steps; ``call``: the keyword
        arguments both stages share (prompt, seeds, sampler, steps, guidance, micro-conditioning;
        aesthetic_score goes to the refiner only). ValueError from either pipeline."""
        call = dict(call)
        aesthetic = call.pop("aesthetic_score", None)
        stage = dict(denoising_end=args.refiner_start, output_type="latent")
        if progress is not None:
            stage["callback_on_step_end"] = progress
        latents = base(height=args.height, width=args.width, **stage, **call)
        call["seed"] = latents.seeds  # as given (or drawn): each image keeps its own
        stage = dict(image=latents.images, denoising_start=args.refiner_start)
        if progress is not None:
            offset = self.base_steps

            def stage_progress(i, timestep=None, x=None):
                progress(offset + int(i), timestep, x)

            stage["callback_on_step_end"] = stage_progress
        if aesthetic is not None:
            stage["aesthetic_score"] = aesthetic
        return self.refiner(output_type="uint8", **stage, **call)


def load_refiner(args, base) -> HandOff | None:
    """The hand-off of ``args.refiner`` after ``base`` (None without --refiner: the refiner
    cached by an earlier command is released); UsageError if either model or the steps do not
    fit. Nothing is compiled here."""
    if args.refiner is None:
        release_pipeline("refiner")
        return None
    _check_base_kind(args.checkpoint, spec_kind(base.spec))
    if _same_checkpoint(args.checkpoint, args.refiner):
        refiner = base  # the base as its own refiner: one pipeline
    else:
        refiner = load_pipeline(
            args.refiner, args.dtype, args.compilation_cache, args.attention, slot="refiner"
        )
    _check_refiner_kind(args, spec_kind(refiner.spec))
    got = [(p.spec.unet.out_channels, p.vae_scale_factor) for p in (base, refiner)]
    if got[0] != got[1]:
        raise UsageError(
            f"--refiner {args.refiner} has another latent space than the base: (channels, VAE "
            f"factor) {got[1]} vs {got[0]}"
        )
    base_steps, refiner_steps = window_steps(args, base, refiner)
    return HandOff(refiner, base_steps, refiner_steps)


def window_steps(args, base, refiner) -> tuple[int, int]:
    """How many sampler iterations each stage runs, cut by the pipeline's own rule
    (sampler_plans.denoising_window); UsageError if one gets none."""
    from ldm_jax.diffusion import sampler_plans  # noqa: PLC0415 - imports jax

    sampler, f = SAMPLERS[args.sampler], args.refiner_start
    counts = []
    for who, pipe, window in (("base", base, {"end": f}), ("refiner", refiner, {"start": f})):
        T = pipe.schedule.num_train_timesteps
        plan = sampler_plans.sampler_plan(
            sampler, pipe.spec.diffusion, T, args.steps, from_image=who == "refiner"
        )
        try:
            plan = sampler_plans.denoising_window(plan, pipe.schedule, T, **window)
        except ValueError as error:
            if "leave none" not in str(error):
                raise UsageError(str(error)) from error
            t_N = sampler_plans.visited_timesteps(plan, pipe.schedule)
            raise UsageError(
                f"--refiner-start {f:g} with --steps {args.steps} leaves the {who} none of the "
                f"steps (timesteps {t_N.round(1).tolist()}): change --refiner-start or raise "
                "--steps"
            ) from error
        counts.append(len(sampler_plans.visited_timesteps(plan, pipe.schedule)))
    return counts[0], counts[1]


def _same_checkpoint(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b


def refiner_metadata(args) -> dict:
    """The PNG "parameters" entries of the hand-off (none without --refiner)."""
    if args.refiner is None:
        return {}
    return {"refiner": args.refiner, "refiner_start": args.refiner_start}
