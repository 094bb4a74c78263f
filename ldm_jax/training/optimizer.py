"""AdamW with warm-up + schedule, global-norm clipping and gradient accumulation, from a config.

The config (an ml_collections ConfigDict, dataclass or namespace) has the attributes below; missing
ones take the defaults. The schedule counts optimizer updates: with `grad_accum_steps = k` (optax
MultiSteps), k train steps (micro-batches) make one update.
"""

from collections.abc import Callable

import optax

SCHEDULES = ("constant", "cosine", "linear")
_DEFAULTS = dict(
    learning_rate=1e-4,
    warmup_steps=0,
    schedule="constant",
    decay_steps=None,  # updates over which cosine/linear decay (default: total_steps - warmup)
    end_learning_rate_factor=0.0,  # final lr = factor * learning_rate for cosine/linear
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    weight_decay=0.01,  # torch AdamW's default, which CompVis LatentDiffusion uses
    grad_clip=1.0,  # max global norm; 0 or None disables clipping
    grad_accum_steps=1,
)


def _get(cfg, name):
    value = cfg.get(name, None) if hasattr(cfg, "get") else getattr(cfg, name, None)
    return _DEFAULTS[name] if value is None else value


def make_schedule(cfg, total_steps: int | None = None) -> Callable:
    """Learning rate as a function of the optimizer update count."""
    lr = float(_get(cfg, "learning_rate"))
    warmup = int(_get(cfg, "warmup_steps"))
    kind = _get(cfg, "schedule")
    if kind not in SCHEDULES:
        raise ValueError(f"unknown optimizer.schedule {kind!r}; allowed: {SCHEDULES}")
    if lr <= 0 or warmup < 0:
        raise ValueError(f"need learning_rate > 0 and warmup_steps >= 0; got {lr}, {warmup}")
    if kind == "constant":
        after = optax.constant_schedule(lr)
    else:
        decay = _get(cfg, "decay_steps")
        if decay is None:
            if total_steps is None:
                raise ValueError(f"schedule {kind!r} needs optimizer.decay_steps or total_steps")
            decay = max(int(total_steps) - warmup, 1)
        end = lr * float(_get(cfg, "end_learning_rate_factor"))
        if kind == "cosine":
            after = optax.cosine_decay_schedule(lr, int(decay), alpha=end / lr)
        else:
            after = optax.linear_schedule(lr, end, int(decay))
    if warmup == 0:
        return after
    # linear warm-up from lr / warmup (the first update already moves the params)
    return optax.join_schedules(
        [optax.linear_schedule(lr / warmup, lr, warmup - 1 or 1), after], [warmup]
    )


def make_optimizer(
    cfg, total_steps: int | None = None
) -> tuple[optax.GradientTransformation, Callable]:
    """(optimizer, schedule_fn): clip -> AdamW(schedule), wrapped in MultiSteps when k > 1."""
    schedule = make_schedule(cfg, total_steps)
    parts = []
    clip = _get(cfg, "grad_clip")
    if clip:
        parts.append(optax.clip_by_global_norm(float(clip)))
    parts.append(
        optax.adamw(
            schedule,
            b1=float(_get(cfg, "b1")),
            b2=float(_get(cfg, "b2")),
            eps=float(_get(cfg, "eps")),
            weight_decay=float(_get(cfg, "weight_decay")),
        )
    )
    tx = optax.chain(*parts)
    k = int(_get(cfg, "grad_accum_steps"))
    if k < 1:
        raise ValueError(f"optimizer.grad_accum_steps must be >= 1; got {k}")
    if k > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=k).gradient_transformation()
    return tx, schedule
