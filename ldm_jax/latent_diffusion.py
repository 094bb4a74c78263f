"""What training and sampling share about a latent diffusion model, written once.

The train step (ldm_jax/training/ldm_step.py) and the sampling pipeline (ldm_jax/sampling/) both
build the noise schedule of a spec, encode the condition with the cond stage, and assemble the
UNet's input (latents concatenated with spatial inputs, cross-attention context, class vector).
"""

from ldm_jax.diffusion.schedules import make_schedule
from ldm_jax.spec import DiffusionSpec


def schedule_from_spec(diffusion: DiffusionSpec):
    """The fp32 noise schedule (betas, alphas_cumprod, ...) that a DiffusionSpec describes."""
    return make_schedule(
        diffusion.beta_schedule,
        diffusion.num_timesteps,
        diffusion.linear_start,
        diffusion.linear_end,
    )
