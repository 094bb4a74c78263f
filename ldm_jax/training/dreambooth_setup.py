"""DreamBooth with prior preservation in the LDM trainer (data.source = "dreambooth"):
the class images the frozen model generates before training, and the batch the step sees.

The loader (ldm_jax/data/dreambooth.py) yields the instance half and the class half ("prior_"
keys), B rows each per host. The step takes one batch: the two halves stacked on the host
([instance; class], 2B rows) with a per-row `loss_weight` of 2 and 2·λ, so the step's
mean_2B(w · loss) is diffusers' train_dreambooth loss

    mean_B loss(instance) + λ · mean_B loss(class),     λ = data.prior_loss_weight.

Stacking per host keeps every row on the host that read it (no exchange between devices).
"""

from __future__ import annotations

import jax
import numpy as np

PRIOR_PREFIX = "prior_"  # ldm_jax.data.dreambooth's (not imported here: the loader pulls in grain)


def stack_prior_half(batch: dict[str, np.ndarray], prior_loss_weight: float) -> dict:
    """One host batch: instance rows then class rows, and "loss_weight" [2B] (module docstring).
    A batch without a class half (no data.class_dir) is returned as it is."""
    prior = {k[len(PRIOR_PREFIX):]: v for k, v in batch.items() if k.startswith(PRIOR_PREFIX)}
    if not prior:
        return batch
    instance = {k: v for k, v in batch.items() if not k.startswith(PRIOR_PREFIX)}
    if prior.keys() != instance.keys():
        raise ValueError(f"instance keys {sorted(instance)} and class keys {sorted(prior)} differ")
    stacked = {k: np.concatenate([np.asarray(instance[k]), np.asarray(prior[k])]) for k in instance}
    rows = len(next(iter(instance.values())))
    weight = np.concatenate([np.full(rows, 2.0), np.full(rows, 2.0 * prior_loss_weight)])
    stacked["loss_weight"] = weight.astype(np.float32)
    return stacked


def class_image_generator(pipeline, image_size: int, sample_cfg, seed: int):
    """generate(prompts, first_index) -> uint8 [n, S, S, 3] with `pipeline` (the frozen model),
    the run's sample settings (sampler, steps, guidance), and class image i drawn from seed
    `seed + i`: the same folder whatever the batching, and a topped-up folder never repeats one."""

    def generate(prompts: list[str], first_index: int) -> np.ndarray:
        seeds = [seed + first_index + i for i in range(len(prompts))]
        return pipeline(
            prompt=list(prompts), height=image_size, width=image_size,
            num_inference_steps=int(sample_cfg.get("steps", 25)),
            sampler=str(sample_cfg.get("sampler", "ddim")),
            guidance_scale=float(sample_cfg.get("guidance", 7.5)),
            seed=seeds, output_type="uint8",
        ).images  # fmt: skip

    return generate


def prepare_class_images(data_cfg, make_pipeline, sample_cfg, seed: int) -> int:
    """Top data.class_dir up to data.num_class_images (process 0 writes; the others wait at a
    barrier, so class_dir must be shared storage on a pod). Returns how many were generated."""
    class_dir = str(data_cfg.get("class_dir", "") or "")
    wanted = int(data_cfg.get("num_class_images", 0) or 0)
    generated = 0
    if class_dir.strip() and wanted > 0 and jax.process_index() == 0:
        cache = {}

        def generate(prompts, first_index):
            if "pipeline" not in cache:  # built only when an image is missing
                cache["pipeline"] = make_pipeline()
            return class_image_generator(
                cache["pipeline"], int(data_cfg.image_size), sample_cfg, seed
            )(prompts, first_index)

        from ldm_jax.data.dreambooth import ensure_class_images  # noqa: PLC0415

        generated = ensure_class_images(class_dir, wanted, str(data_cfg.class_prompt), generate)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices("dreambooth class images")
    return generated
