"""Chapter 6 — the KL-regularized autoencoder: Stable Diffusion's VAE (diffusers' `AutoencoderKL`).

Latent diffusion (Rombach et al., 2022, §3) runs the diffusion model not on pixels but on a small latent image.
An encoder E maps x [B, 3, H, W] to z [B, 4, H/f, W/f] with downsampling factor f = 2^(levels-1) (SD: 4 levels,
f = 8, 512x512x3 -> 64x64x4, 48x fewer numbers); a decoder D maps z back to pixels, D(E(x)) ≈ x.

A plain autoencoder would do, except that nothing stops its latents from spreading over an arbitrary, badly
scaled, holey region, and the diffusion model has to learn that region. The variational autoencoder
(Kingma & Welling, 2014) makes the encoder output a distribution q(z|x) = N(μ(x), diag σ²(x)) and trains on the
evidence lower bound

    log p(x) ≥ ELBO = E_{z~q(z|x)}[ log p(x|z) ] - KL( q(z|x) || p(z) ),   p(z) = N(0, I)

with the reparameterization z = μ + σ ⊙ ε, ε ~ N(0, I), so gradients flow into μ and σ. For diagonal Gaussians the
KL term has a closed form, summed over every latent element (channel, row, column):

    KL( N(μ, σ²) || N(0, 1) ) = ½ Σ ( μ² + σ² - 1 - log σ² )

SD's "KL-reg" autoencoder (Rombach §3, appendix G) keeps only a whisper of that term — weight 1e-6 beside an L1 +
perceptual + adversarial reconstruction loss — enough to stop the latents from drifting to huge values, not enough
to make them N(0, I): their std is about 1/0.18215 ≈ 5.5, hence `scaling_factor`. The diffusion model sees
z·0.18215; the pipeline divides by it again before `decode`.

The network is all ResnetBlocks (chapter 1) with one single-head self-attention in the middle of each side:

    encoder: conv_in -> [ResnetBlock x layers, Downsample] per level (none after the last) -> mid -> norm,SiLU,conv_out
    mid:     ResnetBlock -> AttentionBlock -> ResnetBlock
    decoder: conv_in -> mid -> [ResnetBlock x (layers+1), Upsample] per level, deepest first -> norm, SiLU, conv_out

Parameter names are diffusers' `AutoencoderKL` state_dict keys, so its weights load with strict=True.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .formats import configs
from .nn import CrossAttention, ResnetBlock
from .nn.layers import Conv2d, GroupNorm

EPS = 1e-6  # every GroupNorm in SD's VAE uses eps = 1e-6 (the U-Net's use 1e-5)


# ----------------------------------------------------------------------------------------------------- config
@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple = (128, 256, 512, 512)  # one entry per level; f = 2^(len - 1)
    layers_per_block: int = 2                         # ResnetBlocks per encoder level (the decoder has one more)
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512                            # the training resolution (only used by tiling, later)
    scaling_factor: float = 0.18215                   # z_diffusion = z_vae * scaling_factor
    use_quant_conv: bool = True                       # 1x1 conv on the moments after the encoder
    use_post_quant_conv: bool = True                  # 1x1 conv on z before the decoder

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        if isinstance(self.sample_size, list):
            self.sample_size = tuple(self.sample_size)
        g = self.norm_num_groups  # every GroupNorm of a level splits its c channels into g groups
        for c in self.block_out_channels:
            if c % g:
                raise ValueError(f"block_out_channels {list(self.block_out_channels)} do not split into "
                                 f"norm_num_groups={g} groups ({c} % {g} = {c % g})")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    # diffusers' config.json <-> VAEConfig: the translation is minidiff/formats/configs.py
    @classmethod
    def from_diffusers(cls, d: dict) -> "VAEConfig":
        """A diffusers `vae/config.json` dict (or `AutoencoderKL.config`) -> VAEConfig; ValueError naming the key for
        anything this implementation does not build. (formats.configs.vae_from_diffusers)"""
        return configs.vae_from_diffusers(cls, d)

    def to_diffusers(self) -> dict:
        """A dict diffusers' `AutoencoderKL(**d)` / `AutoencoderKL.from_config(d)` accepts (what config.json holds).
        (formats.configs.vae_to_diffusers)"""
        return configs.vae_to_diffusers(self)


# ------------------------------------------------------------------------------------------ the posterior q(z|x)
def _randn(shape, generator, device, dtype):
    """ε ~ N(0, I) drawn as diffusers' `randn_tensor` draws it: on the generator's device (a CPU generator draws on
    the CPU, then the tensor moves), and with a list of generators one per batch item — so a seed gives the same ε
    on any device."""
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, list):
        return torch.cat([_randn((1, *shape[1:]), g, device, dtype) for g in generator])
    rand_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(std²)), built from the encoder's moments [B, 2·latent, h, w] = [mean | log σ²].

    mean, logvar, std, var: [B, latent, h, w]. Mirrors diffusers' DiagonalGaussianDistribution."""

    def __init__(self, moments: torch.Tensor):
        self.moments = moments
        self.mean, logvar = moments.chunk(2, dim=1)     # [B, 2C, h, w] -> 2 x [B, C, h, w]
        # clamped as diffusers/LDM do: σ² in [e^-30, e^20], so exp() neither underflows to 0 nor overflows
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator=None) -> torch.Tensor:
        """The reparameterization trick: z = μ + σ ⊙ ε, ε ~ N(0, I). -> [B, C, h, w]"""
        eps = _randn(self.mean.shape, generator, self.mean.device, self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        """The most likely z, μ. (diffusers' image-to-image and inpainting pipelines, and minidiff's, use sample(generator)
        instead, so that a seed fixes the result.)"""
        return self.mean

    def kl(self, other: "DiagonalGaussian | None" = None) -> torch.Tensor:
        """KL(self || other) summed over C, H, W -> [B]; other = None means the prior N(0, I):

            KL(N(μ₁,σ₁²) || N(μ₂,σ₂²)) = ½ Σ [ (μ₁-μ₂)²/σ₂² + σ₁²/σ₂² - 1 - log σ₁² + log σ₂² ]
        """
        if other is None:
            return 0.5 * torch.sum(self.mean ** 2 + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum((self.mean - other.mean) ** 2 / other.var + self.var / other.var
                               - 1.0 - self.logvar + other.logvar, dim=[1, 2, 3])

    def nll(self, x: torch.Tensor, dims=(1, 2, 3)) -> torch.Tensor:
        """-log q(x) of a sample x [B, C, h, w], summed over dims -> [B]:  ½ Σ [ log 2π + log σ² + (x-μ)²/σ² ]"""
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar + (x - self.mean) ** 2 / self.var, dim=list(dims))


# --------------------------------------------------------------------------------------------- building blocks
class AttentionBlock(CrossAttention):
    """Single-head self-attention across all h·w positions, with a GroupNorm in front and a residual around it.

    x [B, C, H, W] -> [B, C, H, W]. One head of width C, q/k/v/out Linears with biases. In SD it runs at the deepest
    level only: a 512px image is 64x64 = 4096 tokens of width 512 there."""

    def __init__(self, channels: int, groups: int):
        super().__init__(channels, heads=1, dim_head=channels, qkv_bias=True)
        self.group_norm = GroupNorm(groups, channels, eps=EPS)

    def forward(self, x):
        H, W = x.shape[-2:]
        h = rearrange(self.group_norm(x), "b c h w -> b (h w) c")  # pixels as tokens: [B, HW, C]
        h = super().forward(h)                                     # [B, HW, C]
        return x + rearrange(h, "b (h w) c -> b c h w", h=H, w=W)  # [B, C, H, W]


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv. [B, C, H, W] -> [B, C, H/2, W/2].

    Padding is asymmetric, one zero row/column at the bottom/right only (as LDM trained it), not padding=1."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # [B, C, H, W] -> [B, C, H+1, W+1] -> [B, C, H/2, W/2]


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour copy, then a 3x3 conv to smooth the blocks. [B, C, H, W] -> [B, C, 2H, 2W]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # [B, C, 2H, 2W]


class DownBlock(nn.Module):
    """One encoder level (diffusers' DownEncoderBlock2D): n ResnetBlocks, then maybe a Downsample."""

    def __init__(self, in_ch: int, out_ch: int, n: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups=groups, eps=EPS)
                                      for i in range(n)])
        if downsample:  # a list of one, for the key name "downsamplers.0.conv"
            self.downsamplers = nn.ModuleList([Downsample(out_ch)])

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if hasattr(self, "downsamplers") else x


