"""SDXL's micro-conditioning: the "text_time" vector y that the UNet's adm MLP (label_emb) takes.

y = [pooled text embedding, Fourier features of each time id], as SGM's conditioner builds it
(FrozenOpenCLIPEmbedder2's pooled output, then ConcatTimestepEmbedderND(outdim=256) for
original_size_as_tuple, crop_coords_top_left and target_size_as_tuple, or aesthetic_score for the
refiner) and diffusers' UNet2DConditionModel does for addition_embed_type="text_time"
(Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0) of time_ids.flatten()). The time
ids follow diffusers' `_get_add_time_ids`: base (h, w, top, left, h, w); refiner
(h, w, top, left, aesthetic score).
"""

import jax
import jax.numpy as jnp

from ldm_jax.models.unet_blocks import timestep_embedding

# SGM ConcatTimestepEmbedderND(outdim=256) / diffusers addition_time_embed_dim of SDXL
SDXL_TIME_EMBED_DIM = 256


def text_time_embedding(
    pooled_BD: jax.Array, time_ids_BN: jax.Array, dim: int = SDXL_TIME_EMBED_DIM
) -> jax.Array:
    """[B, D] pooled text embedding + [B, N] time ids -> y [B, D + N * dim] (fp32 features).

    Each id gets timestep_embedding(id, dim) = [cos, sin], laid out id after id.
    """
    pooled_BD, time_ids_BN = jnp.asarray(pooled_BD), jnp.asarray(time_ids_BN)
    if pooled_BD.ndim != 2 or time_ids_BN.ndim != 2 or pooled_BD.shape[0] != time_ids_BN.shape[0]:
        raise ValueError(
            "text_time_embedding takes pooled [B, D] and time ids [B, N] of one batch; got "
            f"{pooled_BD.shape} and {time_ids_BN.shape}"
        )
    batch, n = time_ids_BN.shape
    features = timestep_embedding(time_ids_BN.reshape(-1), dim).reshape(batch, n * dim)
    return jnp.concatenate([pooled_BD.astype(jnp.float32), features], axis=-1)


def time_ids(original_size, crops_coords_top_left, *, target_size=None, aesthetic_score=None):
    """Micro-conditioning ids [B, 6] (base: target_size) or [B, 5] (refiner: aesthetic_score).

    Sizes and crops are (height, width) / (top, left) pairs, [2] or [B, 2]; the score a scalar
    or [B]. Exactly one of target_size and aesthetic_score.
    """
    if (target_size is None) == (aesthetic_score is None):
        raise ValueError("pass exactly one of target_size (base) and aesthetic_score (refiner)")
    given = (original_size, crops_coords_top_left, target_size)
    columns = [jnp.atleast_2d(jnp.asarray(v, jnp.float32)) for v in given if v is not None]
    for pair in columns:
        if pair.ndim != 2 or pair.shape[-1] != 2:
            raise ValueError(
                f"sizes and crops are (h, w) / (top, left) pairs, [2] or [B, 2]; got {pair.shape}"
            )
    if aesthetic_score is not None:
        columns.append(jnp.asarray(aesthetic_score, jnp.float32).reshape(-1, 1))
    batch = max(c.shape[0] for c in columns)
    try:
        columns = [jnp.broadcast_to(c, (batch, c.shape[-1])) for c in columns]
    except ValueError:
        raise ValueError(
            f"batch sizes differ: {[c.shape[0] for c in columns]} (each 1 or one B)"
        ) from None
    return jnp.concatenate(columns, axis=-1)
