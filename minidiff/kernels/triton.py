"""Our Triton kernels for CUDA: GroupNorm(+SiLU), LayerNorm, GEGLU and the matmul epilogue (bias, GELU, residual),
forward and backward, in fp32 / bf16 / fp16 (every sum and every activation computed in fp32).

Each public function is a `torch.library.triton_op` ("minidiff::<name>") whose kernels are launched through
`torch.library.wrap_triton`: torch.compile traces into it (it sees the kernels and the small torch ops around them)
instead of treating it as an opaque call, and autograd is registered on it, with the backward kernels behind their
own triton_ops (minidiff::<name>_backward). The kernels themselves, with their math, are in

    triton_norm.py          group_norm(x, weight, bias, num_groups, eps, silu), layer_norm(x, weight, bias, eps)
    triton_elementwise.py   geglu(h), bias_act_residual(y, bias=None, gelu=False, residual=None)

Without triton installed (any CPU-only machine) this module imports and says AVAILABLE = False, defining nothing
else. With TRITON_INTERPRET=1 in the environment before triton is imported, the same kernels run on CPU tensors in
Triton's interpreter (slowly): that is how tests/test_triton_kernels.py checks them on a machine with no GPU.
"""
from __future__ import annotations

import torch

try:
    import triton  # noqa: F401  (the package, not this module: imports are absolute)
except ImportError:
    AVAILABLE = False
else:
    AVAILABLE = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")   # torch >= 2.6

if AVAILABLE:
    from .triton_elementwise import bias_act_residual, geglu
    from .triton_norm import LAYER_NORM_MAX_N, group_norm, layer_norm

    __all__ = ["AVAILABLE", "LAYER_NORM_MAX_N", "bias_act_residual", "geglu", "group_norm", "layer_norm"]
else:
    __all__ = ["AVAILABLE"]
