"""The latent-diffusion train step: pure, sharded, jitted once, state donated.

    state, frozen = init_ldm_state(spec, train_cfg, optimizer, mesh, rules, rng)
    train_step = make_ldm_train_step(spec, train_cfg, optimizer, schedule_fn, mesh, rules)
    state, metrics = train_step(state, frozen, batch, rng)   # same rng every step

Trainable params (`state.params`) are {"unet"} plus {"cond_stage"} when the conditioning encoder
is trained jointly (CondStageSpec.trainable: LDM-BERT, class embedder); the frozen networks
(first stage, a frozen CLIP) are a separate sharded argument, never closed over, never in the state.
`rng` is folded with state.step inside the step, so a resumed run draws the same noise.

LoRA (`LDMTrainConfig.lora`): `state.params` holds only the adapters (training/lora_adapters.py);
every network is frozen, and the step uses W + (alpha/r)·down@up for each adapted kernel.

batch: {"image": f32 [B, H, W, 3] in [-1, 1]} or {"latents": [B, h, w, c]} (first-stage latents
before scaling), an optional "loss_weight" f32 [B] (loss = mean(w * per-example loss); DreamBooth's
prior preservation), plus "tokens" int32 [B, T] (text), "class_label" int32 [B] (class, adm), and
"concat" [B, h, w, c'] for the concat/hybrid conditioning keys. SDXL: "tokens" int32 [B, E, T]
(one row per text encoder), "original_size" and "crop_top_left" [B, 2]; the target size is the
batch's own (H, W), so each aspect-ratio bucket is one compiled shape.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldm_jax.compile_options import compiler_options
from ldm_jax.latent_diffusion import (
    SDXLInputs,
    apply_unet,
    encode_condition,
    schedule_from_spec,
    unet_conditioning,
)
from ldm_jax.models import text_time
from ldm_jax.models.attention_dispatch import implementation_from_name
from ldm_jax.models.backend import target_backend
from ldm_jax.models.conditioning import drop_class_labels
from ldm_jax.models.distributions import DiagonalGaussian
from ldm_jax.models.factory import network_modules
from ldm_jax.models.remat import check_remat
from ldm_jax.spec import SDXL_BASE_TIME_IDS, ModelSpec
from ldm_jax.training.ema import ema_decay, update_ema
from ldm_jax.training.ldm_loss import diffusion_loss
from ldm_jax.training.lora_adapters import LoRATraining, init_adapters, merge_adapters
from ldm_jax.training.sharding import (
    DEFAULT_LOGICAL_RULES,
    batch_sharding,
    box_like,
    logical_shardings,
    replicated,
    traced_on_mesh,
    with_shardings,
)
from ldm_jax.training.state import TrainState, create_sharded_state, new_train_state

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class LDMTrainConfig:
    """Training choices that are not network parameters (defaults from the ModelSpec)."""

    prediction_type: str | None = None  # None: spec.diffusion.prediction_type
    min_snr_gamma: float | None = None  # None/0: plain MSE
    cond_drop_prob: float = 0.0  # conditioning replaced by the null one (classifier-free guidance)
    scale_by_std: bool = False  # scale_factor = 1 / std(first batch's latents), kept in the state
    compute_dtype: str = "float32"  # module dtype; params stay fp32 (master weights)
    remat: str = "none"  # a models/remat.py policy for every UNet ResBlock / attention layer
    attention: str | None = None  # dot_product_attention implementation; None chooses per call
    ema_decay: float = 0.9999
    grad_accum_steps: int = 1  # must match the optimizer's MultiSteps k (EMA updates per update)
    train_cond_stage: bool | None = None  # None: spec.cond_stage.trainable
    lora: LoRATraining | None = None  # train adapters only, every network frozen

    def __post_init__(self):
        if self.compute_dtype not in COMPUTE_DTYPES:
            allowed = list(COMPUTE_DTYPES)
            raise ValueError(f"compute_dtype {self.compute_dtype!r}; allowed: {allowed}")
        check_remat(self.remat)
        implementation_from_name(self.attention)
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1]; got {self.cond_drop_prob}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1); got {self.ema_decay}")
        if self.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1; got {self.grad_accum_steps}")

    @classmethod
    def from_config(cls, config) -> "LDMTrainConfig":
        """From the shared ConfigDict layout (config.diffusion.*, ema.decay, compute_dtype, remat,
        optimizer.grad_accum_steps); absent keys keep the defaults."""

        def get(section, key, default):
            node = config.get(section, None) if section else config
            value = None if node is None else node.get(key, None)
            return default if value is None else value

        remat = get(None, "remat", "none")
        remat = {True: "blocks", False: "none"}.get(remat, remat)
        return cls(
            prediction_type=get("diffusion", "prediction_type", None),
            min_snr_gamma=get("diffusion", "min_snr_gamma", None),
            cond_drop_prob=float(get("diffusion", "cond_drop_prob", 0.0)),
            scale_by_std=bool(get("diffusion", "scale_by_std", False)),
            compute_dtype=get(None, "compute_dtype", "float32"),
            remat=remat,
            attention=implementation_from_name(get(None, "attention", None)),
            ema_decay=float(get("ema", "decay", 0.9999)),
            grad_accum_steps=int(get("optimizer", "grad_accum_steps", 1)),
            train_cond_stage=get("model", "train_cond_stage", None),
        )


def ldm_modules(spec: ModelSpec, cfg: LDMTrainConfig) -> dict[str, tuple[nn.Module, tuple]]:
    """network_modules in the compute dtype and attention implementation, the UNet
    rematerialised under the remat policy."""
    if spec.unet is None:
        raise ValueError("the ModelSpec has no UNet (first stage only): nothing to train here")
    check_remat(cfg.remat, target_backend())
    modules = network_modules(spec, COMPUTE_DTYPES[cfg.compute_dtype], cfg.attention)
    unet, inputs = modules["unet"]
    modules["unet"] = (unet.clone(remat=cfg.remat), inputs)
    return modules


def trainable_names(spec: ModelSpec, cfg: LDMTrainConfig) -> tuple[str, ...]:
    """The networks the loss is differentiated into (with LoRA: those holding adapters)."""
    if cfg.lora is not None:
        return cfg.lora.networks
    train_cond = spec.cond_stage is not None and (
        spec.cond_stage.trainable if cfg.train_cond_stage is None else cfg.train_cond_stage
    )
    return ("unet", "cond_stage") if train_cond else ("unet",)


def boxed_abstract_params(modules) -> dict[str, Any]:
    """Every network's params as nn.LogicallyPartitioned boxes of ShapeDtypeStructs (no memory)."""
    return {
        name: jax.eval_shape(lambda m=module, i=inputs: m.init(jax.random.key(0), *i)["params"])
        for name, (module, inputs) in modules.items()
    }


