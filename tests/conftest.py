"""Shared test setup: the parity fixture records every measured error and prints them as a table."""

import os

# 8 fake CPU devices for the sharding tests; must be set before jax is first imported.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import numpy as np
import pytest

try:  # the PyTorch references run on few threads; keep them from oversubscribing CI's 2 cores
    import torch

    torch.set_num_threads(2)
except ImportError:  # pragma: no cover - torch is part of the test extra
    torch = None

# fp32 acceptance bar for every network compared with its PyTorch reference.
PARITY_TOLERANCE = 1e-4


def relative_error(ours, reference) -> float:
    """max |ours - reference| / max |reference|: a norm-wise relative error.

    Element-wise relative error is meaningless where the reference crosses zero, so the largest
    deviation is measured against the reference's scale.
    """
    ours = np.asarray(ours, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if ours.shape != reference.shape:
        raise AssertionError(f"shape mismatch: ours {ours.shape} vs reference {reference.shape}")
    scale = max(np.abs(reference).max(), 1e-12)
    return float(np.abs(ours - reference).max() / scale)


@pytest.fixture
def parity(request):
    """parity(name, ours, reference, tol=1e-4): assert and record the relative error."""

    def check(name, ours, reference, tol=PARITY_TOLERANCE):
        error = relative_error(ours, reference)
        request.node.user_properties.append(("parity", (name, error)))
        assert error <= tol, f"{name}: relative error {error:.3e} > {tol:.0e}"
        return error

    return check


def pytest_terminal_summary(terminalreporter):
    rows = []
    for report in terminalreporter.stats.get("passed", []) + terminalreporter.stats.get(
        "failed", []
    ):
        if report.when != "call":
            continue
        for key, value in report.user_properties:
            if key == "parity":
                rows.append(value)
    if not rows:
        return
    terminalreporter.section("parity against the PyTorch references (fp32, max rel. error)")
    width = max(len(name) for name, _ in rows)
    for name, error in sorted(rows):
        terminalreporter.write_line(f"{name:<{width}}  {error:.2e}")