class UpBlock(nn.Module):
    """One decoder level (diffusers' UpDecoderBlock2D): n ResnetBlocks, then maybe an Upsample."""

    def __init__(self, in_ch: int, out_ch: int, n: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups=groups, eps=EPS)
                                      for i in range(n)])
        if upsample:
            self.upsamplers = nn.ModuleList([Upsample(out_ch)])

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if hasattr(self, "upsamplers") else x


class MidBlock(nn.Module):
    """ResnetBlock -> AttentionBlock -> ResnetBlock at the lowest resolution: the one place every pixel sees every
    other (global context: colour casts, symmetric structure). [B, C, h, w] -> [B, C, h, w]."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups=groups, eps=EPS) for _ in range(2)])
        self.attentions = nn.ModuleList([AttentionBlock(channels, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


# ---------------------------------------------------------------------------------------- encoder and decoder
class Encoder(nn.Module):
    """x [B, in, H, W] -> [B, out, H/f, W/f]; out = 2·latent (moments μ, log σ²) for the VAE, latent for a plain AE."""

    def __init__(self, config: VAEConfig, out_channels: int):
        super().__init__()
        ch, g, n = config.block_out_channels, config.norm_num_groups, len(config.block_out_channels)
        self.conv_in = Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownBlock(ch[max(i - 1, 0)], ch[i], config.layers_per_block, g, downsample=i < n - 1) for i in range(n)])
        self.mid_block = MidBlock(ch[-1], g)
        self.conv_norm_out = GroupNorm(g, ch[-1], eps=EPS)
        self.conv_out = Conv2d(ch[-1], out_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)                            # [B, ch0, H, W]
        for block in self.down_blocks:
            h = block(h)                               # halves H, W at every level but the last
        h = self.mid_block(h)                          # [B, ch[-1], H/f, W/f]
        return self.conv_out(self.conv_norm_out(h, silu=True))


class Decoder(nn.Module):
    """z [B, latent, h, w] -> [B, out, h·f, w·f]. The mirror of the encoder, deepest level first, one more
    ResnetBlock per level (layers_per_block + 1) — decoding is the harder direction."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, g, n = tuple(reversed(config.block_out_channels)), config.norm_num_groups, len(config.block_out_channels)
        self.conv_in = Conv2d(config.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g)
        self.up_blocks = nn.ModuleList([
            UpBlock(ch[max(i - 1, 0)], ch[i], config.layers_per_block + 1, g, upsample=i < n - 1) for i in range(n)])
        self.conv_norm_out = GroupNorm(g, ch[-1], eps=EPS)
        self.conv_out = Conv2d(ch[-1], config.out_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid_block(self.conv_in(z))            # [B, ch[-1], h, w]
        for block in self.up_blocks:
            h = block(h)                               # doubles h, w at every level but the last
        return self.conv_out(self.conv_norm_out(h, silu=True))  # [B, out, h·f, w·f]


def _check_size(x, f):
    if x.shape[-2] % f or x.shape[-1] % f:
        raise ValueError(f"image size {tuple(x.shape[-2:])} must be a multiple of the VAE's downsampling factor {f}")


# ------------------------------------------------------------------------------------------------- the models
class AutoencoderKL(nn.Module):
    """SD's KL-regularized VAE. encode: images [B, 3, H, W] in [-1, 1] -> DiagonalGaussian over [B, latent, H/f, W/f];
    decode: z [B, latent, H/f, W/f] (unscaled) -> images [B, 3, H, W] (roughly in [-1, 1], not clamped)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        c = config.latent_channels
        self.encoder = Encoder(config, 2 * c)
        self.decoder = Decoder(config)
        # 1x1 convs between the networks and the latent (LDM's "quant_conv", a leftover of its VQ sibling)
        self.quant_conv = Conv2d(2 * c, 2 * c, 1) if config.use_quant_conv else None
        self.post_quant_conv = Conv2d(c, c, 1) if config.use_post_quant_conv else None

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        _check_size(images, self.config.downsample_factor)
        moments = self.encoder(images)                 # [B, 2·latent, H/f, W/f]
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)                         # [B, 3, H, W]

    def forward(self, images, sample_posterior: bool = False, generator=None):
        """-> (reconstruction [B, 3, H, W], posterior). Decodes μ, or a sample z ~ q(z|x) with sample_posterior."""
        posterior = self.encode(images)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def loss(self, images, kl_weight: float = 1e-6, generator=None):
        """The negative ELBO as LDM weighs it, without its perceptual and adversarial terms. -> (total, recon, kl).

            recon = Σ_{c,h,w} |x - D(z)|,  z = μ + σ ε   (L1: -log p(x|z) for a Laplace decoder, up to constants)
            kl    = KL(q(z|x) || N(0, I))                 (summed over latent elements)
            total = mean_B [ recon + kl_weight · kl ]
        """
        reconstruction, posterior = self(images, sample_posterior=True, generator=generator)
        recon = (images - reconstruction).abs().sum(dim=[1, 2, 3]).mean()
        kl = posterior.kl().mean()
        return recon + kl_weight * kl, recon, kl


class Autoencoder(nn.Module):
    """The plain deterministic autoencoder beside it, for contrast: the same encoder and decoder, z = E(x), no
    posterior, no KL — nothing shapes where the latents live. encode: [B, 3, H, W] -> z [B, latent, H/f, W/f]."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config, config.latent_channels)
        self.decoder = Decoder(config)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        _check_size(images, self.config.downsample_factor)
        return self.encoder(images)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, images):
        """-> (reconstruction [B, 3, H, W], z [B, latent, h, w])"""
        z = self.encode(images)
        return self.decode(z), z

    def loss(self, images):
        """The same L1 reconstruction term as AutoencoderKL.loss, and nothing else: mean_B Σ_{c,h,w} |x - D(E(x))|."""
        reconstruction, _ = self(images)
        return (images - reconstruction).abs().sum(dim=[1, 2, 3]).mean()