def _trained_and_frozen(tree: dict, spec: ModelSpec, cfg: LDMTrainConfig) -> tuple[dict, dict]:
    """(networks in the state, frozen networks): with LoRA every network is frozen."""
    if cfg.lora is not None:
        return {}, tree
    return _split(tree, trainable_names(spec, cfg))


def _new_state(boxed: dict, boxed_trained: dict, cfg, optimizer, scale: float, rng) -> TrainState:
    """The step-0 state (call under create_sharded_state / eval_shape): the trained networks, or
    with LoRA fresh adapters boxed like the kernels they adapt."""
    if cfg.lora is not None:
        return new_train_state(init_adapters(boxed, cfg.lora, rng), optimizer, scale)
    return new_train_state(boxed_trained, optimizer, scale)


def _split(tree: dict, names) -> tuple[dict, dict]:
    return {k: v for k, v in tree.items() if k in names}, {
        k: v for k, v in tree.items() if k not in names
    }


def _place_params(name, boxed, shardings, given, module, inputs, rng):
    """Pretrained values put onto the shardings, or a random init created in place."""
    if given is None:
        init = jax.jit(
            lambda r: nn.meta.unbox(module.init(r, *inputs)["params"]), out_shardings=shardings
        )
        return init(rng)
    expected = nn.meta.unbox(boxed)
    want, have = _shapes_by_path(expected), _shapes_by_path(given)
    if want != have:
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
        raise ValueError(
            f"init params for {name!r} do not match the spec: missing {missing[:5]}, "
            f"unexpected {extra[:5]}, wrong shapes {[(k, have[k], want[k]) for k in wrong[:5]]}"
        )
    # rebuilt in the spec's tree structure (a loaded tree may use other mapping types)
    values = [np.asarray(a, np.float32) for a in jax.tree.leaves(given)]
    return jax.device_put(jax.tree.unflatten(jax.tree.structure(expected), values), shardings)


