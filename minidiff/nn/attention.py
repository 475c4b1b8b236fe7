"""Chapter 1.4 — attention and the transformer.

Scaled dot-product attention (Vaswani et al., 2017, eq. 1):

    Attention(Q, K, V) = softmax(Q Kᵀ / √d) V

Q holds L queries, K and V hold S keys and values, each a vector of width d, for every batch item and head:
q is [B, heads, L, d], k and v are [B, heads, S, d], the result is [B, heads, L, d].

Two implementations compute the same function:
  * "naive": the equation written out, for reading (and the reference the tests hold the fast path to);
  * "sdpa":  torch's fused `scaled_dot_product_attention` (flash / memory-efficient kernels), the default.
`set_attention_impl` picks the default for the whole library; `attention(..., impl=...)` overrides it per call.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .. import kernels
from .layers import LayerNorm, Linear

_IMPL = "sdpa"


def set_attention_impl(impl: str) -> None:
    """Choose "naive" or "sdpa" as the library-wide default attention."""
    global _IMPL
    if impl not in ("naive", "sdpa"):
        raise ValueError(f"attention impl must be 'naive' or 'sdpa', got {impl!r}")
    _IMPL = impl


def get_attention_impl() -> str:
    return _IMPL


@contextlib.contextmanager
def attention_impl(impl: str):
    """Context manager: `with attention_impl("naive"): ...` runs everything inside on the naive path."""
    old = _IMPL
    set_attention_impl(impl)
    try:
        yield
    finally:
        set_attention_impl(old)


def attention(q, k, v, mask=None, causal: bool = False, impl: str | None = None, slice_size: int | None = None):
    """softmax(QKᵀ/√d + mask) V.

    q: [B, h, L, d]; k, v: [B, h, S, d] -> [B, h, L, d].
    mask: broadcastable to [B, h, L, S]; bool (True = attend) or float (added to the scores, -inf = blocked).
    causal: query i sees keys j <= i only (a decoder, e.g. CLIP's text transformer).
    slice_size: a memory saver: the queries in chunks of this many, so at most [B, h, slice_size, S] scores exist at
    once (each query's softmax only needs its own row, so the result is the same).
    """
    impl = impl or _IMPL
    L = q.shape[-2]
    if slice_size and L > slice_size:
        if causal:  # the chunk starting at query i needs rows i.. of the causal mask: build it whole, slice it below
            mask, causal = _merge_causal(mask, L, k.shape[-2], q.device, q.dtype), False
        rows = mask is not None and mask.dim() >= 2 and mask.shape[-2] == L  # a mask per query row (else broadcast)
        return torch.cat([attention(q[..., i:i + slice_size, :], k, v, mask[..., i:i + slice_size, :] if rows else mask,
                                    impl=impl) for i in range(0, L, slice_size)], dim=-2)  # [B, h, L, d]
    if impl == "sdpa":
        if causal and mask is not None:  # SDPA takes one or the other: fold causality into the mask
            mask = _merge_causal(mask, q.shape[-2], k.shape[-2], q.device, q.dtype)
            causal = False
        return kernels.attention(q, k, v, mask, causal)   # torch's fused kernel (oneDNN's matmuls for long CPU ones)
    if impl != "naive":
        raise ValueError(f"attention impl must be 'naive' or 'sdpa', got {impl!r}")
    return attention_probs(q, k, mask, causal) @ v  # [B, h, L, S] @ [B, h, S, d] -> [B, h, L, d]


def attention_probs(q, k, mask=None, causal: bool = False):
    """The attention weights softmax(QKᵀ/√d + mask): q [B, h, L, d], k [B, h, S, d] -> [B, h, L, S], each row a
    probability distribution over the S keys (how much of each value query i takes in). The "naive" attention is
    these weights @ V; the cross-attention probe shows them to a controller (CrossAttention.controller)."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, h, L, S]
    if causal:
        mask = _merge_causal(mask, q.shape[-2], k.shape[-2], q.device, scores.dtype)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return scores.softmax(dim=-1)


def _merge_causal(mask, L, S, device, dtype):
    # query i may see key j when j <= i (top-left aligned, as in SDPA's is_causal)
    causal = torch.ones(L, S, dtype=torch.bool, device=device).tril()
    if mask is None:
        return causal
    if mask.dtype == torch.bool:
        return mask & causal
    return mask.masked_fill(~causal, float("-inf")).to(dtype)


class CrossAttention(nn.Module):
    """Multi-head attention of a sequence x onto a context (itself, when context is None: self-attention).

    x: [B, L, query_dim], context: [B, S, context_dim] -> [B, L, query_dim].
    Q = x W_q, K = c W_k, V = c W_v are split into `heads` heads of width `dim_head`; `residual` (optional, [B, L,
    query_dim]) is added to the output inside the output projection's matmul (a transformer block's x + Attn(...)).
    """

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 qkv_bias: bool = False):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = Linear(query_dim, inner, bias=qkv_bias)
        self.to_k = Linear(context_dim, inner, bias=qkv_bias)
        self.to_v = Linear(context_dim, inner, bias=qkv_bias)
        # a list of one, so the parameter names match the published checkpoints ("to_out.0.weight")
        self.to_out = nn.ModuleList([Linear(inner, query_dim)])

    slice_size: int | None = None  # attention in query chunks (a memory saver, see minidiff.speed.enable_attention_slicing)
    # The probe. A controller attached here is called as controller(layer, probs) with this layer and its attention
    # weights probs = softmax(QKᵀ/√d) [B, h, L, S], computed through the chapter's softmax (attention_probs). It may
    # look (return None: the layer's output is computed exactly as without it) or replace them (return a tensor of the
    # same shape: the output is new_probs @ V, e.g. prompt-to-prompt's injected maps). minidiff.explain attaches
    # them; with None (the default) the fused SDPA path runs untouched.
    controller = None

    def forward(self, x, context=None, mask=None, residual=None):
        q, k, v = self.project_qkv(x, context)                    # [B, h, L, d], [B, h, S, d], [B, h, S, d]
        replaced = None if self.controller is None else self.controller(self, attention_probs(q, k, mask))
        if replaced is None:
            out = attention(q, k, v, mask=mask, slice_size=self.slice_size)  # [B, h, L, d]
        else:
            out = replaced.to(v.dtype) @ v                        # [B, h, L, S] @ [B, h, S, d] -> [B, h, L, d]
        out = rearrange(out, "b h l d -> b l (h d)")              # heads side by side again: [B, L, h·d]
        o = self.to_out[0]
        return o(out) if residual is None else o(out, add=residual)

    def project_qkv(self, x, context=None):
        """Q = x W_q, K = c W_k, V = c W_v, split into heads: -> [B, h, L, d], [B, h, S, d], [B, h, S, d]."""
        h = self.heads
        if context is None and kernels.can_stack(self.to_q, self.to_k, self.to_v):
            # self-attention: the three projections read the same x, so one matmul against [W_q; W_k; W_v] does them
            qkv = kernels.linear(x, *kernels.stacked(self.to_q, self.to_k, self.to_v))      # [B, L, 3·h·d]
            return rearrange(qkv, "b l (three h d) -> three b h l d", three=3, h=h).unbind(0)
        context = x if context is None else context
        q = rearrange(self.to_q(x), "b l (h d) -> b h l d", h=h)                          # [B, h, L, d]
        if kernels.can_stack(self.to_k, self.to_v):   # cross-attention: K and V both read the context
            kv = kernels.linear(context, *kernels.stacked(self.to_k, self.to_v))           # [B, S, 2·h·d]
            k, v = rearrange(kv, "b s (two h d) -> two b h s d", two=2, h=h).unbind(0)
            return q, k, v
        k = rearrange(self.to_k(context), "b s (h d) -> b h s d", h=h)                    # [B, h, S, d]
        v = rearrange(self.to_v(context), "b s (h d) -> b h s d", h=h)                    # [B, h, S, d]
        return q, k, v


class SelfAttention(CrossAttention):
    """CrossAttention with the sequence attending to itself: x [B, L, dim] -> [B, L, dim]."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, qkv_bias: bool = False):
        super().__init__(dim, None, heads, dim_head, qkv_bias)

    def forward(self, x, mask=None):
        return super().forward(x, None, mask)


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer, 2020): GEGLU(x) = (x W + b) ⊙ GELU(x V + c), one projection split in two."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2)

    def forward(self, x):
        if isinstance(self.proj, nn.Linear):     # the projection and the gate in fused kernels
            return kernels.geglu(x, self.proj.weight, self.proj.bias)
        x, gate = self.proj(x).chunk(2, dim=-1)  # a wrapped projection (LoRA): its own forward, then the gate
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """The transformer's position-wise MLP: dim -> 4·dim (GEGLU) -> dim (+ residual, added inside the last matmul).
    [B, L, dim] -> [B, L, dim]."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # indices 0 and 2 as in the published checkpoints (1 was a dropout)
        self.net = nn.ModuleDict({"0": GEGLU(dim, dim * mult), "2": Linear(dim * mult, dim)})

    def forward(self, x, residual=None):
        h = self.net["0"](x)                                  # [B, L, 4·dim]
        return self.net["2"](h) if residual is None else self.net["2"](h, add=residual)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block as in SD's U-Net: self-attention, cross-attention onto the text, MLP.

        x = x + SelfAttn(LN(x));  x = x + CrossAttn(LN(x), context);  x = x + FF(LN(x))

    (each "x +" is handed to the layer as `residual=`, so the add happens inside its last matmul.)
    Without a context_dim the cross-attention is left out (a plain encoder block).
    x: [B, L, dim], context: [B, S, context_dim] -> [B, L, dim].
    """

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None = None):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        if context_dim is not None:
            self.norm2 = LayerNorm(dim)
            self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm3 = LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context=None):
        x = self.attn1(self.norm1(x), residual=x)
        if hasattr(self, "attn2"):
            x = self.attn2(self.norm2(x), context, residual=x)
        return self.ff(self.norm3(x), residual=x)


def sinusoidal_positions(length: int, dim: int, base: float = 10000.0):
    """The transformer's fixed positional encoding (Vaswani et al., §3.5): [length, dim].

    PE[p, 2i] = sin(p / base^(2i/dim)),  PE[p, 2i+1] = cos(p / base^(2i/dim)).
    """
    pos = torch.arange(length, dtype=torch.float32)[:, None]               # [L, 1]
    freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)    # [dim/2]
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)
    return pe


def timestep_embedding(t, dim: int, flip_sin_to_cos: bool = True, shift: float = 0.0, max_period: float = 10000.0):
    """The diffusion timestep t as a sinusoid vector (DDPM, after the transformer's encoding): t [B] -> [B, dim].

    freq_i = max_period^(-i / (dim/2 - shift)), i = 0 .. dim/2-1;  emb = [cos(t·freq), sin(t·freq)]
    (SD v1 uses flip_sin_to_cos=True, shift=0: cosines first).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift)
    args = t[:, None].float() * torch.exp(exponent)[None, :]               # [B, half]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)            # [B, dim]
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """Sinusoid -> Linear -> SiLU -> Linear: the learned time embedding added into every ResnetBlock. [B] -> [B, dim]."""

    def __init__(self, in_dim: int, dim: int, flip_sin_to_cos: bool = True, shift: float = 0.0):
        super().__init__()
        self.in_dim, self.flip, self.shift = in_dim, flip_sin_to_cos, shift
        self.linear_1 = Linear(in_dim, dim)
        self.linear_2 = Linear(dim, dim)

    def forward(self, t, dtype=None):
        # the parameters' dtype (not linear_1.weight's: a LoRA-wrapped linear_1 has no weight of its own)
        emb = timestep_embedding(t, self.in_dim, self.flip, self.shift).to(dtype or next(self.parameters()).dtype)
        return self.linear_2(F.silu(self.linear_1(emb)))
