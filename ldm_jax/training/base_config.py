"""The config layout every trainer shares (configs/*.py start from `base_config`).

Sections: trainer, seed, workdir_default, mesh, sharding_rules, model, diffusion, lora, optimizer,
ema, compute_dtype, remat, data, train, sample, distributed.

config.lora (ldm_jax/training/lora_setup.py): `rank` 0 trains the networks themselves; >= 1 trains
LoRA adapters of that rank on the layers `unet_targets` / `text_encoder_targets` name (PEFT's
target_modules rule on diffusers / transformers module names; empty: none), scaled alpha / rank
(`alpha` 0: = rank); the run exports them in `export_formats` (peft, kohya) with every
checkpoint.

Keys a trainer does not use are ignored; overrides of keys that do not exist are rejected by
train.py.

config.mesh (ldm_jax/training/mesh_config.py): `axes` ("data", "fsdp", "tensor"); `shape`, the
devices along each axis within one slice (ICI), one -1 = the rest; `dcn_shape`, the slices along
each axis (DCN), default all ones = one slice, one -1 = the rest; `process_is_granule`, True to
count each process as a slice (multi-process CPU, GPU clusters). Axis i spans
shape[i] * dcn_shape[i] devices. A 2-slice TPU pod: --config.mesh.dcn_shape="(2,1,1)" (data
parallel across slices, fsdp within each); 2 GPU hosts: also
--config.mesh.process_is_granule=True.
"""

import ml_collections

from ldm_jax.training.distributed import distributed_config
from ldm_jax.training.mesh_config import mesh_config
from ldm_jax.training.sharding import DEFAULT_LOGICAL_RULES


def train_config(**overrides) -> ml_collections.ConfigDict:
    """config.train: what the loop reads (ldm_jax/training/loop.py)."""
    values = {
        "num_steps": 1000,
        "log_every": 50,
        "checkpoint_every": 1000,
        "sample_every": 0,  # 0: no sample grids
        "keep_checkpoints": 3,
        "async_checkpointing": True,
        "progress_bar": True,
        "peak_flops_per_device": 0.0,  # 0: look the device up (MFU "unknown peak" on CPU)
        # fault injection for tests: a real SIGKILL / SIGTERM of this process after that step
        "debug": {"kill_at_step": -1, "sigterm_at_step": -1},
    }
    unknown = sorted(set(overrides) - set(values))
    if unknown:
        raise ValueError(f"unknown config.train keys {unknown}; allowed: {sorted(values)}")
    return ml_collections.ConfigDict({**values, **overrides})


def base_config(trainer: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.trainer = trainer
    c.seed = 0
    c.workdir_default = f"runs/{trainer}"
    # batch over data x fsdp; params sharded over fsdp; -1 = every remaining device of the slice
    c.mesh = mesh_config()
    c.sharding_rules = DEFAULT_LOGICAL_RULES
    c.model = ml_collections.ConfigDict(
        {"init_from": "", "spec": ml_collections.ConfigDict(), "first_stage_from": "",
         "tokenizer": "",
         "prediction_type": "", "train_cond_stage": ml_collections.FieldReference(None, bool)}
    )
    c.diffusion = ml_collections.ConfigDict(
        {"prediction_type": ml_collections.FieldReference(None, str),
         "min_snr_gamma": 0.0, "cond_drop_prob": 0.1, "scale_by_std": False}
    )
    c.optimizer = ml_collections.ConfigDict(
        {"learning_rate": 1e-4, "warmup_steps": 0, "schedule": "constant", "b1": 0.9,
         "b2": 0.999, "eps": 1e-8, "weight_decay": 0.01, "grad_clip": 1.0, "grad_accum_steps": 1}
    )
    c.lora = ml_collections.ConfigDict(
        {"rank": 0, "alpha": 0.0, "unet_targets": ("to_q", "to_k", "to_v", "to_out.0"),
         "text_encoder_targets": (), "export_formats": ("peft", "kohya")}
    )
    c.ema = ml_collections.ConfigDict({"decay": 0.9999})
    c.compute_dtype = "float32"
    c.remat = "none"  # models/remat.py: none, blocks, save_dots, save_dots_no_batch, offload_dots
    c.attention = "auto"  # auto (by backend, dtype, shape), xla, cudnn, blocked, splash
    from ldm_jax.data import default_data_config  # noqa: PLC0415

    c.data = default_data_config()
    c.train = train_config()
    c.sample = ml_collections.ConfigDict(
        {"num_images": 0, "prompts": ("",), "class_labels": (0,), "steps": 25,
         "sampler": "ddim", "guidance": 1.0}
    )  # sampler: any name of ldm_jax.sampler_options.SAMPLER_TABLE (README "Samplers") or alias
    c.distributed = distributed_config()
    return c
