"""Result files, timing and the case loop shared by the JAX and torch measurement processes."""

import json
import os
import statistics
import time
import traceback
from pathlib import Path

from gpu_suite_models import case_list


class Results:
    """Rows of one process, rewritten atomically to a JSON file after every row."""

    def __init__(self, path: Path, info: dict):
        self.path, self.data = path, {"info": info, "rows": {}}
        self.save()

    def add(self, name: str, row: dict) -> None:
        self.data["rows"][name] = row
        self.save()
        short = {k: v for k, v in row.items() if k != "s_all"}
        print(f"[{self.path.stem}] {name}: {json.dumps(short)}", flush=True)

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


QUICK = {"on": False}  # --tiny: one call per group, two groups (the smoke test checks code paths)


def time_groups(run_once, sync, *, group_s: float = 0.4, groups: int = 3) -> dict:
    """Median seconds per call over `groups` groups of back-to-back calls (one sync per group).

    Calls inside a group are not synchronised, so host dispatch overlaps device work as in a
    training loop; the caller has already warmed up (compiled) the call. group_s=0: one call
    per group, with no sizing call first (the slow rows: sampling).
    """
    if QUICK["on"]:
        group_s, groups = 0.0, 2
    per_group = 1
    if group_s > 0:
        start = time.perf_counter()
        sync(run_once())
        single = time.perf_counter() - start
        per_group = max(1, min(20, int(group_s / max(single, 1e-6))))
    seconds = []
    for _ in range(groups):
        start = time.perf_counter()
        for _ in range(per_group):
            out = run_once()
        sync(out)
        seconds.append((time.perf_counter() - start) / per_group)
    return {"s": statistics.median(seconds), "s_all": seconds, "calls_per_group": per_group}


def gib(n) -> float | None:
    return None if n is None else round(n / 2**30, 3)


def run_cases(side: str, args, deadline: float, results: Results, handlers: dict) -> None:
    """Every case in priority order (or --only's order), each recorded as soon as it ends; a case
    that no longer fits before `deadline` is recorded as skipped."""
    QUICK["on"] = args.tiny
    took = {}  # kind -> wall seconds of the last case of that kind
    cases = case_list(args.train_batch, tuple(args.attention or ()), tuple(args.remat))
    if args.only:  # in the order given
        by_name = {case["name"]: case for case in cases}
        cases = [by_name[name] for name in args.only if name in by_name]
    for case in cases:
        left = deadline - time.time()
        need = 0 if args.tiny else took.get(case["kind"], case["estimate"][side])
        if left < need:
            note = f"time guard: {left:.0f} s left, needs ~{need:.0f}"
            results.add(case["name"], {"skipped": note, "batch": case["batch"]})
            continue
        start = time.perf_counter()
        try:
            row = handlers[case["kind"]](case)
        except Exception as error:  # noqa: BLE001 - record (e.g. out of memory) and go on
            traceback.print_exc()
            row = {"error": f"{type(error).__name__}: {str(error)[:400]}"}
        row["case_wall_s"] = time.perf_counter() - start
        row["batch"] = case["batch"]
        if "skipped" not in row:
            took[case["kind"]] = row["case_wall_s"]
        results.add(case["name"], row)
        print(f"[{side}] {case['name']} took {row['case_wall_s']:.1f} s; "
              f"{deadline - time.time():.0f} s left", flush=True)  # fmt: skip
