"""The diffusers timestep settings (timestep_spacing, steps_offset, set_alpha_to_one) are part of
the model description: loaders fill them from the scheduler config (local folders and hub ids),
every export writes them back, and old spec JSON without them still loads."""

import dataclasses
import json
import shutil

import diffusers
import numpy as np
import pytest
import safetensors
from support.tiny_pipelines import sd_pipeline
from support.tiny_specs import SD1_LIKE, random_params

from ldm_jax.checkpoints import LatentDiffusionCheckpoint, load_checkpoint
from ldm_jax.checkpoints.compvis.export import SPEC_METADATA_KEY
from ldm_jax.checkpoints.errors import ArchitectureError, UnsupportedExportError
from ldm_jax.checkpoints.orbax import SPEC_FILE
from ldm_jax.diffusion.sampler_plans import sampler_plan
from ldm_jax.diffusion.timesteps import make_timesteps
from ldm_jax.sampling import LatentDiffusionPipeline
from ldm_jax.spec import DiffusionSpec, spec_from_dict, spec_to_dict

TIMESTEP_FIELDS = ("timestep_spacing", "steps_offset", "set_alpha_to_one")
TRAILING = dict(timestep_spacing="trailing", steps_offset=0, set_alpha_to_one=True)


def _settings(spec) -> dict:
    return {name: getattr(spec.diffusion, name) for name in TIMESTEP_FIELDS}


def _with_settings(spec, **settings):
    return dataclasses.replace(spec, diffusion=dataclasses.replace(spec.diffusion, **settings))


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd") / "pipeline"
    sd_pipeline().save_pretrained(folder)
    return folder


def _rewrite_scheduler(folder, scheduler_class=diffusers.DDIMScheduler, **settings):
    """The folder's scheduler config as diffusers itself writes it with `settings`."""
    source = diffusers.DDIMScheduler.from_pretrained(folder / "scheduler")
    scheduler_class.from_config(source.config, **settings).save_pretrained(folder / "scheduler")


# ------------------------------------------------------------------ the spec itself


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("steps_offset", True, "steps_offset must be an int >= 0"),
        ("steps_offset", -1, "steps_offset must be an int >= 0"),
        ("steps_offset", 1.0, "steps_offset must be an int >= 0"),
        ("steps_offset", "1", "steps_offset must be an int >= 0"),
        ("set_alpha_to_one", 1, "set_alpha_to_one must be True or False"),
        ("set_alpha_to_one", "true", "set_alpha_to_one must be True or False"),
        ("timestep_spacing", "even", "unknown timestep_spacing 'even'"),
    ],
)
def test_wrong_settings_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        DiffusionSpec(**{field: value})


def test_old_spec_json_without_the_settings_loads_with_the_defaults():
    data = spec_to_dict(SD1_LIKE)
    for name in TIMESTEP_FIELDS:
        del data["diffusion"][name]
    spec = spec_from_dict(json.loads(json.dumps(data)))
    assert _settings(spec) == dict(
        timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False
    )
    assert spec == SD1_LIKE


def test_spec_json_round_trips_the_settings():
    spec = _with_settings(SD1_LIKE, **TRAILING)
    assert spec_from_dict(json.loads(json.dumps(spec_to_dict(spec)))) == spec


# ------------------------------------------------------------------ diffusers folders


def test_folder_scheduler_settings_reach_the_spec(sd_folder, tmp_path):
    folder = shutil.copytree(sd_folder, tmp_path / "trailing")
    _rewrite_scheduler(folder, **TRAILING)
    assert _settings(load_checkpoint(folder).spec) == TRAILING
    _rewrite_scheduler(folder, timestep_spacing="linspace", steps_offset=3, set_alpha_to_one=False)
    assert _settings(load_checkpoint(folder).spec) == dict(
        timestep_spacing="linspace", steps_offset=3, set_alpha_to_one=False
    )


def test_sd_release_pndm_scheduler_config(sd_folder, tmp_path):
    folder = shutil.copytree(sd_folder, tmp_path / "pndm")
    _rewrite_scheduler(
        folder, diffusers.PNDMScheduler, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False
    )
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "PNDMScheduler"
    assert _settings(load_checkpoint(folder).spec) == dict(
        timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False
    )


def test_absent_keys_mean_what_diffusers_ddim_means(sd_folder, tmp_path):
    folder = shutil.copytree(sd_folder, tmp_path / "bare")
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    for name in TIMESTEP_FIELDS:
        config.pop(name)
    config_file.write_text(json.dumps(config))
    expected = {name: getattr(diffusers.DDIMScheduler().config, name) for name in TIMESTEP_FIELDS}
    assert expected == dict(timestep_spacing="leading", steps_offset=0, set_alpha_to_one=True)
    assert _settings(load_checkpoint(folder).spec) == expected


