"""Text-to-image sampling speed: ldm_jax's LatentDiffusionPipeline against PyTorch diffusers.

Builds a random-weight checkpoint with Stable Diffusion's shapes (``--model sd15``: UNet preset
"sd-v1", the SD VAE "kl-f8", CLIP ViT-L/14 text; ``--model tiny``: a small SD-like model for a
quick CPU run), writes it as a diffusers folder in a temporary directory, and samples the SAME
weights with both implementations, each in a fresh process (so JAX's GPU memory preallocation and
the two runtimes' thread pools never meet):

- ours: ``LatentDiffusionPipeline.from_pretrained(folder, dtype=--dtype)``, DDIM;
- diffusers: ``StableDiffusionPipeline.from_pretrained(folder, torch_dtype=--torch-dtype)`` with its
  ``DDIMScheduler`` and torch SDPA attention (``AttnProcessor2_0``), on CUDA when available.

Both run ``--steps`` DDIM steps with classifier-free guidance 7.5 (empty negative prompt) at
``--batch`` images of ``--height`` x ``--width``, decode with the VAE and return host arrays. The
first call is timed alone (ours: tracing + XLA compilation + one run; diffusers: one eager run with
CUDA/cuDNN warm-up; torch compiles nothing unless torch.compile is used), then ``--repeats`` steady
calls; "first - steady" is ours' compile time. Prints a markdown table.

    python benchmarks/sample_speed.py --model tiny
    python benchmarks/sample_speed.py --model sd15 --dtype bfloat16 --torch-dtype float16
"""

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROMPT = "a photograph of an astronaut riding a horse"
GUIDANCE = 7.5
DEFAULT_SIZE = {"sd15": 512, "tiny": 64}
WEIGHT_SCALE = 0.02  # std of the random weights (0.1 overflows SD 1.5's deep stacks)


# --- the model ---------------------------------------------------------------------------------
def model_spec(name: str):
    from ldm_jax.spec import CondStageSpec, DiffusionSpec, ModelSpec

    if name == "sd15":
        from ldm_jax.presets.autoencoders import SD_VAE
        from ldm_jax.presets.text_encoders import CLIP_TEXT_PRESETS
        from ldm_jax.presets.unets import UNET_PRESETS

        clip = CondStageSpec("clip", CLIP_TEXT_PRESETS["clip-vit-l-14"])
        return ModelSpec(first_stage=SD_VAE, unet=UNET_PRESETS["sd-v1"], cond_stage=clip)

    from ldm_jax.presets.tiny import TINY_CLIP_TEXT, TINY_UNET, TINY_VAE

    size = DEFAULT_SIZE["tiny"] // TINY_VAE.downsample_factor
    return ModelSpec(
        first_stage=TINY_VAE,
        unet=TINY_UNET,
        cond_stage=CondStageSpec("clip", TINY_CLIP_TEXT),
        diffusion=DiffusionSpec(latent_size=size),
    )


def write_random_folder(name: str, folder: Path) -> int:
    """Write a random-weight diffusers folder of model `name`; returns the parameter count."""
    import jax

    from ldm_jax.checkpoints import LatentDiffusionCheckpoint
    from ldm_jax.checkpoints.diffusers.export import save_diffusers
    from ldm_jax.models.factory import abstract_checkpoint_params

    spec = model_spec(name)
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda a: WEIGHT_SCALE * rng.standard_normal(a.shape, dtype=np.float32),
        abstract_checkpoint_params(spec),
    )
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
    save_diffusers(LatentDiffusionCheckpoint(spec, params), folder)
    return count


# --- measurements (each in its own process; prints one JSON line) -------------------------------
def _timed(call, repeats: int) -> dict:
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    steady = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        steady.append(time.perf_counter() - start)
    return {"first": first, "steady": steady}


def measure_ours(args) -> dict:
    import flax
    import jax
    import jax.numpy as jnp
    import jaxlib

    from ldm_jax.sampling.pipeline import LatentDiffusionPipeline

    start = time.perf_counter()
    pipe = LatentDiffusionPipeline.from_pretrained(args.folder, dtype=jnp.dtype(args.dtype))
    jax.block_until_ready(pipe.params)
    load = time.perf_counter() - start

    def call():
        images = pipe(  # a host numpy array: the call has finished when it returns
            [PROMPT] * args.batch,
            height=args.height,
            width=args.width,
            num_inference_steps=args.steps,
            guidance_scale=GUIDANCE,
            sampler="ddim",
            seed=0,
            output_type="np",
        ).images
        assert images.shape == (args.batch, args.height, args.width, 3), images.shape

    devices = jax.local_devices()
    device = f"{devices[0].platform}: {devices[0].device_kind}"
    if len(devices) > 1:
        device += f" x{len(devices)}"
    versions = f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, flax {flax.__version__}"
    return {"load": load, "device": device, "versions": versions} | _timed(call, args.repeats)


