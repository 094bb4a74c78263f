"""CI smoke run of benchmarks/gpu_suite.py --tiny: every row of the GPU suite runs end to end on the
CPU (tiny models, both the JAX and the torch side) and lands, with numbers, in the merged table
that BENCHMARKS.md takes; plus the met/missed verdicts and the time guard, on made-up rows."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_suite_models import case_list  # noqa: E402
from gpu_suite_report import merged_table, row_targets  # noqa: E402
from gpu_suite_timing import Results, run_cases  # noqa: E402

TINY_TRAIN_BATCH = 2  # gpu_suite.py's --tiny default
JAX_NUMBERS = ("s", "images_per_s", "compile_s", "gflops", "mfu")
TORCH_NUMBERS = ("s", "images_per_s", "gflops", "mfu")


def _tiny_run(out: Path):
    env = dict(os.environ)
    # the suite picks its own devices; conftest's 8 fake CPU devices would shard the pipeline
    env["XLA_FLAGS"] = " ".join(
        flag for flag in env.get("XLA_FLAGS", "").split()
        if "xla_force_host_platform_device_count" not in flag
    )  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--tiny", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    return results, (out / "results.md").read_text(), done.stdout


def _expected_rows() -> list[str]:
    return [case["name"] for case in case_list(TINY_TRAIN_BATCH)]


def test_tiny_run_has_every_row_with_numbers_and_verdicts(tmp_path):
    # one test for the one ~1.5-minute run (a module fixture would run once per xdist worker)
    results, table, stdout = _tiny_run(tmp_path)
    _check_json(results)
    _check_table(table, stdout)


def _check_json(results):
    assert {"jax", "torch", "wall_s"} <= set(results)
    expected = _expected_rows()
    assert len(expected) >= 7 and "train_b2_images" in expected
    for side, numbers in (("jax", JAX_NUMBERS), ("torch", TORCH_NUMBERS)):
        data = results[side]
        assert {"device", "versions"} <= set(data["info"]), data["info"]
        rows = data["rows"]
        assert set(rows) == {"matmul_peak", *expected}, sorted(rows)
        assert rows["matmul_peak"]["tflops"] > 0
        for name in expected:
            row = rows[name]
            for key in numbers:
                value = row.get(key)
                assert isinstance(value, float) and math.isfinite(value) and value > 0, (
                    side, name, key, row,
                )  # fmt: skip
            assert row["case_wall_s"] > 0 and row["batch"] >= 1
    train = results["jax"]["rows"]["train_b2_images"]
    assert train["inputs"] == "image" and math.isfinite(train["loss"])
    assert results["jax"]["rows"]["train_b2_remat_blocks"]["remat"] == "blocks"


def _check_table(table, stdout):
    assert table.strip() in stdout  # the driver prints the table it writes
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    lines = {line.split("|")[1].strip(): line for line in rows}
    for name in _expected_rows():
        line = lines[name]
        for bad in ("skipped", "nan", "rror", "not run"):
            assert bad not in line, line
        cells = [cell.strip() for cell in line.split("|")[1:-1]]
        assert float(cells[2]) > 0 and float(cells[10]) > 0, line  # ours s, torch s
        assert float(cells[14]) > 0, line  # ours / torch speed
    targets = table.split("Targets", 1)[1]
    for name in _expected_rows():  # every JAX row has a compile target with a verdict
        assert f"- {name}: compile <= 60 s:" in targets
    for name in ("train_b2", "train_b2_images", "sample_b1", "sample_b8"):
        verdicts = [line for line in targets.splitlines() if line.startswith(f"- {name}: speed")]
        assert len(verdicts) == 1 and ("**met**" in verdicts[0] or "**MISSED**" in verdicts[0])


def test_target_verdicts():
    ours = {"s": 0.1, "mfu": 0.5, "compile_s": 61.0, "peak_memory_gib": 30.0, "peak_set_here": True}
    torch = {"s": 0.14, "peak_memory_gib": 31.0}
    got = {what: ok for what, _, ok in row_targets("train_b16", ours, torch)}
    assert got == {
        "speed >= 1.3x torch": "met",  # 1.4x
        "MFU >= 45%": "met",
        "peak memory <= torch": "met",
        "compile <= 60 s": "MISSED",
    }
    slower = ours | {"s": 0.12, "mfu": 0.3, "compile_s": 20.0, "peak_memory_gib": 40.0}
    got = {what: ok for what, _, ok in row_targets("train_b16_images", slower, torch)}
    assert got["speed >= 1.3x torch"] == "MISSED" and got["MFU >= 45%"] == "MISSED"
    assert got["peak memory <= torch"] == "MISSED" and got["compile <= 60 s"] == "met"
    # a process peak set by an earlier row says nothing about this row's own peak
    earlier = slower | {"peak_set_here": False}
    got = {what: ok for what, _, ok in row_targets("train_b16", earlier, torch)}
    assert got["peak memory <= torch"] == "not measured"
    got = {what: ok for what, _, ok in row_targets("sample_b8", {"s": 1.0}, {"s": 1.1})}
    assert got == {"speed >= 1.2x torch": "MISSED"}
    got = {what: ok for what, _, ok in row_targets("sample_b1", {"s": 1.0}, {"skipped": "time"})}
    assert got == {"speed >= 1.2x torch": "not measured"}
    table = merged_table(
        {"rows": {"sample_b1": {"s": 1.0, "batch": 1, "images_per_s": 1.0}}},
        {"rows": {"sample_b1": {"skipped": "time guard: 3 s left, needs ~8"}}},
    )
    assert "time guard" in table and "speed >= 1.2x torch: –x — **not measured**" in table


def test_time_guard_skips_what_no_longer_fits_and_errors_do_not_stop_the_run(tmp_path):
    args = SimpleNamespace(train_batch=16, attention=["xla"], remat=["blocks"], only=None,
                           tiny=False)  # fmt: skip
    ran = []

    def handler(case):
        ran.append(case["name"])
        if case["name"] == "sample_b1":
            raise RuntimeError("out of memory")
        time.sleep(0.01)
        return {"s": 1.0}

    results = Results(tmp_path / "jax.json", {})
    kinds = {case["kind"] for case in case_list(16)}
    run_cases("jax", args, time.time() + 70, results, dict.fromkeys(kinds, handler))
    rows = json.loads((tmp_path / "jax.json").read_text())["rows"]
    # estimates: train 100 s, sample 45 s, ... > 70 s left, until a kind has run (then its wall
    # time counts): nothing fits but the kinds whose estimate is under 70 s
    assert ran == ["sample_b1", "sample_b8", "unet_fwd_b8", "vae_decode_b1", "unet_fwd_b8_attn_xla"]
    assert "time guard" in rows["train_b16"]["skipped"]
    assert "time guard" in rows["train_b16_remat_blocks"]["skipped"]
    assert rows["sample_b1"]["error"] == "RuntimeError: out of memory"
    assert rows["sample_b8"]["s"] == 1.0 and rows["vae_decode_b1"]["case_wall_s"] > 0
    assert list(rows) == [case["name"] for case in case_list(16, ("xla",), ("blocks",))]
