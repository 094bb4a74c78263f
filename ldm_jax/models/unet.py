"""The latent-diffusion UNet: CompVis ldm/modules/diffusionmodules/openaimodel.py UNetModel.

Same option set and computation as openaimodel (diffusers UNet2DConditionModel for the
cross-attention models, UNet2DModel for the unconditional ones), NHWC. Parameters are named after
openaimodel's block numbering (`input_blocks_4_res`, `middle_attn`, `output_blocks_5_up`, ...), so
both checkpoint layouts map onto them with a loop over `unet_layout(config)`.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.attention import AttentionBlock, SpatialTransformer
from ldm_jax.models.layers import Dtype, GroupNorm, conv, dense, embedding
from ldm_jax.models.remat import remat_policy
from ldm_jax.models.unet_blocks import (
    NORM_EPS,
    NORM_GROUPS,
    Downsample,
    ResBlock,
    Upsample,
    timestep_embedding,
)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """openaimodel.UNetModel hyper-parameters (same names, same defaults; dims=2 only).

    Execution choices that change no parameter (remat, attention kernel) live on `UNet`.
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 8)
    num_res_blocks: int | tuple[int, ...] = 2  # int or one per level
    attention_resolutions: tuple[int, ...] = ()  # downsampling rates ds with attention
    num_heads: int = -1
    num_head_channels: int = -1  # when set, heads = channels // num_head_channels
    legacy: bool = True  # openaimodel's head-width rule (see attention_heads)
    use_spatial_transformer: bool = False  # SpatialTransformer (cross-attention) vs AttentionBlock
    transformer_depth: int | tuple[int, ...] = 1  # int or one per level; middle uses the last
    context_dim: int | None = None
    use_linear_in_transformer: bool = False  # SD2: proj_in/out are Linear (key tables only)
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    conv_resample: bool = True
    num_classes: int | str | None = None  # int: class embedding; "sequential": adm MLP
    adm_in_channels: int | None = None  # width of y for num_classes="sequential"
    # SDXL: y is the "text_time" vector (models/text_time.py: pooled text embedding, then
    # Fourier features of this width for each size/crop/score id). The network is the same
    # adm MLP; it is diffusers' `add_embedding` (addition_embed_type="text_time") instead of
    # its `class_embedding` (class_embed_type="projection"), so key tables only.
    addition_time_embed_dim: int | None = None
    disable_self_attentions: tuple[bool, ...] | None = None  # one per level
    dropout: float = 0.0
    upcast_attention: bool = False
    # GroupNorm groups of every norm (diffusers norm_num_groups; openaimodel: always 32)
    norm_num_groups: int = NORM_GROUPS

    def __post_init__(self):
        for name in ("channel_mult", "attention_resolutions", "disable_self_attentions"):
            value = getattr(self, name)
            if isinstance(value, list):  # keep the dataclass hashable
                object.__setattr__(self, name, tuple(value))
        for name in ("num_res_blocks", "transformer_depth"):
            value = getattr(self, name)
            if isinstance(value, list | tuple):
                object.__setattr__(self, name, tuple(value))
                if len(value) != len(self.channel_mult):
                    raise ValueError(
                        f"{name} must be an int or have one entry per level "
                        f"({len(self.channel_mult)}); got {value}"
                    )
        if self.disable_self_attentions is not None and len(self.disable_self_attentions) != len(
            self.channel_mult
        ):
            raise ValueError(
                f"disable_self_attentions needs one entry per level ({len(self.channel_mult)}); "
                f"got {self.disable_self_attentions}"
            )
        self._check_transformer_depths()
        if self.num_heads == -1 and self.num_head_channels == -1:
            raise ValueError("set either num_heads or num_head_channels (both are -1)")
        if self.use_spatial_transformer != (self.context_dim is not None):
            raise ValueError(
                "use_spatial_transformer=True needs context_dim, and context_dim needs "
                f"use_spatial_transformer=True; got {self.use_spatial_transformer}, "
                f"context_dim={self.context_dim}"
            )
        if not (self.num_classes is None or isinstance(self.num_classes, int)):
            if self.num_classes != "sequential":
                raise ValueError(
                    f"num_classes must be None, an int or 'sequential'; got {self.num_classes!r}"
                )
            if self.adm_in_channels is None:
                raise ValueError("num_classes='sequential' needs adm_in_channels")
        dim = self.addition_time_embed_dim
        if dim is not None and (type(dim) is not int or dim < 1):
            raise ValueError(f"addition_time_embed_dim must be None or an int >= 1; got {dim!r}")
        if dim is not None and self.num_classes != "sequential":
            raise ValueError(
                "addition_time_embed_dim (SDXL's text_time vector y) needs "
                f"num_classes='sequential'; got num_classes={self.num_classes!r}"
            )
        self._check_norm_groups()

    def _check_transformer_depths(self) -> None:
        """Depth 0 would silently build a plain AttentionBlock; a level without attention is
        left out of attention_resolutions instead (SGM's SDXL yaml keeps an unused 1 there)."""
        if not self.use_spatial_transformer:
            return
        depths = self.per_level("transformer_depth")
        levels = len(self.channel_mult)
        used = [lv for lv in range(levels) if 2**lv in self.attention_resolutions] + [levels - 1]
        if not all(type(d) is int for d in depths):
            return  # wrong types: validate_spec names them
        bad = sorted({lv for lv in used if depths[lv] < 1})
        if bad:
            raise ValueError(
                f"transformer_depth {self.transformer_depth} is < 1 at level(s) {bad}, which have "
                "attention (attention_resolutions, or the middle block at the last level); leave "
                "a level out of attention_resolutions to give it no attention"
            )

    def _check_norm_groups(self) -> None:
        groups = self.norm_num_groups
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"norm_num_groups must be an int >= 1; got {groups!r}")
        mc = self.model_channels
        if not all(type(v) is int for v in (mc, *self.channel_mult)):
            return  # wrong types: validate_spec names them; no arithmetic on untrusted values
        # every GroupNorm sees model_channels or a level's width (or a sum of them)
        widths = sorted({mc} | {m * mc for m in self.channel_mult})
        bad = [c for c in widths if c % groups]
        if bad:
            raise ValueError(
                f"norm_num_groups={groups} must divide the channels of every GroupNorm "
                f"(model_channels x channel_mult = {widths}); {bad} are not divisible"
            )

    def per_level(self, name: str) -> tuple[int, ...]:
        value = getattr(self, name)
        return (value,) * len(self.channel_mult) if isinstance(value, int) else value

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """One attention layer: SpatialTransformer (depth > 0) or a plain AttentionBlock (depth 0)."""

    num_heads: int
    head_dim: int
    depth: int = 0
    disable_self_attn: bool = False