def _shapes_by_path(tree) -> dict[str, tuple]:
    return {
        jax.tree_util.keystr(p): np.shape(a) for p, a in jax.tree_util.tree_leaves_with_path(tree)
    }


def init_ldm_state(
    spec: ModelSpec,
    cfg: LDMTrainConfig,
    optimizer: optax.GradientTransformation,
    mesh,
    rules=DEFAULT_LOGICAL_RULES,
    rng: jax.Array | None = None,
    init_params: dict[str, Any] | None = None,
) -> tuple[TrainState, dict[str, Any]]:
    """(state, frozen params), both sharded by `rules` and created without a full copy anywhere.

    `init_params` ({"unet" | "first_stage" | "cond_stage": tree}, e.g. a
    LatentDiffusionCheckpoint's params) starts those networks from pretrained values (fine-tuning);
    absent networks are randomly initialised.
    """
    rng = jax.random.key(0) if rng is None else rng
    modules = ldm_modules(spec, cfg)
    boxed = boxed_abstract_params(modules)
    shardings = logical_shardings(boxed, mesh, rules)
    init_params = init_params or {}
    unknown = set(init_params) - set(modules)
    if unknown:
        raise ValueError(
            f"init_params has networks {sorted(unknown)}; this spec has {sorted(modules)}"
        )
    params = {
        name: _place_params(
            name, boxed[name], shardings[name], init_params.get(name), *modules[name], r
        )
        for (name, r) in zip(modules, jax.random.split(rng, len(modules)), strict=True)
    }
    trained, frozen = _trained_and_frozen(params, spec, cfg)
    boxed_trained, _ = _split(boxed, trained)
    start_scale = 1.0 if cfg.scale_by_std else spec.diffusion.scale_factor
    adapter_rng = jax.random.fold_in(rng, len(modules))

    def init_fn(p):
        trained_boxed = box_like(p, boxed_trained)
        return _new_state(boxed, trained_boxed, cfg, optimizer, start_scale, adapter_rng)

    state, _ = create_sharded_state(init_fn, mesh, rules, trained)
    return state, frozen


def ldm_state_shardings(spec, cfg, optimizer, mesh, rules=DEFAULT_LOGICAL_RULES):
    """(abstract state, abstract frozen): ShapeDtypeStructs carrying their shardings, no memory.

    The restore target for checkpoints and the input to `train_step.lower(...)`.
    """
    boxed = boxed_abstract_params(ldm_modules(spec, cfg))
    boxed_trained, boxed_frozen = _trained_and_frozen(boxed, spec, cfg)
    abstract_state = jax.eval_shape(
        lambda p: _new_state(boxed, p, cfg, optimizer, 1.0, jax.random.key(0)), boxed_trained
    )
    state = with_shardings(
        nn.meta.unbox(abstract_state), logical_shardings(abstract_state, mesh, rules)
    )
    frozen_shardings = logical_shardings(boxed_frozen, mesh, rules)
    frozen = with_shardings(nn.meta.unbox(boxed_frozen), frozen_shardings)
    return state, frozen


def _shardings_of(abstract_tree):
    return jax.tree.map(lambda a: a.sharding, abstract_tree)


