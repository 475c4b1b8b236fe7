"""CPU kernels through oneDNN, for inference in fp32 / bf16 (they have no backward: training takes the reference).

Where the time goes in one SD v1.4 U-Net step on a CPU (batch 2, 64×64 latents, see docs/benchmarks.md): convolutions
~35%, linear layers ~35% in fp32 (~15% in bf16), attention ~20% in fp32 (~45% in bf16). Two things here win time:

  * linear layers: `F.linear` calls MKL, which on an AMD CPU runs its AVX2 code (~100 GFLOP/s per core), while oneDNN —
    the library PyTorch already uses for convolutions — runs AVX-512 (~240 GFLOP/s). A matmul y = x Wᵀ + b also costs a
    separate pass to copy b into y; oneDNN adds b (and a following GELU, ⊙ or + residual) inside the matmul's epilogue,
    while y is still in registers.
  * convolutions: F.conv2d reorders the weight into oneDNN's blocked layout on every call; for the 1280-channel
    convolutions at 16×16 and 8×8 that reorder costs as much as the convolution itself. Here the reordered copy is made
    once and cached (per weight and input shape; rebuilt when the weight changes), and activations are kept
    channels-last (NHWC), the layout oneDNN's kernels are written for — which also makes the U-Net's
    pixels-as-tokens reshape [B, C, H, W] -> [B, HW, C] a free view. The user's weights are never touched: the packed
    copy is a cache beside them (its price: a second copy of the convolution weights in memory).

Each op is also a `torch.library.custom_op`, so torch.compile keeps it as one opaque call (the raw mkldnn ops have no
fake-tensor kernels; inductor fuses what is around them).
"""
from __future__ import annotations

import weakref

import torch

AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# oneDNN's bf16 kernels need AVX-512 (avx512bw/vl/dq) at least; on an AVX2-only CPU (or under ONEDNN_MAX_CPU_ISA=AVX2)
# it cannot even create the primitive, so bf16 takes the reference kernels there
DTYPES = (torch.float32, torch.bfloat16) if AVAILABLE and torch.ops.mkldnn._is_mkldnn_bf16_supported() \
    else (torch.float32,)


def applies(x, weight) -> bool:
    """oneDNN's kernels serve CPU inference in fp32 / bf16 (where the CPU has bf16 kernels), with x and the weight in
    one dtype."""
    return (AVAILABLE and x.device.type == "cpu" and x.dtype == weight.dtype and x.dtype in DTYPES
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


# ------------------------------------------------------------------------------------------ linear, fused epilogue
def _linear_eager(x, weight, bias, post: str, other):
    if other is not None:   # post = "mul" | "add": y ⊙ other, other + y
        return torch.ops.mkldnn._linear_pointwise.binary(x, other.contiguous(), weight, bias, post)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, post, [], "none" if post == "gelu" else "")


@torch.library.custom_op("minidiff::onednn_linear", mutates_args=())
def _linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, post: str,
               other: torch.Tensor | None) -> torch.Tensor:
    return _linear_eager(x, weight, bias, post, other)


@_linear_op.register_fake
def _(x, weight, bias, post, other):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def linear(x, weight, bias=None, *, gelu: bool = False, mul=None, add=None):
    """kernels.reference.linear's function, the epilogue (GELU erf | ⊙ mul | + add) inside oneDNN's matmul."""
    post = "gelu" if gelu else "mul" if mul is not None else "add" if add is not None else "none"
    other = mul if mul is not None else add
    if torch.compiler.is_compiling():
        return _linear_op(x, weight, bias, post, other)
    return _linear_eager(x, weight, bias, post, other)


# ------------------------------------------------------------------------------------------ packed convolution
# weight id -> (key, packed weight): one input shape per weight at a time (a new resolution repacks). The entry goes
# with its weight (weakref.finalize); the key holds the weight's storage address and version counter, which every
# in-place change bumps (load_state_dict, optimizer steps), so a changed weight is repacked.
_PACKED: dict[int, tuple] = {}


def _packed_weight(weight, geometry, x_shape):
    key = (weight.data_ptr(), weight._version, weight.dtype, tuple(x_shape), repr(geometry))
    entry = _PACKED.get(id(weight))
    if entry is None or entry[0] != key:
        if entry is None:
            weakref.finalize(weight, _PACKED.pop, id(weight), None)
        packed = torch.ops.mkldnn._reorder_convolution_weight(weight, *geometry, list(x_shape))
        entry = _PACKED[id(weight)] = (key, packed)
    return entry[1]


