"""Sampling from the shell: the logic behind ``python sample.py``.

    python sample.py --checkpoint PATH_OR_ID --prompt "a photo of a cat" [--n 4] [--steps 50]
        [--sampler NAME] [--guidance 7.5] [--seed S] [--out outputs/]
        [--init-image PATH --strength 0.75] [--mask PATH] [--class-label N] [--low-res-image PATH]
        [--lora PATH[:SCALE] ...] [--textual-inversion PATH[:TOKEN] ...]
        [--refiner CHECKPOINT [--refiner-start 0.8]]    # SDXL base -> refiner (cli/refiner.py)

The checkpoint decides the task: text-to-image (--prompt), unconditional (no conditioning flag),
class-conditional (--class-label), image-to-image (--init-image, --strength), inpainting
(--init-image, --mask) or super-resolution (--low-res-image); a flag the checkpoint cannot use is
an error.
    python sample.py --prompt "a red circle"    # the model of `python train.py` (runs/default)

Writes ``00.png, 01.png, ...`` (one per image, each with its own seed in the "parameters" PNG
text: ``--seed S`` gives image i the seed S + i, no --seed draws a fresh S) and ``grid.png`` into
``--out``, with a per-step progress bar on stderr. Bad input is one ``error:`` line on stderr,
exit status 2, and nothing written: everything is checked before sampling, existing files are kept
unless ``--overwrite``, and the PNGs are written into a temporary folder inside ``--out`` and then
moved into place.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ldm_jax.cli.adapter_flags import check_loras, check_textual_inversions
from ldm_jax.cli.common import (
    DEFAULT_CHECKPOINT,
    SAMPLERS,
    Parser,
    UsageError,
    check_number,
    check_output_folder,
    default_checkpoint,
    load_pipeline,
    prog_name,
    require_checkpoint,
    run_command,
)
from ldm_jax.cli.refiner import (
    add_refiner_flags,
    check_refiner_args,
    load_refiner,
    refiner_metadata,
)
from ldm_jax.cli.sample_files import GRID_NAME, output_names, write_images
from ldm_jax.models.attention_dispatch import ATTENTION_CHOICES
from ldm_jax.sampler_options import (
    SAMPLER_ALIASES,
    SAMPLER_INFO,
    SAMPLER_NAMES,
    check_eta,
    check_guidance,
    check_guidance_rescale,
    check_seed,
    check_strength,
)

DTYPES = ("float32", "bfloat16", "float16")  # float16: GPUs without bfloat16 (T4, V100)
CHECKPOINT_HELP = (
    "a diffusers folder, a CompVis .safetensors/.ckpt file, an ldm_jax orbax folder, or a hub id "
    "(org/name, downloaded when named)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=prog_name("python sample.py"),
        description="Sample images from a latent diffusion checkpoint (Stable Diffusion 1.x/2.x "
        "incl. inpainting, the LDM zoo: text-to-image, unconditional, class-conditional, "
        "inpainting, super-resolution). Writes one PNG per image and grid.png into --out; bad "
        "input exits with status 2 and writes nothing.",
    )
    parser.add_argument(
        "--checkpoint",
        help=f"the model: {CHECKPOINT_HELP} (default: {DEFAULT_CHECKPOINT}, which `python "
        "train.py` writes)",
    )
    parser.add_argument(
        "--prompt", help="the text prompt (text models: required; truncated to 77 tokens)"
    )
    parser.add_argument("--negative-prompt", default=None, help="unconditional prompt for CFG")
    parser.add_argument("--n", type=int, default=4, help="number of images (default 4)")
    parser.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    parser.add_argument(
        "--sampler",
        choices=tuple(SAMPLERS),
        metavar="NAME",
        default="ddim",
        help=f"one of {', '.join(SAMPLER_NAMES)} (default ddim; plms: epsilon models only; "
        f"README's sampler table gives the diffusers scheduler of each); aliases: "
        f"{', '.join(SAMPLER_ALIASES)}",
    )
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta in [0, 1] (default 0)")
    parser.add_argument(
        "--guidance",
        type=float,
        default=7.5,
        help="classifier-free guidance scale, finite (7.5; <=1 off)",
    )
    parser.add_argument(
        "--guidance-rescale",
        type=float,
        default=0.0,
        help="guidance rescale in [0, 1] (0 = off; 0.7 for zero-terminal-SNR v-models)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed in [0, 2**32 - 1] of the first image (image i: seed + i); default: a fresh "
        "random one, printed and written into each PNG",
    )
    parser.add_argument(
        "--clip-skip",
        type=int,
        default=None,
        metavar="N",
        help="CLIP text models: condition on the text encoder's output N layers earlier "
        "(diffusers' clip_skip; 1 = the penultimate layer)",
    )
    sdxl = parser.add_argument_group("SDXL micro-conditioning (SDXL checkpoints only)")
    sdxl.add_argument(
        "--original-size", type=int, nargs=2, metavar=("H", "W"),
        help="the original image size to condition on (default: the output size)",
    )  # fmt: skip
    sdxl.add_argument(
        "--crop-top-left", type=int, nargs=2, metavar=("TOP", "LEFT"),
        help="the crop's top-left corner to condition on (default 0 0)",
    )  # fmt: skip
    sdxl.add_argument(
        "--aesthetic-score", type=float, metavar="S", help="refiner: aesthetic score (default 6)"
    )
    add_refiner_flags(parser)
    parser.add_argument(
        "--height", type=int, help="image height in pixels, a multiple of the VAE factor (8 for SD)"
    )
    parser.add_argument("--width", type=int, help="image width in pixels (default: the model's)")
    parser.add_argument("--out", default="outputs", help="output folder (default outputs/)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace existing PNGs of the same names"
    )
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="params/compute dtype")
    parser.add_argument(
        "--attention",
        choices=ATTENTION_CHOICES,
        default="auto",
        help="attention kernel (default auto: cuDNN flash attention on NVIDIA GPUs in bf16/fp16, "
        "splash on TPU, tiled XLA for long sequences elsewhere)",
    )
    parser.add_argument(
        "--compilation-cache", metavar="DIR", help="JAX persistent compilation cache folder"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="merge a LoRA file (kohya/A1111 or diffusers/PEFT .safetensors, or .ckpt/.pt) into "
        "the UNet and text encoder, weighted by SCALE (default 1); repeat for several",
    )
    parser.add_argument(
        "--textual-inversion",
        action="append",
        default=[],
        metavar="PATH[:TOKEN]",
        help="add a textual-inversion embedding (A1111 .pt/.safetensors, diffusers "
        "learned_embeds.bin/.safetensors, SDXL clip_l/clip_g) as TOKEN (default: the file's "
        "token or name); repeat for several",
    )
    tasks = parser.add_argument_group(
        "tasks (the checkpoint decides which apply; images are never resized: a size mismatch is "
        "an error naming the expected size)"
    )
    tasks.add_argument(
        "--init-image",
        metavar="PATH",
        help="image-to-image: the starting image (with --mask: the image to inpaint); the output "
        "has its size, so --height/--width must match it if given",
    )
    tasks.add_argument(
        "--strength",
        type=float,
        help="image-to-image noise strength in (0, 1] (default 0.75): the last int(steps * "
        "strength) steps are run; SD inpainting: below 1 starts from the noised image",
    )
    tasks.add_argument("--mask", metavar="PATH", help="inpainting mask (white = repaint)")
    tasks.add_argument("--class-label", type=int, metavar="N", help="class id (cin256 models)")
    tasks.add_argument(
        "--low-res-image",
        metavar="PATH",
        help="super-resolution (LDM BSR): the image to upscale; the output is the first stage's "
        "factor times larger",
    )
    return parser


def check_args(args) -> None:
    """Checks that need no model; UsageError on the first problem."""
    if not args.checkpoint:
        args.checkpoint = default_checkpoint(CHECKPOINT_HELP)
    for flag in ("init_image", "mask", "low_res_image"):
        path = getattr(args, flag)
        if path is not None and not Path(path).expanduser().is_file():
            raise UsageError(f"--{flag.replace('_', '-')} {path} is not a file")
    check_number(check_guidance, args.guidance, "--guidance")
    check_number(check_guidance_rescale, args.guidance_rescale, "--guidance-rescale")
    check_number(check_eta, args.eta, "--eta")
    if args.eta and SAMPLERS[args.sampler] != "ddim":
        raise UsageError(f"--eta applies to --sampler ddim only, not {args.sampler}")
    if args.seed is not None:
        check_number(check_seed, args.seed, "--seed")
    if args.clip_skip is not None and args.clip_skip < 0:
        raise UsageError(f"--clip-skip must be >= 0, got {args.clip_skip}")
    if args.strength is not None:
        check_number(check_strength, args.strength, "--strength")
        if args.init_image is None:
            raise UsageError("--strength needs --init-image (the image to start from)")
    if args.mask is not None and args.init_image is None:
        raise UsageError("--mask needs --init-image (the image to inpaint)")
    if args.n < 1:
        raise UsageError(f"--n must be >= 1, got {args.n}")
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    for flag in ("height", "width"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag} must be positive, got {value}")
    args.loras = check_loras(args.lora)
    args.embeddings = check_textual_inversions(args.textual_inversion)
    require_checkpoint(args.checkpoint, hint=f"pass {CHECKPOINT_HELP}")
    check_refiner_args(args, CHECKPOINT_HELP)
    check_output_folder(args.out, [*output_names(args.n), GRID_NAME], args.overwrite)


def check_model(args, pipe) -> None:
    """Checks against the loaded model; UsageError on the first problem."""
    f = pipe.vae_scale_factor
    for flag in ("height", "width"):
        value = getattr(args, flag)
        if value is not None and value % f:
            raise UsageError(f"--{flag} {value} is not a multiple of {f} (the VAE factor)")
    check_task_flags(args, pipe.task)
    prediction = pipe.spec.diffusion.prediction_type
    if SAMPLER_INFO[SAMPLERS[args.sampler]].epsilon_only and prediction not in ("epsilon", "eps"):
        raise UsageError(
            f"--sampler {args.sampler} needs an epsilon model; this one predicts "
            f"{prediction!r}: use any other sampler, e.g. ddim or dpm++_2m_karras"
        )


def check_task_flags(args, task) -> None:
    """The conditioning and task flags against what the checkpoint's task takes."""
    from ldm_jax.sampling.tasks import INPAINTING  # noqa: PLC0415

    what = f"this checkpoint is {task.name}"
    if task.conditioning == "text" and args.prompt is None:
        raise UsageError(f'--prompt is required: {what}; e.g. --prompt "a photo of a cat"')
    if task.conditioning != "text" and (args.prompt is not None or args.negative_prompt):
        raise UsageError(f"--prompt/--negative-prompt do not apply: {what}")
    if task.conditioning == "class" and args.class_label is None:
        raise UsageError(f"--class-label N is required: {what}")
    if task.conditioning != "class" and args.class_label is not None:
        raise UsageError(f"--class-label does not apply: {what}")
    inpainting = task.concat in INPAINTING
    if inpainting and args.mask is None:
        raise UsageError(f"--init-image and --mask are required: {what} (an inpainting model)")
    if args.mask is not None and not inpainting:
        raise UsageError(f"--mask needs an inpainting checkpoint: {what}")
    if args.init_image is not None and not (task.takes_init_image or inpainting):
        raise UsageError(f"--init-image does not apply: {what}")
    sd_inpainting = task.concat == "mask_and_masked_image"
    if args.strength is not None and not (task.takes_init_image or sd_inpainting):
        raise UsageError(f"--strength does not apply: {what}")
    if task.concat == "low_res_image" and args.low_res_image is None:
        raise UsageError(f"--low-res-image is required: {what}")
    if task.concat != "low_res_image" and args.low_res_image is not None:
        raise UsageError(f"--low-res-image needs a super-resolution checkpoint: {what}")