def make_ldm_train_step(
    spec: ModelSpec,
    cfg: LDMTrainConfig,
    optimizer: optax.GradientTransformation,
    schedule_fn: Callable,
    mesh,
    rules=DEFAULT_LOGICAL_RULES,
    *,
    null_tokens: np.ndarray | None = None,
):
    """jit(train_step) with in/out NamedShardings and the state donated.

    `null_tokens` [T]: the tokenized empty prompt, needed for text conditioning dropout.
    """
    modules = ldm_modules(spec, cfg)
    trained = trainable_names(spec, cfg)
    cond = spec.cond_stage
    key = spec.diffusion.conditioning_key
    prediction_type = cfg.prediction_type or spec.diffusion.prediction_type
    noise_schedule = schedule_from_spec(spec.diffusion)
    k = cfg.grad_accum_steps
    sdxl = cond is not None and cond.kind == "sdxl"
    if sdxl:
        check_sdxl_training(cond.config)
    if cfg.cond_drop_prob > 0 and cond is not None and cond.takes_text:
        if null_tokens is None:
            raise ValueError("cond_drop_prob > 0 with a text encoder needs null_tokens (of '')")
        if sdxl:  # one row of ids per text encoder: [E, T]
            null_tokens = sdxl_token_array(null_tokens).reshape(len(cond.config.text_encoders), -1)
        else:
            null_tokens = np.asarray(null_tokens, np.int32).reshape(-1)
    latent_factor = spec.first_stage.downsample_factor
    first_stage = modules["first_stage"][0]
    unet = modules["unet"][0]
    cond_module = modules.get("cond_stage", (None,))[0]

    def latents(frozen, batch, rng):
        if "latents" in batch:
            return batch["latents"].astype(jnp.float32)
        if "image" not in batch:
            raise ValueError(f"batch needs 'image' or 'latents'; got keys {sorted(batch)}")
        fs = {"params": frozen["first_stage"]}
        h = first_stage.apply(fs, batch["image"], method="encode")
        z = h.sample(rng) if isinstance(h, DiagonalGaussian) else h
        return jax.lax.stop_gradient(z.astype(jnp.float32))

    def conditioning(cond_params, batch, rng):
        """The UNet's conditioning for this conditioning key, with conditioning dropout."""
        concat = encoded = None
        if key in ("concat", "hybrid"):
            concat = _require(batch, "concat")
            if cond is not None and cond.kind == "spatial_rescaler" and cond_module is not None:
                concat = encode_condition(cond, cond_module, cond_params, concat)
        encodes = cond is not None and cond.kind != "spatial_rescaler"
        if sdxl:
            return unet_conditioning(key, encoded=sdxl_conditioning(cond_params, batch, rng))
        if key in ("crossattn", "hybrid", "adm") and encodes:
            if cond.takes_text:
                tokens = _require(batch, "tokens")
                if cfg.cond_drop_prob > 0:
                    tokens = drop_tokens(tokens, null_tokens, cfg.cond_drop_prob, rng)
                encoded = encode_condition(cond, cond_module, cond_params, tokens)
            else:  # class embedder
                labels = _require(batch, "class_label")
                if cfg.cond_drop_prob > 0:
                    labels = drop_class_labels(cond.config, labels, cfg.cond_drop_prob, rng)
                encoded = encode_condition(cond, cond_module, cond_params, labels)
        labels = _require(batch, "class_label") if key == "adm" and encoded is None else None
        return unet_conditioning(key, encoded=encoded, concat=concat, labels=labels)

    def sdxl_conditioning(cond_params, batch, rng):
        """(context, y) of both encoders; dropout replaces the prompt by the empty one for every
        encoder at once (diffusers' proportion_empty_prompts), the time ids stay the example's."""
        tokens_BET = _require(batch, "tokens")
        if tokens_BET.ndim != 3:
            raise ValueError(f"SDXL batches hold tokens [B, encoders, T]; got {tokens_BET.shape}")
        if cfg.cond_drop_prob > 0:
            tokens_BET = drop_tokens(tokens_BET, null_tokens, cfg.cond_drop_prob, rng)
        token_ids = tuple(tokens_BET[:, i] for i in range(tokens_BET.shape[1]))
        if "latents" in batch:
            target = tuple(d * latent_factor for d in batch["latents"].shape[1:3])
        else:
            target = tuple(batch["image"].shape[1:3])
        time_ids_BN = sdxl_time_ids(
            _require(batch, "original_size"), _require(batch, "crop_top_left"), target
        )
        return encode_condition(
            cond, cond_module, cond_params, SDXLInputs(token_ids, time_ids_BN)
        )

    def train_step(state: TrainState, frozen, batch, rng):
        rng = jax.random.fold_in(rng, state.step)
        enc_rng, drop_rng, loss_rng, dropout_rng = jax.random.split(rng, 4)
        z = latents(frozen, batch, enc_rng)
        if cfg.scale_by_std:  # CompVis on_train_batch_start: 1 / std of the very first batch
            first = 1.0 / jnp.std(z)
            scale = jnp.where(state.step == 0, first, state.scale_factor).astype(jnp.float32)
        else:
            scale = state.scale_factor
        z0 = z * scale

        def loss_fn(params):
            if cfg.lora is not None:
                nets = merge_adapters(frozen, params, cfg.lora.factor)
            else:
                nets = {**frozen, **params}
            cond_params = nets.get("cond_stage")
            c = conditioning(cond_params, batch, drop_rng)
            if "cond_stage" not in trained and c.context is not None:
                c = c._replace(context=jax.lax.stop_gradient(c.context))
                if sdxl:  # y holds the pooled text embedding
                    c = c._replace(y=jax.lax.stop_gradient(c.y))

            def apply_fn(x_t, t_B):
                return apply_unet(
                    unet, nets["unet"], x_t, t_B, c,
                    deterministic=False, rngs={"dropout": dropout_rng},
                )  # fmt: skip

            return diffusion_loss(
                apply_fn, noise_schedule, z0, loss_rng, prediction_type, cfg.min_snr_gamma,
                weights_B=batch.get("loss_weight"),
            )

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        updates_done = (state.step + 1) // k  # MultiSteps applies the k-th micro-batch's update
        ema = update_ema(state.ema_params, params, ema_decay(updates_done, cfg.ema_decay))
        if k > 1:
            applied = (state.step + 1) % k == 0
            ema = jax.tree.map(lambda new, old: jnp.where(applied, new, old), ema, state.ema_params)
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            ema_params=ema,
            scale_factor=scale,
        )
        metrics = {
            "loss": loss,
            "grad_norm": _global_norm(grads),
            "learning_rate": jnp.asarray(schedule_fn(state.step // k), jnp.float32),
            "scale_factor": scale,
        }
        return new_state, metrics

    abstract_state, abstract_frozen = ldm_state_shardings(spec, cfg, optimizer, mesh, rules)
    state_sh, frozen_sh = _shardings_of(abstract_state), _shardings_of(abstract_frozen)
    return jax.jit(
        traced_on_mesh(train_step, mesh),
        in_shardings=(state_sh, frozen_sh, batch_sharding(mesh), replicated(mesh)),
        out_shardings=(state_sh, replicated(mesh)),
        donate_argnums=0,
        compiler_options=compiler_options(),
    )


def _global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(tree)))


