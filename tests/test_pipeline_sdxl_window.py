"""SDXL's base -> refiner hand-off (denoising_end / denoising_start) with the second-order and
multistep samplers against diffusers 0.42 running their schedulers (fp32, same noise).

diffusers cuts each scheduler's own timestep list: StableDiffusionXLPipeline keeps the entries
>= round(T - denoising_end T) (Heun's list [t0, t1, t1, ..., t_{N-1}, t_{N-1}] then ends on an
Euler half-step), StableDiffusionXLImg2ImgPipeline.get_timesteps runs the entries < the cutoff
from ``set_begin_index`` (Heun: one entry more, the whole previous step), with a scheduler whose
history (DPM-Solver++ / UniPC ``model_outputs``, UniPC's ``last_sample``) starts empty.

Two levels: the samplers on an analytic denoiser against the schedulers driven as the two
pipelines drive them (every sampler, cheap), and the tiny SDXL pipelines (base -> latents ->
refiner, one pair per sampler: each compiles twice, ~20 s on 2 cores). The stochastic samplers
get the pipeline's per-step noise on the diffusers side (tests/test_pipeline_samplers.py).
"""

import types

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import support.sdxl_fixtures
import torch
from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as xl_i2i
from support.tiny_pipelines import torch_noise
from test_pipeline_samplers import _feed_noise, _our_step_noise_NCHW

from ldm_jax.diffusion import SAMPLERS, sampler_plans
from ldm_jax.latent_diffusion import schedule_from_spec
from ldm_jax.sampler_options import SAMPLER_INFO
from ldm_jax.sampling.inputs import strength_slice
from ldm_jax.spec import DiffusionSpec

# the tiny SDXL base + refiner (folders, our pipelines, diffusers'), shared with other SDXL tests
folders, pipes, references = (support.sdxl_fixtures.folders, support.sdxl_fixtures.pipes,
                              support.sdxl_fixtures.references)

PIXEL_BAR = 2 / 255
PROMPTS = ["a photo of a cat", "an oil painting of a harbour"]
SHAPE_NCHW = (2, 4, 8, 8)  # 16 x 16 pixels (the tiny VAE halves)
T = 1000
# 8 steps cut at 0.6 (t >= 400 on the base): every sampler runs >= 2 steps on each side, so the
# base stops within the second-order steps and the refiner restarts its history
STEPS, FRACTION = 8, 0.6
SEED, REFINER_SEED = 11, 23
HANDOFF = ("heun", "dpm_solver", "dpm++_2m_karras", "dpm++_2m_sde", "dpm++_2m_sde_karras", "unipc")
# the pipelines run one sampler per module by default (Heun ~60 s, the others ~30 s on 2 cores);
# the remaining rows differ from these only in sigmas / noise, checked on the analytic denoiser
# above, and run with -m slow (pixels <= 2.7e-5 each, measured)
PIPELINE_CASES = [
    "heun",
    "dpm++_2m_sde_karras",
    "unipc",
    *(pytest.param(n, marks=pytest.mark.slow) for n in ("dpm_solver", "dpm++_2m_karras",
                                                        "dpm++_2m_sde")),
]  # fmt: skip
# SDXL's scheduler config (tests/support/tiny_pipelines.py, as the release)
CONFIG = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
              timestep_spacing="leading")  # fmt: skip
SPEC = DiffusionSpec(linear_start=0.00085, linear_end=0.012, timestep_spacing="leading",
                     steps_offset=1)  # fmt: skip
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)


def _scheduler(name: str, config: dict):
    """The diffusers scheduler of the sampler table's row, from a scheduler config."""
    info = SAMPLER_INFO[name]
    kwargs = dict(info.diffusers_config)
    if info.karras:
        kwargs["use_karras_sigmas"] = True
    return getattr(diffusers, info.diffusers).from_config(config, **kwargs)


# --- diffusion level: an analytic denoiser, diffusers' schedulers driven as the pipelines do


def _model_jax(x, t_B):
    u = (t_B.astype(jnp.float32) + 1.0)[:, None, None, None] / T
    return jnp.sqrt(u) * x + 0.05 * jnp.sin(t_B.astype(jnp.float32)[:, None, None, None] / 100)