def task_inputs(args, task) -> dict:
    """The pipeline keyword arguments of the task flags (images opened; UsageError if not)."""
    kwargs = {}
    kwargs["num_images_per_prompt"] = args.n
    if task.conditioning == "text":
        kwargs["prompt"] = args.prompt
        kwargs["negative_prompt"] = args.negative_prompt
    elif task.conditioning == "class":
        kwargs["class_labels"] = [args.class_label]
    if args.init_image is not None:
        kwargs["image"] = _open_image(args.init_image, "--init-image", "RGB")
        if args.mask is not None:
            kwargs["mask_image"] = _open_image(args.mask, "--mask", "L")
            kwargs["strength"] = args.strength
        else:
            kwargs["strength"] = 0.75 if args.strength is None else args.strength
    if args.low_res_image is not None:
        kwargs["low_res_image"] = _open_image(args.low_res_image, "--low-res-image", "RGB")
    for flag, argument in SDXL_FLAGS:
        value = getattr(args, flag)
        if value is not None:
            kwargs[argument] = tuple(value) if isinstance(value, list) else value
    return kwargs


# SDXL flags (args attribute) -> pipeline arguments
SDXL_FLAGS = (
    ("original_size", "original_size"),
    ("crop_top_left", "crops_coords_top_left"),
    ("aesthetic_score", "aesthetic_score"),
)


