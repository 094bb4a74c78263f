"""Convert a checkpoint between formats.

    python -m ldm_jax.convert SRC DST --to diffusers|compvis|orbax [--config v2-inference-v.yaml]
        [--prediction-type epsilon|v_prediction] [--use-ema] [--dtype float32|bfloat16|float16]
        [--overwrite]

SRC: a CompVis .safetensors/.ckpt file, a diffusers folder, an ldm_jax orbax folder, or a hub id.
DST: a folder (diffusers, orbax) or a .safetensors file (compvis). Nothing is written on error,
and the exit status is non-zero (2) with one line saying what is wrong. --overwrite replaces only
a checkpoint of the --to format (or an empty folder), and never SRC or a folder holding it.
"""

import argparse
import sys

from ldm_jax.cli.common import Parser, UsageError, prog_name, run_command

DTYPES = ("float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    from ldm_jax.checkpoints.save import EXPORT_FORMATS  # noqa: PLC0415

    parser = Parser(
        prog=prog_name("python -m ldm_jax.convert"),
        description="Convert a latent-diffusion checkpoint between CompVis, diffusers and orbax.",
    )
    parser.add_argument("source", help="checkpoint file, diffusers/orbax folder, or hub id")
    parser.add_argument("destination", help="output folder, or .safetensors file for compvis")
    parser.add_argument(
        "--to",
        required=True,
        choices=EXPORT_FORMATS,
        dest="format",
        help="output format: compvis (one .safetensors file), diffusers (a pipeline folder) or "
        "orbax (an ldm_jax folder that restores onto a sharded mesh)",
    )
    parser.add_argument("--config", help="the original CompVis yaml config of SRC")
    parser.add_argument("--prediction-type", choices=("epsilon", "v_prediction"))
    parser.add_argument("--use-ema", action="store_true", help="take the UNet's EMA weights")
    parser.add_argument("--dtype", choices=DTYPES, help="convert parameters while loading")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing DST that is a checkpoint of the --to format",
    )
    return parser


def main(argv=None) -> int:
    """``python -m ldm_jax.convert`` / ``ldm-jax-convert``: the exit status (0, or 2)."""
    return run_command(build_parser(), _convert, argv)


def _convert(args) -> int:
    import jax.numpy as jnp  # noqa: PLC0415 - keep --help fast

    from ldm_jax.checkpoints import load_checkpoint, save_checkpoint  # noqa: PLC0415
    from ldm_jax.checkpoints.save import check_save_destination  # noqa: PLC0415

    protect = (args.source, args.config)
    try:
        check_save_destination(  # before the (long) read: never over (or around) the source
            args.destination, format=args.format, overwrite=args.overwrite, protect=protect
        )
        checkpoint = load_checkpoint(
            args.source,
            dtype=getattr(jnp, args.dtype) if args.dtype else None,
            prediction_type=args.prediction_type,
            config=args.config,
            use_ema=args.use_ema,
        )
        written = save_checkpoint(
            checkpoint,
            args.destination,
            format=args.format,
            overwrite=args.overwrite,
            protect=protect,
        )
    except (ValueError, OSError, ImportError, KeyError) as error:
        raise UsageError(str(error)) from error
    print(f"wrote {args.format} checkpoint to {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