def _model_torch(x, t):
    t = torch.as_tensor(t, dtype=torch.float32)
    return torch.sqrt((t + 1.0) / T) * x + 0.05 * torch.sin(t / 100)


def _diffusers_loop(scheduler, x, timesteps, noise):
    for i, t in enumerate(timesteps):
        kwargs = {} if noise is None else {"variance_noise": torch.from_numpy(noise[i])}
        out = _model_torch(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, **kwargs).prev_sample
    return x.numpy()


def _diffusers_base(name, x_T, noise):
    """StableDiffusionXLPipeline's loop with denoising_end (its lines, the UNet replaced)."""
    scheduler = _scheduler(name, CONFIG)
    scheduler.set_timesteps(STEPS)
    timesteps = scheduler.timesteps
    cutoff = int(round(T - FRACTION * T))
    timesteps = timesteps[: len(list(filter(lambda ts: ts >= cutoff, timesteps)))]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    x = torch.from_numpy(x_T) * scheduler.init_noise_sigma
    return _diffusers_loop(scheduler, x, timesteps, noise), len(timesteps)


def _diffusers_refiner(name, latents, noise):
    """StableDiffusionXLImg2ImgPipeline with denoising_start: its own get_timesteps (which calls
    set_begin_index), the latents taken as they are (add_noise=False)."""
    scheduler = _scheduler(name, CONFIG)
    scheduler.set_timesteps(STEPS)
    holder = types.SimpleNamespace(scheduler=scheduler)
    timesteps, _ = xl_i2i.StableDiffusionXLImg2ImgPipeline.get_timesteps(
        holder, STEPS, 0.3, "cpu", denoising_start=FRACTION
    )
    return _diffusers_loop(scheduler, torch.from_numpy(latents), timesteps, noise), len(timesteps)


def _ours(name, plan, schedule, x, noise):
    options = dict(plan.options)
    if plan.prev_timesteps is not None:
        options["prev_timesteps"] = jnp.asarray(plan.prev_timesteps)
    if noise is not None:
        options["noise"] = jnp.asarray(noise)
    fn = jax.jit(lambda x: SAMPLERS[name](_model_jax, x, schedule, jnp.asarray(plan.timesteps),
                                          **options))  # fmt: skip
    return np.asarray(fn(x))


def _close(label, ours, reference, parity):
    error = float(np.abs(ours - reference).max() / (1.0 + np.abs(reference).max()))
    print(f"{label}: max abs / (1 + max |x|) {error:.2e}")
    parity(label, ours, reference, 1e-5)
    assert error <= 1e-5, f"{label}: {error:.3e}"


@pytest.mark.parametrize("name", [*HANDOFF, "plms"])
def test_sampler_window_matches_diffusers(parity, name):
    """The base's latents (denoising_end) and the refiner's result (denoising_start, from
    diffusers' base latents) of each sampler, step for step as the schedulers; PLMS: end only."""
    schedule = schedule_from_spec(SPEC)
    stochastic = SAMPLER_INFO[name].stochastic
    x_T = torch.randn(SHAPE_NCHW, generator=torch.Generator().manual_seed(0)).numpy()
    noise = np.random.default_rng(1).standard_normal((STEPS, *SHAPE_NCHW)).astype(np.float32)
    full = sampler_plans.sampler_plan(name, SPEC, T, STEPS)
    base = sampler_plans.denoising_window(full, schedule, T, end=FRACTION)
    n_base = sampler_plans.visited_timesteps(base, schedule).shape[0]
    reference, calls = _diffusers_base(name, x_T, noise[:n_base] if stochastic else None)
    ours = _ours(name, base, schedule, jnp.asarray(x_T), noise[:n_base] if stochastic else None)
    # the network calls diffusers made: Heun twice per step but the last (its Euler half); PLMS'
    # visited list repeats t1 as its scheduler's does
    assert calls == (2 * n_base - 1 if name == "heun" else n_base)
    _close(f"window {name}: denoising_end {FRACTION} latents", ours, reference, parity)
    if name == "plms":
        with pytest.raises(ValueError, match="denoising_start does not apply to plms"):
            sampler_plans.denoising_window(full, schedule, T, start=FRACTION)
        return

    refiner_plan = sampler_plans.sampler_plan(name, SPEC, T, STEPS, from_image=True)
    window = sampler_plans.denoising_window(refiner_plan, schedule, T, start=FRACTION)
    first = dict(window.options)["first_step"]
    # Heun restarts at the base's last step (diffusers' "+1" entry), the others after it
    assert first == (n_base - 1 if name == "heun" else n_base)
    n_refiner = STEPS - first
    step_noise = noise[::-1][:n_refiner].copy() if stochastic else None
    expected, calls = _diffusers_refiner(name, reference, step_noise)
    assert calls == (2 * n_refiner - 1 if name == "heun" else n_refiner)
    t_N, prev_N = jnp.asarray(window.timesteps), window.prev_timesteps
    x = sampler_plans.start_from_latents(window, schedule, t_N, prev_N, jnp.asarray(reference))
    result = _ours(name, window, schedule, x, step_noise)
    _close(f"window {name}: denoising_start {FRACTION} from diffusers' latents", result, expected,
           parity)  # fmt: skip