def attention_heads(config: UNetConfig, channels: int) -> tuple[int, int]:
    """(num_heads, head_dim) exactly as openaimodel derives them, `legacy` rule included."""
    if config.num_head_channels == -1:
        num_heads, dim_head = config.num_heads, channels // config.num_heads
    else:
        num_heads, dim_head = channels // config.num_head_channels, config.num_head_channels
    if config.legacy:
        dim_head = (
            channels // num_heads if config.use_spatial_transformer else config.num_head_channels
        )
    if config.use_spatial_transformer:  # SpatialTransformer(channels, num_heads, dim_head)
        return num_heads, dim_head
    # AttentionBlock(channels, num_heads, num_head_channels=dim_head): dim_head wins when set.
    if dim_head != -1:
        if channels % dim_head:
            raise ValueError(
                f"AttentionBlock channels {channels} not divisible by head width {dim_head}"
            )
        num_heads = channels // dim_head
    return num_heads, channels // num_heads


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One openaimodel input/output block (a TimestepEmbedSequential) and its place in the net."""

    index: int  # input_blocks / output_blocks index in openaimodel
    level: int
    position: int  # index among the level's res blocks (diffusers resnets/attentions index)
    in_channels: int
    out_channels: int
    attention: AttentionSpec | None = None
    resample: bool = False  # input: the block is a Downsample; output: it ends with an Upsample


@dataclasses.dataclass(frozen=True)
class UNetLayout:
    input_blocks: tuple[BlockSpec, ...]  # input_blocks 1.. (0 is conv_in)
    middle_channels: int
    middle_attention: AttentionSpec
    output_blocks: tuple[BlockSpec, ...]


def unet_layout(config: UNetConfig) -> UNetLayout:
    """Blocks in openaimodel's construction order, with channels and attention settings."""
    res_blocks, depths = config.per_level("num_res_blocks"), config.per_level("transformer_depth")

    def attention(level, channels):
        if 2**level not in config.attention_resolutions:
            return None
        heads, head_dim = attention_heads(config, channels)
        if not config.use_spatial_transformer:
            return AttentionSpec(heads, head_dim)
        disabled = bool(config.disable_self_attentions and config.disable_self_attentions[level])
        return AttentionSpec(heads, head_dim, depths[level], disabled)

    inputs, skip_channels, ch = [], [config.model_channels], config.model_channels
    for level, mult in enumerate(config.channel_mult):
        out = mult * config.model_channels
        for position in range(res_blocks[level]):
            inputs.append(
                BlockSpec(len(inputs) + 1, level, position, ch, out, attention(level, out))
            )
            ch = out
            skip_channels.append(ch)
        if level != len(config.channel_mult) - 1:
            inputs.append(
                BlockSpec(len(inputs) + 1, level, res_blocks[level], ch, ch, resample=True)
            )
            skip_channels.append(ch)

    middle_channels = ch
    heads, head_dim = attention_heads(config, ch)
    middle = AttentionSpec(heads, head_dim, depths[-1] if config.use_spatial_transformer else 0)

    outputs = []
    for level in reversed(range(len(config.channel_mult))):
        out = config.channel_mult[level] * config.model_channels
        for position in range(res_blocks[level] + 1):
            resample = level > 0 and position == res_blocks[level]
            in_ch = ch + skip_channels.pop()
            outputs.append(
                BlockSpec(
                    len(outputs), level, position, in_ch, out, attention(level, out), resample
                )
            )
            ch = out

    return UNetLayout(tuple(inputs), middle_channels, middle, tuple(outputs))


