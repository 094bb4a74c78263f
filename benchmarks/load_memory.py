"""Peak host memory (RSS) of `load_checkpoint` on a full-size Stable Diffusion 1.x file.

Writes a random fp32 CompVis-layout checkpoint with SD 1.5's shapes (UNet + VAE + CLIP text,
1.07 B parameters, ~4.3 GB) to a temporary folder, as .safetensors (streamed, never all in memory)
and, unless --formats says otherwise, as a Lightning-style .ckpt; then loads each in a fresh
process, fp32 and bf16, and prints a table of peak RSS against the file size. The files are
removed at the end. The issue's bar: loading needs no more than about two copies of the file.

    python benchmarks/load_memory.py [--dir /tmp] [--formats safetensors,ckpt]
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


def tensor_shapes(spec) -> dict[str, tuple[int, ...]]:
    """PyTorch shapes of every key of the CompVis file of `spec`, without any parameters."""
    from ldm_jax.checkpoints.compvis.checkpoint_table import compvis_checkpoint_table
    from ldm_jax.checkpoints.key_table import KeyMap, flatten_params
    from ldm_jax.models.factory import abstract_checkpoint_params

    table = compvis_checkpoint_table(spec)
    abstract = flatten_params(abstract_checkpoint_params(spec))
    shapes = {}
    for entry in table.entries:
        if not isinstance(entry, KeyMap):
            raise NotImplementedError("fused entries are not in SD 1.x files")
        shapes[entry.torch_key] = entry.transform.torch_shape(abstract[entry.flax_path].shape)
    return shapes


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Stream random fp32 tensors into a .safetensors file (header, then data in order)."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = 4 * int(np.prod(shape))
        header[key] = {
            "dtype": "F32",
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
            f.write((0.02 * rng.standard_normal(shape, dtype=np.float32)).tobytes())


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


def measure(path: str, dtype_name: str) -> None:
    """Child process: load once, print a JSON line of memory and time."""
    import jax
    import jax.numpy as jnp

    from ldm_jax.checkpoints import load_checkpoint

    jnp.zeros(1).block_until_ready()  # start the runtime before the baseline
    baseline = rss_bytes()
    dtype = {"fp32": None, "bf16": jnp.bfloat16}[dtype_name]
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
        spec_ok=checkpoint.spec == sd15_spec(),
    )
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--formats", default="safetensors,ckpt")
    parser.add_argument("--measure", nargs=2, metavar=("PATH", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(*args.measure)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        shapes = tensor_shapes(sd15_spec())
        source = Path(tmp) / "sd15-random.safetensors"
        start = time.perf_counter()
        write_safetensors(source, shapes)
        files = {"safetensors": source}
        if "ckpt" in args.formats:
            files["ckpt"] = Path(tmp) / "sd15-random.ckpt"
            write_ckpt(files["ckpt"], source)
        if "safetensors" not in args.formats:
            files.pop("safetensors")
        count = sum(int(np.prod(s)) for s in shapes.values())
        print(f"wrote {count:,} fp32 parameters in {time.perf_counter() - start:.0f} s\n")
        print(
            "| file | load dtype | file GB | params GB | peak RSS GB | peak - baseline GB |"
            " (peak - baseline) / file | load s | spec detected |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for name, path in files.items():
            size = path.stat().st_size
            for dtype in ("fp32", "bf16"):
                out = (
                    subprocess.run(
                        [sys.executable, __file__, "--measure", str(path), dtype],
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
