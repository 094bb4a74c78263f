"""The merged ours-vs-torch table with model FLOPs and MFU."""

import json
import math


def _fmt(value, digits=3):
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def flops_key(case_name: str) -> tuple[str, float]:
    """(key of count_model_flops' result, multiplier) for a case name."""
    if case_name.startswith("train_"):
        return "train", 1.0
    if case_name.startswith("unet_fwd_b8"):
        return "unet_fwd_b8", 1.0
    if case_name.startswith("unet_fwd_b"):
        return "unet_fwd_b1", float(case_name.removeprefix("unet_fwd_b").split("_")[0])
    if case_name == "clip_text_b1":
        return "text_b1", 1.0
    return case_name, 1.0


def add_model_flops(jax_data: dict, torch_data: dict, flops: dict) -> None:
    """Fill each row's model GFLOP and MFU, both sides against JAX's measured matmul peak."""
    peak = jax_data.get("rows", {}).get("matmul_peak", {}).get("tflops")
    for data in (jax_data, torch_data):
        for name, row in data.get("rows", {}).items():
            key, factor = flops_key(name)
            if "s" in row and key in flops and peak:
                row["gflops"] = factor * flops[key] / 1e9
                row["mfu"] = factor * flops[key] / row["s"] / (peak * 1e12)


def merged_table(jax_data: dict, torch_data: dict) -> str:
    jr, tr = jax_data.get("rows", {}), torch_data.get("rows", {})
    lines = [
        "| case | batch | ours s | ours img/s | compile s | GFLOP | MFU | XLA mem GiB "
        "| peak GiB | torch s | torch img/s | torch MFU | torch peak GiB | ours / torch speed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in [c for c in jr if c not in ("matmul_peak", "cudnn_attention_probe")]:
        o, t = jr[name], tr.get(name, {})
        if "s" not in o:
            note = o.get("skipped") or o.get("error", "?")
            lines.append(f"| {name} | {o.get('batch', '')} | {note} |" + " |" * 11)
            continue
        ratio = t["s"] and o["s"] and t["s"] / o["s"] if "s" in t else None
        tnote = t.get("skipped") or t.get("error")
        lines.append(
            f"| {name} | {o['batch']} | {_fmt(o['s'], 4)} | {_fmt(o['images_per_s'])} "
            f"| {_fmt(o.get('compile_s'))} | {_fmt(o.get('gflops'), 5)} "
            f"| {_fmt(100 * o['mfu'], 3) + '%' if 'mfu' in o else '–'} "
            f"| {_fmt(o.get('xla_memory_gib'))} "
            f"| {_fmt(o.get('peak_memory_gib'))} "
            f"| {_fmt(t.get('s'), 4) if 's' in t else (tnote or '–')} "
            f"| {_fmt(t.get('images_per_s'))} "
            f"| {_fmt(100 * t['mfu'], 3) + '%' if 'mfu' in t else '–'} "
            f"| {_fmt(t.get('peak_memory_gib'))} "
            f"| {_fmt(ratio)} |"
        )
    jp, tp = jr.get("matmul_peak", {}), tr.get("matmul_peak", {})
    head = (
        f"ours: {jax_data.get('info', {}).get('device')}; "
        f"{jax_data.get('info', {}).get('versions')}; XLA_FLAGS="
        f"{jax_data.get('info', {}).get('xla_flags')!r}\n"
        f"torch: {torch_data.get('info', {}).get('device')}; "
        f"{torch_data.get('info', {}).get('versions')}\n"
        f"measured bf16 matmul peak: JAX {_fmt(jp.get('tflops'), 4)} TFLOP/s, "
        f"torch {_fmt(tp.get('tflops'), 4)} TFLOP/s (MFU is against JAX's)\n"
        f"cuDNN attention probe: {json.dumps(jr.get('cudnn_attention_probe'))}\n\n"
    )
    return head + "\n".join(lines)
