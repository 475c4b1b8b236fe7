"""Chapter 1.4: attention — naive == SDPA under every mask kind, and parity with diffusers' blocks."""
import math

import pytest
import torch

from minidiff.nn import (CrossAttention, SelfAttention, TimestepEmbedding, TransformerBlock, attention,
                         attention_impl, get_attention_impl, set_attention_impl, sinusoidal_positions,
                         timestep_embedding)

TOL = dict(rtol=1e-5, atol=1e-5)


def _qkv(B=2, h=3, L=5, S=7, d=8):
    return torch.randn(B, h, L, d), torch.randn(B, h, S, d), torch.randn(B, h, S, d)


def _padding_mask(B, S):
    """Bool key-padding mask [B, 1, 1, S]: item b attends to its first S - b keys (True = attend)."""
    return (torch.arange(S)[None, :] < (S - torch.arange(B))[:, None])[:, None, None, :]


def _masks(B, L, S):
    bool_pad = _padding_mask(B, S)
    return {
        "none": None,
        "bool_padding": bool_pad,
        "bool_full": torch.rand(B, 1, L, S) > 0.3,                        # [B, 1, L, S], per query
        "float_padding": torch.zeros(B, 1, 1, S).masked_fill(~bool_pad, float("-inf")),
        "float_bias": torch.randn(B, 3, L, S),                           # an additive bias per head (e.g. ALiBi-like)
    }


