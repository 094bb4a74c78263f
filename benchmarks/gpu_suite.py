"""One-shot GPU benchmark suite: ldm_jax against diffusers PyTorch at Stable Diffusion 1.5 shapes.

Random weights with the shapes of the presets (UNet "sd-v1", VAE "kl-f8", CLIP ViT-L/14 text),
512x512 images (64x64x4 latents), bf16 compute. Measured, in priority order (a time guard skips
what no longer fits, so the most important rows come first):

- the bf16 matmul rate of this device (the peak that MFU is taken against), both frameworks;
- UNet train step (noise-prediction loss, forward + backward + AdamW, fp32 master weights, bf16
  compute), with and without rematerialisation;
- 50-step DDIM sampling with classifier-free guidance 7.5 at batch 1 and 8: text encoder, the
  guided loop and the VAE decode, uint8 images on the host (ours: `LatentDiffusionPipeline`;
  torch: the same loop as diffusers' StableDiffusionPipeline, DDIMScheduler, no tokenizer);
- UNet forward (batch 8 with cuDNN and with XLA attention as a before/after, batch 2);
- VAE decode and encode (batch 1, 512x512) and the CLIP text encoder (batch 1).

For each row: median seconds per call (groups of back-to-back calls, one sync per group), images
per second, compile seconds (ours: lower + compile; sampling: first call minus steady call), model
FLOPs from XLA's cost analysis of the same programs lowered for the CPU platform from abstract
inputs (`count_model_flops`, run by the driver alongside; a GPU lowering reports no FLOPs and a
compiled GPU program hides its cuDNN convolutions from the count), MFU of both sides against the
measured JAX matmul peak, XLA's memory estimate for the program (arguments + outputs + temporaries)
and peak device memory (JAX: the process' running peak; torch: per row). A probe first compiles
cuDNN flash attention (forward + gradient) at every UNet attention shape and falls back to XLA
attention everywhere if it fails. The two frameworks run one after the other in fresh processes
(JAX first unless --torch-first), each writing its JSON under --out after every row; the driver
prints one merged table with ours-over-torch speed ratios and writes results.json / results.md.
Every case together needs about 11 minutes on an H200 (JAX ~7, torch ~3, compile included): pick
rows with --only (run in the order given) to fit one call.

    # GPU (the device image has no diffusers: install the carried wheel first)
    PYTHONPATH=/tmp/site:. python3 benchmarks/gpu_suite.py --out $OUT --budget 470
    # CPU smoke test of every code path with tiny models
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

from gpu_suite_jax import run_jax
from gpu_suite_models import STEPS, XLA_GPU_FLAGS, count_model_flops
from gpu_suite_report import add_model_flops, merged_table
from gpu_suite_torch import run_torch


def run_child(side: str, args, deadline: float) -> None:
    command = [sys.executable, os.path.abspath(__file__), "--measure", side, "--out", args.out]
    command += ["--deadline", str(deadline), "--train-batch", str(args.train_batch)]
    command += ["--steps", str(args.steps), "--budget", str(args.budget)]
    command += ["--tiny"] if args.tiny else []
    command += ["--probe-compare"] if args.probe_compare else []
    command += ["--only", *args.only] if args.only else []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if side == "jax":
        env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), *XLA_GPU_FLAGS]).strip()
    else:
        env["JAX_PLATFORMS"] = "cpu"  # torch's process imports ldm_jax only for configs
    try:
        done = subprocess.run(command, env=env, timeout=max(1.0, deadline - time.time() + 15))
        print(f"[driver] {side} exited with {done.returncode}", flush=True)
    except subprocess.TimeoutExpired:
        print(f"[driver] {side} killed at its deadline", flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the JSON and markdown results")
    parser.add_argument("--tiny", action="store_true", help="tiny models: a CPU smoke test")
    parser.add_argument(
        "--budget", type=float, default=None, help="seconds for the whole run (470; tiny: 3000)"
    )
    parser.add_argument(
        "--jax-share", type=float, default=0.72, help="fraction of the budget for the JAX side"
    )
    parser.add_argument("--train-batch", type=int, default=None, help="default 16 (tiny: 2)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50; tiny: 3)")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--torch-first", action="store_true", help="run the torch side first")
    parser.add_argument(
        "--probe-compare", action="store_true", help="compare cuDNN attention with XLA's"
    )
    parser.add_argument("--only", nargs="*", help="run only these case names")
    parser.add_argument("--measure", choices=("jax", "torch", "flops"), help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
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
    # model FLOPs: lowering only, on the host CPU, while the children measure
    flops_command = [sys.executable, os.path.abspath(__file__), "--measure", "flops"]
    flops_command += ["--out", args.out, "--train-batch", str(args.train_batch)]
    flops_command += ["--steps", str(args.steps)] + (["--tiny"] if args.tiny else [])
    flops_child = subprocess.Popen(flops_command, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    if args.skip_torch:
        run_child("jax", args, end)
    elif args.torch_first:  # torch's short share first, then JAX until the end
        run_child("torch", args, start + (1 - args.jax_share) * args.budget)
        run_child("jax", args, end - 5)
    else:
        run_child("jax", args, start + args.jax_share * args.budget)
        run_child("torch", args, end - 5)

    def load(side):
        path = Path(args.out) / f"{side}.json"
        return json.loads(path.read_text()) if path.exists() else {}

    try:
        flops_child.wait(timeout=60)
    except subprocess.TimeoutExpired:
        flops_child.kill()
    flops_path = Path(args.out) / "flops.json"
    flops = json.loads(flops_path.read_text()) if flops_path.exists() else {}
    jax_data, torch_data = load("jax"), load("torch")
    add_model_flops(jax_data, torch_data, flops)
    table = merged_table(jax_data, torch_data)
    merged = {"jax": jax_data, "torch": torch_data, "wall_s": time.time() - start}
    (Path(args.out) / "results.json").write_text(json.dumps(merged, indent=1))
    (Path(args.out) / "results.md").write_text(table + "\n")
    print(table, flush=True)
    print(f"[driver] total wall {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
