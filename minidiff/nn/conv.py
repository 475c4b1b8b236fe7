"""Chapter 1.2 — convolution and pooling, from scratch (indexing and matmul only).

A 2-D convolution slides a small kernel over the image and takes a dot product at every position
(deep-learning "convolution" is really cross-correlation: the kernel is not flipped):

    y[b, o, i, j] = bias[o] + Σ_c Σ_m Σ_n  w[o, c, m, n] · x[b, c, s·i + d·m − p, s·j + d·n − p]

with stride s, dilation d and zero padding p. Output size per spatial axis (the formula in torch's docs):

    H_out = ⌊(H + 2p − d·(k − 1) − 1) / s⌋ + 1

The trick that makes it fast is "im2col": gather, for every output position, the k_h·k_w input pixels the
kernel touches (one strided slice of x per kernel offset (m, n)), then the whole convolution is one matmul of
the weights [C_out, C_in·k_h·k_w] with those columns [C_in·k_h·k_w, H_out·W_out]. Autograd differentiates
slicing and matmul, so the backward pass comes for free.

Groups split the channels into G independent convolutions (G = C_in is a "depthwise" convolution).
Pooling uses the same windows but reduces each with max or mean instead of a dot product with weights.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _windows(x, kernel, stride, dilation):
    """All kernel windows of an (already padded) x: [B, C, H, W] -> [B, C, kh, kw, H_out, W_out].

    patches[..., m, n, i, j] = x[..., s_h·i + d_h·m, s_w·j + d_w·n]: for each kernel offset (m, n) one strided
    slice of x holds that tap's input for every output position at once.
    """
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    H, W = x.shape[-2:]
    H_out = (H - dh * (kh - 1) - 1) // sh + 1
    W_out = (W - dw * (kw - 1) - 1) // sw + 1
    if H_out <= 0 or W_out <= 0:
        raise ValueError(f"kernel {kernel} (dilation {dilation}) does not fit the {H}x{W} input")
    rows = []
    for m in range(kh):
        cols = []
        for n in range(kw):
            h0, w0 = dh * m, dw * n
            # [B, C, H_out, W_out]: rows h0, h0 + s_h, ..., cols w0, w0 + s_w, ...
            cols.append(x[:, :, h0:h0 + sh * (H_out - 1) + 1:sh, w0:w0 + sw * (W_out - 1) + 1:sw])
        rows.append(torch.stack(cols, dim=2))                                  # [B, C, kw, H_out, W_out]
    return torch.stack(rows, dim=2)                                            # [B, C, kh, kw, H_out, W_out]


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups: int = 1):
    """2-D convolution, same arguments and result as torch.nn.functional.conv2d (padding: int or (ph, pw)).

    x: [B, C_in, H, W], weight: [C_out, C_in/groups, kh, kw], bias: [C_out] or None -> [B, C_out, H_out, W_out].
    """
    B, C, _, _ = x.shape
    O, Cg, kh, kw = weight.shape
    G = groups
    if C != Cg * G or O % G:
        raise ValueError(f"conv2d: input has {C} channels, weight {tuple(weight.shape)}, groups={G}: mismatch")
    (ph, pw), stride, dilation = _pair(padding), _pair(stride), _pair(dilation)
    x = F.pad(x, (pw, pw, ph, ph))                                    # zero padding: [B, C, H+2ph, W+2pw]
    cols = _windows(x, (kh, kw), stride, dilation)                     # [B, C, kh, kw, H_out, W_out]
    H_out, W_out = cols.shape[-2:]
    cols = cols.reshape(B, G, Cg * kh * kw, H_out * W_out)             # [B, G, Cg·kh·kw, H_out·W_out]
    w = weight.reshape(G, O // G, Cg * kh * kw)                        # [G, O/G, Cg·kh·kw]
    out = w @ cols                                                     # [B, G, O/G, H_out·W_out] (w broadcasts over B)
    out = out.reshape(B, O, H_out, W_out)                              # [B, C_out, H_out, W_out]
    if bias is not None:
        out = out + bias[None, :, None, None]
    return out


def max_pool2d(x, kernel_size, stride=None, padding=0):
    """Max over each k_h×k_w window: [B, C, H, W] -> [B, C, H_out, W_out]. stride defaults to kernel_size
    (non-overlapping windows), as in torch. Padding counts as −∞, so it never wins the max.
    """
    kernel = _pair(kernel_size)
    stride = _pair(stride if stride is not None else kernel_size)
    ph, pw = _pair(padding)
    x = F.pad(x, (pw, pw, ph, ph), value=float("-inf"))
    win = _windows(x, kernel, stride, (1, 1))                          # [B, C, kh, kw, H_out, W_out]
    return win.flatten(2, 3).max(dim=2).values                         # [B, C, H_out, W_out]


def avg_pool2d(x, kernel_size, stride=None, padding=0):
    """Mean over each k_h×k_w window: [B, C, H, W] -> [B, C, H_out, W_out]. stride defaults to kernel_size.
    Zero padding is included in the mean (torch's default count_include_pad=True).
    """
    kernel = _pair(kernel_size)
    stride = _pair(stride if stride is not None else kernel_size)
    ph, pw = _pair(padding)
    x = F.pad(x, (pw, pw, ph, ph))
    win = _windows(x, kernel, stride, (1, 1))                          # [B, C, kh, kw, H_out, W_out]
    return win.mean(dim=(2, 3))                                        # [B, C, H_out, W_out]


class Conv2d(nn.Module):
    """Our conv2d with learnable weight [C_out, C_in/groups, kh, kw] and bias [C_out].

    Same parameter names, shapes and default initialisation as torch.nn.Conv2d (so the state_dicts are
    interchangeable): weights ~ U(−√(1/fan_in), √(1/fan_in)) (kaiming_uniform with a=√5), the same bound for
    the bias.
    x: [B, C_in, H, W] -> [B, C_out, H_out, W_out].
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True):
        super().__init__()
        kh, kw = _pair(kernel_size)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kh, kw))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x):
        return conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self):
        o, i, kh, kw = self.weight.shape
        return (f"{i * self.groups}, {o}, kernel_size=({kh}, {kw}), stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}")