def _conv_eager(x, weight, bias, padding, stride, dilation, groups):
    x = x.contiguous(memory_format=torch.channels_last)   # NHWC in, NHWC out: oneDNN's native layout
    geometry = (list(padding), list(stride), list(dilation), groups)
    packed = _packed_weight(weight, geometry, x.shape)
    return torch.ops.mkldnn._convolution_pointwise(x, packed, bias, *geometry, "none", [], "")


@torch.library.custom_op("minidiff::onednn_conv2d", mutates_args=())
def _conv_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: list[int],
             stride: list[int], dilation: list[int], groups: int) -> torch.Tensor:
    return _conv_eager(x, weight, bias, padding, stride, dilation, groups).contiguous(
        memory_format=torch.channels_last)


@_conv_op.register_fake
def _(x, weight, bias, padding, stride, dilation, groups):
    out = [x.shape[0], weight.shape[0]]
    for i, n in enumerate(x.shape[2:]):   # (n + 2p − d·(k − 1) − 1) // s + 1
        out.append((n + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i] + 1)
    return x.new_empty(out).contiguous(memory_format=torch.channels_last)


def conv2d(x, weight, bias, stride, padding, dilation, groups):
    """kernels.reference.conv2d's function with the weight packed once; padding / stride / dilation as int pairs."""
    args = (list(padding), list(stride), list(dilation), groups)
    if torch.compiler.is_compiling():
        return _conv_op(x, weight, bias, *args)
    return _conv_eager(x, weight, bias, *args)


def conv_applies(x, padding, padding_mode) -> bool:
    """What the packed call supports: 4-D input, zero padding given as numbers (not "same"/"valid")."""
    return x.dim() == 4 and padding_mode == "zeros" and not isinstance(padding, str)


# ------------------------------------------------------------------------------------------ attention, long sequences
# From this many queries on, bf16 attention runs as the matmuls below instead of torch's fused CPU kernel. Measured on
# a 2-core AMD EPYC (avx512_bf16, no AMX), benchmarks/attention_cpu.py: SD's 64×64 self-attention (4096 tokens, 8
# heads of 40) in 0.76–0.86× the fused kernel's time in bf16, and a whole guided U-Net step in 0.88×. In fp32 the
# whole step came out 1.01×: no gain we can show, so fp32 stays on the fused kernel,
# as do shorter sequences (the 32×32 level's 1024 tokens and every cross-attention).
ATTENTION_MIN_TOKENS = 2048
ATTENTION_CHUNK = 512   # queries per block: the [512, S] fp32 score block of S = 4096 keys (8 MB) stays in the L3 cache


def attention_applies(q, k, v, mask, causal) -> bool:
    """The matmul path serves bf16 CPU inference without a mask, for long sequences (see ATTENTION_MIN_TOKENS)."""
    return (AVAILABLE and q.device.type == "cpu" and q.dtype == torch.bfloat16 and mask is None
            and not causal and q.shape[-2] >= ATTENTION_MIN_TOKENS and k.shape[-2] >= ATTENTION_MIN_TOKENS
            and q.dim() == 4 and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                                                   or v.requires_grad)))


def attention(q, k, v):
    """softmax(QKᵀ/√d) V, one head and one block of queries at a time: S = Q_blk Kᵀ by oneDNN's fp32 matmul (the
    scores stay fp32, as in the fused kernel: bf16 scores would lose ~3 digits of the logits), the softmax, then P V.
    q [B, h, L, d], k, v [B, h, S, d] -> [B, h, L, d] in q's dtype. Why it wins over the fused kernel at d = 40: two
    oneDNN GEMMs with 512-row blocks keep the AVX-512 units busier than the fused kernel's small tiles."""
    B, h, L, d = q.shape
    qs = (q.float() * d ** -0.5).reshape(B * h, L, d).contiguous()   # [BH, L, d], the 1/√d folded into Q
    ks = k.float().reshape(B * h, -1, d).contiguous()                # [BH, S, d]: as a linear layer's weight, Kᵀ
    vt = v.float().reshape(B * h, -1, d).transpose(1, 2).contiguous()   # [BH, d, S]: as a weight, V
    out = torch.empty(B * h, L, d, dtype=q.dtype)
    for i in range(B * h):
        for j in range(0, L, ATTENTION_CHUNK):
            scores = torch.ops.mkldnn._linear_pointwise(qs[i, j:j + ATTENTION_CHUNK], ks[i], None, "none", [], "")
            probs = torch.softmax(scores, dim=-1)                                             # [blk, S]
            out[i, j:j + ATTENTION_CHUNK] = torch.ops.mkldnn._linear_pointwise(probs, vt[i], None, "none", [], "")
    return out.reshape(B, h, L, d)