def test_windows_as_diffusers_counts():
    """Which entries of each scheduler's own list the two pipelines run, against our windows, for
    several step counts and cutoffs and all three spacings (Heun's list: step k's Euler half at
    entry 2k, its correction at 2k + 1)."""
    for spacing in ("leading", "trailing", "linspace"):
        spec = DiffusionSpec(linear_start=0.00085, linear_end=0.012, timestep_spacing=spacing,
                             steps_offset=1)  # fmt: skip
        schedule = schedule_from_spec(spec)
        for name, steps in (("heun", 4), ("heun", 25), ("unipc", 25), ("dpm++_2m_karras", 4)):
            scheduler = _scheduler(name, dict(CONFIG, timestep_spacing=spacing))
            scheduler.set_timesteps(steps)
            listed, heun = scheduler.timesteps.numpy(), scheduler.order == 2
            full = sampler_plans.sampler_plan(name, spec, T, steps, from_image=True)
            for fraction in (0.02, 0.5, 0.8, 0.98):
                cutoff = int(round(T - fraction * T))
                kept = int((listed >= cutoff).sum())  # StableDiffusionXLPipeline's cut
                below = int((listed < cutoff).sum())
                below += int(heun and below % 2 == 0)  # get_timesteps' order-2 rule
                runs = {"end": (0, kept), "start": (len(listed) - below, len(listed))}
                for kind, (begin, stop) in runs.items():
                    if begin == stop:
                        with pytest.raises(ValueError, match="leave none of the"):
                            sampler_plans.denoising_window(full, schedule, T, **{kind: fraction})
                        continue
                    window = sampler_plans.denoising_window(full, schedule, T, **{kind: fraction})
                    options = dict(window.options)
                    first, last = options.get("first_step", 0), options.get("last_step", steps)
                    ours = (2 * first, 2 * last - 1) if heun else (first, last)
                    assert ours == (begin, stop), (name, steps, spacing, fraction, kind)
                    visited = sampler_plans.visited_timesteps(window, schedule)
                    run = listed[begin:stop][:: 2 if heun else 1]
                    np.testing.assert_allclose(visited, run, atol=1e-3)
                # img2img (strength 0.6) + denoising_end: get_timesteps' slice from
                # set_begin_index(t_start * order), then the pipeline's filter of what is left
                t_start = strength_slice(steps, 0.6)
                sliced = listed[t_start * scheduler.order :]
                kept = int((sliced >= cutoff).sum())
                if kept:
                    plan = sampler_plans.sampler_plan(name, spec, T, steps, t_start,
                                                      from_image=True)  # fmt: skip
                    window = sampler_plans.denoising_window(plan, schedule, T, end=fraction)
                    last = dict(window.options).get("last_step", steps)
                    run = 2 * (last - t_start) - 1 if heun else last - t_start
                    assert run == kept, (name, steps, spacing, fraction, "strength")


