"""Training observability: one writer for stdout, a JSONL file and TensorBoard events, plus MFU.

MFU = achieved FLOP/s per device / peak FLOP/s per device. The achieved FLOPs come from XLA's cost
analysis of the compiled (SPMD-partitioned) step, which counts one device's share of the work. Peak
FLOP/s come from the config or from `PEAK_FLOPS_PER_DEVICE`; for an unknown device (the CPU) MFU
is left out rather than invented.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from ldm_jax.images import write_png

# Dense bf16 peak FLOP/s per device (vendor data sheets, no sparsity), keyed by a substring of
# `jax.Device.device_kind`. Longer keys are tried first so "TPU v5 lite" wins over "TPU v5".
PEAK_FLOPS_PER_DEVICE = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def peak_flops_per_device(device_kind: str, configured: float = 0.0) -> float | None:
    """The configured peak if positive, else the table's entry for `device_kind`, else None."""
    if configured and configured > 0:
        return float(configured)
    for key in sorted(PEAK_FLOPS_PER_DEVICE, key=len, reverse=True):
        if key.lower() in device_kind.lower():
            return PEAK_FLOPS_PER_DEVICE[key]
    return None


def compiled_flops(compiled) -> float | None:
    """FLOPs of one call of a compiled (jax `.lower(...).compile()`) function on one device."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement cost analysis
        return None
    if isinstance(analysis, (list, tuple)):  # older jax returned one dict per module
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops is not None and flops > 0 else None


def mfu(flops_per_step: float | None, steps_per_second: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1] (per device), or None when either figure is unknown."""
    if not flops_per_step or not peak or steps_per_second <= 0:
        return None
    return flops_per_step * steps_per_second / peak


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class MetricWriter:
    """Writes scalar dicts to stdout, `workdir/metrics.jsonl` and TensorBoard (`workdir/tb`), and
    image grids to TensorBoard and `workdir/samples/`. Only an enabled writer (process 0) writes.

    While `bar` (a tqdm bar) is set, lines go through `bar.write`, which clears the bar, prints
    the line and redraws the bar, so log lines on stdout never tear the bar on stderr.
    """

    def __init__(self, workdir: str | Path, *, enabled: bool = True, stream=None):
        self.workdir = Path(workdir)
        self.enabled = enabled
        self.stream = sys.stdout if stream is None else stream
        self.bar = None
        self._jsonl = None
        self._tb = None
        if enabled:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.workdir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
            from tensorboardX import SummaryWriter  # noqa: PLC0415 - only process 0 needs it

            self._tb = SummaryWriter(str(self.workdir / "tb"))

    def write_scalars(self, step: int, scalars: dict, hidden=()) -> None:
        """Every scalar to metrics.jsonl; those not in `hidden` (e.g. terms that are zero by the
        config at this step) also to stdout and TensorBoard. None values are left out."""
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float, np.number)) else v)
                 for k, v in scalars.items() if v is not None}
        # the loss first (device_get returns the step's metrics sorted by name)
        shown = {k: v for k, v in sorted(clean.items(), key=lambda kv: kv[0] != "loss")
                 if k not in hidden}
        line = " ".join(f"{k}={_format(v)}" for k, v in shown.items())
        self._print(f"step {step}: {line}")
        self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
        self._jsonl.flush()
        for key, value in shown.items():
            if isinstance(value, float) and math.isfinite(value):
                self._tb.add_scalar(key, value, int(step))
        self._tb.flush()

    def write_text(self, message: str) -> None:
        if self.enabled:
            self._print(message)

    def _print(self, message: str) -> None:
        if self.bar is None:
            print(message, file=self.stream, flush=True)
        else:
            self.bar.write(message, file=self.stream)
            self.stream.flush()

    def write_image(self, step: int, name: str, image_HWC: np.ndarray) -> Path | None:
        """Log a uint8 [H, W, 3] grid to TensorBoard and save it as samples/<name>_<step>.png."""
        if not self.enabled:
            return None
        image_HWC = np.asarray(image_HWC)
        if image_HWC.dtype != np.uint8 or image_HWC.ndim != 3 or image_HWC.shape[-1] != 3:
            raise ValueError(f"image grid must be uint8 [H, W, 3], got {image_HWC.dtype} "
                             f"{image_HWC.shape}")
        self._tb.add_image(name, image_HWC, int(step), dataformats="HWC")
        self._tb.flush()
        return write_png(image_HWC, self.workdir / "samples" / f"{name}_{int(step):08d}.png")

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_jsonl(path: str | Path) -> dict[int, dict]:
    """metrics.jsonl as {step: record}; a resumed run's re-logged steps replace earlier lines."""
    records = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            records[int(record["step"])] = record
    return records
