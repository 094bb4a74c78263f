"""Sampling: the pipeline (conditioning -> guided sampler -> decoder), tasks, inputs, progress.

    from ldm_jax.sampling import LatentDiffusionPipeline
"""

from ldm_jax.sampling.pipeline import LatentDiffusionPipeline

__all__ = ["LatentDiffusionPipeline"]
