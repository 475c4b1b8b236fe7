"""The reference kernels: each hot operation written as the plain PyTorch expression a chapter teaches.

These define WHAT every other implementation (oneDNN on the CPU, Triton on CUDA) must compute; tests/test_kernels.py and
tests/test_triton_kernels.py hold the others to them. They run wherever the fast ones do not apply (training on the
CPU, fp16 on the CPU, any device without Triton) and everywhere under `kernels.use("reference")`.
"""
from __future__ import annotations

import torch.nn.functional as F


def linear(x, weight, bias=None, *, gelu: bool = False, mul=None, add=None):
    """y = x Wᵀ + b, then at most one epilogue: GELU(y), y ⊙ mul, or add + y.
    x [..., in], weight [out, in], bias [out], mul / add [..., out] -> [..., out]."""
    y = F.linear(x, weight, bias)
    if gelu:
        return F.gelu(y)
    if mul is not None:
        return y * mul
    return y if add is None else add + y


def geglu(x, weight, bias):
    """GEGLU (Shazeer 2020): (x W + b) ⊙ GELU(x V + c), where [W; V] is one projection split in two (chunk order:
    value first, gate second). x [..., in], weight [2n, in], bias [2n] -> [..., n]."""
    h, gate = F.linear(x, weight, bias).chunk(2, dim=-1)   # 2 × [..., n]
    return h * F.gelu(gate)


def conv2d(x, weight, bias, stride, padding, dilation, groups):
    """The 2-D convolution (chapter 2 builds it from loops; this is torch's). x [B, C_in, H, W] -> [B, C_out, H', W']."""
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def group_norm(x, weight, bias, num_groups: int, eps: float, silu: bool = False):
    """GroupNorm (Wu & He 2018): per sample and group of C/G channels, (x − μ) / √(σ² + ε) · γ + β; then SiLU when
    `silu` (every ResnetBlock's SiLU(GroupNorm(x))). x [B, C, *spatial] -> same shape."""
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


def layer_norm(x, weight, bias, eps: float):
    """LayerNorm (Ba et al. 2016) over the last dimension: (x − μ) / √(σ² + ε) · γ + β. x [..., d] -> [..., d]."""
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
