"""sample.py --refiner (ldm_jax/cli/refiner.py): the SDXL base -> refiner hand-off from the shell
writes what the two-stage Python API gives (denoising_end / denoising_start, same seeds), says so
in each PNG, and refuses every misuse with one error (exit 2, nothing written) before any model
loads -- or, for what only the weights tell, before anything compiles. Tiny random diffusers
folders."""

import json
import math

import numpy as np
import pytest
import safetensors.numpy
from PIL import Image
from support.tiny_pipelines import (
    sd_pipeline,
    sdxl_pipeline,
    sdxl_refiner_pipeline,
)

from ldm_jax.checkpoints import load_checkpoint
from ldm_jax.checkpoints.compvis import detect
from ldm_jax.checkpoints.orbax import SPEC_FILE
from ldm_jax.cli import common, refiner
from ldm_jax.cli import sample as sampling_cli
from ldm_jax.diffusion import sampler_plans
from ldm_jax.sampling.pipeline import LatentDiffusionPipeline
from ldm_jax.spec import spec_to_dict

PROMPT, NEGATIVE = "a photo of a cat", "blurry"
RUN = dict(num_inference_steps=5, guidance_scale=5.0, sampler="euler_ancestral")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-refiner-cli")
    sdxl_pipeline().save_pretrained(root / "base")
    sdxl_refiner_pipeline().save_pretrained(root / "refiner")
    sd_pipeline().save_pretrained(root / "sd")
    (root / "image.png").write_bytes(b"")  # an existing file for --init-image
    yield root
    common.release_pipeline("model")  # no tiny pipelines left in the caches for later tests
    common.release_pipeline("refiner")


def _run(argv, capsys):
    code = sampling_cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("error:")], err


def _hand_off_argv(folders, out, *extra):
    return ["--checkpoint", folders / "base", "--refiner", folders / "refiner",
            "--refiner-start", "0.7", "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
            "--steps", "5", "--guidance", "5", "--sampler", "euler_ancestral", "--n", "2",
            "--seed", "3", "--aesthetic-score", "7", "--no-progress", "--out", out,
            *extra]  # fmt: skip