def _flag_names(message: str) -> str:
    """The pipeline's argument names in an error message, as the flags that set them."""
    message = message.replace("guidance_scale=1", "--guidance 1")
    message = message.replace("guidance_scale ", "--guidance ")
    for argument, flag in (
        ("clip_skip", "--clip-skip"),
        ("original_size", "--original-size"),
        ("crops_coords_top_left", "--crop-top-left"),
        ("aesthetic_score", "--aesthetic-score"),
        ("mask_image", "--mask"),
        ("low_res_image", "--low-res-image"),
        ("image", "--init-image"),
    ):
        if message.startswith(argument + " "):
            return flag + message[len(argument) :]
    return message


def _open_image(path: str, flag: str, mode: str):
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    try:
        with Image.open(Path(path).expanduser()) as image:
            return image.convert(mode)
    except (OSError, UnidentifiedImageError) as error:
        raise UsageError(f"{flag} {path} is not a readable image ({error})") from error


def prompt_warnings(tokenizer, prompts) -> list[str]:
    """A warning for each prompt longer than the text encoder's context (it gets truncated)."""
    hf = getattr(tokenizer, "hf_tokenizer", None)
    limit = getattr(tokenizer, "max_length", None)
    if hf is None or limit is None:
        return []
    warnings = []
    for name, text in prompts:
        count = len(hf.tokenize(text)) + hf.num_special_tokens_to_add()
        if count > limit:
            warnings.append(
                f"warning: {name} is {count} tokens; the text encoder reads {limit}, "
                "the rest is ignored"
            )
    return warnings


