"""The built-in default run (config.trainer = "default", configs/default.py): two stages, one model.

    stage 1  the first stage (a KL autoencoder) on the data's images       -> workdir/autoencoder/
             its reconstruction grid (config.first_stage.sample_images)     -> autoencoder/samples/
             exported as a first-stage-only checkpoint                      -> workdir/first_stage/
    stage 2  the LDM ("ldm" task) on that frozen first stage, its text
             encoder trained jointly                                        -> workdir/ldm/
    then     the final model (EMA weights, measured scale_factor), orbax    -> workdir/model/
             and a grid of config.sample.prompts                            -> workdir/samples.png
             (also ldm/samples/samples_<step>.png, where the loop puts a stage's grids)

Each stage is the generic loop (`loop.run`) in its own folder, so a rerun of the same command
resumes the stage that was running and skips finished ones (their last checkpoint is at
num_steps). Stage 1 is the "autoencoder" task (autoencoder_task.py): config.first_stage.* holds
its batch, optimizer, loss, EMA and train settings; the rest of the config is stage 2's, and
config.model.spec.first_stage is stage 1's architecture.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np

from ldm_jax.images import make_grid, write_png
from ldm_jax.spec import ModelSpec, spec_from_dict, spec_to_dict
from ldm_jax.training import loop
from ldm_jax.training.autoencoder_task import AutoencoderTask
from ldm_jax.training.config_checks import check_config, check_stage, sampler_name
from ldm_jax.training.ldm_task import LDMTask

AUTOENCODER_DIR, FIRST_STAGE_DIR, LDM_DIR = "autoencoder", "first_stage", "ldm"
MODEL_DIR, GRID_NAME = "model", "samples.png"
DEFAULT_WORKDIR = "runs/default"
# what `python sample.py --prompt ...` prints when it finds no model (see ldm_jax/cli/sample.py)
SAMPLE_PROMPT = "a green triangle left of a yellow circle"


def stage_configs(config) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """(stage 1 config, stage 2 config): full configs for `loop.run`, one per stage."""
    if "first_stage" not in config:
        raise ValueError("config.trainer='default' needs a config.first_stage section (stage 1: "
                         "global_batch_size, optimizer, loss, train); see configs/default.py")
    first = copy.deepcopy(config)
    first.unlock()
    first.trainer = "autoencoder"
    stage = config.first_stage
    first.data.global_batch_size = int(stage.global_batch_size)
    first.optimizer = copy.deepcopy(stage.optimizer)
    first.train = copy.deepcopy(stage.train)
    first.loss = copy.deepcopy(stage.loss)
    first.ema.decay = float(stage.ema_decay)
    # originals over reconstructions, every first_stage.train.sample_every steps and at the end
    first.sample.num_images = int(stage.get("sample_images", 0))
    # the autoencoder task reads the first stage from a first-stage-only spec
    spec = spec_from_dict(_plain(config.model.spec))
    first.model.spec = ml_collections.ConfigDict(
        spec_to_dict(ModelSpec(first_stage=spec.first_stage))
    )
    second = copy.deepcopy(config)
    second.unlock()
    second.trainer = "ldm"
    return first, second


class DefaultRun:
    """`run(workdir)` trains both stages and writes the model; the train CLI
    (ldm_jax/cli/train.py) calls it for config.trainer = "default" instead of `loop.run`."""

    def __init__(self, config):
        self.config = config
        check_config(config)  # stage 2's settings fail here, not after stage 1 has trained
        self.first_config, self.ldm_config = stage_configs(config)
        for stage in (self.first_config, self.ldm_config):
            check_stage(stage)
        self.spec = spec_from_dict(_plain(config.model.spec))
        if self.spec.unet is None or self.spec.cond_stage is None:
            raise ValueError("the default run trains a text-to-image LDM: config.model.spec needs "
                             "a unet and a cond_stage")

    def run(self, workdir, *, stream=None) -> loop.RunResult:
        workdir = Path(workdir).absolute()
        out = stream or sys.stdout
        say = lambda text: print(text, file=out, flush=True)  # noqa: E731
        start = time.perf_counter()
        if is_complete(self.config, workdir):
            say(completion_message(self.config, workdir))
            return loop.RunResult(step=int(self.config.train.num_steps), preempted=False,
                                  metrics={})
        first_steps, ldm_steps = (int(c.train.num_steps) for c in (self.first_config,
                                                                     self.ldm_config))
        say(f"stage 1/2: autoencoder, {first_steps} steps -> {workdir / AUTOENCODER_DIR}")
        first_task = AutoencoderTask(self.first_config)
        first = loop.run(self.first_config, workdir / AUTOENCODER_DIR, first_task, stream=stream,
                         label="stage 1/2: autoencoder")
        if first.preempted:
            return first
        first_stage = self._export_first_stage(first_task, first.state, workdir / FIRST_STAGE_DIR)
        del first  # stage 1's state (optimizer, discriminator) leaves the devices
        say(f"stage 1 done ({time.perf_counter() - start:.0f} s): first stage "
            f"{workdir / FIRST_STAGE_DIR}")

        say(f"stage 2/2: text-to-image LDM, {ldm_steps} steps -> {workdir / LDM_DIR}")
        task = LDMTask(self.ldm_config)
        task.init_params = {"first_stage": first_stage}
        result = loop.run(self.ldm_config, workdir / LDM_DIR, task, stream=stream,
                          label="stage 2/2: ldm")
        if result.preempted:
            return result
        model = self._export_model(task, result.state, workdir / MODEL_DIR)
        stage_grid = workdir / LDM_DIR / "samples" / f"samples_{ldm_steps:08d}.png"
        grid, report = self._sample_grid(model, workdir / GRID_NAME, stage_grid)
        say(f"stage 2 done ({time.perf_counter() - start:.0f} s in all): model {model}, "
            f"samples {grid}")
        if report is not None:
            say(f"prompt adherence of the sample grid: {report.summary()}")
        say(next_steps(workdir, float(self.config.sample.guidance)))
        return result

    @staticmethod
    def _export_first_stage(task: AutoencoderTask, state, path: Path) -> dict:
        """Stage 1's final autoencoder params, also saved as a first-stage-only checkpoint."""
        checkpoint = task.first_stage_checkpoint(state)
        if jax.process_index() == 0:
            checkpoint.save_pretrained(path, format="orbax", overwrite=True)
        return checkpoint.params["first_stage"]

    @staticmethod
    def _export_model(task: LDMTask, state, path: Path) -> Path:
        """The final LatentDiffusionCheckpoint: frozen first stage + EMA of the trained networks,
        with the scale_factor the run measured."""
        checkpoint = task.ema_checkpoint(state)
        if jax.process_index() == 0:
            checkpoint.save_pretrained(path, format="orbax", overwrite=True)
        return path

    def _sample_grid(self, model: Path, path: Path, stage_grid: Path):
        """(grid path, adherence report or None): config.sample.prompts sampled from the saved
        model (read back, as sample.py would), tiled into a PNG at `path` and at `stage_grid` (stage
        2's samples/ folder: the grid of its EMA weights at the last step)."""
        if jax.process_index() != 0:
            return path, None
        from ldm_jax.sampling.pipeline import LatentDiffusionPipeline  # noqa: PLC0415

        sample = self.config.sample
        prompts = list(sample.prompts)
        n = max(int(sample.num_images), 1)
        prompts = [prompts[i % len(prompts)] for i in range(n)]
        pipe = LatentDiffusionPipeline.from_pretrained(model)
        images = np.asarray(pipe(prompts, num_inference_steps=int(sample.steps),
                                 guidance_scale=float(sample.guidance),
                                 sampler=sampler_name(sample.sampler),
                                 seed=int(self.config.seed), output_type="uint8").images)
        grid = make_grid(images)
        write_png(grid, stage_grid)
        write_png(grid, path)  # last: its presence marks the run complete
        return path, _adherence(images, prompts)


