"""What a pipeline call returns, and the seeds behind it.

``output_type`` (diffusers' names, plus "uint8"): "pil" a list of PIL images, "np" float32
[B, H, W, 3] in [0, 1], "uint8" uint8 [B, H, W, 3], "latent" the final latents [B, h, w, C] (NHWC,
scaled as the UNet sees them; not decoded).

Seeds: image i's initial noise and per-step noise come from ``PRNGKey(seeds[i])`` alone, so seed
``s`` reproduces its image in a batch of one or in any batch. An int seed gives seeds
``s, s + 1, ...`` (mod 2**32); ``None`` draws a fresh one from the OS, returned in ``.seeds``.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any

from ldm_jax.sampler_options import MAX_SEED, check_seed

OUTPUT_TYPES = ("pil", "np", "uint8", "latent")


@dataclasses.dataclass(frozen=True)
class PipelineOutput:
    """``images`` in the requested ``output_type``; ``seeds`` one per image (None when the call
    was given ``rng=``); ``timesteps`` the network's timestep at each callback iteration."""

    images: Any
    seeds: list[int] | None
    timesteps: Any = None

    def __len__(self) -> int:
        return len(self.images)


def check_output_type(output_type) -> str:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"unknown output_type {output_type!r}; choose one of {OUTPUT_TYPES}")
    return output_type


def image_seeds(seed, batch: int) -> list[int]:
    """One seed per image: ``seed`` (an int: it and the next ones), a list of ``batch`` ints, or
    None (a fresh random start). Each is checked to lie in [0, 2**32 - 1]."""
    if seed is None:
        seed = secrets.randbelow(MAX_SEED + 1)
    if isinstance(seed, list | tuple):
        seeds = [check_seed(s, "seed") for s in seed]
        if len(seeds) != batch:
            raise ValueError(
                f"seed lists {len(seeds)} seeds for {batch} images (give one int or {batch})"
            )
        return seeds
    first = check_seed(seed)
    return [(first + i) % (MAX_SEED + 1) for i in range(batch)]
