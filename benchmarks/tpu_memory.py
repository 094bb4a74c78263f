"""Per-device memory of the LDM train step on Cloud TPU, from the TPU compiler itself, on a CPU
host: a deviceless ahead-of-time compile for a TPU topology (jax.experimental.topologies, as
MaxText's train_compile.py does). The step is the one train.py runs: the sharded LDM step of
ldm_jax/training/ldm_step.py, lowered from ShapeDtypeStructs only (nothing is materialised), traced
for TPU (`ldm_jax.models.backend.compile_target("tpu")`: splash attention kernels, no Pallas
interpret mode) and compiled by libtpu for every chip of the topology; one row per model x
topology x remat policy with `compiled.memory_analysis()` of one chip.

Needs libtpu (no TPU): a venv that sees this project's packages plus libtpu, e.g.

    python3 -m venv /tmp/tpuvenv
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/tpuvenv/lib/python3.11/site-packages/p.pth
    echo "$PWD" >> /tmp/tpuvenv/lib/python3.11/site-packages/p.pth
    /tmp/tpuvenv/bin/pip install --no-deps libtpu==0.0.42.1   # the one jax[tpu]==0.10.2 pins
    JAX_PLATFORMS=cpu /tmp/tpuvenv/bin/python benchmarks/tpu_memory.py \\
        --model sdxl --topology v5p:2x2x2,v5p:4x4x4 --remat save_dots_no_batch

libtpu allows one process per host unless ALLOW_MULTIPLE_LIBTPU_LOAD=1 is set (two topologies
compiled at once). --model sd15|sdxl (train_memory.py's specs: UNet trained with AdamW + EMA,
fp32 master weights, bf16 compute; text encoders and VAE frozen), --lora R trains rank-R
attention adapters instead.
The global batch is --per-device-batch x chips (data 1 x fsdp N x tensor 1).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
GIB = 2**30
HBM_GIB = {"TPU v5 lite": 16, "TPU v5": 95, "TPU v6 lite": 32, "TPU v4": 32}


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("sd15", "sdxl"), default="sdxl")
    parser.add_argument("--topology", default="v5p:2x2x2",
                        help="comma list of TPU topologies, e.g. v5e:2x4, v5p:4x4x4, v6e:8x8")
    parser.add_argument("--per-device-batch", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=None, help="default 512 / 1024")
    parser.add_argument("--inputs", default="latents", choices=("latents", "image"))
    parser.add_argument("--remat", default="save_dots_no_batch")
    parser.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = _parse(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    from jax.experimental import topologies
    from train_memory import compile_step, memory_row, sd15_spec, sdxl_spec

    from ldm_jax.models.backend import compile_target

    spec = {"sd15": sd15_spec, "sdxl": sdxl_spec}[args.model]()
    resolution = args.resolution or (1024 if args.model == "sdxl" else 512)
    trained = f"LoRA r{args.lora}" if args.lora else "full fine-tuning"
    print(f"jax {jax.__version__}, libtpu deviceless compile; {args.model} at {resolution} px, "
          f"{args.per_device_batch} image(s) per chip, bf16 compute, {trained}", flush=True)
    rows = []
    for name in args.topology.split(","):
        topology = topologies.get_topology_desc(platform="tpu", topology_name=name)
        chips = len(topology.devices)
        mesh = topologies.make_mesh(topology, (1, chips, 1), ("data", "fsdp", "tensor"))
        kind = topology.devices[0].device_kind
        for remat in args.remat.split(","):
            start = time.perf_counter()
            with compile_target("tpu"):
                compiled, seconds, _ = compile_step(
                    spec, mesh, args.inputs, remat, "bfloat16", args.per_device_batch * chips,
                    resolution, "auto", args.lora,
                )  # fmt: skip
            row = memory_row(compiled, topology=name, kind=kind, chips=chips, remat=remat,
                             compile_s=seconds, wall_s=time.perf_counter() - start)
            hbm = HBM_GIB.get(kind)
            row["fits"] = "?" if hbm is None else ("yes" if row["total"] <= hbm else "no")
            row["hbm"] = hbm
            print(_row(row), flush=True)
            rows.append(row)
    print("\n| topology | chip | remat | args GiB | outputs GiB | aliased GiB | temps GiB "
          "| total GiB / chip | HBM GiB | fits | TFLOP/chip/step | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(_row(row))


def _row(r: dict) -> str:
    return (f"| {r['topology']} | {r['kind']} | {r['remat']} | {r['args']:.2f} | {r['out']:.2f} "
            f"| {r['alias']:.2f} | {r['temp']:.2f} | {r['total']:.2f} | {r['hbm']} | {r['fits']} "
            f"| {r['tflops']:.2f} | {r['compile_s']:.0f} |")


if __name__ == "__main__":
    main()
