"""The latent-diffusion task for the loop (config.trainer = "ldm").

config.model:
    init_from        a checkpoint that `load_checkpoint` reads (CompVis file, diffusers folder,
                     orbax folder, hub id): fine-tune from its weights, architecture and tokenizer
    spec             else: a ModelSpec as `spec_to_dict` data (trained from scratch, random init)
    first_stage_from with spec: the trained autoencoder to encode with (a checkpoint path)
    tokenizer        tokenizer folder / hub id (needed for an LDM-BERT spec; CLIP specs with the
                     49,408-token vocabulary use the packaged one)
    prediction_type  "" or an override of the checkpoint's ("epsilon" | "v_prediction")
    train_cond_stage None: the spec's CondStageSpec.trainable
config.sample: num_images, prompts (text), class_labels (class), steps, sampler, guidance.
config.lora: rank >= 1 trains LoRA adapters instead (ldm_jax/training/lora_setup.py); every
checkpoint writes them to <workdir>/lora/ in each of lora.export_formats.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from ldm_jax.checkpoints import LatentDiffusionCheckpoint, load_checkpoint
from ldm_jax.checkpoints.tokenizer import tokenizer_for_spec
from ldm_jax.images import make_grid
from ldm_jax.models.factory import network_modules
from ldm_jax.spec import spec_from_dict
from ldm_jax.training.bound_step import BoundStep
from ldm_jax.training.config_checks import sampler_name
from ldm_jax.training.dreambooth_setup import prepare_class_images, stack_prior_half
from ldm_jax.training.ldm_step import (
    LDMTrainConfig,
    init_ldm_state,
    make_ldm_train_step,
    sdxl_token_array,
    trainable_names,
)
from ldm_jax.training.lora_adapters import merge_adapters
from ldm_jax.training.lora_setup import export_adapters, lora_from_config
from ldm_jax.training.optimizer import make_optimizer
from ldm_jax.training.setup import mesh_rules_and_batch
from ldm_jax.training.sharding import (
    batch_sharding,
    data_parallel_size,
    gather_to_host,
    replicated,
)


def _plain(value):
    return value.to_dict() if hasattr(value, "to_dict") else value


def resolve_model(model_cfg):
    """(spec, init params or None, tokenizer or None) from config.model."""
    init_from = model_cfg.get("init_from", "") or ""
    prediction_type = model_cfg.get("prediction_type", "") or None
    tokenizer_source = model_cfg.get("tokenizer", "") or None
    if init_from:

        checkpoint = load_checkpoint(init_from, prediction_type=prediction_type,
                                     tokenizer=tokenizer_source)
        return checkpoint.spec, checkpoint.params, checkpoint.tokenizer
    spec_data = _plain(model_cfg.get("spec", None))
    if not spec_data:
        raise ValueError("config.model needs init_from (a checkpoint to fine-tune) or spec "
                         "(spec_to_dict of a ModelSpec, to train from scratch)")
    spec = spec_from_dict(spec_data)
    if prediction_type:
        spec = dataclasses.replace(
            spec, diffusion=dataclasses.replace(spec.diffusion, prediction_type=prediction_type)
        )
    tokenizer = tokenizer_for_spec(spec, tokenizer_source)
    return spec, _first_stage_params(model_cfg, spec), tokenizer


def _first_stage_params(model_cfg, spec):
    """{"first_stage": params} from config.model.first_stage_from (a trained autoencoder: any
    checkpoint load_checkpoint reads), or None (random init: only for tests)."""
    source = model_cfg.get("first_stage_from", "") or ""
    if not source:
        return None

    checkpoint = load_checkpoint(source)
    if checkpoint.spec.first_stage != spec.first_stage:
        raise ValueError(
            f"config.model.first_stage_from={source} holds a different autoencoder "
            f"({checkpoint.spec.first_stage}) than config.model.spec ({spec.first_stage})"
        )
    return {"first_stage": checkpoint.params["first_stage"]}


class GlobalBatches:
    """Per-host numpy batches from the data loader as global, batch-sharded jax.Arrays
    (`transform`: what each host batch goes through first, e.g. DreamBooth's stacking)."""

    def __init__(self, local_batches, sharding, transform=None):
        self.local_batches, self.sharding = local_batches, sharding
        self.transform = transform

    def __iter__(self):
        return self

    def __next__(self):
        from ldm_jax.data import to_global_batch  # noqa: PLC0415

        batch = next(self.local_batches)
        if self.transform is not None:
            batch = self.transform(batch)
        return to_global_batch(batch, self.sharding)

    def get_state(self):
        return self.local_batches.get_state()

    def set_state(self, state):
        self.local_batches.set_state(state)

    def close(self):
        if hasattr(self.local_batches, "close"):
            self.local_batches.close()


class LDMTask:
    def __init__(self, config):
        self.config = config
        self.mesh, self.rules, self.global_batch_size = mesh_rules_and_batch(config)
        self.spec, self.init_params, self.tokenizer = resolve_model(config.model)
        self.cfg = LDMTrainConfig.from_config(config)
        lora = lora_from_config(config.get("lora", None), self.spec)
        if lora is not None:
            self.cfg = dataclasses.replace(self.cfg, lora=lora)
        updates = max(int(config.train.num_steps) // self.cfg.grad_accum_steps, 1)
        self.optimizer, schedule = make_optimizer(config.optimizer, updates)
        cond = self.spec.cond_stage
        self.text = cond is not None and cond.takes_text
        if self.text and self.tokenizer is None:
            raise ValueError("this model is text-conditioned but has no tokenizer: set "
                             "config.model.tokenizer to a tokenizer folder or hub id")
        null_tokens = sdxl_token_array(self.tokenizer([""]))[0] if self.text else None
        self._jitted = make_ldm_train_step(self.spec, self.cfg, self.optimizer, schedule,
                                           self.mesh, self.rules, null_tokens=null_tokens)
        self.train_step = None
        self.frozen = None
        self._pipeline = None

    def init_state(self, rng):
        state, self.frozen = init_ldm_state(self.spec, self.cfg, self.optimizer, self.mesh,
                                            self.rules, rng, self.init_params)
        self.init_params = None  # now on the devices; free the host copy
        self.train_step = BoundStep(self._jitted, self.frozen)
        return state

    def make_iterator(self) -> GlobalBatches:
        from ldm_jax.data import make_train_dataset  # noqa: PLC0415

        data = self.config.data
        dreambooth = data.get("source", "") == "dreambooth"
        make, transform = make_train_dataset, None
        if dreambooth:  # class images first (the frozen model draws them), then both halves
            from ldm_jax.data.dreambooth import dreambooth_batches  # noqa: PLC0415

            prepare_class_images(data, self._initial_pipeline, self.config.get("sample", {}),
                                 int(self.config.seed))
            make = dreambooth_batches
            weight = float(data.get("prior_loss_weight", 1.0))
            transform = functools.partial(stack_prior_half, prior_loss_weight=weight)
        local = make(
            data, self.tokenizer if self.text else None, self.global_batch_size,
            int(self.config.seed), data_parallel_size=data_parallel_size(self.mesh),
            micro_conditioning=self.spec.cond_stage is not None
            and self.spec.cond_stage.kind == "sdxl",
            bucket_multiple=latent_grid(self.spec),
        )
        return GlobalBatches(local, batch_sharding(self.mesh), transform)

    def _initial_pipeline(self):
        """The starting model as a sampling pipeline (DreamBooth's class images)."""
        from ldm_jax.sampling.pipeline import LatentDiffusionPipeline  # noqa: PLC0415

        params = self.init_params or {}
        missing = sorted(set(network_modules(self.spec)) - set(params))
        if missing:
            raise ValueError(
                f"DreamBooth's class images are drawn by the starting model, but {missing} are "
                "not pretrained here: set config.model.init_from, or fill data.class_dir with "
                "data.num_class_images images yourself"
            )
        return LatentDiffusionPipeline(LatentDiffusionCheckpoint(self.spec, params,
                                                                 self.tokenizer))

    def ema_checkpoint(self, state) -> LatentDiffusionCheckpoint:
        """The model as trained so far (host numpy): the frozen networks, the EMA of the trained
        ones, and the scale_factor the run uses (scale_by_std measures it on the first batch, so
        it lives in the state, not in the spec)."""
        lora = self.cfg.lora
        if lora is not None:  # W + delta of the EMA adapters, merged where the weights live
            adapted = {name: self.frozen[name] for name in lora.networks}
            merged = jax.jit(merge_adapters, static_argnums=2)(
                adapted, state.ema_params, lora.factor
            )
            params = {**gather_to_host(self.frozen), **gather_to_host(merged)}
        else:
            trained = trainable_names(self.spec, self.cfg)
            frozen, ema = gather_to_host(self.frozen), gather_to_host(state.ema_params)
            params = {**frozen, **{k: v for k, v in ema.items() if k in trained}}
        scale = float(np.asarray(jax.device_get(state.scale_factor)))
        spec = dataclasses.replace(
            self.spec, diffusion=dataclasses.replace(self.spec.diffusion, scale_factor=scale)
        )
        return LatentDiffusionCheckpoint(spec, params, self.tokenizer)

    def export(self, state, workdir) -> list:
        """With each checkpoint: LoRA runs write their (EMA) adapters in each of
        config.lora.export_formats to <workdir>/lora/ (process 0); other runs export nothing."""
        if self.cfg.lora is None:
            return []
        adapters = gather_to_host(state.ema_params)  # a collective: every process calls it
        if jax.process_index() != 0:
            return []
        formats = tuple(self.config.lora.get("export_formats", ()) or ())
        return export_adapters(workdir, self.spec, adapters, self.cfg.lora, formats)

    def sample(self, state, rng):
        """A grid sampled with the EMA weights (config.sample), or None when num_images is 0."""
        sample_cfg = self.config.get("sample", None)
        if sample_cfg is None or int(sample_cfg.get("num_images", 0)) <= 0:
            return None
        from ldm_jax.sampling.pipeline import LatentDiffusionPipeline  # noqa: PLC0415

        checkpoint = self.ema_checkpoint(state)
        scale = checkpoint.spec.diffusion.scale_factor
        if self._pipeline is None or self._pipeline.spec.diffusion.scale_factor != scale:
            self._pipeline = LatentDiffusionPipeline(checkpoint)
        else:
            self._pipeline.params = jax.device_put(checkpoint.params,
                                                   replicated(self._pipeline.mesh))
        n = int(sample_cfg.num_images)
        kwargs = {}
        if self.text:
            prompts = list(sample_cfg.get("prompts", None) or [""])
            kwargs["prompt"] = [prompts[i % len(prompts)] for i in range(n)]
        elif self._pipeline.task.conditioning == "class":
            labels = list(sample_cfg.get("class_labels", None) or [0])
            kwargs["class_labels"] = [labels[i % len(labels)] for i in range(n)]
        else:
            kwargs["batch_size"] = n
        images = self._pipeline(
            num_inference_steps=int(sample_cfg.get("steps", 25)),
            sampler=sampler_name(sample_cfg.get("sampler", "ddim")),
            guidance_scale=float(sample_cfg.get("guidance", 1.0)),
            rng=rng, output_type="uint8", **kwargs,
        ).images
        return make_grid(images)


def latent_grid(spec) -> int:
    """The pixels every image side must be a multiple of: the VAE's factor x 2^(UNet levels - 1)
    (each UNet level halves the latent; odd sizes would not round-trip the skip connections)."""
    return spec.first_stage.downsample_factor * 2 ** (len(spec.unet.channel_mult) - 1)


def make_task(config) -> LDMTask:
    return LDMTask(config)
