"""Chapter 7 — the denoising U-Net of Stable Diffusion v1, conditioned on text by cross-attention.

The U-Net ε_θ(z_t, t, τ(y)) predicts the noise in a latent z_t at timestep t, given the text encoding τ(y)
(Rombach et al. 2022, eq. 2: L = E ‖ε − ε_θ(z_t, t, τ(y))‖²). Three inputs, three ways in:

  * the latent z_t goes down a ladder of resolutions (64 → 32 → 16 → 8 for SD's 64×64 latents) and back up;
    every activation saved on the way down is concatenated onto the way up (the skip connections, Ronneberger
    et al. 2015), so fine detail lost by downsampling is handed straight to the decoder;
  * the timestep t becomes a sinusoid → MLP vector `temb` that is ADDED inside every ResnetBlock
    (minidiff.nn.ResnetBlock: h = h + Linear(SiLU(temb))) — every layer knows how noisy its input is;
  * the text enters ONLY through cross-attention (Rombach et al. 2022, eq. 3):
        Attention(Q, K, V) = softmax(Q Kᵀ / √d) V,  Q = W_Q φ(z_t),  K = W_K τ(y),  V = W_V τ(y)
    the queries are the image's pixels, the keys and values the prompt's tokens: each pixel reads the words it
    needs. A SpatialTransformer sits after each ResnetBlock of the levels that have one (SD: the top three down,
    the middle, the top three up).

    config = UNetConfig()                     # SD v1.4: 859,520,964 parameters
    unet = UNet(config)
    eps = unet(latents, t, context)           # [B, 4, h, w], [B] / int, [B, 77, 768] -> [B, 4, h, w]

Parameter names are diffusers' `UNet2DConditionModel` state_dict keys, so its weights load with strict=True.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from .formats import configs
from .nn import ResnetBlock, TimestepEmbedding, TransformerBlock
from .nn.layers import Conv2d, GroupNorm


# --------------------------------------------------------------------------------------------------- config
@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple = (320, 640, 1280, 1280)   # width of each level, top (full resolution) to bottom
    layers_per_block: int = 2                            # ResnetBlocks per down level (the up levels have one more)
    cross_attention: tuple = (True, True, True, False)   # per down level: transformers or not (up path: reversed)
    # NB diffusers' SD v1 config calls this `attention_head_dim: 8`, but it is the NUMBER of heads
    # (diffusers issue #2011); each head is channels // heads wide (40, 80, 160, 160 in SD v1).
    heads: int = 8
    cross_attention_dim: int = 768                       # width of the text encoding τ(y): CLIP ViT-L/14's 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True                         # timestep sinusoid as [cos, sin]
    freq_shift: int = 0
    sample_size: int | None = 64                         # the latent size it was trained at (512 px / 8)
    transformer_layers: int = 1                          # TransformerBlocks per SpatialTransformer

    def __post_init__(self):
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        self.cross_attention = tuple(bool(a) for a in self.cross_attention)
        if len(self.cross_attention) != len(self.block_out_channels):
            raise ValueError(f"cross_attention has {len(self.cross_attention)} entries, block_out_channels "
                             f"{len(self.block_out_channels)}: one flag per level")
        for c in self.block_out_channels:
            if c % self.heads:
                raise ValueError(f"{c} channels do not split into heads={self.heads} heads")
            g = self.norm_num_groups  # every GroupNorm of a level splits its c channels into g groups
            if c % g:
                raise ValueError(f"block_out_channels {list(self.block_out_channels)} do not split into "
                                 f"norm_num_groups={g} groups ({c} % {g} = {c % g})")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]   # 1280 in SD v1

    # diffusers' config.json <-> UNetConfig: the translation is minidiff/formats/configs.py
    @classmethod
    def from_diffusers(cls, d: dict) -> "UNetConfig":
        """A diffusers `unet/config.json` dict (or a UNet2DConditionModel's `.config`) -> UNetConfig; ValueError
        naming every key of an architecture other than SD v1's. (formats.configs.unet_from_diffusers)"""
        return configs.unet_from_diffusers(cls, d)

    def to_diffusers(self) -> dict:
        """The config.json dict of the same model; diffusers' UNet2DConditionModel(**d) builds it.
        (formats.configs.unet_to_diffusers)"""
        return configs.unet_to_diffusers(self)


# --------------------------------------------------------------------------------------------------- blocks
def _run(module, *args, enabled: bool = False):
    """module(*args), or recomputed in the backward pass instead of storing its activations (gradient
    checkpointing: trades one extra forward for the memory of every intermediate inside `module`)."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


class Downsample(nn.Module):
    """Halve the resolution with a learned 3×3 stride-2 conv (padding 1): [B, C, H, W] -> [B, C, ⌈H/2⌉, ⌈W/2⌉]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour ×2 (or to `size`, when the down path rounded an odd size up), then a 3×3 conv.
    [B, C, H, W] -> [B, C, 2H, 2W] (or [B, C, *size])."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size=None):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest") if size is None else \
            F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class SpatialTransformer(nn.Module):
    """Lets every pixel of a feature map attend to the other pixels and to the text.

    GroupNorm (eps 1e-6) -> 1×1 conv proj_in -> pixels as tokens [B, HW, C] -> TransformerBlocks
    (self-attention, cross-attention onto the context = eq. 3's K, V = W τ(y), MLP) -> back to [B, C, H, W]
    -> 1×1 conv proj_out -> + the input (a residual, like the ResnetBlocks around it).
    x: [B, C, H, W], context: [B, S, context_dim] -> [B, C, H, W].
    """

    def __init__(self, channels: int, heads: int, context_dim: int, depth: int = 1, groups: int = 32):
        super().__init__()
        self.norm = GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(channels, heads, channels // heads, context_dim) for _ in range(depth)])
        self.proj_out = Conv2d(channels, channels, 1)

    def forward(self, x, context):
        H, W = x.shape[-2:]
        h = self.proj_in(self.norm(x))                      # [B, C, H, W]
        h = rearrange(h, "b c h w -> b (h w) c")            # one token per pixel: [B, HW, C]
        for block in self.transformer_blocks:
            h = block(h, context)                           # [B, HW, C]; the text enters here (attn2)
        h = rearrange(h, "b (h w) c -> b c h w", h=H, w=W)  # [B, C, H, W]
        return x + self.proj_out(h)


class DownBlock(nn.Module):
    """One level of the encoder: `layers` × (ResnetBlock [+ SpatialTransformer]), then an optional Downsample.

    x: [B, C_in, H, W] -> ([B, C, H/2, W/2] (or [B, C, H, W] at the bottom level),
                           the list of every intermediate output, kept for the skip connections).
    """

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, layers: int, cfg: UNetConfig, attention: bool,
                 downsample: bool):
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_ch if j == 0 else out_ch, out_ch, temb_ch, groups=g, eps=eps) for j in range(layers)])
        if attention:
            self.attentions = nn.ModuleList(
                [SpatialTransformer(out_ch, cfg.heads, cfg.cross_attention_dim, cfg.transformer_layers, g)
                 for _ in range(layers)])
        if downsample:
            self.downsamplers = nn.ModuleList([Downsample(out_ch)])  # a list of one: the key is downsamplers.0.conv
        self.gradient_checkpointing = False

    def forward(self, x, temb, context):
        ck = self.gradient_checkpointing
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = _run(resnet, x, temb, enabled=ck)                       # the timestep is added in here
            if hasattr(self, "attentions"):
                x = _run(self.attentions[j], x, context, enabled=ck)    # the text is read in here
            skips.append(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """The bottom of the U, at the lowest resolution (8×8 for SD's 64×64 latents):
    ResnetBlock -> SpatialTransformer -> ResnetBlock. [B, C, H, W] -> [B, C, H, W]."""

    def __init__(self, ch: int, temb_ch: int, cfg: UNetConfig):
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, temb_ch, groups=g, eps=eps) for _ in range(2)])
        self.attentions = nn.ModuleList(
            [SpatialTransformer(ch, cfg.heads, cfg.cross_attention_dim, cfg.transformer_layers, g)])
        self.gradient_checkpointing = False

    def forward(self, x, temb, context):
        ck = self.gradient_checkpointing
        x = _run(self.resnets[0], x, temb, enabled=ck)
        x = _run(self.attentions[0], x, context, enabled=ck)
        return _run(self.resnets[1], x, temb, enabled=ck)


