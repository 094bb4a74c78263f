"""A functional PyTorch forward of CompVis openaimodel.UNetModel that reads CompVis-named tensors.

Written from ldm/modules/diffusionmodules/openaimodel.py and ldm/modules/attention.py
(Stability-AI/stablediffusion): the same construction loops (channels, heads, `legacy` rule,
child numbering inside each TimestepEmbedSequential) and the same forward, but as plain
functions over a state dict, so that a CompVis-layout state dict can be run without the original
repository. Tests compare it with diffusers (where diffusers can express the model) and with our
UNet (everywhere), which checks the CompVis key table numerically.
"""

import math

import torch
import torch.nn.functional as F

from ldm_jax.models.unet import UNetConfig


class _Net:
    def __init__(self, sd: dict[str, torch.Tensor], cfg: UNetConfig):
        self.sd, self.cfg = sd, cfg
        self.used: set[str] = set()

    def w(self, key: str) -> torch.Tensor:
        self.used.add(key)
        return self.sd[key]

    def has(self, key: str) -> bool:
        return key in self.sd

    def group_norm(self, p, x, eps):
        return F.group_norm(x.float(), 32, self.w(f"{p}.weight"), self.w(f"{p}.bias"), eps)

    def conv(self, p, x, **kwargs):
        return F.conv2d(x, self.w(f"{p}.weight"), self.w(f"{p}.bias"), **kwargs)

    def linear(self, p, x, bias=True):
        return F.linear(x, self.w(f"{p}.weight"), self.w(f"{p}.bias") if bias else None)

    def resblock(self, p, x, emb, updown=None):
        h = F.silu(self.group_norm(f"{p}.in_layers.0", x, 1e-5))
        if updown == "down":
            h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
        elif updown == "up":
            h, x = F.interpolate(h, scale_factor=2.0), F.interpolate(x, scale_factor=2.0)
        h = self.conv(f"{p}.in_layers.2", h, padding=1)
        emb_out = self.linear(f"{p}.emb_layers.1", F.silu(emb))[:, :, None, None]
        if self.cfg.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.group_norm(f"{p}.out_layers.0", h, 1e-5) * (1 + scale) + shift
        else:
            h = self.group_norm(f"{p}.out_layers.0", h + emb_out, 1e-5)
        h = self.conv(f"{p}.out_layers.3", F.silu(h), padding=1)
        if self.has(f"{p}.skip_connection.weight"):
            x = self.conv(f"{p}.skip_connection", x)
        return x + h

    def attention_block(self, p, x, num_heads):
        """AttentionBlock with QKVAttentionLegacy: heads split before q/k/v."""
        b, c, hh, ww = x.shape
        xf = x.reshape(b, c, -1)
        qkv = F.conv1d(
            self.group_norm(f"{p}.norm", xf, 1e-5),
            self.w(f"{p}.qkv.weight"),
            self.w(f"{p}.qkv.bias"),
        )
        length = qkv.shape[-1]
        ch = qkv.shape[1] // (3 * num_heads)
        q, k, v = qkv.reshape(b * num_heads, ch * 3, length).split(ch, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
        a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, -1, length)
        h = F.conv1d(a, self.w(f"{p}.proj_out.weight"), self.w(f"{p}.proj_out.bias"))
        return (xf + h).reshape(b, c, hh, ww)

    def cross_attention(self, p, x, context, heads):
        q = self.linear(f"{p}.to_q", x, bias=False)
        k = self.linear(f"{p}.to_k", context, bias=False)
        v = self.linear(f"{p}.to_v", context, bias=False)
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return self.linear(f"{p}.to_out.0", out)

    def spatial_transformer(self, p, x, context, heads, depth, disable_self_attn):
        b, c, hh, ww = x.shape
        x_in = x
        x = self.group_norm(f"{p}.norm", x, 1e-6)
        linear = self.cfg.use_linear_in_transformer
        if not linear:
            x = self.conv(f"{p}.proj_in", x)
        x = x.flatten(2).transpose(1, 2)
        if linear:
            x = self.linear(f"{p}.proj_in", x)
        for i in range(depth):
            t = f"{p}.transformer_blocks.{i}"

            def ln(n, y, t=t):
                return F.layer_norm(
                    y, y.shape[-1:], self.w(f"{t}.norm{n}.weight"), self.w(f"{t}.norm{n}.bias")
                )

            ctx1 = context if disable_self_attn else ln(1, x)
            x = self.cross_attention(f"{t}.attn1", ln(1, x), ctx1, heads) + x
            x = self.cross_attention(f"{t}.attn2", ln(2, x), context, heads) + x
            a, gate = self.linear(f"{t}.ff.net.0.proj", ln(3, x)).chunk(2, dim=-1)
            x = self.linear(f"{t}.ff.net.2", a * F.gelu(gate)) + x
        if linear:
            x = self.linear(f"{p}.proj_out", x)
        x = x.transpose(1, 2).reshape(b, -1, hh, ww)
        if not linear:
            x = self.conv(f"{p}.proj_out", x)
        return x + x_in