def _adherence(images, prompts):
    """Adherence of the grid's images when the prompts are shapes captions, else None."""
    from ldm_jax.eval import adherence  # noqa: PLC0415

    try:
        return adherence.score(images, prompts)
    except ValueError:  # not shapes captions (a custom config.sample.prompts)
        return None


def next_steps(workdir: Path, guidance: float) -> str:
    """The commands to run once the model is written (with the grid's guidance scale)."""
    model = Path(workdir) / MODEL_DIR
    default = (Path.cwd() / DEFAULT_WORKDIR / MODEL_DIR).absolute()
    if model.absolute() == default:  # sample.py's default checkpoint: no flag needed
        model, flag = Path(DEFAULT_WORKDIR) / MODEL_DIR, ""
    else:
        flag = f" --checkpoint {model}"
    return (f"next: python sample.py{flag} --prompt \"{SAMPLE_PROMPT}\" --guidance {guidance:g}"
            "  (the grid's guidance; sample.py's default, 7.5, is Stable Diffusion's)\n"
            f"      python -m ldm_jax.eval.adherence{flag} --guidance {guidance:g}"
            "  (prompt adherence on the test split)")


def is_complete(config, workdir) -> bool:
    """Both stages at their last step, the model exported and the grid written: a rerun has
    nothing to do (and must not re-export, re-sample or rewrite config.json)."""
    workdir = Path(workdir)
    first_steps = int(config.first_stage.train.num_steps)
    stage_1 = loop.newest_step(workdir / AUTOENCODER_DIR)
    return (stage_1 is not None and stage_1 >= first_steps
            and loop.is_complete(config, workdir / LDM_DIR)
            and (workdir / MODEL_DIR).is_dir() and (workdir / GRID_NAME).is_file())


def completion_message(config, workdir) -> str:
    workdir = Path(workdir)
    return (f"the run in {workdir} is already complete (both stages trained, model "
            f"{workdir / MODEL_DIR}); nothing to do. Use another --workdir for a new run")


def _plain(value):
    return value.to_dict() if hasattr(value, "to_dict") else value


def make_task(config) -> DefaultRun:
    return DefaultRun(config)
