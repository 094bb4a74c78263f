"""Destinations: overwrite replaces only a checkpoint of the same kind, never the source; the final
move cannot replace what appeared meanwhile; killed writes' temporaries are cleaned up."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import safetensors.numpy
from support.tiny_specs import SD1_LIKE, UNCONDITIONAL_VQ, random_params

from ldm_jax import atomic
from ldm_jax.atomic import DestinationExistsError, DestinationOverlapsSourceError, atomic_output
from ldm_jax.checkpoints import LatentDiffusionCheckpoint, load_checkpoint, save_checkpoint
from ldm_jax.checkpoints.compvis.checkpoint_table import compvis_checkpoint_table
from ldm_jax.checkpoints.compvis.export import COMPVIS_FILE
from ldm_jax.checkpoints.diffusers.export import DIFFUSERS_FOLDER


@pytest.fixture(scope="module")
def checkpoint():
    return LatentDiffusionCheckpoint(UNCONDITIONAL_VQ, random_params(UNCONDITIONAL_VQ))


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _project(root):
    (root / "src").mkdir(parents=True)
    (root / "src" / "main.py").write_text("print('mine')")
    return root


# --- overwrite replaces only the same kind ---------------------------------------------------


def test_overwrite_keeps_an_unrelated_folder(tmp_path, checkpoint):
    project = _project(tmp_path / "myproject")
    with pytest.raises(DestinationExistsError) as error:
        checkpoint.save_pretrained(project, format="diffusers", overwrite=True)
    message = str(error.value)
    assert "src/" in message and "model_index.json" in message, message  # what is, what may be
    assert (project / "src" / "main.py").read_text() == "print('mine')"
    assert _tree(tmp_path) == ["myproject", "myproject/src", "myproject/src/main.py"]


@pytest.mark.parametrize(
    ("written", "there"),
    [("orbax", "diffusers"), ("diffusers", "orbax"), ("orbax", "file"), ("compvis", "folder")],
)
def test_overwrite_keeps_a_destination_of_another_kind(tmp_path, checkpoint, written, there):
    destination = tmp_path / ("dst.safetensors" if written == "compvis" else "dst")
    if there == "file":
        destination.write_bytes(b"mine")
    elif there == "folder":
        destination.mkdir()
        (destination / "notes.txt").write_text("mine")
    else:
        checkpoint.save_pretrained(destination, format=there)
    before = _tree(tmp_path)
    with pytest.raises(DestinationExistsError, match="overwrite replaces only"):
        checkpoint.save_pretrained(destination, format=written, overwrite=True)
    assert _tree(tmp_path) == before


def test_overwrite_replaces_the_same_kind_and_empty_folders(tmp_path, checkpoint):
    checkpoint.save_pretrained(tmp_path / "sd", format="diffusers")
    (tmp_path / "sd" / "stale.txt").write_text("from the old export")
    checkpoint.save_pretrained(tmp_path / "sd", format="diffusers", overwrite=True)
    assert not (tmp_path / "sd" / "stale.txt").exists()
    (tmp_path / "empty").mkdir()
    checkpoint.save_pretrained(tmp_path / "empty", format="orbax", overwrite=True)
    assert (tmp_path / "empty" / "ldm_spec.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "sd"]  # no temporaries left


def test_default_kind_replaces_files_and_empty_folders_only(tmp_path):
    (tmp_path / "a.txt").write_text("old")
    with atomic_output(tmp_path / "a.txt", overwrite=True) as temporary:
        temporary.write_text("new")
    assert (tmp_path / "a.txt").read_text() == "new"
    _project(tmp_path / "proj")
    with pytest.raises(DestinationExistsError, match="a file, or an empty folder"):
        with atomic_output(tmp_path / "proj", overwrite=True) as temporary:
            temporary.mkdir()
    assert (tmp_path / "proj" / "src" / "main.py").exists()
    with pytest.raises(DestinationExistsError, match="a folder"):  # a file never replaces a folder
        with atomic_output(tmp_path / "proj", overwrite=True) as temporary:
            temporary.write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "proj"]


# --- the source is never the destination ----------------------------------------------------


@pytest.fixture(scope="module")
def compvis_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("source") / "model.safetensors"
    params = random_params(SD1_LIKE)
    safetensors.numpy.save_file(compvis_checkpoint_table(SD1_LIKE).to_torch(params), str(path))
    return path


def test_convert_refuses_the_folder_holding_its_source(tmp_path, compvis_file):
    project = tmp_path / "proj"
    project.mkdir()
    source = project / "model.safetensors"
    source.write_bytes(compvis_file.read_bytes())
    result = subprocess.run(
        [sys.executable, "-m", "ldm_jax.convert", str(source), str(project), "--to", "orbax",
         "--overwrite"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "contains" in lines[0], lines
    assert source.read_bytes() == compvis_file.read_bytes()
    assert _tree(tmp_path) == ["proj", "proj/model.safetensors"]


def test_convert_checks_the_destination_before_reading_the_source(tmp_path, compvis_file):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(compvis_file.read_bytes()[:-1000])  # reading it would fail
    project = _project(tmp_path / "proj")
    result = subprocess.run(
        [sys.executable, "-m", "ldm_jax.convert", str(truncated), str(project), "--to",
         "diffusers", "--overwrite"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert "src/" in result.stderr and "model_index.json" in result.stderr, result.stderr
    assert _tree(project) == ["src", "src/main.py"]


def test_a_loaded_checkpoint_never_replaces_its_source(tmp_path, checkpoint):
    checkpoint.save_pretrained(tmp_path / "sd", format="diffusers")
    loaded = load_checkpoint(tmp_path / "sd")
    before = _tree(tmp_path)
    with pytest.raises(DestinationOverlapsSourceError, match="is "):
        loaded.save_pretrained(tmp_path / "sd", format="diffusers", overwrite=True)
    with pytest.raises(DestinationOverlapsSourceError, match="lies inside"):
        loaded.save_pretrained(tmp_path / "sd" / "as-orbax", format="orbax")
    assert _tree(tmp_path) == before


def test_protect_resolves_links_and_relative_paths(tmp_path, monkeypatch, compvis_file):
    loaded = load_checkpoint(compvis_file)
    monkeypatch.chdir(compvis_file.parent)
    link = tmp_path / "link.safetensors"
    link.symlink_to(compvis_file)
    with pytest.raises(DestinationOverlapsSourceError, match=" is "):
        save_checkpoint(loaded, link, format="compvis", overwrite=True)
    relative = "../" + compvis_file.parent.name
    with pytest.raises(DestinationOverlapsSourceError, match="contains"):
        save_checkpoint(loaded, relative, format="orbax", overwrite=True)
    folder_link = tmp_path / "folder"
    folder_link.symlink_to(compvis_file.parent)
    with pytest.raises(DestinationOverlapsSourceError, match="contains"):  # relative protect
        with atomic_output(folder_link, overwrite=True, protect=["model.safetensors"]) as path:
            path.mkdir()
    assert link.resolve() == compvis_file and folder_link.resolve() == compvis_file.parent
    assert sorted(p.name for p in compvis_file.parent.iterdir()) == ["model.safetensors"]


# --- the final move cannot replace what appeared meanwhile ----------------------------------


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "fallback"])
@pytest.mark.parametrize("output", ["file", "folder"])
def test_a_destination_created_meanwhile_is_kept(tmp_path, monkeypatch, renameat2, output):
    if not renameat2:
        monkeypatch.setattr(atomic, "_libc_renameat2", lambda: None)
        monkeypatch.setattr(atomic.os, "link", _no_hard_links)
    destination = tmp_path / "out"
    with pytest.raises(DestinationExistsError, match="already exists"):
        with atomic_output(destination) as temporary:
            temporary.mkdir() if output == "folder" else temporary.write_text("ours")
            destination.write_text("another process")
    assert destination.read_text() == "another process"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def _no_hard_links(*args, **kwargs):
    raise PermissionError(1, "Operation not permitted")


def test_an_unrelated_folder_created_meanwhile_is_kept_even_with_overwrite(tmp_path):
    destination = tmp_path / "sd"
    with pytest.raises(DestinationExistsError, match="model_index.json"):
        with atomic_output(destination, overwrite=True, replaceable=DIFFUSERS_FOLDER) as folder:
            folder.mkdir()
            _project(destination)
    assert _tree(tmp_path) == ["sd", "sd/src", "sd/src/main.py"]


def test_a_file_is_overwritten_in_one_replace(tmp_path, monkeypatch):
    destination = tmp_path / "sd.safetensors"
    destination.write_text("old")
    moves = []

    def spy(real):
        def move(source, target, *args, **kwargs):
            moves.append(os.path.lexists(destination))  # did the destination still exist?
            return real(source, target, *args, **kwargs)

        return move

    monkeypatch.setattr(atomic.os, "replace", spy(os.replace))
    monkeypatch.setattr(atomic.os, "rename", spy(os.rename))
    with atomic_output(destination, overwrite=True, replaceable=COMPVIS_FILE) as temporary:
        temporary.write_text("new")
    assert moves == [True] and destination.read_text() == "new"


def test_folder_swap_without_renameat2_puts_the_old_one_back_on_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_libc_renameat2", lambda: None)
    destination = tmp_path / "sd"
    (destination / "unet").mkdir(parents=True)
    (destination / "model_index.json").write_text("{}")
    real_move = atomic._move_noreplace

    def failing_move(source, target, is_folder):
        if ".tmp-" in source.name and not os.path.lexists(target):  # moving in, old one aside
            raise OSError(5, "I/O error")
        return real_move(source, target, is_folder)

    monkeypatch.setattr(atomic, "_move_noreplace", failing_move)
    with pytest.raises(OSError, match="I/O error"):
        with atomic_output(destination, overwrite=True, replaceable=DIFFUSERS_FOLDER) as folder:
            folder.mkdir()
            (folder / "model_index.json").write_text('{"new": 1}')
    assert (destination / "model_index.json").read_text() == "{}"
    assert _tree(tmp_path) == ["sd", "sd/model_index.json", "sd/unet"]
    monkeypatch.setattr(atomic, "_move_noreplace", real_move)  # and without the failure: swapped
    with atomic_output(destination, overwrite=True, replaceable=DIFFUSERS_FOLDER) as folder:
        folder.mkdir()
        (folder / "model_index.json").write_text('{"new": 1}')
    assert _tree(tmp_path) == ["sd", "sd/model_index.json"]


def test_folder_swap_without_renameat2_never_loses_the_old_one_in_a_race(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_libc_renameat2", lambda: None)
    destination = tmp_path / "sd"
    destination.mkdir()
    (destination / "model_index.json").write_text("{}")
    real_rename = os.rename

    def rename_then_race(source, target):
        real_rename(source, target)
        if ".old-" in os.fspath(target):  # moved aside: another process takes the name now
            _project(destination)

    monkeypatch.setattr(atomic.os, "rename", rename_then_race)
    with pytest.raises(DestinationExistsError, match="is kept at"):
        with atomic_output(destination, overwrite=True, replaceable=DIFFUSERS_FOLDER) as folder:
            folder.mkdir()
    (kept,) = tmp_path.glob("sd.previous-*")
    assert (kept / "model_index.json").read_text() == "{}"
    assert _tree(destination) == ["src", "src/main.py"]
    assert len(list(tmp_path.iterdir())) == 2


# --- temporaries of killed writes -------------------------------------------------------------


def _dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_killed_writes_are_cleaned_up_by_the_next_write(tmp_path):
    destination = tmp_path / "sd.safetensors"
    script = textwrap.dedent(f"""
        import os, signal
        from ldm_jax.atomic import atomic_output
        with atomic_output({str(destination)!r}) as temporary:
            temporary.write_bytes(bytes(1000))
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = subprocess.run([sys.executable, "-c", script], timeout=60)
    assert result.returncode == -signal.SIGKILL
    (leftover,) = tmp_path.iterdir()
    assert leftover.name.startswith(".sd.safetensors.tmp-")
    with atomic_output(destination) as temporary:
        temporary.write_bytes(b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["sd.safetensors"]


def test_cleanup_spares_live_writers_other_names_and_the_only_old_copy(tmp_path):
    host, dead, alive = atomic._HOST, _dead_pid(), os.getppid()
    names = {
        f".out.tmp-{host}-{dead}-0123abcd": False,  # removed: its writer is gone
        f".out.tmp-{host}-{alive}-0123abcd": True,  # a live writer's
        f".out.old-{host}-{dead}-0123abcd": True,  # kept while out/ is missing: maybe the only copy
        f".other.tmp-{host}-{dead}-0123abcd": True,  # another destination's
        f".out.tmp-{dead}": True,  # not our pattern
        f".out.tmp-ffffff-{dead}-0123abcd": True,  # another host's (pid unknown here)
    }
    for name in names:
        (tmp_path / name).write_text("x")
    with atomic_output(tmp_path / "out") as temporary:
        temporary.mkdir()
    expected = sorted([*(n for n, kept in names.items() if kept), "out"])
    assert sorted(p.name for p in tmp_path.iterdir()) == expected
    with atomic_output(tmp_path / "out", overwrite=True) as temporary:  # now out/ exists
        temporary.mkdir()
    assert f".out.old-{host}-{dead}-0123abcd" not in {p.name for p in tmp_path.iterdir()}