def test_window_refusals():
    schedule = schedule_from_spec(SPEC)
    plms = sampler_plans.sampler_plan("plms", SPEC, T, STEPS)
    with pytest.raises(ValueError, match="skips|noise level they are not at"):
        sampler_plans.denoising_window(plms, schedule, T, start=0.5, end=0.8)
    heun = sampler_plans.sampler_plan("heun", SPEC, T, STEPS, first_step=2, from_image=True)
    with pytest.raises(ValueError, match="denoising_start replaces strength"):
        sampler_plans.denoising_window(heun, schedule, T, start=0.5)


# --- the tiny SDXL pipelines


@pytest.mark.parametrize("name", PIPELINE_CASES)
def test_base_to_refiner_matches_diffusers(pipes, references, parity, monkeypatch, name):
    """denoising_end on the base (latents out), denoising_start on the refiner from them: each
    side's own chain, as test_pipeline_sdxl.py's Euler case."""
    (base, refiner), (ref_base, ref_refiner) = pipes, references
    for pipe in (ref_base, ref_refiner):
        monkeypatch.setattr(pipe, "scheduler", _scheduler(name, pipe.scheduler.config))
    stochastic = SAMPLER_INFO[name].stochastic
    common = dict(num_inference_steps=STEPS, guidance_scale=5.0)
    generator, x_T = torch_noise(SHAPE_NCHW, seed=0)

    drawn = None
    if stochastic:
        drawn = _feed_noise(monkeypatch, ref_base.scheduler, _our_step_noise_NCHW(SEED, 2, STEPS))
    with torch.no_grad():
        latents = ref_base(PROMPTS, generator=generator, output_type="latent",
                           denoising_end=FRACTION, **common).images  # fmt: skip
    seen = []
    ours_latents = base(PROMPTS, latents=x_T, seed=SEED, sampler=name, output_type="latent",
                        denoising_end=FRACTION, callback_on_step_end=lambda *a: seen.append(a[1]),
                        **common).images  # fmt: skip
    if drawn is not None:
        assert len(drawn) == len(seen)  # one draw per step on both sides
    error = float(np.abs(ours_latents - latents.numpy().transpose(0, 2, 3, 1)).max())
    print(f"SDXL base denoising_end {FRACTION}, {name}: latents max abs {error:.2e}")
    parity(f"SDXL base denoising_end {FRACTION}: {name} (latents)", ours_latents,
           latents.numpy().transpose(0, 2, 3, 1), 1e-4)  # fmt: skip

    if stochastic:
        drawn = _feed_noise(monkeypatch, ref_refiner.scheduler,
                            _our_step_noise_NCHW(REFINER_SEED, 2, STEPS))  # fmt: skip
    with torch.no_grad():
        expected = ref_refiner(PROMPTS, image=latents, denoising_start=FRACTION, output_type="np",
                               **common).images  # fmt: skip
    refined = []
    ours = refiner(PROMPTS, image=ours_latents, seed=REFINER_SEED, denoising_start=FRACTION,
                   sampler=name, output_type="np",
                   callback_on_step_end=lambda *a: refined.append(a[1]),
                   **common).images  # fmt: skip
    # Heun's refiner re-runs the base's last step (diffusers' +1), the others continue after it
    assert len(seen) + len(refined) == STEPS + (name == "heun")
    if drawn is not None:
        assert len(drawn) == len(refined)
    error = float(np.abs(ours - expected).max())
    label = f"SDXL base -> refiner at {FRACTION}: {name} (pixels)"
    print(f"{label}: max abs {error:.2e}")
    parity(label, ours, expected, PIXEL_BAR)
    assert error <= PIXEL_BAR, f"{label}: max abs {error:.3e} > 2/255"
    assert 0.2 < np.mean((expected > 0) & (expected < 1))  # not just saturated pixels


def test_plms_refuses_denoising_start(pipes):
    """PLMS' denoising_end is a slice of its steps (test_sampler_window_matches_diffusers[plms];
    the pipeline slices as for DDIM); denoising_start is refused before anything compiles."""
    latents = np.zeros((2, *SHAPE_NCHW[2:], SHAPE_NCHW[1]), np.float32)
    with pytest.raises(ValueError, match="denoising_start does not apply to plms"):
        pipes[1](PROMPTS, image=latents, denoising_start=FRACTION, sampler="plms")