@pytest.mark.parametrize("L,S", [(5, 5), (4, 9), (9, 4)], ids=["L=S", "L<S", "L>S"])
@pytest.mark.parametrize("mask_kind", ["none", "bool_padding", "bool_full", "float_padding", "float_bias"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_naive_equals_sdpa(L, S, mask_kind, causal):
    q, k, v = _qkv(L=L, S=S)
    mask = _masks(2, L, S)[mask_kind]
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.clone()
        mask[..., 0] = True  # every query keeps at least key 0, so no softmax row is all -inf (NaN in both)
    naive = attention(q, k, v, mask=mask, causal=causal, impl="naive")
    sdpa = attention(q, k, v, mask=mask, causal=causal, impl="sdpa")
    assert naive.shape == (2, 3, L, 8)
    assert torch.isfinite(naive).all()
    torch.testing.assert_close(naive, sdpa, **TOL)


def test_naive_attention_is_the_equation():
    # softmax(QKᵀ/√d)V written with explicit loops over batch, head, query: an independent oracle
    q, k, v = _qkv(B=1, h=2, L=3, S=4, d=5)
    mask = torch.tensor([True, True, False, True])
    out = attention(q, k, v, mask=mask, causal=True, impl="naive")
    ref = torch.zeros_like(out)
    for h in range(2):
        for i in range(3):
            scores = torch.tensor([(q[0, h, i] @ k[0, h, j]).item() / math.sqrt(5) for j in range(4)])
            allowed = torch.tensor([bool(mask[j]) and j <= i for j in range(4)])
            w = torch.exp(scores - scores.max()) * allowed
            w = w / w.sum()
            ref[0, h, i] = (w[:, None] * v[0, h]).sum(0)
    torch.testing.assert_close(out, ref, **TOL)
    # causal: the output at position 0 depends on key/value 0 only
    v2 = v.clone()
    v2[..., 1:, :] += 1.0
    torch.testing.assert_close(attention(q, k, v2, causal=True, impl="naive")[..., 0, :],
                               attention(q, k, v, causal=True, impl="naive")[..., 0, :])


def test_impl_switch():
    assert get_attention_impl() == "sdpa"
    with attention_impl("naive"):
        assert get_attention_impl() == "naive"
    assert get_attention_impl() == "sdpa"
    with pytest.raises(ValueError):
        set_attention_impl("flash")
    with pytest.raises(ValueError):
        attention(*_qkv(), impl="flash")


@pytest.mark.parametrize("impl", ["sdpa", "naive"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
def test_cross_attention_matches_diffusers(impl, with_mask):
    from diffusers.models.attention_processor import Attention

    dim, ctx_dim, heads, dim_head = 32, 24, 4, 8
    ref = Attention(query_dim=dim, cross_attention_dim=ctx_dim, heads=heads, dim_head=dim_head).eval()
    ours = CrossAttention(dim, ctx_dim, heads=heads, dim_head=dim_head).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, ctx = torch.randn(2, 6, dim), torch.randn(2, 5, ctx_dim)
    mask = ref_mask = None
    if with_mask:  # key padding; diffusers takes it as an additive [B, 1, S] bias
        keep = _padding_mask(2, 5)                                        # [B, 1, 1, S]
        mask = keep
        ref_mask = torch.zeros(2, 1, 5).masked_fill(~keep[:, 0], float("-inf"))
    with torch.no_grad(), attention_impl(impl):
        torch.testing.assert_close(ours(x, ctx, mask=mask), ref(x, encoder_hidden_states=ctx, attention_mask=ref_mask),
                                   **TOL)
        # without a context it is self-attention
        ref_self = Attention(query_dim=dim, heads=heads, dim_head=dim_head).eval()
        ours_self = SelfAttention(dim, heads=heads, dim_head=dim_head).eval()
        ours_self.load_state_dict(ref_self.state_dict(), strict=True)
        torch.testing.assert_close(ours_self(x), ref_self(x), **TOL)


@pytest.mark.parametrize("context_dim", [24, None], ids=["cross", "self_only"])
def test_transformer_block_matches_diffusers(context_dim):
    from diffusers.models.attention import BasicTransformerBlock

    dim, heads, dim_head = 32, 4, 8
    ref = BasicTransformerBlock(dim, heads, dim_head, cross_attention_dim=context_dim, activation_fn="geglu").eval()
    ours = TransformerBlock(dim, heads, dim_head, context_dim=context_dim).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine parameters, so they are really compared
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    ours.load_state_dict(ref.state_dict(), strict=True)  # norm1/attn1/norm2/attn2/norm3/ff.net.0.proj/ff.net.2
    x = torch.randn(2, 10, dim)
    ctx = torch.randn(2, 7, context_dim) if context_dim else None
    with torch.no_grad():
        torch.testing.assert_close(ours(x, ctx), ref(x, encoder_hidden_states=ctx), **TOL)


@pytest.mark.parametrize("dim,flip,shift", [(320, True, 0.0), (64, False, 1.0), (33, True, 0.0), (8, True, 1.0)])
def test_timestep_embedding_matches_diffusers(dim, flip, shift):
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 1, 10, 250, 999])
    ref = get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    ours = timestep_embedding(t, dim, flip_sin_to_cos=flip, shift=shift)
    assert ours.shape == (5, dim)
    torch.testing.assert_close(ours, ref, **TOL)


def test_timestep_embedding_module_matches_diffusers():
    from diffusers.models.embeddings import TimestepEmbedding as RefTE, Timesteps

    proj, ref = Timesteps(64, flip_sin_to_cos=True, downscale_freq_shift=0), RefTE(64, 128).eval()
    ours = TimestepEmbedding(64, 128).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)  # linear_1 / linear_2
    t = torch.tensor([3, 500])
    with torch.no_grad():
        torch.testing.assert_close(ours(t), ref(proj(t)), **TOL)


def test_sinusoidal_positions_formula():
    L, dim = 50, 16
    pe = sinusoidal_positions(L, dim)
    ref = torch.zeros(L, dim, dtype=torch.float64)
    for p in range(L):               # PE[p, 2i] = sin(p / 10000^(2i/dim)), PE[p, 2i+1] = cos(same)
        for i in range(dim // 2):
            angle = p / 10000 ** (2 * i / dim)
            ref[p, 2 * i], ref[p, 2 * i + 1] = math.sin(angle), math.cos(angle)
    torch.testing.assert_close(pe.double(), ref, rtol=1e-5, atol=1e-5)
    # properties: bounded, position 0 is [0, 1, 0, 1, ...], each (sin, cos) pair lies on the unit circle,
    # and PE[p + k] is a fixed rotation of PE[p] (so relative offsets are linear functions of the encoding)
    assert pe.abs().max() <= 1
    torch.testing.assert_close(pe[0], torch.tensor([0.0, 1.0] * (dim // 2)))
    torch.testing.assert_close(pe[:, 0::2] ** 2 + pe[:, 1::2] ** 2, torch.ones(L, dim // 2))
    k = 3
    freq = 10000 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    c, s = torch.cos(k * freq), torch.sin(k * freq)
    sin_p, cos_p = pe[:-k, 0::2].double(), pe[:-k, 1::2].double()
    torch.testing.assert_close(pe[k:, 0::2].double(), sin_p * c + cos_p * s, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pe[k:, 1::2].double(), cos_p * c - sin_p * s, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_cpu_attention_by_onednn_matmuls_equals_sdpa(dtype):
    """bf16 CPU inference on long sequences (≥ kernels.onednn.ATTENTION_MIN_TOKENS queries) runs attention as oneDNN
    matmuls in blocks of queries (faster there: benchmarks/attention_cpu.py), with fp32 scores like the fused kernel;
    fp32 stays on the fused kernel (no measured gain), the matmul function itself is checked in both.

    The bound, against float64 on the same (already rounded) inputs: a logit x = q·k/√d summed in fp32 is off by
    ≲ d·u₃₂·|x|ₘₐₓ (u₃₂ = 2⁻²⁴); exp turns that into the same relative error of each probability, so the output (a
    convex mix of v) moves by ≤ d·u₃₂·|x|ₘₐₓ·|v|ₘₐₓ. bf16 then rounds the output once: + 2⁻⁸·|out|ₘₐₓ."""
    from minidiff import kernels
    from minidiff.kernels import onednn
    if not onednn.AVAILABLE:
        pytest.skip("no oneDNN in this torch build")
    L, d = onednn.ATTENTION_MIN_TOKENS, 8
    g = torch.Generator().manual_seed(0)
    q, k, v = ((torch.randn(1, 2, L, d, generator=g) * 2).to(dtype) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    logits = q.double() @ k.double().transpose(-1, -2) / d ** 0.5
    tol = d * 2.0 ** -24 * float(logits.abs().max()) * float(v.double().abs().max())
    if dtype == torch.bfloat16:
        tol += 2.0 ** -8 * float(ref.abs().max())
    with torch.no_grad():
        assert onednn.attention_applies(q, k, v, None, False) == (dtype == torch.bfloat16)
        out = attention(q, k, v)                                        # the chapter's function, default impl
        direct = onednn.attention(q, k, v)
    assert out.dtype == dtype and out.shape == q.shape
    assert float((out.double() - ref).abs().max()) < tol
    assert float((direct.double() - ref).abs().max()) < tol
    # what does not take the path: a mask, a shorter sequence, a gradient, the reference backend
    assert not onednn.attention_applies(q, k, v, torch.ones(L, L, dtype=torch.bool), False)
    assert not onednn.attention_applies(q[:, :, :L // 2], k[:, :, :L // 2], v, None, False)
    assert not onednn.attention_applies(q.bfloat16().requires_grad_(), k.bfloat16(), v.bfloat16(), None, False)
    with kernels.use("reference"), torch.no_grad():                     # torch's fused kernel, the same bound
        assert float((attention(q, k, v).double() - ref).abs().max()) < tol
