"""Convert the public LPIPS/VGG16 PyTorch weights into our LPIPS parameter file.

    python -m ldm_jax.training.lpips_weights --vgg16 vgg16.pth --heads vgg.pth \
        --out lpips.safetensors

--vgg16: torchvision's VGG16 ImageNet weights (`vgg16-397923af.pth`; only `features.*` is used).
--heads: the LPIPS v0.1 linear heads (`lpips/weights/v0.1/vgg.pth`, shipped inside the `lpips`
         pip package; taming's `vgg.pth` holds the same keys).
Both may be `.safetensors` instead. The output is a safetensors file keyed by our parameter paths
("vgg/conv1_1/kernel", "lin0/kernel", ...); `load_lpips_params` reads it back, checking every
key and shape. Nothing is downloaded.
"""

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flax import traverse_util

from ldm_jax.atomic import atomic_output
from ldm_jax.checkpoints.errors import CheckpointFileError
from ldm_jax.checkpoints.files import open_tensor_file
from ldm_jax.training.lpips import VGG16_STAGES, conv_name, lpips_param_shapes

# torchvision vgg16().features indices of the 13 convs (ReLUs and max-pools sit between them).
_TORCHVISION_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


class LPIPSWeightsError(ValueError):
    """An LPIPS weight file is missing, incomplete or of the wrong shape."""


def _conv_names() -> list[str]:
    return [conv_name(s, i) for s, widths in enumerate(VGG16_STAGES) for i in range(len(widths))]


def convert_lpips_state_dicts(vgg16: Mapping, heads: Mapping) -> dict:
    """torchvision VGG16 + lpips head state dicts (numpy or torch values) -> our param tree."""
    vgg16 = {k.removeprefix("module."): v for k, v in vgg16.items()}
    flat = {}
    missing = []
    for name, index in zip(_conv_names(), _TORCHVISION_CONV_INDICES, strict=True):
        w_key, b_key = f"features.{index}.weight", f"features.{index}.bias"
        if w_key not in vgg16 or b_key not in vgg16:
            missing += [k for k in (w_key, b_key) if k not in vgg16]
            continue
        # OIHW -> HWIO
        flat[("vgg", name, "kernel")] = np.transpose(_numpy(vgg16[w_key]), (2, 3, 1, 0))
        flat[("vgg", name, "bias")] = _numpy(vgg16[b_key])
    for k in range(len(VGG16_STAGES)):
        key = f"lin{k}.model.1.weight"
        if key not in heads:
            missing.append(key)
            continue
        flat[(f"lin{k}", "kernel")] = _numpy(heads[key]).reshape(1, -1).T  # [1,C,1,1] -> [C,1]
    if missing:
        raise LPIPSWeightsError(
            f"missing LPIPS weights {missing}; --vgg16 must be torchvision's VGG16 state dict "
            "(features.N.weight/bias) and --heads the lpips v0.1 vgg.pth "
            "(lin0..lin4.model.1.weight)"
        )
    params = traverse_util.unflatten_dict(flat)
    _check_shapes(params, "converted weights")
    return params


def _numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def _check_shapes(params: Mapping, origin: str) -> None:
    expected = traverse_util.flatten_dict(lpips_param_shapes(), sep="/")
    got = traverse_util.flatten_dict(params, sep="/")
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    wrong = [
        f"{k}: {tuple(got[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in sorted(set(expected) & set(got))
        if tuple(got[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or wrong:
        raise LPIPSWeightsError(
            f"{origin} do not fit LPIPS-VGG16: missing {missing}, unexpected {unexpected}, "
            f"wrong shapes {wrong}"
        )


def save_lpips_params(params: Mapping, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the param tree as safetensors (atomically)."""
    from safetensors.numpy import save_file

    _check_shapes(params, "LPIPS params")
    flat = {
        k: np.ascontiguousarray(v, np.float32)
        for k, v in traverse_util.flatten_dict(params, sep="/").items()
    }
    with atomic_output(out, overwrite=overwrite) as tmp:
        save_file(flat, str(tmp))
    return Path(out)


def load_lpips_params(path: str | Path) -> dict:
    """Read a file written by `save_lpips_params` (or this module's CLI)."""
    path = Path(path)
    if not path.is_file():
        raise LPIPSWeightsError(
            f"LPIPS weights {path} not found; convert them once with `python -m "
            "ldm_jax.training.lpips_weights --vgg16 vgg16.pth --heads vgg.pth --out "
            f"{path}`, or train without the perceptual term (loss.perceptual_weight=0)"
        )
    try:
        with open_tensor_file(path) as f:
            flat = {k: np.asarray(f[k], np.float32) for k in f}
    except CheckpointFileError as error:
        raise LPIPSWeightsError(str(error)) from None
    params = traverse_util.unflatten_dict(flat, sep="/")
    _check_shapes(params, str(path))
    return params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vgg16", required=True, help="torchvision VGG16 weights (.pth)")
    parser.add_argument("--heads", required=True, help="lpips v0.1 vgg.pth linear heads")
    parser.add_argument("--out", required=True, help="output .safetensors")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        with open_tensor_file(args.vgg16) as vgg, open_tensor_file(args.heads) as heads:
            params = convert_lpips_state_dicts(
                {k: vgg[k] for k in vgg if k.startswith(("features.", "module.features."))},
                {k: heads[k] for k in heads},
            )
        save_lpips_params(params, args.out, overwrite=args.overwrite)
    except (CheckpointFileError, LPIPSWeightsError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