class UNet(nn.Module):
    """openaimodel.UNetModel: eps/v prediction from (x_t, t, context, y), all NHWC.

    y: class ids [B] (num_classes an int) or the adm vector [B, adm_in_channels] ("sequential";
    for SDXL the text_time vector of models/text_time.py).

    `remat` names the policy (models/remat.py) under which every ResBlock and attention layer is
    rematerialised ("none": not at all; "blocks": openaimodel's use_checkpoint); outputs are
    unchanged. `attention_implementation` is passed to `dot_product_attention` (None chooses).
    """

    config: UNetConfig
    dtype: Dtype = jnp.float32
    remat: str = "none"
    attention_implementation: str | None = None

    @nn.compact
    def __call__(self, x_BHWC, timesteps_B, context_BSD=None, y=None, *, deterministic=True):
        cfg = self.config
        timesteps_B = self._check_inputs(x_BHWC, timesteps_B, context_BSD, y)
        layout = unet_layout(cfg)
        d = self.dtype

        t_emb = timestep_embedding(timesteps_B, cfg.model_channels)
        emb = dense(cfg.time_embed_dim, name="time_embed_in", dtype=d)(t_emb)
        emb = dense(cfg.time_embed_dim, name="time_embed_out", dtype=d)(nn.silu(emb))
        if isinstance(cfg.num_classes, int):
            label = embedding(cfg.num_classes, cfg.time_embed_dim, name="label_emb")(y)
            emb = emb + label.astype(emb.dtype)
        elif cfg.num_classes == "sequential":
            label = dense(cfg.time_embed_dim, name="label_emb_in", dtype=d)(y)
            emb = emb + dense(cfg.time_embed_dim, name="label_emb_out", dtype=d)(nn.silu(label))

        def run(module, *args):
            """Call a ResBlock or attention layer, rematerialised under the remat policy.
            `deterministic` stays a Python bool closed over, never traced."""

            def call(mdl, *a):
                if isinstance(mdl, AttentionBlock):
                    return mdl(*a)
                return mdl(*a, deterministic=deterministic)

            if self.remat == "none":
                return call(module, *args)
            return nn.remat(call, policy=remat_policy(self.remat))(module, *args)

        def res_block(name, out_channels, resample=None):
            return ResBlock(
                out_channels,
                cfg.use_scale_shift_norm,
                resample,
                cfg.dropout,
                dtype=d,
                norm_num_groups=cfg.norm_num_groups,
                name=name,
            )

        def attend(name, spec, h):
            if spec.depth == 0:
                block = AttentionBlock(
                    spec.num_heads,
                    spec.head_dim,
                    norm_eps=NORM_EPS,
                    upcast=cfg.upcast_attention,
                    zero_init_out=True,
                    implementation=self.attention_implementation,
                    dtype=d,
                    norm_num_groups=cfg.norm_num_groups,
                    name=name,
                )
                return run(block, h)
            block = SpatialTransformer(
                spec.num_heads,
                spec.head_dim,
                depth=spec.depth,
                dropout=cfg.dropout,
                context_dim=cfg.context_dim,
                disable_self_attn=spec.disable_self_attn,
                upcast=cfg.upcast_attention,
                implementation=self.attention_implementation,
                dtype=d,
                norm_num_groups=cfg.norm_num_groups,
                name=name,
            )
            return run(block, h, context_BSD)

        h = conv(cfg.model_channels, 3, name="conv_in", dtype=d)(x_BHWC.astype(d))
        hs = [h]
        for block in layout.input_blocks:
            name = f"input_blocks_{block.index}"
            if block.resample and cfg.resblock_updown:
                h = run(res_block(f"{name}_down", block.out_channels, "down"), h, emb)
            elif block.resample:
                h = Downsample(cfg.conv_resample, d, name=f"{name}_down")(h)
            else:
                h = run(res_block(f"{name}_res", block.out_channels), h, emb)
                if block.attention is not None:
                    h = attend(f"{name}_attn", block.attention, h)
            hs.append(h)

        h = run(res_block("middle_res_0", layout.middle_channels), h, emb)
        h = attend("middle_attn", layout.middle_attention, h)
        h = run(res_block("middle_res_1", layout.middle_channels), h, emb)

        for block in layout.output_blocks:
            name = f"output_blocks_{block.index}"
            h = jnp.concatenate([h, hs.pop()], axis=-1)
            h = run(res_block(f"{name}_res", block.out_channels), h, emb)
            if block.attention is not None:
                h = attend(f"{name}_attn", block.attention, h)
            if block.resample and cfg.resblock_updown:
                h = run(res_block(f"{name}_up", block.out_channels, "up"), h, emb)
            elif block.resample:
                h = Upsample(cfg.conv_resample, d, name=f"{name}_up")(h)

        h = nn.silu(GroupNorm(cfg.norm_num_groups, NORM_EPS, d, name="out_norm")(h))
        return conv(cfg.out_channels, 3, name="out_conv", dtype=d, zero_init=True)(h)

    def _check_inputs(self, x_BHWC, timesteps_B, context_BSD, y) -> jax.Array:
        """Raise ValueError for inputs this network cannot take; returns timesteps as [B]."""
        cfg = self.config
        if x_BHWC.ndim != 4 or x_BHWC.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"x must be [B, H, W, {cfg.in_channels}] (NHWC, in_channels={cfg.in_channels}); "
                f"got shape {x_BHWC.shape}"
            )
        b, height, width, _ = x_BHWC.shape
        f = cfg.downsampling_factor
        if height % f or width % f:
            raise ValueError(
                f"height and width must be multiples of {f} (2 ** (len(channel_mult) - 1)); "
                f"got {height}x{width}"
            )
        timesteps_B = jnp.asarray(timesteps_B)
        if timesteps_B.ndim == 0:
            timesteps_B = jnp.broadcast_to(timesteps_B, (b,))
        if timesteps_B.shape != (b,):
            raise ValueError(f"timesteps must be a scalar or [{b}]; got {timesteps_B.shape}")
        if cfg.use_spatial_transformer:
            want = f"[{b}, S, {cfg.context_dim}]"
            if context_BSD is None:
                raise ValueError(f"this UNet cross-attends to a context {want}; got None")
            if context_BSD.ndim != 3 or context_BSD.shape[0] != b:
                raise ValueError(f"context must be {want}; got shape {context_BSD.shape}")
            if context_BSD.shape[-1] != cfg.context_dim:
                raise ValueError(
                    f"context width {context_BSD.shape[-1]} != context_dim {cfg.context_dim}"
                )
        elif context_BSD is not None:
            raise ValueError("this UNet has no cross-attention (context_dim=None); got a context")
        if cfg.num_classes is None:
            if y is not None:
                raise ValueError("this UNet is not class-conditional (num_classes=None); got y")
        elif y is None:
            raise ValueError(f"this UNet needs y (num_classes={cfg.num_classes!r}); got None")
        elif cfg.num_classes == "sequential" and y.shape != (b, cfg.adm_in_channels):
            raise ValueError(f"y must be [{b}, {cfg.adm_in_channels}]; got shape {y.shape}")
        elif isinstance(cfg.num_classes, int) and y.shape != (b,):
            raise ValueError(f"y must be [{b}] class ids in [0, {cfg.num_classes}); got {y.shape}")
        return timesteps_B
