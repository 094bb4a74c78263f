"""Run a Colab notebook's code cells in order, as Colab's "Run all" does, outside Colab.

IPython shell and magic lines (``!pip ...``, ``%env ...``) are left out; the rest of each cell runs
unchanged. Colab's own names get stand-ins that record what they were given: ``display`` (an
IPython builtin) and ``google.colab.drive.mount``.

    python tests/support/notebook_runner.py NOTEBOOK RECORD_DIR

runs every cell in a fresh process (as a fresh Colab kernel would) and writes
RECORD_DIR/record.json (the cells run, their seconds, the Drive mounts with the cell that asked)
and displayed_<k>.png per displayed image.
"""

import contextlib
import importlib.abc
import importlib.util
import json
import sys
import time
import types
from pathlib import Path


def code_cells(notebook) -> list[dict]:
    cells = json.loads(Path(notebook).read_text())["cells"]
    return [cell for cell in cells if cell["cell_type"] == "code"]


def python_source(cell) -> str:
    """The cell's source without IPython shell/magic lines."""
    lines = "".join(cell["source"]).splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith(("!", "%")))


class Colab:
    """Stand-ins for what Colab provides, recording their calls; `cell` is the running cell."""

    def __init__(self):
        self.cell = None
        self.seconds: list[float] = []  # per cell run
        self.displayed: list = []
        self.mounts: list[tuple[int, str]] = []

    def display(self, obj) -> None:
        self.displayed.append(obj)

    def mount(self, mountpoint, *args, **kwargs) -> None:
        self.mounts.append((self.cell, str(mountpoint)))

    @contextlib.contextmanager
    def installed(self):
        """`google.colab` importable while a cell runs, and forgotten after it: jax's debugger
        takes any `google.colab` in sys.modules for Colab's own (and imports more of it)."""
        finder = _ColabFinder(self)
        sys.meta_path.append(finder)  # last: a real `google` package (protobuf's) is kept
        try:
            yield self
        finally:
            sys.meta_path.remove(finder)
            for name in ("google.colab", "google"):
                if getattr(sys.modules.get(name), "__loader__", None) is finder:
                    del sys.modules[name]


class _ColabFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, colab: Colab):
        self.colab = colab

    def find_spec(self, name, path=None, target=None):
        if name in ("google", "google.colab"):
            return importlib.util.spec_from_loader(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return None  # the default module

    def exec_module(self, module) -> None:
        if module.__name__ == "google.colab":
            module.drive = types.SimpleNamespace(mount=self.colab.mount)


def run(notebook, colab: Colab, namespace: dict | None = None) -> dict:
    """Execute every code cell in `namespace` (a fresh one by default); returns the namespace.
    An exception propagates from the cell that raised it (`colab.cell` says which)."""
    namespace = {} if namespace is None else namespace
    namespace.setdefault("display", colab.display)
    for index, cell in enumerate(code_cells(notebook)):
        colab.cell = index
        code = compile(python_source(cell), f"{Path(notebook).name}:code cell {index}", "exec")
        start = time.perf_counter()
        with colab.installed():
            exec(code, namespace)
        colab.seconds.append(round(time.perf_counter() - start, 2))
    return namespace


def main(notebook, record_dir) -> None:
    colab, record_dir = Colab(), Path(record_dir)
    run(notebook, colab)
    for k, image in enumerate(colab.displayed):
        image.save(record_dir / f"displayed_{k}.png")
    displayed = len(colab.displayed)
    record = {"cells_run": colab.cell + 1, "mounts": colab.mounts, "displayed": displayed}
    record["seconds"] = colab.seconds
    (record_dir / "record.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(*sys.argv[1:])