def _heads(cfg: UNetConfig, ch: int, upsample: bool = False) -> tuple[int, int]:
    """(heads, dim_head) exactly as UNetModel.__init__ computes them for a layer of ch channels."""
    num_heads = cfg.num_heads
    if cfg.num_head_channels == -1:
        dim_head = ch // num_heads
    else:
        num_heads, dim_head = ch // cfg.num_head_channels, cfg.num_head_channels
    if cfg.legacy:
        dim_head = ch // num_heads if cfg.use_spatial_transformer else cfg.num_head_channels
    if cfg.use_spatial_transformer:
        return num_heads, dim_head
    # AttentionBlock(num_heads=num_heads or num_heads_upsample (= cfg.num_heads), dim_head)
    heads = (cfg.num_heads if upsample else num_heads) if dim_head == -1 else ch // dim_head
    return heads, dim_head


def _timestep_embedding(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def unet_forward(sd, cfg: UNetConfig, x, timesteps, context=None, y=None):
    """openaimodel.UNetModel.forward on NCHW tensors; returns (output, keys read)."""
    net = _Net(sd, cfg)
    levels = len(cfg.channel_mult)
    res_blocks = cfg.per_level("num_res_blocks")
    depths = cfg.per_level("transformer_depth")
    disabled = cfg.disable_self_attentions or (False,) * levels

    def attend(p, h, ch, level, upsample=False):
        heads, _ = _heads(cfg, ch, upsample)
        if cfg.use_spatial_transformer:
            depth = depths[-1] if level is None else depths[level]
            off = False if level is None else disabled[level]
            return net.spatial_transformer(p, h, context, heads, depth, off)
        return net.attention_block(p, h, heads)

    emb = net.linear("time_embed.0", _timestep_embedding(timesteps, cfg.model_channels))
    emb = net.linear("time_embed.2", F.silu(emb))
    if isinstance(cfg.num_classes, int):
        emb = emb + F.embedding(y, net.w("label_emb.weight"))
    elif cfg.num_classes == "sequential":
        emb = emb + net.linear("label_emb.0.2", F.silu(net.linear("label_emb.0.0", y)))

    h = net.conv("input_blocks.0.0", x, padding=1)
    hs, ds, index, ch = [h], 1, 1, cfg.model_channels
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(res_blocks[level]):
            h = net.resblock(f"input_blocks.{index}.0", h, emb)
            ch = mult * cfg.model_channels
            if ds in cfg.attention_resolutions:
                h = attend(f"input_blocks.{index}.1", h, ch, level)
            hs.append(h)
            index += 1
        if level != levels - 1:
            p = f"input_blocks.{index}.0"
            if cfg.resblock_updown:
                h = net.resblock(p, h, emb, "down")
            elif cfg.conv_resample:
                h = net.conv(f"{p}.op", h, stride=2, padding=1)
            else:
                h = F.avg_pool2d(h, 2)
            hs.append(h)
            index, ds = index + 1, ds * 2

    h = net.resblock("middle_block.0", h, emb)
    h = attend("middle_block.1", h, ch, None)
    h = net.resblock("middle_block.2", h, emb)

    index = 0
    for level, mult in reversed(list(enumerate(cfg.channel_mult))):
        for i in range(res_blocks[level] + 1):
            h = net.resblock(f"output_blocks.{index}.0", torch.cat([h, hs.pop()], dim=1), emb)
            ch, child = cfg.model_channels * mult, 1
            if ds in cfg.attention_resolutions:
                h = attend(f"output_blocks.{index}.1", h, ch, level, upsample=True)
                child = 2
            if level and i == res_blocks[level]:
                p = f"output_blocks.{index}.{child}"
                if cfg.resblock_updown:
                    h = net.resblock(p, h, emb, "up")
                else:
                    h = F.interpolate(h, scale_factor=2.0, mode="nearest")
                    if cfg.conv_resample:
                        h = net.conv(f"{p}.conv", h, padding=1)
                ds //= 2
            index += 1

    h = F.silu(net.group_norm("out.0", h, 1e-5))
    return net.conv("out.2", h, padding=1), net.used