def measure_diffusers(args) -> dict:
    import diffusers
    import torch
    import transformers
    from diffusers.models.attention_processor import AttnProcessor2_0

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.torch_dtype)
    start = time.perf_counter()
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        args.folder, torch_dtype=dtype, safety_checker=None
    ).to(device)
    if cuda:
        torch.cuda.synchronize()
    load = time.perf_counter() - start
    assert isinstance(pipe.scheduler, diffusers.DDIMScheduler), type(pipe.scheduler)
    pipe.unet.set_attn_processor(AttnProcessor2_0())  # SDPA (the torch 2 default, made explicit)
    pipe.vae.set_attn_processor(AttnProcessor2_0())
    pipe.set_progress_bar_config(disable=True)

    def call():
        generator = torch.Generator(device).manual_seed(0)
        with torch.inference_mode():
            images = pipe(
                [PROMPT] * args.batch,
                height=args.height,
                width=args.width,
                num_inference_steps=args.steps,
                guidance_scale=GUIDANCE,
                eta=0.0,
                generator=generator,
                output_type="np",  # a host numpy array, as ours returns
            ).images
        if cuda:
            torch.cuda.synchronize()
        assert images.shape == (args.batch, args.height, args.width, 3), images.shape

    if cuda:
        name = f"cuda: {torch.cuda.get_device_name(0)}"
    else:
        name = f"cpu: {torch.get_num_threads()} threads"
    versions = (
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"transformers {transformers.__version__}"
    )
    return {"load": load, "device": name, "versions": versions} | _timed(call, args.repeats)


# --- driver ------------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def host_memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def run_child(impl: str, args, env) -> dict:
    command = [sys.executable, __file__, "--measure", impl, "--folder", str(args.folder)]
    for name in ("model", "dtype", "torch_dtype", "steps", "batch", "height", "width", "repeats"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"the {impl} measurement failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


@dataclasses.dataclass
class Row:
    impl: str
    dtype: str
    result: dict

    @property
    def steady(self) -> float:
        return statistics.median(self.result["steady"])


def print_table(args, rows: list[Row], count: int) -> None:
    print(
        f"model: {args.model} (random weights, {count:,} parameters), {args.steps} DDIM steps, "
        f"guidance {GUIDANCE}, batch {args.batch}, {args.height}x{args.width}, "
        f"median of {args.repeats} steady calls"
    )
    print(
        f"host: {cpu_name()}, {os.cpu_count()} CPUs, {host_memory_gib():.0f} GiB; "
        f"Python {platform.python_version()}"
    )
    for row in rows:
        print(f"{row.impl}: {row.result['device']}; {row.result['versions']}")
    print()
    print(
        "| implementation | dtype | load s | first call s | first − steady s "
        "| s / batch | s / image | images / s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        r = row.result
        print(
            f"| {row.impl} | {row.dtype} | {r['load']:.1f} | {r['first']:.2f} "
            f"| {r['first'] - row.steady:.2f} | {row.steady:.3f} "
            f"| {row.steady / args.batch:.3f} | {args.batch / row.steady:.3f} |"
        )
    if len(rows) == 2:
        ours, theirs = rows
        print(f"\nours / diffusers images/s: {theirs.steady / ours.steady:.2f}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument(
        "--torch-dtype",
        choices=("float32", "float16", "bfloat16"),
        default=None,
        help="diffusers' dtype (default: --dtype)",
    )
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--height", type=int, default=None, help="default 512 (sd15), 64 (tiny)")
    parser.add_argument("--width", type=int, default=None, help="default 512 (sd15), 64 (tiny)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--only", choices=("ours", "diffusers"), default=None, help="measure one side only"
    )
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the folder is written")
    parser.add_argument("--measure", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.torch_dtype = args.torch_dtype or args.dtype
    args.height = args.height or DEFAULT_SIZE[args.model]
    args.width = args.width or DEFAULT_SIZE[args.model]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.measure:
        measure = measure_ours if args.measure == "ours" else measure_diffusers
        print(json.dumps(measure(args)))
        return

    child_env = dict(os.environ)
    # the parent only builds and writes the weights: keep its JAX off the accelerator
    os.environ["JAX_PLATFORMS"] = "cpu"
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        args.folder = Path(tmp) / f"{args.model}-random"
        start = time.perf_counter()
        count = write_random_folder(args.model, args.folder)
        print(f"wrote {args.folder.name} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        impls = [args.only] if args.only else ["ours", "diffusers"]
        rows = []
        for impl in impls:
            dtype = args.dtype if impl == "ours" else args.torch_dtype
            rows.append(Row(impl, dtype, run_child(impl, args, child_env)))
            print(f"measured {impl}", file=sys.stderr)
    print_table(args, rows, count)


if __name__ == "__main__":
    main()
