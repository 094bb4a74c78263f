"""The Colab notebook as shipped, run top to bottom offline (its parameter values unchanged; only
the `!pip` line is left out): the default hub id is served from a tiny model in a local hub cache,
Drive is a stand-in, and LDM_JAX_ALLOW_CPU=1 lets it sample on this CPU."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from support import notebook_runner
from support.hf_cache import add_to_hub_cache
from support.tiny_pipelines import sd_pipeline

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "ldm_jax_colab.ipynb"
HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SAMPLE_SIZE = 16  # the tiny model's images (8x8 latents, VAE factor 2)


def _cells():
    return notebook_runner.code_cells(NOTEBOOK)


def _index(text: str) -> int:
    """The index of the one code cell with a line that starts with `text`."""
    lines = ["".join(cell["source"]).splitlines() for cell in _cells()]
    (index,) = [i for i, cell in enumerate(lines) if any(s.startswith(text) for s in cell)]
    return index


def _parameters() -> dict:
    (cell,) = [c for c in _cells() if "parameters" in c["metadata"].get("tags", [])]
    namespace = {}
    exec(notebook_runner.python_source(cell), namespace)
    return namespace


def test_shipped_parameters_are_colabs():
    p = _parameters()
    assert p["CHECKPOINT"] == HUB_ID  # the test below serves exactly this id
    assert p["LDM_JAX_SOURCE"].startswith("/content/drive/")  # so Drive is mounted before pip
    assert (p["N"], p["STEPS"], p["SAMPLER"], p["GUIDANCE"], p["SEED"]) == (
        4, 25, "dpm++_2m_karras", 7.5, None
    )  # fmt: skip
    assert p["DTYPE"] is None  # picked by the device


def test_notebook_runs_as_shipped(tmp_path):
    folder = tmp_path / "tiny-sd"
    sd_pipeline().save_pretrained(folder)
    hub_cache = tmp_path / "hf" / "hub"
    add_to_hub_cache(hub_cache, HUB_ID, folder)
    content, record = tmp_path / "content", tmp_path / "record"  # Colab's working folder: /content
    content.mkdir()
    record.mkdir()
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(hub_cache))
    env.update(HF_HUB_OFFLINE="1", LDM_JAX_ALLOW_CPU="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    runner = [sys.executable, notebook_runner.__file__, str(NOTEBOOK), str(record)]
    done = subprocess.run(runner, cwd=content, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]

    ran = json.loads((record / "record.json").read_text())
    assert ran["cells_run"] == len(_cells())
    # the default source is on Drive: mounted once, by a cell before the one that runs pip
    ((mount_cell, mountpoint),) = ran["mounts"]
    assert mountpoint == "/content/drive" and mount_cell < _index("!pip install")
    assert "dtype float32" in done.stdout  # CPU, allowed by LDM_JAX_ALLOW_CPU

    p = _parameters()
    out = content / p["OUT"]
    grid = Image.open(out / "grid.png")
    settings = json.loads(grid.text["parameters"])
    seeds = settings.pop("seed")
    assert len(seeds) == p["N"] and len(set(seeds)) == p["N"]  # SEED None: a fresh seed each
    assert settings["checkpoint"] == HUB_ID and settings["steps"] == p["STEPS"]
    assert settings["sampler"] == p["SAMPLER"] and settings["prompt"] == p["PROMPT"]
    assert sorted(x.name for x in out.iterdir()) == sorted(
        ["grid.png", *(f"seed_{s}.png" for s in seeds)]
    )
    for seed in seeds:  # each image's own seed in its metadata
        image = Image.open(out / f"seed_{seed}.png")
        assert image.size == (SAMPLE_SIZE, SAMPLE_SIZE)
        assert json.loads(image.text["parameters"]) == {**settings, "seed": seed}
    cols = math.ceil(math.sqrt(p["N"]))
    assert grid.size == (cols * SAMPLE_SIZE, math.ceil(p["N"] / cols) * SAMPLE_SIZE)
    assert ran["displayed"] == 1
    assert Image.open(record / "displayed_0.png").tobytes() == grid.tobytes()


def _run_until_it_stops(monkeypatch, tmp_path):
    """Run the cells on this CPU without LDM_JAX_ALLOW_CPU: (error, namespace, cell index)."""
    monkeypatch.delenv("LDM_JAX_ALLOW_CPU", raising=False)
    monkeypatch.chdir(tmp_path)
    colab, namespace = notebook_runner.Colab(), {}
    with pytest.raises(RuntimeError) as error:
        notebook_runner.run(NOTEBOOK, colab, namespace)
    return str(error.value), namespace, colab.cell


def test_cpu_runtime_stops_before_the_download_with_how_to_fix(monkeypatch, tmp_path):
    message, namespace, cell = _run_until_it_stops(monkeypatch, tmp_path)
    assert "JAX found no GPU or TPU" in message
    assert "Runtime → Change runtime type" in message and "LDM_JAX_ALLOW_CPU=1" in message
    assert cell == _index("def pick_dtype") < _index("pipe = ")
    assert "pipe" not in namespace


@pytest.mark.parametrize(
    "platform, capability, dtype",
    [
        ("tpu", None, "bfloat16"),
        ("gpu", "8.0", "bfloat16"),  # A100
        ("gpu", "8.9", "bfloat16"),  # L4
        ("gpu", "9.0", "bfloat16"),  # H100
        ("gpu", "7.5", "float16"),  # T4: no bfloat16
        ("gpu", "7.0", "float16"),  # V100
        ("cpu", None, "float32"),
    ],
)
def test_dtype_follows_the_device(platform, capability, dtype, monkeypatch, tmp_path):
    _, namespace, _ = _run_until_it_stops(monkeypatch, tmp_path)
    device = SimpleNamespace(platform=platform, device_kind="fake")
    if capability is not None:  # jax's CUDA devices have it
        device.compute_capability = capability
    assert namespace["pick_dtype"](device) == dtype
