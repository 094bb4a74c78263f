"""The merged ours-vs-torch table: model FLOPs, MFU, and each row against the issue's targets."""

import math

from gpu_suite_models import flops_key

# the targets (ours against diffusers PyTorch on the same GPU)
TRAIN_SPEEDUP = 1.3  # images/s, train step at batch 16
TRAIN_MFU = 0.45
SAMPLE_SPEEDUP = 1.2  # 50-step DDIM + CFG, batch 1 and 8
COMPILE_S = 60.0
NOT_ROWS = ("matmul_peak",)


def _fmt(value, digits=3):
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def _pct(row):
    return _fmt(100 * row["mfu"], 3) + "%" if "mfu" in row else "–"


def add_model_flops(jax_data: dict, torch_data: dict, flops: dict) -> None:
    """Fill each row's model GFLOP and MFU, both sides against JAX's measured matmul peak."""
    peak = jax_data.get("rows", {}).get("matmul_peak", {}).get("tflops")
    for data in (jax_data, torch_data):
        for name, row in data.get("rows", {}).items():
            key = flops_key(name)
            if "s" in row and key in flops and peak:
                row["gflops"] = flops[key] / 1e9
                row["mfu"] = flops[key] / row["s"] / (peak * 1e12)


def speed_ratio(ours: dict, torch: dict) -> float | None:
    """ours images/s over torch images/s (= torch seconds over ours)."""
    if "s" in ours and "s" in torch and ours["s"] > 0:
        return torch["s"] / ours["s"]
    return None


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "MISSED")


def row_targets(name: str, ours: dict, torch: dict) -> list[tuple[str, str, str]]:
    """[(target, measured, met / MISSED / not measured)] that apply to one row."""
    out = []
    ratio = speed_ratio(ours, torch)
    trains = name.startswith("train_") and "_remat_" not in name
    if trains:
        ok = None if ratio is None else ratio >= TRAIN_SPEEDUP
        out.append((f"speed >= {TRAIN_SPEEDUP}x torch", f"{_fmt(ratio)}x", _verdict(ok)))
        ok = None if "mfu" not in ours else ours["mfu"] >= TRAIN_MFU
        out.append((f"MFU >= {TRAIN_MFU:.0%}", _pct(ours), _verdict(ok)))
        mine, theirs = ours.get("peak_memory_gib"), torch.get("peak_memory_gib")
        ok = None if mine is None or theirs is None else mine <= theirs
        if ok is False and ours.get("peak_set_here") is False:
            ok = None  # the process' peak was set by an earlier row: this row's is unknown
        out.append(("peak memory <= torch", f"{_fmt(mine)} vs {_fmt(theirs)} GiB", _verdict(ok)))
    if name.startswith("sample_"):
        ok = None if ratio is None else ratio >= SAMPLE_SPEEDUP
        out.append((f"speed >= {SAMPLE_SPEEDUP}x torch", f"{_fmt(ratio)}x", _verdict(ok)))
    if ours.get("compile_s") is not None:
        ok = ours["compile_s"] <= COMPILE_S
        out.append((f"compile <= {COMPILE_S:.0f} s", f"{_fmt(ours['compile_s'])} s", _verdict(ok)))
    return out


HEADER = (
    "| case | batch | ours s | ours img/s | compile s | GFLOP | ours MFU | ours peak GiB "
    "| XLA GiB | cuDNN attn calls | torch s | torch img/s | torch MFU | torch peak GiB "
    "| ours / torch speed | row wall s ours / torch | targets |"
)


def merged_table(jax_data: dict, torch_data: dict) -> str:
    jr, tr = jax_data.get("rows", {}), torch_data.get("rows", {})
    lines = [HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
    target_lines = []
    for name in [c for c in {**jr, **tr} if c not in NOT_ROWS]:
        o, t = jr.get(name, {}), tr.get(name, {})
        targets = row_targets(name, o, t)
        target_lines += [f"- {name}: {what}: {value} — **{ok}**" for what, value, ok in targets]
        marks = "; ".join(f"{what.split(' ')[0]} {ok}" for what, _, ok in targets) or "–"
        onote = str(o.get("skipped") or o.get("error") or "not run").replace("|", "/")
        tnote = str(t.get("skipped") or t.get("error") or "not run").replace("|", "/")
        peak = _fmt(o.get("peak_memory_gib"))
        if o.get("peak_set_here") is False:
            peak = "≤ " + peak
        cells = [
            name, _fmt(o.get("batch", t.get("batch"))),
            _fmt(o["s"], 4) if "s" in o else onote, _fmt(o.get("images_per_s")),
            _fmt(o.get("compile_s")), _fmt(o.get("gflops"), 5), _pct(o), peak,
            _fmt(o.get("xla_memory_gib")), _fmt(o.get("cudnn_attention_calls")),
            _fmt(t["s"], 4) if "s" in t else tnote, _fmt(t.get("images_per_s")), _pct(t),
            _fmt(t.get("peak_memory_gib")), _fmt(speed_ratio(o, t)),
            f"{_fmt(o.get('case_wall_s'))} / {_fmt(t.get('case_wall_s'))}", marks,
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    jp, tp = jr.get("matmul_peak", {}), tr.get("matmul_peak", {})
    ji, ti = jax_data.get("info", {}), torch_data.get("info", {})
    head = (
        f"ours: {ji.get('device')}; {ji.get('versions')}; XLA_FLAGS={ji.get('xla_flags')!r}\n"
        f"torch: {ti.get('device')}; {ti.get('versions')}\n"
        f"measured bf16 matmul peak: JAX {_fmt(jp.get('tflops'), 4)} TFLOP/s, "
        f"torch {_fmt(tp.get('tflops'), 4)} TFLOP/s (both sides' MFU is against JAX's)\n\n"
    )
    targets = "\n\nTargets (ours against torch on this device):\n" + "\n".join(target_lines)
    return head + "\n".join(lines) + targets
