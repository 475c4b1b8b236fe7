"""The four layers every network here is built from, running through minidiff.kernels.

Each is torch's own layer — the same constructor, parameters, initialisation and state_dict keys, so published
checkpoints load with strict=True — whose forward calls the kernels layer instead of torch.nn.functional. That is the
whole trick of "one model, two speeds": the module a chapter teaches is the module that runs, and `kernels.pick`
chooses, per call, the plain PyTorch expression, oneDNN (CPU inference) or Triton (CUDA). Chapter 2 builds the
convolution itself from loops (minidiff.nn.conv.Conv2d); this one is the production layer.

    Linear(x, add=r)         x Wᵀ + b + r, the residual added inside the matmul         [..., in] -> [..., out]
    Conv2d(x)                the 2-D convolution                                        [B, C, H, W] -> [B, C', H', W']
    GroupNorm(x, silu=True)  SiLU(GroupNorm(x)) in one pass                             [B, C, *] -> [B, C, *]
    LayerNorm(x)             LayerNorm over the last dimension                          [..., d] -> [..., d]
"""
from __future__ import annotations

from torch import nn

from .. import kernels


class Linear(nn.Linear):
    """y = x Wᵀ + b (+ add). x [..., in_features] -> [..., out_features]."""

    def forward(self, x, add=None):
        return kernels.linear(x, self.weight, self.bias, add=add)


class Conv2d(nn.Conv2d):
    """torch.nn.Conv2d through kernels.conv2d. On the CPU at inference the output comes back channels-last (NHWC
    strides; the same shape and values), the layout oneDNN computes in, so the next convolution needs no copy."""

    def forward(self, x):
        if self.padding_mode != "zeros":   # reflect / replicate / circular: pad first, as nn.Conv2d does
            return super().forward(x)
        return kernels.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class GroupNorm(nn.GroupNorm):
    """GroupNorm; `silu=True` applies SiLU after it in the same kernel (every ResnetBlock's SiLU(GroupNorm(x)))."""

    def forward(self, x, silu: bool = False):
        return kernels.group_norm(x, self.weight, self.bias, self.num_groups, self.eps, silu)


class LayerNorm(nn.LayerNorm):
    """LayerNorm over the last dimension (the only kind the transformers here use)."""

    def forward(self, x):
        if len(self.normalized_shape) != 1 or self.weight is None:
            return super().forward(x)
        return kernels.layer_norm(x, self.weight, self.bias, self.eps)


__all__ = ["Linear", "Conv2d", "GroupNorm", "LayerNorm"]