class UpBlock(nn.Module):
    """One level of the decoder: `layers` × (concat a skip -> ResnetBlock [+ SpatialTransformer]), then an
    optional Upsample.

    x: [B, C_prev, H, W], skips: the down path's stack (this block pops `layers` entries off its end)
    -> [B, C, 2H, 2W] (or [B, C, H, W] at the top level).
    """

    def __init__(self, in_chs: list[int], out_ch: int, temb_ch: int, cfg: UNetConfig, attention: bool,
                 upsample: bool):
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        # in_chs[j] = channels of x plus channels of the skip concatenated onto it before ResnetBlock j
        self.resnets = nn.ModuleList([ResnetBlock(c, out_ch, temb_ch, groups=g, eps=eps) for c in in_chs])
        if attention:
            self.attentions = nn.ModuleList(
                [SpatialTransformer(out_ch, cfg.heads, cfg.cross_attention_dim, cfg.transformer_layers, g)
                 for _ in in_chs])
        if upsample:
            self.upsamplers = nn.ModuleList([Upsample(out_ch)])
        self.gradient_checkpointing = False

    def forward(self, x, temb, context, skips: list):
        ck = self.gradient_checkpointing
        for j, resnet in enumerate(self.resnets):
            x = torch.cat([x, skips.pop()], dim=1)                      # [B, C_x + C_skip, H, W]
            x = _run(resnet, x, temb, enabled=ck)
            if hasattr(self, "attentions"):
                x = _run(self.attentions[j], x, context, enabled=ck)
        if hasattr(self, "upsamplers"):
            # upsample to exactly the size of the next skip: an odd size H went down to ⌈H/2⌉, and ×2 would
            # overshoot it (diffusers' forward_upsample_size); for even sizes this is the plain ×2
            x = self.upsamplers[0](x, size=skips[-1].shape[-2:])
        return x