@pytest.mark.parametrize(
    "change, message",
    [
        ({"timestep_spacing": "uniform"}, r"timestep_spacing 'uniform': allowed \['leading'"),
        ({"steps_offset": "1"}, "steps_offset must be an int >= 0"),
        ({"set_alpha_to_one": None}, "set_alpha_to_one must be True or False"),
    ],
)
def test_bad_scheduler_settings_name_the_file(sd_folder, tmp_path, change, message):
    folder = shutil.copytree(sd_folder, tmp_path / "bad")
    config_file = folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | change))
    with pytest.raises(ArchitectureError, match=f"scheduler_config.json: .*{message}"):
        load_checkpoint(folder)


# ------------------------------------------------------------------ exports


def test_trailing_model_exports_and_reloads_as_trailing(tmp_path):
    spec = _with_settings(SD1_LIKE, **TRAILING)
    checkpoint = LatentDiffusionCheckpoint(spec, random_params(spec))
    folder = checkpoint.save_pretrained(tmp_path / "sd", format="diffusers")
    # the networks' configs come back canonicalised (see test_load_diffusers); the settings exactly
    assert LatentDiffusionCheckpoint.from_pretrained(folder).spec.diffusion == spec.diffusion
    scheduler = diffusers.DDIMScheduler.from_pretrained(folder / "scheduler")
    assert {name: scheduler.config[name] for name in TIMESTEP_FIELDS} == TRAILING
    scheduler.set_timesteps(7)  # diffusers visits the steps ldm_jax's rule gives for them
    np.testing.assert_array_equal(
        scheduler.timesteps.numpy(), make_timesteps(7, 1000, "trailing", 0)
    )


def test_compvis_only_spacing_is_refused_before_writing(tmp_path):
    spec = _with_settings(SD1_LIKE, timestep_spacing="quad")
    checkpoint = LatentDiffusionCheckpoint(spec, random_params(spec))
    with pytest.raises(UnsupportedExportError, match="no timestep_spacing 'quad'.*compvis"):
        checkpoint.save_pretrained(tmp_path / "sd", format="diffusers")
    assert not (tmp_path / "sd").exists()


def test_compvis_and_orbax_exports_keep_the_settings(tmp_path):
    spec = _with_settings(SD1_LIKE, timestep_spacing="linspace", steps_offset=2)
    checkpoint = LatentDiffusionCheckpoint(spec, random_params(spec))
    single = checkpoint.save_pretrained(tmp_path / "sd.safetensors", format="compvis")
    with safetensors.safe_open(str(single), "np") as f:
        embedded = spec_from_dict(json.loads(f.metadata()[SPEC_METADATA_KEY]))
    assert embedded == spec
    assert load_checkpoint(single).spec == spec

    orbax = checkpoint.save_pretrained(tmp_path / "orbax", format="orbax")
    assert load_checkpoint(orbax).spec == spec
    data = json.loads((orbax / SPEC_FILE).read_text())  # as written before the settings existed
    for name in TIMESTEP_FIELDS:
        del data["diffusion"][name]
    (orbax / SPEC_FILE).write_text(json.dumps(data))
    assert load_checkpoint(orbax).spec == SD1_LIKE


# ------------------------------------------------------------------ hub ids


def test_hub_id_scheduler_settings_reach_the_checkpoint(sd_folder, tmp_path, monkeypatch):
    """A hub id goes through the folder loader after download: here from a local hub cache,
    with the hub unreachable (offline mode and a dead endpoint)."""
    import huggingface_hub.constants

    cache = tmp_path / "hub-cache"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--org--name"
    snapshot = shutil.copytree(sd_folder, repo / "snapshots" / commit)
    _rewrite_scheduler(snapshot, **TRAILING)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name, value in (("HF_HUB_OFFLINE", "1"), ("HF_HUB_CACHE", str(cache))):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.chdir(tmp_path)  # no local folder named org/name

    checkpoint = LatentDiffusionCheckpoint.from_pretrained("org/name")
    assert _settings(checkpoint.spec) == TRAILING
    assert checkpoint.spec == load_checkpoint(snapshot).spec

    pipe = LatentDiffusionPipeline.from_pretrained("org/name")  # the sampler visits them
    assert _settings(pipe.spec) == TRAILING
    t_N = pipe.timesteps("ddim", 3)
    np.testing.assert_array_equal(t_N, make_timesteps(3, 1000, "trailing", 0))  # [999, 666, 332]
    plan = sampler_plan("ddim", pipe.spec.diffusion, 1000, 3)
    assert plan.prev_timesteps[-1] == -1  # set_alpha_to_one: the last step ends at abar = 1
