"""The Colab notebook's Python cells, run offline on a tiny model, so the notebook cannot rot."""

import json
import pathlib

from PIL import Image
from support.tiny_pipelines import sd_pipeline

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "ldm_jax_colab.ipynb"


def _python(cell) -> str:
    """The cell's source without IPython shell/magic lines (``!pip ...``, ``%...``)."""
    lines = "".join(cell["source"]).splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith(("!", "%")))


def test_notebook_samples_and_displays_the_grid(tmp_path):
    notebook = json.loads(NOTEBOOK.read_text())
    cells = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert any("!pip install" in "".join(cell["source"]) for cell in cells)
    (parameters,) = [c for c in cells if "parameters" in c["metadata"].get("tags", [])]

    folder = tmp_path / "tiny-sd"
    sd_pipeline().save_pretrained(folder)
    overrides = dict(
        CHECKPOINT=str(folder), N=2, STEPS=2, SAMPLER="ddim", HEIGHT=None, WIDTH=None,
        DTYPE="float32", OUT=str(tmp_path / "out"), COMPILATION_CACHE=None,
    )  # fmt: skip
    shown = []
    namespace = {"display": shown.append}  # IPython's builtin in Colab
    for index, cell in enumerate(cells):
        exec(compile(_python(cell), f"{NOTEBOOK.name}:code cell {index}", "exec"), namespace)
        if cell is parameters:
            assert set(overrides) <= set(namespace), "the parameters cell lost a variable"
            namespace.update(overrides)

    (grid,) = shown
    assert isinstance(grid, Image.Image) and grid.size == (32, 16)  # 2 images of 16x16, 1 row
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["00.png", "01.png", "grid.png"]
    assert Image.open(out / "grid.png").tobytes() == grid.tobytes()