def main(argv=None) -> int:
    """``python sample.py`` / ``ldm-jax-sample``: the exit status (0, or 2 for bad input)."""
    return run_command(build_parser(), _sample, argv)


def _sample(args) -> int:
    check_args(args)  # before the slow imports: bad input is answered at once
    pipe = load_pipeline(args.checkpoint, args.dtype, args.compilation_cache, args.attention)
    check_model(args, pipe)
    hand_off = load_refiner(args, pipe)  # None without --refiner
    try:
        for path, scale in args.loras:
            try:
                pipe.load_lora(Path(path).expanduser(), scale, name=path)
            except ValueError as error:  # UnsupportedLoRAError included
                raise UsageError(f"--lora {path}: {error}") from error
        for path, token in args.embeddings:
            try:
                pipe.load_textual_inversion(Path(path).expanduser(), token)
            except ValueError as error:  # TextualInversionError included
                raise UsageError(f"--textual-inversion {path}: {error}") from error
        return _sample_and_write(args, pipe, hand_off)
    finally:
        if args.loras:  # the cached pipeline serves the next command without them
            pipe.unload_lora()
        if args.embeddings:
            pipe.unload_textual_inversion()


def _sample_and_write(args, pipe, hand_off=None) -> int:
    from ldm_jax.sampling.pipeline import sampler_iterations  # noqa: PLC0415 - imports jax
    from ldm_jax.sampling.progress import StepProgress  # noqa: PLC0415

    kwargs = task_inputs(args, pipe.task)
    texts = [] if args.prompt is None else [("--prompt", args.prompt)]
    if args.negative_prompt:
        texts.append(("--negative-prompt", args.negative_prompt))
    for line in prompt_warnings(pipe.tokenizer, texts):
        print(line, file=sys.stderr)

    sampler = SAMPLERS[args.sampler]
    strength = kwargs.get("strength")
    try:
        iterations = sampler_iterations(sampler, args.steps, strength)
    except ValueError as error:
        raise UsageError(f"--strength: {error}") from error
    call = dict(
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        guidance_rescale=args.guidance_rescale,
        sampler=sampler,
        eta=args.eta,
        seed=args.seed,
        clip_skip=args.clip_skip,
        **kwargs,
    )
    desc = args.sampler if hand_off is None else f"{args.sampler} (base, refiner)"
    iterations = iterations if hand_off is None else hand_off.iterations
    with StepProgress(iterations, desc=desc, disable=args.no_progress) as progress:
        try:
            if hand_off is not None:
                result = hand_off(pipe, args, call, progress)
            else:
                result = pipe(
                    height=args.height, width=args.width, output_type="uint8",
                    callback_on_step_end=progress, **call,
                )  # fmt: skip
        except ValueError as error:
            raise UsageError(_flag_names(str(error))) from error

    metadata = {
        key: getattr(args, key)
        for key in ("checkpoint", "prompt", "negative_prompt", "steps", "sampler", "eta")
    }
    metadata.update(refiner_metadata(args))  # --refiner, --refiner-start
    for key in ("init_image", "strength", "mask", "class_label", "low_res_image",
                "original_size", "crop_top_left", "aesthetic_score"):  # fmt: skip
        if getattr(args, key) is not None:
            metadata[key] = getattr(args, key)
    metadata.update(guidance=args.guidance)
    for key in ("guidance_rescale", "clip_skip"):
        if getattr(args, key):
            metadata[key] = getattr(args, key)
    if args.loras:
        metadata["lora"] = [f"{path}:{scale:g}" for path, scale in args.loras]
    if args.embeddings:
        metadata["textual_inversion"] = [
            path if token is None else f"{path}:{token}" for path, token in args.embeddings
        ]
    written = write_images(result.images, Path(args.out), metadata, result.seeds)
    names = [p.name for p in written[:-1]]
    names = ", ".join(names) if len(names) <= 4 else f"{names[0]} ... {names[-1]}"
    print(f"wrote {len(written) - 1} images ({names}) and {GRID_NAME} to {Path(args.out)}/")
    seeds = result.seeds
    print(f"seeds: {seeds[0]}" + (f" ... {seeds[-1]} (one per image)" if len(seeds) > 1 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
