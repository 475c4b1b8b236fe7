"""The kernels layer: every hot operation of the models, with one implementation per kind of hardware.

The chapters' modules (minidiff.nn's Linear, Conv2d, GroupNorm, LayerNorm; the attention, ResNet, U-Net, VAE and CLIP
code) call these functions; nothing ever swaps a module's class or rewrites a user's weights. Each function has

    reference   plain PyTorch, the expression the chapter teaches          (kernels/reference.py)
    onednn      the CPU's oneDNN: fused epilogues, packed conv weights     (kernels/onednn.py)     CPU inference
    triton      our Triton kernels, forward and backward                   (kernels/triton.py)     CUDA

and `pick` chooses one per call from the tensors it is given:

    backend "reference" (`use("reference")`, `StableDiffusion.fast = False`)         -> reference
    a CUDA tensor inside torch.compile, Triton installed, the op in               -> triton (inference and training)
      compiled_triton_ops() (or backend "triton")
    a CPU tensor, fp32/bf16, nothing that needs a gradient, oneDNN present        -> onednn   (bf16: AVX-512 CPUs)
    anything else (eager CUDA, CPU training, fp16 on the CPU, ...)                 -> reference

Why eager CUDA takes the reference (PyTorch's own CUDA kernels): measured on an H200 (docs/benchmarks.md), each of our
Triton ops costs 0.1–0.2 ms per eager call — the Python launch of a triton_op, not the GPU work — against 0.02–0.06 ms
for PyTorch's kernels, so the eager U-Net step was 1.7× slower on them. Inside torch.compile the launch cost is gone
(inductor calls the kernels directly, and CUDA graphs replay them), and the fused GroupNorm+SiLU, GEGLU and epilogue
kernels save passes over memory; `use("triton")` forces them in eager code too.

Under torch.compile an op of ours has a rival: inductor writes its own fused kernel from the reference expression.
A Triton op is kept only where it beats that; `set_compiled_triton_ops` names the ops torch.compile takes from us
(the others take the reference expression and inductor fuses it), and benchmarks/gpu_session.sh measures both ways.
Until a GPU run has measured them (docs/benchmarks.md) all four stay on.

All three compute the same function; the differences are rounding (tests/test_kernels.py states the tolerance per
dtype). Attention lives in its chapter (minidiff.nn.attention.attention, with its own switch `set_attention_impl`):
torch's fused SDPA kernel is its fast path, except for long sequences in bf16 CPU inference, where `attention` below
runs it as oneDNN matmuls (faster there: kernels/onednn.py).

    from minidiff import kernels
    with kernels.use("reference"):   # run the chapters' expressions exactly
        eps = unet(latents, t, context)
    kernels.pick(x)                  # "reference" | "onednn" | "triton": what a call on x would run
"""
from __future__ import annotations

import contextlib
import weakref

import torch

from . import onednn, reference

try:
    from . import triton as _triton
    TRITON = bool(getattr(_triton, "AVAILABLE", False))
except ImportError:   # the Triton file is optional; without triton installed it says AVAILABLE = False
    _triton, TRITON = None, False

BACKENDS = ("auto", "reference", "triton")
_backend = "auto"
TRITON_OPS = ("group_norm", "layer_norm", "geglu", "bias_act_residual")   # our Triton ops, by the name pick() gets
_compiled_triton = frozenset(TRITON_OPS)   # those torch.compile takes on CUDA (see set_compiled_triton_ops)


def set_backend(name: str) -> None:
    """"auto" (the fastest kernel that applies to each call), "reference" (plain PyTorch everywhere) or "triton"
    (our Triton kernels for every CUDA tensor, eager too; CPU tensors as "auto")."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"kernels backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use(name: str):
    """`with kernels.use("reference"): ...` — the backend inside the block, restored after it."""
    old = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(old)


def set_compiled_triton_ops(ops) -> None:
    """Which of our Triton ops torch.compile takes on CUDA: "all", "none", or names from TRITON_OPS; the others take
    the reference expression there, which inductor fuses into a kernel of its own. Set it before compiling (a graph
    already compiled keeps the ops it was traced with: torch._dynamo.reset() drops it). Eager code is not affected."""
    global _compiled_triton
    names = TRITON_OPS if ops == "all" else () if ops == "none" else tuple(ops)
    unknown = sorted(set(names) - set(TRITON_OPS))
    if unknown:
        raise ValueError(f"unknown Triton op(s) {unknown}; choose from {TRITON_OPS}, 'all' or 'none'")
    _compiled_triton = frozenset(names)


def compiled_triton_ops() -> tuple:
    """The Triton ops torch.compile takes on CUDA (set_compiled_triton_ops), in TRITON_OPS order."""
    return tuple(op for op in TRITON_OPS if op in _compiled_triton)


def pick(x, weight=None, op: str | None = None) -> str:
    """The implementation a call on input x (and weight) runs: "reference" | "onednn" | "triton".
    op: the operation's name in TRITON_OPS, for the per-op choice under torch.compile (set_compiled_triton_ops)."""
    if _backend == "reference":
        return "reference"
    if x.is_cuda:
        compiled = torch.compiler.is_compiling() and (op is None or op in _compiled_triton)
        return "triton" if TRITON and (_backend == "triton" or compiled) else "reference"
    if onednn.applies(x, x if weight is None else weight):
        return "onednn"
    return "reference"