def test_cli_writes_the_two_stage_api_images(folders, tmp_path, capsys):
    """A stochastic sampler (fresh noise every step, drawn from each image's seed) so the seeds
    must reach both stages; the refiner's aesthetic score and the fraction too."""
    out = tmp_path / "out"
    code, errors, err = _run(_hand_off_argv(folders, out), capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["00.png", "01.png", "grid.png"]
    written = [np.asarray(Image.open(out / f"0{i}.png")) for i in range(2)]

    # the pipelines the CLI cached: the same objects a notebook would get again
    base = common.load_pipeline(str(folders / "base"))
    ref = common.load_pipeline(str(folders / "refiner"), slot="refiner")
    assert base is not ref and refiner.spec_kind(ref.spec) == "refiner"
    steps = []
    latents = base(PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=2, seed=3,
                   denoising_end=0.7, output_type="latent",
                   callback_on_step_end=lambda i, t, x: steps.append(t), **RUN)  # fmt: skip
    images = ref(PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=2, seed=3,
                 image=latents.images, denoising_start=0.7, aesthetic_score=7.0,
                 output_type="uint8", callback_on_step_end=lambda i, t, x: steps.append(t),
                 **RUN).images  # fmt: skip
    assert steps == [801, 601, 401, 201, 1]  # base t >= 300, refiner below
    for i in range(2):
        assert np.array_equal(written[i], images[i]), np.abs(written[i] - images[i]).max()

    for i in range(2):
        meta = json.loads(Image.open(out / f"0{i}.png").info["parameters"])
        assert meta["checkpoint"] == str(folders / "base")
        assert meta["refiner"] == str(folders / "refiner")
        assert meta["refiner_start"] == 0.7
        assert meta["aesthetic_score"] == 7.0
        assert meta["seed"] == 3 + i and meta["sampler"] == "euler_ancestral"
    assert json.loads(Image.open(out / "grid.png").info["parameters"])["seeds"] == [3, 4]


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails the test: the errors must come before."""

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(sampling_cli, "load_pipeline", load)
    monkeypatch.setattr(refiner, "load_pipeline", load)


def _replace(argv, flag, value):
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


BEFORE_LOADING = {
    "non-SDXL refiner": (
        lambda a, f: _replace(a, "--refiner", f / "sd"),
        "--refiner {sd} is not an SDXL model; it must be an SDXL refiner or base",
    ),
    "non-SDXL base": (
        lambda a, f: _replace(a, "--checkpoint", f / "sd"),
        "--refiner needs an SDXL base (text-to-image) as --checkpoint; {sd} is not an SDXL",
    ),
    "swapped": (
        lambda a, f: _replace(_replace(a, "--checkpoint", f / "refiner"), "--refiner", f / "base"),
        "--checkpoint {refiner} is an SDXL refiner; with --refiner the --checkpoint is the SDXL "
        "base that runs first (swap them?)",
    ),
    "base as refiner with an aesthetic score": (
        lambda a, f: _replace(a, "--refiner", f / "base"),
        "--aesthetic-score applies to an SDXL refiner; --refiner {base} is an SDXL base",
    ),
    "start 1": (
        lambda a, f: _replace(a, "--refiner-start", "1"),
        "--refiner-start must be in (0, 1) (the base's fraction of the schedule), got 1.0",
    ),
    "start 0": (lambda a, f: _replace(a, "--refiner-start", "0"), "got 0.0"),
    "start nan": (lambda a, f: _replace(a, "--refiner-start", "nan"), "got nan"),
    "start without refiner": (
        lambda a, f: a[:2] + a[4:],
        "--refiner-start needs --refiner (the checkpoint that takes over)",
    ),
    "sampler that cannot resume": (
        lambda a, f: _replace(a, "--sampler", "plms"),
        "--refiner needs a sampler that can resume mid-schedule, one of ddim, ddpm, "
        "dpm_solver, dpm++_2m_karras, dpm++_2m_sde, dpm++_2m_sde_karras, euler, euler_karras, "
        "euler_ancestral, heun, unipc; not plms",
    ),
    "sampler that cannot resume (alias)": (
        lambda a, f: _replace(a, "--sampler", "PNDMScheduler"),
        "not PNDMScheduler",
    ),
    "img2img": (
        lambda a, f: [*a, "--init-image", f / "image.png"],
        "--init-image does not apply with --refiner: the base -> refiner hand-off is "
        "text-to-image (--prompt)",
    ),
    "no prompt": (
        lambda a, f: a[:6] + a[8:],
        '--refiner needs --prompt (SDXL is text-to-image), e.g. --prompt "a cat"',
    ),
    "missing refiner": (
        lambda a, f: _replace(a, "--refiner", f / "nothing"),
        "checkpoint '{nothing}' not found: --refiner takes a diffusers folder",
    ),
}


@pytest.mark.parametrize("case", list(BEFORE_LOADING))
def test_bad_input_is_refused_before_any_model_loads(case, folders, tmp_path, capsys, no_loading):
    edit, message = BEFORE_LOADING[case]
    out = tmp_path / "out"
    argv = edit(_hand_off_argv(folders, out), folders)
    code, errors, err = _run(argv, capsys)
    names = {k: folders / k for k in ("sd", "base", "refiner", "nothing")}
    assert code == 2 and len(errors) == 1, err
    assert message.format(**names) in errors[0]
    assert not out.exists()


def test_what_only_the_weights_tell_is_refused_before_compiling(folders, tmp_path, capsys,
                                                                monkeypatch):  # fmt: skip
    """Too few steps for both stages: the timesteps come from the checkpoint's scheduler."""

    def compile_fails(*args, **kwargs):
        raise AssertionError("sampling started")

    monkeypatch.setattr(LatentDiffusionPipeline, "__call__", compile_fails)
    out = tmp_path / "out"
    argv = _replace(_replace(_hand_off_argv(folders, out), "--steps", "1"), "--refiner-start",
                    "0.9")  # fmt: skip
    code, errors, err = _run(argv, capsys)
    assert code == 2 and len(errors) == 1, err
    assert errors[0] == (
        "error: --refiner-start 0.9 with --steps 1 leaves the base none of the steps "
        "(timesteps [1.0]): change --refiner-start or raise --steps"
    )
    assert not out.exists()


def test_config_peek_agrees_with_the_loaded_models(folders, tmp_path):
    """sdxl_kind reads configs and headers only (diffusers folder, orbax folder, SGM single
    file); its answer is the loaded spec's, its single-file keys the loader's."""
    assert refiner.sdxl_kind(str(folders / "sd")) == "not_sdxl"
    assert refiner.spec_kind(load_checkpoint(folders / "sd").spec) == "not_sdxl"
    for name, slot in (("base", "model"), ("refiner", "refiner")):
        pipe = common.load_pipeline(str(folders / name), slot=slot)  # cached by the first test
        assert refiner.spec_kind(pipe.spec) == name
        assert refiner.sdxl_kind(str(folders / name)) == name
        orbax = tmp_path / f"{name}-orbax"  # its spec, as save_orbax writes it
        orbax.mkdir()
        (orbax / SPEC_FILE).write_text(json.dumps(spec_to_dict(pipe.spec)))
        assert refiner.sdxl_kind(str(orbax)) == name
    # SGM single files: the keys ldm_jax.checkpoints.compvis.detect tells them by
    assert refiner._SGM == detect.SGM_EMBEDDERS_PREFIX
    assert refiner._SGM_CLIP.startswith(detect.SGM_CLIP_KEYS)
    unet_in = refiner._UNET_IN
    files = {
        "base": {refiner._SGM_CLIP: (8, 4), detect.SGM_OPENCLIP_KEYS[0] + "x": (1,),
                 unet_in: (32, 4, 3, 3)},
        "refiner": {detect.SGM_OPENCLIP_KEYS[1] + "x": (1,), unet_in: (32, 4, 3, 3)},
        "sdxl_other": {refiner._SGM_CLIP: (8, 4), unet_in: (32, 9, 3, 3)},  # inpainting
        "not_sdxl": {detect.CLIP_KEYS + "x": (1,), unet_in: (32, 4, 3, 3)},
    }  # fmt: skip
    for kind, shapes in files.items():
        path = tmp_path / f"{kind}.safetensors"
        safetensors.numpy.save_file({k: np.zeros(v, np.float16) for k, v in shapes.items()}, path)
        assert refiner.sdxl_kind(str(path)) == kind
    assert refiner.sdxl_kind("org/name") is None  # a hub id: checked once loaded
    assert refiner.sdxl_kind(str(folders / "image.png")) is None


def test_window_samplers_match_the_pipeline():
    assert refiner.WINDOW_MODULES == sampler_plans.WINDOW_MODULES
    assert math.isclose(refiner.DEFAULT_START, 0.8)


def test_base_as_its_own_refiner_is_one_pipeline(folders, tmp_path):
    """--refiner naming the --checkpoint (diffusers allows the base as refiner): no second
    load; the steps split as the pipeline cuts them."""
    argv = ["--checkpoint", folders / "base", "--refiner", folders / "base", "--refiner-start",
            "0.7", "--prompt", "a cat", "--steps", "5", "--out", tmp_path / "out"]  # fmt: skip
    args = sampling_cli.build_parser().parse_args([str(a) for a in argv])
    sampling_cli.check_args(args)
    base = common.load_pipeline(str(folders / "base"))
    hand_off = refiner.load_refiner(args, base)
    assert hand_off.refiner is base
    assert (hand_off.base_steps, hand_off.refiner_steps) == (3, 2)  # t >= 300: 801, 601, 401


def test_the_refiner_has_its_own_cache_slot(folders, tmp_path, capsys, monkeypatch):
    """The refiner is kept beside the base (a notebook's next hand-off reloads neither), and a
    command without --refiner lets it go."""
    common.load_pipeline(str(folders / "refiner"), slot="refiner")  # kept from the first test
    assert common._cached_refiner.cache_info().currsize == 1
    argv = ["--checkpoint", folders / "base", "--prompt", "a cat", "--aesthetic-score", "6",
            "--steps", "2", "--no-progress", "--out", tmp_path / "out"]  # fmt: skip
    code, errors, err = _run(argv, capsys)  # refused by the base pipeline, before compiling
    assert code == 2 and "--aesthetic-score does not apply" in errors[0], err
    assert common._cached_refiner.cache_info().currsize == 0

    loads = []

    def from_pretrained(path, **kwargs):
        loads.append(path)
        return object()

    monkeypatch.setattr(LatentDiffusionPipeline, "from_pretrained", from_pretrained)
    common.release_pipeline("model")
    try:
        first = common.load_pipeline("model")
        assert common.load_pipeline("model", slot="refiner") is not first
        assert common.load_pipeline("model") is first  # both kept
        common.release_pipeline("refiner")
        common.load_pipeline("model", slot="refiner")
        assert loads == ["model"] * 3
    finally:
        common.release_pipeline("model")
        common.release_pipeline("refiner")
