"""Peak host memory (RSS) of `load_checkpoint` on a full-size Stable Diffusion 1.x or XL file.

Writes a random checkpoint with the published shapes to a temporary folder — SD 1.5 (CompVis
layout, UNet + VAE + CLIP text, 1.07 B parameters, fp32, ~4.3 GB) or SDXL base (SGM layout, UNet +
VAE + both text encoders, 3.47 B parameters, fp16 as published, ~6.9 GB) — as .safetensors
(streamed, never all in memory) and, unless --formats says otherwise, as a Lightning-style .ckpt;
then loads each in a fresh process, in the stored dtype and into bf16, and prints a table of peak
RSS against the file size. The files are removed at the end. Bars: about two copies of the file
(SD 1.5), ~1.1x the file for an SDXL .safetensors.

    python benchmarks/load_memory.py [--model sd15|sdxl] [--dir /tmp] [--formats safetensors,ckpt]
"""

import argparse
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GB = 1e9


def sd15_spec():
    from ldm_jax.presets.autoencoders import SD_VAE
    from ldm_jax.presets.text_encoders import CLIP_TEXT_PRESETS
    from ldm_jax.presets.unets import UNET_PRESETS
    from ldm_jax.spec import CondStageSpec, ModelSpec

    clip = CondStageSpec("clip", CLIP_TEXT_PRESETS["clip-vit-l-14"])
    return ModelSpec(first_stage=SD_VAE, unet=UNET_PRESETS["sd-v1"], cond_stage=clip)


def sdxl_spec():
    from ldm_jax.presets.sdxl import sdxl_preset

    return sdxl_preset("sdxl-base")


MODELS = {"sd15": (sd15_spec, "F32"), "sdxl": (sdxl_spec, "F16")}  # spec, the published dtype


def tensor_shapes(spec) -> dict[str, tuple[int, ...]]:
    """PyTorch shapes of every key of the CompVis/SGM file of `spec`, without any parameters
    (a fused tensor, OpenCLIP's in_proj, stacks its parts' shapes along the first axis)."""
    from ldm_jax.checkpoints.compvis.checkpoint_table import compvis_checkpoint_table
    from ldm_jax.checkpoints.key_table import KeyMap, flatten_params
    from ldm_jax.models.factory import abstract_checkpoint_params

    table = compvis_checkpoint_table(spec)
    abstract = flatten_params(abstract_checkpoint_params(spec))
    shapes = {}
    for entry in table.entries:
        if isinstance(entry, KeyMap):
            shape = entry.transform.torch_shape(abstract[entry.flax_path].shape)
        else:
            parts = [entry.transform.torch_shape(abstract[p].shape) for p in entry.flax_paths]
            shape = (sum(part[0] for part in parts), *parts[0][1:])
        shapes[entry.torch_key] = shape
    return shapes


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], dtype: str = "F32") -> None:
    """Stream random tensors ("F32" or "F16") into a .safetensors file (header, then data)."""
    numpy_dtype = {"F32": np.float32, "F16": np.float16}[dtype]
    itemsize = np.dtype(numpy_dtype).itemsize
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = itemsize * int(np.prod(shape))
        header[key] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for shape in shapes.values():
            values = 0.02 * rng.standard_normal(shape, dtype=np.float32)
            f.write(values.astype(numpy_dtype).tobytes())


def write_ckpt(path: Path, source: Path) -> None:
    """A Lightning-style .ckpt holding the same tensors (written by a child process)."""
    code = (
        "import sys, torch, safetensors.torch as s\n"
        "sd = s.load_file(sys.argv[1])\n"
        "torch.save({'state_dict': sd, 'global_step': 840000}, sys.argv[2])\n"
    )
    subprocess.run([sys.executable, "-c", code, str(source), str(path)], check=True)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(path: str, dtype_name: str, model: str) -> None:
    """Child process: load once, print a JSON line of memory and time."""
    import jax
    import jax.numpy as jnp

    from ldm_jax.checkpoints import load_checkpoint

    jnp.zeros(1).block_until_ready()  # start the runtime before the baseline
    baseline = rss_bytes()
    dtype = {"stored": None, "bf16": jnp.bfloat16}[dtype_name]
    start = time.perf_counter()
    checkpoint = load_checkpoint(path, dtype=dtype)
    jax.block_until_ready(checkpoint.params)
    seconds = time.perf_counter() - start
    leaves = jax.tree.leaves(checkpoint.params)
    result = dict(
        baseline=baseline,
        peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        final=rss_bytes(),
        params=sum(leaf.nbytes for leaf in leaves),
        seconds=seconds,
        spec_ok=checkpoint.spec.unet == MODELS[model][0]().unet,
    )
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--formats", default="safetensors,ckpt")
    parser.add_argument("--model", choices=tuple(MODELS), default="sd15")
    parser.add_argument("--measure", nargs=3, metavar=("PATH", "DTYPE", "MODEL"),
                        help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args()
    if args.measure:
        return measure(*args.measure)

    make_spec, stored = MODELS[args.model]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        shapes = tensor_shapes(make_spec())
        source = Path(tmp) / f"{args.model}-random.safetensors"
        start = time.perf_counter()
        write_safetensors(source, shapes, stored)
        files = {"safetensors": source}
        if "ckpt" in args.formats:
            files["ckpt"] = Path(tmp) / f"{args.model}-random.ckpt"
            write_ckpt(files["ckpt"], source)
        if "safetensors" not in args.formats:
            files.pop("safetensors")
        count = sum(int(np.prod(s)) for s in shapes.values())
        print(f"wrote {count:,} {stored} parameters in {time.perf_counter() - start:.0f} s\n")
        print(
            "| file | load dtype | file GB | params GB | peak RSS GB | peak - baseline GB |"
            " (peak - baseline) / file | load s | spec detected |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for name, path in files.items():
            size = path.stat().st_size
            for dtype in ("stored", "bf16"):
                out = (
                    subprocess.run(
                        [sys.executable, __file__, "--measure", str(path), dtype, args.model],
                        check=True,
                        capture_output=True,
                        text=True,
                    )
                    .stdout.strip()
                    .splitlines()[-1]
                )
                r = json.loads(out)
                grown = r["peak"] - r["baseline"]
                print(
                    f"| .{name} | {dtype} | {size / GB:.2f} | {r['params'] / GB:.2f} | "
                    f"{r['peak'] / GB:.2f} | {grown / GB:.2f} | {grown / size:.2f} | "
                    f"{r['seconds']:.0f} | {r['spec_ok']} |"
                )


if __name__ == "__main__":
    main()