# ------------------------------------------------------------------------------------------------- the operations
def linear(x, weight, bias=None, *, gelu: bool = False, mul=None, add=None):
    """y = x Wᵀ + b, then at most one epilogue: GELU(y) | y ⊙ mul | add + y (a residual, added inside the matmul).
    x [..., in], weight [out, in], bias [out] | None, mul / add [..., out] -> [..., out]."""
    impl = pick(x, weight, "bias_act_residual")
    if impl == "onednn":
        return onednn.linear(x, weight, bias, gelu=gelu, mul=mul, add=add)
    if impl == "triton" and (gelu or add is not None) and mul is None:
        y = torch.nn.functional.linear(x, weight)       # the matmul (cuBLAS), then bias, GELU, + add in one pass
        return _triton.bias_act_residual(y, bias, gelu, add)
    return reference.linear(x, weight, bias, gelu=gelu, mul=mul, add=add)


def geglu(x, weight, bias):
    """(x W + b) ⊙ GELU(x V + c) with [W; V] = weight, [b; c] = bias. x [..., in] -> [..., out/2]."""
    impl = pick(x, weight, "geglu")
    if impl == "onednn":   # two matmuls, the GELU and the ⊙ in their epilogues
        n = weight.shape[0] // 2
        gate = onednn.linear(x, weight[n:], bias[n:], gelu=True)          # GELU(x V + c)    [..., n]
        return onednn.linear(x, weight[:n], bias[:n], mul=gate)           # (x W + b) ⊙ gate [..., n]
    if impl == "triton":
        return _triton.geglu(torch.nn.functional.linear(x, weight, bias))
    return reference.geglu(x, weight, bias)


def conv2d(x, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1,
           padding_mode: str = "zeros"):
    """2-D convolution. x [B, C_in, H, W], weight [C_out, C_in/groups, kh, kw] -> [B, C_out, H', W'].
    On the CPU at inference the output is channels-last (NHWC strides, same shape): see kernels/onednn.py."""
    if pick(x, weight) == "onednn" and onednn.conv_applies(x, padding, padding_mode):
        return onednn.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return reference.conv2d(x, weight, bias, stride, padding, dilation, groups)


def group_norm(x, weight, bias, num_groups: int, eps: float, silu: bool = False):
    """GroupNorm over groups of channels (then SiLU when `silu`). x [B, C, *spatial] -> same shape."""
    if pick(x, weight, "group_norm") == "triton":
        return _triton.group_norm(x, weight, bias, num_groups, eps, silu)
    if weight is not None and weight.requires_grad and not x.requires_grad and not x.is_contiguous():
        # torch 2.13's CPU GroupNorm backward crashes (segfault) for a channels-last input that needs no gradient
        # when γ, β do: a frozen layer's oneDNN output feeding a trained one (fine-tuning the last blocks)
        x = x.contiguous()
    return reference.group_norm(x, weight, bias, num_groups, eps, silu)


def layer_norm(x, weight, bias, eps: float):
    """LayerNorm over the last dimension. x [..., d] -> [..., d]."""
    if pick(x, weight, "layer_norm") == "triton":
        return _triton.layer_norm(x, weight, bias, eps)
    return reference.layer_norm(x, weight, bias, eps)


def attention(q, k, v, mask=None, causal: bool = False):
    """softmax(QKᵀ/√d + mask) V by the fastest kernel for the call: q [B, h, L, d], k, v [B, h, S, d] -> [B, h, L, d].
    torch's fused SDPA kernel (flash / memory-efficient), or on the CPU at bf16 inference for long sequences oneDNN's
    matmuls (onednn.attention)."""
    if _backend != "reference" and not torch.compiler.is_compiling() and onednn.attention_applies(q, k, v, mask,
                                                                                                   causal):
        return onednn.attention(q, k, v)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


# ------------------------------------------------------------------------------------------------ stacked weights
_STACKED: dict[tuple, tuple] = {}   # ids of the layers -> (key, weight, bias)


def can_stack(*layers) -> bool:
    """Several projections of one input can run as one matmul against their stacked weights — when no weight of
    theirs needs a gradient (training runs the chapter's three matmuls), off the reference backend, and only for
    plain linear layers that nobody is watching: a LoRA-wrapped layer keeps its own forward, and a layer with a forward
    hook is called as itself, so the hook fires (a student's probe on `to_k` sees every call)."""
    return (_backend != "reference" and all(isinstance(m, torch.nn.Linear) for m in layers)
            and not any(m._forward_hooks or m._forward_pre_hooks for m in layers)
            and not (torch.is_grad_enabled() and any(p.requires_grad for m in layers for p in m.parameters())))


def stacked(*layers) -> tuple:
    """(weight [Σ out, in], bias [Σ out] | None) of linear layers stacked along the output dimension, e.g. [W_q; W_k;
    W_v]. Cached: rebuilt when a weight is replaced, moved or changed in place (its version counter)."""
    if torch.compiler.is_compiling():   # traced: concatenate in the graph (a cache is Python state it cannot see)
        weight = torch.cat([m.weight for m in layers])
        return weight, None if layers[0].bias is None else torch.cat([m.bias for m in layers])
    params = [p for m in layers for p in (m.weight, m.bias) if p is not None]
    key = tuple((p.data_ptr(), p._version, p.dtype) for p in params)
    ids = tuple(id(m) for m in layers)
    entry = _STACKED.get(ids)
    if entry is None or entry[0] != key:
        if entry is None:
            weakref.finalize(layers[0], _STACKED.pop, ids, None)
        weight = torch.cat([m.weight for m in layers])
        bias = None if layers[0].bias is None else torch.cat([m.bias for m in layers])
        entry = _STACKED[ids] = (key, weight, bias)
    return entry[1], entry[2]


__all__ = ["linear", "geglu", "conv2d", "group_norm", "layer_norm", "attention", "can_stack", "stacked", "pick", "use",
           "set_backend", "get_backend", "set_compiled_triton_ops", "compiled_triton_ops", "BACKENDS", "TRITON",
           "TRITON_OPS"]
