"""CPU: SD 1.5's 3x3 convolutions under XLA's default (YNNPACK), under ldm_jax's compile options
(XLA's own convolution), and in torch (oneDNN). Batch 2, fp32, NHWC for JAX; best of --repeats.

    python benchmarks/cpu_convs.py
    python benchmarks/cpu_convs.py --no-torch --repeats 3
"""

import argparse

import jax
import numpy as np
from cpu_attention import best_time  # benchmarks/ is on sys.path when run as a script

from ldm_jax.compile_options import compiler_options

# label: (spatial side, in channels, out channels, stride) — the UNet's levels and its up-block
# ResBlocks' first convs (which see the skip-concatenated channels)
CONVS = {
    "64x64, 320->320": (64, 320, 320, 1),
    "64x64, 640->320": (64, 640, 320, 1),
    "64x64, 960->320": (64, 960, 320, 1),
    "32x32, 640->640": (32, 640, 640, 1),
    "16x16, 1280->1280": (16, 1280, 1280, 1),
    "16x16, 2560->1280": (16, 2560, 1280, 1),
    "8x8, 2560->1280": (8, 2560, 1280, 1),
    "16x16->8x8, 1280, stride 2": (16, 1280, 1280, 2),
}


def jax_conv_ms(side, c_in, c_out, stride, options, repeats) -> float:
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.standard_normal((2, side, side, c_in), dtype=np.float32))
    w = jax.device_put(0.01 * rng.standard_normal((3, 3, c_in, c_out), dtype=np.float32))
    padding = ((1, 1), (1, 1)) if stride == 1 else ((0, 1), (0, 1))  # SD's downsample pads 0/1
    conv = jax.jit(
        lambda x, w: jax.lax.conv_general_dilated(
            x, w, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
        ),
        compiler_options=options,
    )
    return 1e3 * best_time(conv, (x, w), repeats)


def torch_conv_ms(side, c_in, c_out, stride, repeats) -> float:
    import torch  # noqa: PLC0415 - optional side

    x = torch.randn(2, c_in, side, side)
    w = 0.01 * torch.randn(c_out, c_in, 3, 3)
    with torch.inference_mode():
        conv = lambda: torch.nn.functional.conv2d(x, w, stride=stride, padding=1)
        return 1e3 * best_time(conv, (), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()
    ours = compiler_options()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, batch 2, fp32, best of "
          f"{args.repeats}; ldm_jax's options: {ours}")
    print("| 3x3 conv | XLA default ms | ldm_jax options ms | torch ms |")
    print("|---|---|---|---|")
    for label, (side, c_in, c_out, stride) in CONVS.items():
        default = jax_conv_ms(side, c_in, c_out, stride, None, args.repeats)
        with_options = jax_conv_ms(side, c_in, c_out, stride, ours, args.repeats)
        reference = ("—" if args.no_torch
                     else f"{torch_conv_ms(side, c_in, c_out, stride, args.repeats):.1f}")
        print(f"| {label} | {default:.1f} | {with_options:.1f} | {reference} |", flush=True)


if __name__ == "__main__":
    main()