def drop_tokens(tokens_BT, null_tokens_T, rate: float, rng: jax.Array) -> jax.Array:
    """Replace each row by the null (empty-prompt) tokens with probability `rate` (CompVis ucg)."""
    null_tokens_T = jnp.asarray(null_tokens_T, tokens_BT.dtype)
    if null_tokens_T.shape != tokens_BT.shape[1:]:
        raise ValueError(f"null tokens {null_tokens_T.shape} do not fit tokens {tokens_BT.shape}")
    # [B, 1] for [B, T] tokens, [B, 1, 1] for SDXL's [B, E, T]: all encoders drop together
    drop_B1 = jax.random.bernoulli(rng, rate, (tokens_BT.shape[0],) + (1,) * (tokens_BT.ndim - 1))
    return jnp.where(drop_B1, null_tokens_T[None], tokens_BT)


def sdxl_token_array(token_ids) -> np.ndarray:
    """SDXLTokenizers' tuple of [B, T] ids (or one [B, T]) -> int32 [B, E, T]: one batch array."""
    if isinstance(token_ids, tuple | list):
        return np.stack([np.asarray(t, np.int32) for t in token_ids], axis=1)
    return np.asarray(token_ids, np.int32)


def check_sdxl_training(conditioner) -> None:
    """The train step builds SDXL's base time ids from the data; other sets are not supported."""
    if tuple(conditioner.time_ids) != SDXL_BASE_TIME_IDS:
        raise ValueError(
            f"training SDXL takes the base model's time ids {SDXL_BASE_TIME_IDS} (original size, "
            f"crop, target size from the data); this conditioner has {conditioner.time_ids} (the "
            "refiner's aesthetic score is not in the training data)"
        )


def sdxl_time_ids(original_size_B2, crop_top_left_B2, target_hw) -> jax.Array:
    """SDXL base micro-conditioning [B, 6]: each image's original (h, w) and crop (top, left),
    the batch's (bucket's) size as target (h, w)."""
    return text_time.time_ids(original_size_B2, crop_top_left_B2, target_size=target_hw)


def _require(batch, name):
    if name not in batch:
        raise ValueError(f"this model's conditioning needs batch[{name!r}]; has {sorted(batch)}")
    return batch[name]
