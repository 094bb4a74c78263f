"""What a training run shows: the bar (stage label, loss, ETA clock from the end of the first,
compiling step), log lines written through the bar, no MFU noise on CPU, and only the stage-1
metrics the config makes meaningful (metrics.jsonl keeps them all)."""

import io
import re
from pathlib import Path

import pytest
from support import toy_regression_config
from support.toy_task import TOY_TASKS

from ldm_jax.models.autoencoder import AutoencoderConfig
from ldm_jax.spec import ModelSpec, spec_to_dict
from ldm_jax.training import autoencoder_task, loop, metrics, tasks
from ldm_jax.training.autoencoder_loss import AutoencoderLossConfig
from ldm_jax.training.config_overrides import load_config
from ldm_jax.training.default_task import stage_configs

DEFAULT = Path(__file__).resolve().parents[1] / "configs" / "default.py"


def toy_config(**train):
    config = load_config(toy_regression_config.PATH)
    config.train.update(dict(num_steps=5, log_every=1, checkpoint_every=0, progress_bar=True,
                             async_checkpointing=False))
    config.train.update(train)
    return config


class FakeBars:
    """Stands in for tqdm: records every bar and, in order, what happened to the bars."""

    def __init__(self):
        self.bars, self.events = [], []

    def __call__(self, **kwargs):
        bar = _FakeBar(self, kwargs)
        self.bars.append(bar)
        self.events.append(("open", kwargs["desc"]))
        return bar


class _FakeBar:
    def __init__(self, owner, kwargs):
        self.owner, self.kwargs = owner, kwargs
        self.n, self.postfix, self.lines = kwargs["initial"], {}, []

    def update(self, n=1):
        self.n += n

    def set_postfix(self, refresh=True, **values):
        self.postfix = values

    def write(self, line, file=None):
        self.lines.append(line)
        self.owner.events.append(("write", line))

    def close(self):
        self.owner.events.append(("close", self.kwargs["desc"]))


@pytest.fixture
def fake_bars(monkeypatch):
    bars = FakeBars()
    monkeypatch.setattr(loop, "tqdm", bars)
    return bars


class EventStream(io.StringIO):
    """stdout that records its lines among the bars' events."""

    def __init__(self, events):
        super().__init__()
        self.events = events

    def write(self, text):
        if text.strip():
            self.events.append(("stream", text.strip()))
        return super().write(text)


def test_bar_label_loss_and_eta_clock_after_the_compiling_step(tmp_path, fake_bars):
    stdout = EventStream(fake_bars.events)
    config = toy_config()
    loop.run(config, tmp_path, tasks.make_task(config, TOY_TASKS), stream=stdout,
             label="stage 1/2: toy")
    compiling, training = fake_bars.bars
    assert compiling.kwargs["desc"] == "stage 1/2: toy (compiling)"
    assert not compiling.kwargs["leave"] and not compiling.kwargs["disable"]
    # step 1 (compiling) done: that bar goes, the compile time is printed once (no bar shown),
    # then the training bar opens: its clock (rate, ETA) starts after compilation
    assert [kind for kind, _ in fake_bars.events[:4]] == ["open", "close", "stream", "open"]
    assert re.fullmatch(r"stage 1/2: toy: compiled in \d+\.\d s.*", fake_bars.events[2][1])
    assert stdout.getvalue().count("compiled in") == 1
    assert training.kwargs["desc"] == "stage 1/2: toy" and training.kwargs["initial"] == 1
    assert training.n == 5 and fake_bars.events[-1] == ("close", "stage 1/2: toy")
    last_loss = metrics.read_jsonl(tmp_path / "metrics.jsonl")[5]["loss"]
    assert training.postfix["loss"] == f"{last_loss:.4g}"
    # every log line went through the bar shown at the time, none straight to the stream
    assert [line.split(":")[0] for line in training.lines] == [f"step {i}" for i in range(1, 6)]
    assert "loss=" not in stdout.getvalue()


