"""sample.py's adapter flags, checked before any model loads: --lora PATH[:SCALE] and
--textual-inversion PATH[:TOKEN] (repeatable)."""

from __future__ import annotations

import math
from pathlib import Path

from ldm_jax.cli.common import UsageError


def check_textual_inversions(values: list[str]) -> list[tuple[str, str | None]]:
    """--textual-inversion PATH[:TOKEN] values -> [(path, token or None)]; a path that is itself
    a file keeps its colons."""
    embeddings = []
    for value in values:
        path, token = value, None
        head, colon, tail = value.rpartition(":")
        if colon and not Path(value).expanduser().is_file():
            path, token = head, tail
            if not token.strip():
                raise UsageError(f"--textual-inversion {value}: TOKEN is empty")
        if not Path(path).expanduser().is_file():
            raise UsageError(f"--textual-inversion {path} is not a file")
        embeddings.append((path, token))
    return embeddings


def check_loras(values: list[str]) -> list[tuple[str, float]]:
    """--lora PATH[:SCALE] values -> [(path, scale)]; a path that is itself a file keeps its
    colons."""
    loras = []
    for value in values:
        path, scale = value, 1.0
        head, colon, tail = value.rpartition(":")
        if colon and not Path(value).expanduser().is_file():
            try:
                path, scale = head, float(tail)
            except ValueError:
                raise UsageError(f"--lora {value}: SCALE must be a number, got {tail!r}") from None
        if not math.isfinite(scale):
            raise UsageError(f"--lora {value}: SCALE must be finite, got {tail}")
        if not Path(path).expanduser().is_file():
            raise UsageError(f"--lora {path} is not a file")
        if path in [p for p, _ in loras]:
            raise UsageError(f"--lora {path} is given twice")
        loras.append((path, scale))
    return loras
