"""Prompt adherence of a checkpoint: sample the shapes test split's captions, read them back.

    python -m ldm_jax.eval.adherence [--checkpoint PATH] [--n 64] [--steps 50] [--guidance 4]
        [--sampler NAME] [--batch 16] [--seed 0] [--json FILE] [--grid FILE]

Without --checkpoint it evaluates the default run's model (``python train.py`` writes it), as
``sample.py`` samples it. Prompts are the first ``--n`` captions of the shapes dataset's test split
(``--data-seed``), so runs are comparable. The default guidance, 4, is the one the default run
samples its grid with (configs/default.py) and README's figures were measured at; ``sample.py``'s
7.5 is Stable Diffusion's usual scale. Prints per-attribute accuracy (see
``ldm_jax.eval.adherence``) beside the default run's targets; ``--json`` also writes it (with every
image's checks), ``--grid`` the sampled images.
Bad input is one ``error:`` line on stderr and exit status 2; outputs are written atomically.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ldm_jax.atomic import atomic_output
from ldm_jax.cli import common
from ldm_jax.cli.common import (
    SAMPLERS,
    Parser,
    UsageError,
    check_creatable,
    check_number,
    load_pipeline,
    prog_name,
    require_checkpoint,
    run_command,
)
from ldm_jax.data.shapes import ShapesConfig, ShapesSource
from ldm_jax.eval.adherence import METRICS, TARGETS, score
from ldm_jax.images import make_grid, write_png
from ldm_jax.sampler_options import MAX_SEED, check_guidance, check_seed

_SETTINGS = ("n", "steps", "sampler", "guidance", "batch", "seed", "data_seed")
# the default run's sample.guidance (configs/default.py): its grid and README's figures use it
DEFAULT_GUIDANCE = 4.0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=prog_name("python -m ldm_jax.eval.adherence"),
        description="Sample the shapes test split's captions with a text-to-image checkpoint and "
        "report how often the images show the captions' colours, shapes, positions and sizes.",
    )
    parser.add_argument(
        "--checkpoint",
        help="checkpoint folder or file (default: the default run's model, as sample.py's, which "
        "`python train.py` writes)",
    )
    parser.add_argument("--n", type=int, default=64, help="number of test prompts (default 64)")
    parser.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    parser.add_argument("--sampler", choices=tuple(SAMPLERS), default="ddim", help="default ddim")
    parser.add_argument(
        "--guidance",
        type=float,
        default=DEFAULT_GUIDANCE,
        help=f"CFG scale, finite; <=1 off (default {DEFAULT_GUIDANCE:g}: the default run samples "
        "its grid and README's figures with it; sample.py's 7.5 is Stable Diffusion's scale)",
    )
    parser.add_argument("--batch", type=int, default=16, help="images per sampler call (16)")
    parser.add_argument(
        "--seed", type=int, default=0, help="sampling seed (default 0); image i uses seed + i"
    )
    parser.add_argument("--data-seed", type=int, default=0, help="shapes dataset seed (default 0)")
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON here")
    parser.add_argument("--grid", metavar="FILE", help="also save the sampled images as a PNG grid")
    parser.add_argument("--overwrite", action="store_true", help="replace existing --json/--grid")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def check_args(args) -> None:
    num_test = ShapesConfig().num_test
    if not 1 <= args.n <= num_test:
        raise UsageError(f"--n must be in [1, {num_test}] (the test split's size), got {args.n}")
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.batch < 1:
        raise UsageError(f"--batch must be >= 1, got {args.batch}")
    check_number(check_guidance, args.guidance, "--guidance")
    last = -(-args.n // args.batch) * args.batch - 1  # image i (padding too) uses seed + i
    check_number(check_seed, args.seed, "--seed")
    if args.seed + last > MAX_SEED:
        raise UsageError(
            f"--seed must be <= {MAX_SEED - last} here: image {last} uses seed + {last}"
        )
    if args.data_seed < 0:
        raise UsageError(f"--data-seed must be >= 0, got {args.data_seed}")
    if not args.checkpoint:  # sample.py's default (moved to ldm_jax.cli.common for both)
        args.checkpoint = common.default_checkpoint("the folder or file a training run saved")
    require_checkpoint(
        args.checkpoint,
        hub_ids=False,
        hint="pass the folder or file a training run saved (e.g. the default run's checkpoint; "
        "see README)",
    )
    if args.json and args.grid and Path(args.json).resolve() == Path(args.grid).resolve():
        raise UsageError(f"--json and --grid are the same file ({args.json}); give two paths")
    for flag in ("json", "grid"):
        path = getattr(args, flag)
        if not path:
            continue
        check_creatable(path, f"--{flag}")
        if Path(path).is_dir():
            raise UsageError(f"--{flag} {path} is a folder; give a file path")
        if Path(path).exists() and not args.overwrite:
            raise UsageError(f"--{flag} {path} exists; pass --overwrite or another path")


def sample_images(pipe, prompts, args) -> np.ndarray:
    """uint8 [n, H, W, 3]; every call has --batch prompts (the last is padded): one compile.
    Image i has seed --seed + i, so each image's noise is its own and it can be sampled alone."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    batches = [prompts[i : i + args.batch] for i in range(0, len(prompts), args.batch)]
    images = []
    for k, batch in enumerate(tqdm(batches, desc="sampling", disable=args.no_progress)):
        padded = batch + [batch[-1]] * (args.batch - len(batch))
        out = pipe(
            padded,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            sampler=SAMPLERS[args.sampler],
            seed=args.seed + k * args.batch,  # seeds seed + k * batch, ..., one per image
            output_type="uint8",
        )
        images.append(out.images[: len(batch)])
    return np.concatenate(images)


def format_table(report) -> str:
    lines = [f"{'attribute':<10} {'accuracy':>9} {'n':>5} {'target':>7}"]
    for metric in METRICS:
        target = TARGETS.get(metric)
        target = f"{target:.0%}" if target is not None else ""
        lines.append(
            f"{metric:<10} {report.accuracy[metric]:>9.1%} {report.counts[metric]:>5} {target:>7}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python -m ldm_jax.eval.adherence`` / ``ldm-jax-adherence``: the exit status (0, 2)."""
    return run_command(build_parser(), _evaluate, argv)


def _evaluate(args) -> int:
    check_args(args)
    pipe = load_pipeline(args.checkpoint)
    prompts = ShapesSource(ShapesConfig(seed=args.data_seed), "test").captions(args.n)
    images = sample_images(pipe, prompts, args)
    report = score(images, prompts)
    print(format_table(report))
    if args.json:
        payload = {
            "checkpoint": args.checkpoint,
            "settings": {k: getattr(args, k) for k in _SETTINGS},
            "accuracy": {m: None if np.isnan(a) else a for m, a in report.accuracy.items()},
            "counts": report.counts,
            "targets": TARGETS,
            "images": [
                {"prompt": p, "checks": c} for p, c in zip(prompts, report.per_image, strict=True)
            ],
        }
        with atomic_output(args.json, overwrite=args.overwrite) as temporary:
            temporary.write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.json}")
    if args.grid:
        write_png(make_grid(images), args.grid)  # existing files were refused in check_args
        print(f"wrote {args.grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