def test_a_resumed_run_counts_from_its_checkpoint(tmp_path, fake_bars):
    config = toy_config(num_steps=3, checkpoint_every=3)
    loop.run(config, tmp_path, tasks.make_task(config, TOY_TASKS), stream=io.StringIO())
    config = toy_config(num_steps=6, checkpoint_every=3)
    loop.run(config, tmp_path, tasks.make_task(config, TOY_TASKS), stream=io.StringIO())
    compiling, training = fake_bars.bars[2:]
    assert compiling.kwargs["initial"] == 3 and training.kwargs["initial"] == 4
    assert training.kwargs["desc"] == "toy_regression"  # default label: config.trainer
    assert training.n == 6


def test_without_a_bar_lines_go_to_the_stream(tmp_path, fake_bars):
    stdout = io.StringIO()
    config = toy_config(progress_bar=False)
    loop.run(config, tmp_path, tasks.make_task(config, TOY_TASKS), stream=stdout)
    assert all(bar.kwargs["disable"] and not bar.lines for bar in fake_bars.bars)
    assert "step 5: loss=" in stdout.getvalue()


def test_real_bar_on_stderr_has_label_and_loss_and_no_mfu_noise_on_cpu(tmp_path, capsys):
    config = toy_config()
    loop.run(config, tmp_path, tasks.make_task(config, TOY_TASKS), label="stage 2/2: ldm")
    out, err = capsys.readouterr()
    final = err.strip().split("\r")[-1]  # the bar as it is left
    assert final.startswith("stage 2/2: ldm: 100%") and "5/5" in final
    assert f"loss={metrics.read_jsonl(tmp_path / 'metrics.jsonl')[5]['loss']:.4g}" in final
    assert "step 5: loss=" in out and "compiled in" in out
    assert "MFU" not in out + err and "mfu" not in out  # the CPU has no known peak


def test_stage_1_kl_metrics_before_disc_start_are_the_meaningful_ones():
    loss = AutoencoderLossConfig(kind="kl", perceptual_weight=0.0, disc_start=1000)
    hidden = autoencoder_task.hidden_metrics(loss, 1000)
    assert autoencoder_task.GAN_METRICS <= hidden and {"logvar", "rec_loss"} <= hidden
    assert not {"loss", "l1_loss", "nll_loss", "kl_loss", "psnr", "grad_norm"} & hidden
    # the step after disc_start (its metrics come from state step 1000): the GAN terms count
    assert not autoencoder_task.GAN_METRICS & autoencoder_task.hidden_metrics(loss, 1001)
    published = AutoencoderLossConfig(kind="kl", learn_logvar=True, disc_start=0)
    assert autoencoder_task.hidden_metrics(published, 1) == frozenset()


def test_default_stage_1_logs_only_meaningful_metrics_and_jsonl_keeps_all(tmp_path):
    first, _ = stage_configs(load_config(str(DEFAULT), "ci"))
    # the default's stage-1 loss and train settings on a smaller network (compiles faster)
    first.model.spec = spec_to_dict(ModelSpec(first_stage=AutoencoderConfig(
        ch=32, ch_mult=(1,), num_res_blocks=1, resolution=16, z_channels=4, embed_dim=4,
        mid_attention=False)))
    first.data.image_size = 16
    task = autoencoder_task.make_task(first)
    stdout = io.StringIO()
    loop.run(first, tmp_path, task, stream=stdout)
    (line,) = [x for x in stdout.getvalue().splitlines() if x.startswith("step 2: loss=")]
    shown = {pair.split("=")[0] for pair in line.removeprefix("step 2: ").split()}
    assert shown == {"loss", "l1_loss", "nll_loss", "kl_loss", "psnr", "grad_norm",
                     "samples_per_second", "steps_per_second"}
    record = metrics.read_jsonl(tmp_path / "metrics.jsonl")[2]
    assert {"disc_loss", "g_loss", "logvar", "rec_loss"} <= set(record)
    assert not {"quant_loss", "perplexity", "codebook_usage"} & set(record)  # KL model
    # the stage's reconstruction grid at its last step, where README says
    assert [p.name for p in (tmp_path / "samples").iterdir()] == ["samples_00000002.png"]