# --------------------------------------------------------------------------------------------------- U-Net
class UNet(nn.Module):
    """ε_θ(z_t, t, τ(y)): latents [B, C_in, h, w], t [B] (or an int / 0-dim tensor for the whole batch),
    context [B, S, cross_attention_dim] -> predicted noise [B, C_out, h, w]."""

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        cfg = self.config = config or UNetConfig()
        chs, L, n = cfg.block_out_channels, cfg.layers_per_block, len(cfg.block_out_channels)
        temb = cfg.time_embed_dim

        self.conv_in = Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        # t -> sinusoid of width chs[0] -> Linear -> SiLU -> Linear: [B] -> [B, 4·chs[0]]
        self.time_embedding = TimestepEmbedding(chs[0], temb, cfg.flip_sin_to_cos, cfg.freq_shift)

        # down: record the channels of every activation pushed on the skip stack, to size the up path's convs
        skip_chs = [chs[0]]  # conv_in's output is the first skip
        self.down_blocks = nn.ModuleList()
        for i, ch in enumerate(chs):
            last = i == n - 1
            self.down_blocks.append(DownBlock(chs[i - 1] if i else chs[0], ch, temb, L, cfg, cfg.cross_attention[i],
                                              downsample=not last))
            skip_chs += [ch] * (L + (not last))

        self.mid_block = MidBlock(chs[-1], temb, cfg)

        # up: levels deepest first; each pops L + 1 skips (one more than its down twin pushed: the extra one is
        # the twin's input, i.e. the level above's downsampled output or conv_in's output)
        self.up_blocks = nn.ModuleList()
        x_ch = chs[-1]
        for i, ch in enumerate(reversed(chs)):
            in_chs = []
            for _ in range(L + 1):
                in_chs.append(x_ch + skip_chs.pop())
                x_ch = ch
            self.up_blocks.append(UpBlock(in_chs, ch, temb, cfg, cfg.cross_attention[n - 1 - i],
                                          upsample=i < n - 1))

        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, chs[0], eps=cfg.norm_eps)
        self.conv_out = Conv2d(chs[0], cfg.out_channels, 3, padding=1)

    def enable_gradient_checkpointing(self):
        for block in self._blocks():
            block.gradient_checkpointing = True

    def disable_gradient_checkpointing(self):
        for block in self._blocks():
            block.gradient_checkpointing = False

    def _blocks(self):
        return [*self.down_blocks, self.mid_block, *self.up_blocks]

    def forward(self, latents, t, context):
        temb = self.time_embedding(_batch_timesteps(t, latents))   # [B, 4·C0]

        x = self.conv_in(latents)                                    # [B, C0, h, w]
        skips = [x]
        for block in self.down_blocks:                               # h, w halve at every level but the last
            x, outs = block(x, temb, context)
            skips += outs
        x = self.mid_block(x, temb, context)                         # [B, C_last, h/2^(n-1), w/2^(n-1)]
        for block in self.up_blocks:                                 # pops the skips, doubles h, w back
            x = block(x, temb, context, skips)
        eps = self.conv_out(self.conv_norm_out(x, silu=True))       # [B, C_out, h, w]
        return eps.contiguous()   # NCHW strides whatever layout the kernels computed in (see kernels/onednn.py)


def _batch_timesteps(t, latents):
    """t as a [B] tensor on the latents' device: an int / float / 0-dim / [1] tensor is broadcast to the batch."""
    if not torch.is_tensor(t):
        t = torch.tensor([t], dtype=torch.float32 if isinstance(t, float) else torch.long)
    return t.reshape(-1).to(latents.device).expand(latents.shape[0])   # [] or [1] or [B] -> [B]


__all__ = ["UNetConfig", "UNet", "SpatialTransformer", "DownBlock", "UpBlock", "MidBlock", "Downsample", "Upsample"]
