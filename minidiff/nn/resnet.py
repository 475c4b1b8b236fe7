"""Chapter 1.3 — ResNet blocks and skip connections (He et al., 2016).

A residual block learns a correction F to its input instead of a whole new mapping:  y = x + F(x).
The identity path carries the gradient straight through (∂y/∂x = 1 + ∂F/∂x), which is why a deep stack of
residual blocks still trains where a plain stack of the same depth does not (tests/test_resnet.py measures it).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .layers import Conv2d, GroupNorm, Linear


class BasicBlock(nn.Module):
    """The classic ResNet block: conv-BN-ReLU-conv-BN, plus the input, then ReLU. [B, C, H, W] -> [B, C', H, W]."""

    def __init__(self, in_channels: int, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or in_channels
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        # a 1x1 projection when the shapes differ, so x can still be added
        self.shortcut = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(self.shortcut(x) + h)


class ResnetBlock(nn.Module):
    """The residual block of SD's U-Net and VAE.

        h = Conv3x3(SiLU(GroupNorm(x)))     (SiLU ∘ GroupNorm is one kernel: norm(x, silu=True))
        h = h + Linear(SiLU(temb))          (U-Net only: the timestep enters every block here)
        h = Conv3x3(SiLU(GroupNorm(h)))
        y = shortcut(x) + h                 (shortcut = 1x1 conv when the channel count changes)

    x: [B, C_in, H, W], temb: [B, temb_channels] -> [B, C_out, H, W].
    GroupNorm rather than BatchNorm: statistics per sample, so it behaves the same at batch 1.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, temb_channels: int | None = None,
                 groups: int = 32, eps: float = 1e-5):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        if temb_channels is not None:
            self.time_emb_proj = Linear(temb_channels, out_channels)
        self.norm2 = GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = Conv2d(in_channels, out_channels, 1)

    def forward(self, x, temb=None):
        h = self.conv1(self.norm1(x, silu=True))
        if temb is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # [B, C] -> [B, C, 1, 1]
        h = self.conv2(self.norm2(h, silu=True))
        shortcut = self.conv_shortcut(x) if hasattr(self, "conv_shortcut") else x
        return shortcut + h
