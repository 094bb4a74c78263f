r"""One-shot GPU benchmark suite: ldm_jax against diffusers PyTorch at Stable Diffusion 1.5 shapes.

Random weights with the shapes of the presets (UNet "sd-v1", VAE "kl-f8", CLIP ViT-L/14 text),
512x512 images (64x64x4 latents), bf16 compute. Ours is what a user gets: the library's train step
(`make_ldm_train_step`), `LatentDiffusionPipeline`, and networks built with the default attention
choice (`attention_implementation=None`). Measured, in priority order (a time guard skips what no
longer fits the budget, so the most important rows come first):

- the bf16 matmul rate of this device (the peak that MFU is taken against), both frameworks;
- train step at batch 16 (noise-prediction loss, forward + backward, clip 1.0 + AdamW on fp32
  master weights, EMA, bf16 compute; the frozen CLIP text encoder inside the step) from
  precomputed latents, then from 512x512 images encoded by the frozen VAE inside the step
  (torch: diffusers' train_text_to_image.py step, encoders under no_grad, autocast);
- 50-step DDIM sampling with classifier-free guidance 7.5 at batch 1 and 8: text encoder, the
  guided loop and the VAE decode, uint8 images on the host (torch: StableDiffusionPipeline's
  loop with DDIMScheduler, no tokenizer);
- UNet forward at batch 8, VAE decode at batch 1;
- optional (--attention xla cudnn blocked): the UNet forward with one attention kernel forced;
- last, the latents train step under each --remat policy (default: blocks, every ResBlock and
  attention layer recomputed; torch: diffusers' gradient checkpointing).

Per row: median seconds per call (groups of back-to-back calls, one sync per group), images per
second, compile seconds (ours: lower + compile; sampling: first call minus steady call), model
FLOPs from XLA's cost analysis of the same networks lowered for the CPU platform
(`count_model_flops`, run alongside on the host), MFU of both sides against the JAX matmul rate
measured in the same call, peak device memory (torch: per row; JAX: the process' running peak,
marked "≤" when an earlier row set it), XLA's memory estimate of the program, the number of cuDNN
fused-attention calls in the compiled program (0: XLA or blocked attention everywhere), the
row's wall time, and met / MISSED for each of the issue's targets. The two frameworks run one
after the other in fresh processes (torch first, its share of the budget capped; JAX then runs
until the end), each writing its JSON under --out after every row; the driver prints one merged
table and writes results.json / results.md.

    # on the GPU machine, one call of about 8 minutes (device tool: timeout_s=560, carry
    # [".whl"]). The device image lacks two pure-Python wheels; fetch them here into .whl/
    # (ignored: echo /.whl/ >> .git/info/exclude), as /work/.library/device/README.md says:
    #   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    #     --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 ml-collections==1.1.0
    set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site \
        || exit; python3 benchmarks/gpu_suite.py --out $OUT 2>&1 | tee $OUT/log.txt
    # CPU smoke test of every code path with tiny models (tests/test_gpu_suite_smoke.py)
    python benchmarks/gpu_suite.py --tiny --out /tmp/gpu_suite
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # ldm_jax without installing

from gpu_suite_jax import run_jax  # noqa: E402
from gpu_suite_models import (  # noqa: E402
    ATTENTION_CHOICES,
    DEFAULT_REMAT,
    STEPS,
    XLA_GPU_FLAGS,
    XLA_TINY_FLAGS,
    count_model_flops,
)
from gpu_suite_report import add_model_flops, merged_table  # noqa: E402
from gpu_suite_torch import run_torch  # noqa: E402


def run_child(side: str, args, deadline: float) -> None:
    """The measuring process of one side (writing <side>.json), killed at `deadline` + 15 s."""
    command = [sys.executable, os.path.abspath(__file__), "--measure", side, "--out", args.out]
    command += ["--deadline", str(deadline), "--train-batch", str(args.train_batch)]
    command += ["--steps", str(args.steps), "--budget", str(args.budget)]
    command += ["--tiny"] if args.tiny else []
    command += ["--attention", *args.attention] if args.attention else []
    command += ["--remat", *args.remat, "--started", str(args.started)]
    command += ["--only", *args.only] if args.only else []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if side == "jax":
        flags = [*XLA_GPU_FLAGS, *(XLA_TINY_FLAGS if args.tiny else ())]
        env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), *flags]).strip()
        # torch's process has exited: JAX may take most of the GPU (default 75%: 60 GiB on an H100)
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    else:
        env["JAX_PLATFORMS"] = "cpu"  # torch's process imports ldm_jax only for configs
    start = time.time()
    try:
        done = subprocess.run(command, env=env, timeout=max(1.0, deadline - time.time() + 15))
        note = f"exited with {done.returncode}"
    except subprocess.TimeoutExpired:
        note = "killed at its deadline"
    print(f"[driver] {side} {note} after {time.time() - start:.0f} s", flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the JSON and markdown results")
    parser.add_argument("--tiny", action="store_true", help="tiny models: a CPU smoke test")
    parser.add_argument(
        "--budget", type=float, default=None, help="seconds for the whole run (470; tiny: 3000)"
    )
    parser.add_argument(
        "--torch-share", type=float, default=0.3, help="the torch side's cap, part of the budget"
    )
    parser.add_argument("--train-batch", type=int, default=None, help="default 16 (tiny: 2)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50; tiny: 3)")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument(
        "--attention", nargs="*", choices=ATTENTION_CHOICES,
        help="extra rows: the UNet forward (batch 8) with this attention kernel forced",
    )  # fmt: skip
    parser.add_argument(
        "--remat", nargs="*", default=list(DEFAULT_REMAT),
        help="the last rows: the latents train step under these remat policies (default: blocks)",
    )  # fmt: skip
    parser.add_argument("--only", nargs="*", help="run only these case names, in this order")
    parser.add_argument("--measure", choices=("jax", "torch", "flops"), help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--started", type=float, default=time.time(), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.train_batch = args.train_batch or (2 if args.tiny else 16)
    args.steps = args.steps or (3 if args.tiny else STEPS)
    args.budget = args.budget or (3000.0 if args.tiny else 470.0)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.measure == "flops":
        flops = count_model_flops(args.tiny, args.train_batch, args.steps)
        (Path(args.out) / "flops.json").write_text(json.dumps(flops, indent=1))
        return
    if args.measure:
        (run_jax if args.measure == "jax" else run_torch)(args)
        return
    start = time.time()
    end = start + args.budget
    print(
        f"[driver] host {platform.node()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; budget {args.budget:.0f} s",
        flush=True,
    )
    for side in ("jax", "torch", "flops"):  # no stale rows from an earlier run
        (Path(args.out) / f"{side}.json").unlink(missing_ok=True)
    # model FLOPs: lowering only, on the host CPU, while the children measure
    flops_command = [sys.executable, os.path.abspath(__file__), "--measure", "flops"]
    flops_command += ["--out", args.out, "--train-batch", str(args.train_batch)]
    flops_command += ["--steps", str(args.steps)] + (["--tiny"] if args.tiny else [])
    flops_child = subprocess.Popen(flops_command, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    # one GPU: torch first (shorter and steadier, its share capped), then JAX until the end.
    # (--tiny does the same: running the sides at once saved little on CI's 2 oversubscribed cores)
    if not args.skip_torch:
        run_child("torch", args, start + args.torch_share * args.budget)
    run_child("jax", args, end - 5)

    def load(name):
        path = Path(args.out) / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else {}

    try:
        flops_child.wait(timeout=60)
    except subprocess.TimeoutExpired:
        flops_child.kill()
    jax_data, torch_data = load("jax"), load("torch")
    add_model_flops(jax_data, torch_data, load("flops"))
    table = merged_table(jax_data, torch_data)
    merged = {"jax": jax_data, "torch": torch_data, "wall_s": time.time() - start}
    (Path(args.out) / "results.json").write_text(json.dumps(merged, indent=1))
    (Path(args.out) / "results.md").write_text(table + "\n")
    print(table, flush=True)
    print(f"[driver] total wall {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
