"""minidiff.speed: every fast path computes what the reference modules compute, within the precision's rounding
(fp32: 1e-4 relative or tighter, bf16: 2e-2), keeps the parameter names, and torch.compile sees no graph breaks."""
import copy

import pytest
import torch
import torch.nn.functional as F

from minidiff import speed
from minidiff.clip import CLIPTextConfig, CLIPTextTransformer
from minidiff.nn import attention_impl
from minidiff.nn.attention import CrossAttention, TransformerBlock, attention
from minidiff.pipeline import StableDiffusion
from minidiff.tokenizer import CLIPTokenizer
from minidiff.unet import UNet, UNetConfig
from minidiff.vae import AutoencoderKL, VAEConfig

UNET = UNetConfig(block_out_channels=(32, 64), layers_per_block=1, cross_attention=(True, True), heads=4,
                  cross_attention_dim=32, norm_num_groups=8, sample_size=8)
VAE = VAEConfig(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8)
TEXT = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2)


def rel(a, b):
    """max |a - b| / max |b|"""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def jitter(model, seed=0, scale=0.05):
    """Default inits leave norms at exactly 1/0 and biases at 0: randomise everything so equality means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval().requires_grad_(False)


def tiny_pipe(seed=0, fast=True):
    torch.manual_seed(seed)
    return StableDiffusion(tokenizer=CLIPTokenizer(), text_encoder=jitter(CLIPTextTransformer(TEXT), seed),
                           unet=jitter(UNet(UNET), seed + 1), vae=jitter(AutoencoderKL(VAE), seed + 2), fast=fast)


def unet_inputs(dtype=torch.float32, size=8):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, size, size, generator=g).to(dtype), torch.tensor([10, 700]),
            torch.randn(2, 7, 32, generator=g).to(dtype))


# ------------------------------------------------------------------------------------------- oneDNN linear epilogues
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_linear_epilogues_match_pytorch(dtype, tol):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 10, 16, 24, generator=g)[..., 0, :].to(dtype)      # [2, 10, 24], not contiguous
    w, b = torch.randn(12, 24, generator=g).to(dtype), torch.randn(12, generator=g).to(dtype)
    other = torch.randn(2, 12, 10, generator=g).to(dtype).transpose(1, 2)  # [2, 10, 12], not contiguous
    y = F.linear(x, w, b)
    with torch.no_grad():
        assert rel(speed.linear(x, w, b), y) < tol
        assert rel(speed.linear(x, w, None), F.linear(x, w)) < tol
        assert rel(speed.linear(x, w, b, gelu=True), F.gelu(y)) < tol
        assert rel(speed.linear(x, w, b, mul=other), y * other) < tol
        assert rel(speed.linear(x, w, b, add=other), other + y) < tol
        assert rel(speed.linear(x, w[6:], b[6:], gelu=True), F.gelu(y[..., 6:])) < tol   # a row slice of W


def test_linear_keeps_autograd():
    """With gradients wanted, the fast linear is F.linear (oneDNN's fused op has no backward)."""
    x = torch.randn(3, 8, requires_grad=True)
    lin = torch.nn.Linear(8, 5)
    ref = torch.autograd.grad(F.gelu(lin(x)).sum(), [x, lin.weight])
    got = torch.autograd.grad(speed.linear(x, lin.weight, lin.bias, gelu=True).sum(), [x, lin.weight])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------------ the U-Net
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels-last", "nchw"])
@pytest.mark.parametrize("fuse_qkv", [True, False], ids=["fused-qkv", "separate-qkv"])
def test_optimized_unet_equals_reference(channels_last, fuse_qkv):
    ref_model = jitter(UNet(UNET))
    fast = speed.optimize(copy.deepcopy(ref_model), channels_last=channels_last, fuse_qkv=fuse_qkv)
    assert type(fast) is speed.FastUNet
    assert fast.conv_in.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
    x, t, c = unet_inputs()
    with torch.no_grad():
        ref, out = ref_model(x, t, c), fast(x, t, c)
    assert out.is_contiguous()
    assert rel(out, ref) < 1e-5


def test_optimized_unet_bf16_equals_reference():
    ref_model = jitter(UNet(UNET))
    fast = speed.optimize(copy.deepcopy(ref_model).to(torch.bfloat16))
    x, t, c = unet_inputs()
    with torch.no_grad():
        ref = ref_model(x, t, c)
        ref16 = ref_model.to(torch.bfloat16)(x.bfloat16(), t, c.bfloat16())
        out = fast(x.bfloat16(), t, c.bfloat16())
    assert rel(out, ref) < 2e-2      # the fast path in bf16 vs the fp32 reference
    assert rel(out, ref16) < 2e-2    # ... and vs the reference modules in bf16


def test_optimize_keeps_parameters_and_restore_undoes_it(tmp_path):
    model = jitter(UNet(UNET))
    names = {k: v.clone() for k, v in model.state_dict().items()}
    speed.optimize(model)
    assert speed.is_optimized(model)
    sd = model.state_dict()
    assert list(sd) == list(names)
    assert all(torch.equal(sd[k], v) for k, v in names.items())
    fresh = UNet(UNET)
    fresh.load_state_dict(sd, strict=True)      # an optimized model's weights load into the reference class
    speed.restore(model)
    assert type(model) is UNet and not speed.is_optimized(model)
    assert not any(type(m).__name__.startswith("Fast") for m in model.modules())
    assert model.conv_in.weight.is_contiguous()


def test_fused_qkv_cache_follows_weight_changes():
    attn = jitter(CrossAttention(16, None, heads=2, dim_head=8))
    fast = speed.optimize(copy.deepcopy(attn))
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), attn(x), rtol=1e-5, atol=1e-6)
        for m in (attn, fast):                     # an in-place update (as an optimizer step does)
            m.to_k.weight.mul_(1.5)
        torch.testing.assert_close(fast(x), attn(x), rtol=1e-5, atol=1e-6)
        new = {k: torch.randn_like(v) for k, v in attn.state_dict().items()}
        attn.load_state_dict(new)
        fast.load_state_dict(new)
        torch.testing.assert_close(fast(x), attn(x), rtol=1e-5, atol=1e-6)
        fast.to(torch.float64)                     # .to() drops the cached fused weights
        assert "_fused_cache" not in fast.__dict__
        torch.testing.assert_close(fast(x.double()), attn.double()(x.double()), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("geometry", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1),
                                      dict(kernel_size=1)], ids=["3x3", "3x3-stride2", "1x1"])
def test_conv_with_packed_weight_equals_conv2d(dtype, tol, geometry):
    """FastConv2d (weight reordered for oneDNN once, cached) == nn.Conv2d, across shapes, weight updates and .to()."""
    conv = jitter(torch.nn.Conv2d(8, 16, **geometry)).to(dtype)
    fast = speed.optimize(copy.deepcopy(conv), channels_last=False)
    assert type(fast) is speed.FastConv2d
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for shape in [(2, 8, 12, 12), (1, 8, 7, 9), (2, 8, 12, 12)]:             # a new shape repacks
            x = torch.randn(shape, generator=g).to(dtype)
            assert rel(fast(x), conv(x)) < tol
            assert rel(fast(x.to(memory_format=torch.channels_last)), conv(x)) < tol
        for m in (conv, fast):                                                   # in place, as an optimizer step
            m.weight.mul_(-0.5)
        assert rel(fast(x), conv(x)) < tol
        assert "_packed_weight" in fast.__dict__
        fast.to(torch.float64)                                                   # drops the packed copy
        assert "_packed_weight" not in fast.__dict__
        assert rel(fast(x.double()), copy.deepcopy(conv).double()(x.double())) < 1e-12
    fast, conv = fast.to(dtype).requires_grad_(True), conv.requires_grad_(True)  # training: the plain conv, same grads
    x = torch.randn(2, 8, 6, 6, generator=g).to(dtype)
    fast(x).square().sum().backward()
    conv(x).square().sum().backward()
    assert rel(fast.weight.grad, conv.weight.grad) < tol


def test_fast_conv_built_directly_compiles():
    """A FastConv2d made with its constructor (not by optimize) runs compiled too, equal to the eager conv."""
    conv = jitter(speed.FastConv2d(8, 8, 3, padding=1))
    x = torch.randn(1, 8, 6, 6)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = conv(x)
        compiled = torch.compile(conv, fullgraph=True)(x)
    torch._dynamo.reset()
    assert rel(compiled, eager) < 1e-5


def test_fused_qkv_cross_attention_and_training_gradients():
    """Self- and cross-attention in a TransformerBlock; with autograd on, the gradients equal the reference's."""
    block = jitter(TransformerBlock(16, heads=2, dim_head=8, context_dim=12)).requires_grad_(True)
    fast = speed.optimize(copy.deepcopy(block))
    x, ctx = torch.randn(2, 6, 16), torch.randn(2, 4, 12)
    with torch.no_grad():
        torch.testing.assert_close(fast(x, ctx), block(x, ctx), rtol=1e-5, atol=1e-5)
    ref = torch.autograd.grad(block(x, ctx).square().sum(), list(block.parameters()))
    got = torch.autograd.grad(fast(x, ctx).square().sum(), list(fast.parameters()))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- attention slicing
def test_attention_slicing_function():
    q, k, v = torch.randn(2, 3, 10, 4), torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 4)
    mask = torch.rand(2, 1, 10, 7) > 0.3
    mask[..., 0] = True
    for impl in ("sdpa", "naive"):
        for kw in ({}, {"mask": mask}, {"causal": True}, {"mask": torch.randn(2, 3, 1, 7), "causal": True}):
            torch.testing.assert_close(attention(q, k, v, impl=impl, slice_size=3, **kw),
                                       attention(q, k, v, impl=impl, **kw), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("optimized", [False, True], ids=["reference", "optimized"])
def test_sliced_unet_equals_unsliced(optimized):
    model = jitter(UNet(UNET))
    if optimized:
        speed.optimize(model)
    x, t, c = unet_inputs(size=16)  # 256 tokens at the top level: slices of 48 leave a ragged last slice
    with torch.no_grad():
        ref = model(x, t, c)
        speed.enable_attention_slicing(model, 48)
        assert all(m.slice_size == 48 for m in model.modules() if isinstance(m, CrossAttention))
        out = model(x, t, c)
        speed.disable_attention_slicing(model)
        assert all(m.slice_size is None for m in model.modules() if isinstance(m, CrossAttention))
    assert rel(out, ref) < 1e-5


# ------------------------------------------------------------------------------------------------- the pipeline
def _generate(pipe, **kw):
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    return pipe.generate("a red circle", steps=3, seed=0, latents=latents, output="tensor", progress=False, **kw)


def test_pipeline_fast_sdpa_equals_reference_naive():
    """generate(): the default (optimized modules, SDPA) against the reference modules on the naive attention."""
    fast, ref = tiny_pipe(fast=True), tiny_pipe(fast=False)
    with attention_impl("naive"):
        expected = _generate(ref)
    assert not speed.is_optimized(ref.unet)
    out = _generate(fast)
    assert speed.is_optimized(fast.unet) and speed.is_optimized(fast.vae) and speed.is_optimized(fast.text_encoder)
    assert rel(out, expected) < 1e-4


def norm_rel(a, b):
    """‖a - b‖ / ‖b‖"""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_pipeline_bf16_close_to_fp32():
    """The whole pipeline in bf16 (fast path) against fp32: 2e-2 relative (‖·‖₂). bf16 keeps 8 bits of mantissa and
    the error grows through the text encoder, the steps and the decoder: the reference modules in bf16 are themselves
    ~3e-2 off fp32 in the worst pixel, so the worst pixel of the fast path is held to the reference's error + 25%."""
    out32 = _generate(tiny_pipe())
    out16 = _generate(tiny_pipe().to(dtype=torch.bfloat16))
    ref16 = _generate(tiny_pipe(fast=False).to(dtype=torch.bfloat16))
    assert out16.dtype == torch.float32 and out16.shape == out32.shape == (1, 3, 16, 16)
    assert norm_rel(out16, out32) < 2e-2
    assert rel(out16, out32) < 1.25 * rel(ref16, out32)


def test_model_offload_on_cpu():
    """The offload hooks (move each network in before it runs) on device="cpu": the same images, and the models
    are left on the CPU; disable removes every hook."""
    pipe = tiny_pipe()
    expected = _generate(pipe)
    speed.enable_model_offload(pipe, "cpu")
    assert pipe.device == torch.device("cpu") and len(pipe._offload[1]) == 2 + 4  # text, unet, 4 VAE parts
    torch.testing.assert_close(_generate(pipe), expected, rtol=0, atol=0)
    speed.disable_model_offload(pipe)
    assert pipe.execution_device is None
    assert not any(m._forward_pre_hooks for model in (pipe.unet, pipe.text_encoder, pipe.vae)
                   for m in model.modules())


class _LocalDecoder:
    """A stand-in VAE whose decode is pointwise (nearest ×2, affine): tiles cannot disagree, so any difference between
    the tiled and the whole decode is a blending bug."""
    config = VAEConfig(block_out_channels=(8, 8))  # downsample_factor 2

    def decode(self, z):
        return F.interpolate(z, scale_factor=2.0) * 3 + 1


def test_vae_tiling_blend_is_exact_for_a_local_decoder():
    z = torch.randn(2, 4, 24, 20)
    dec = _LocalDecoder()
    for tile, overlap in ((12, 4), (10, 6), (7, 1), (24, 8)):
        torch.testing.assert_close(speed.tiled_decode(dec, z, tile, overlap), dec.decode(z), rtol=1e-6, atol=1e-6)


def test_vae_tiling():
    from diffusers import AutoencoderKL as DiffusersVAE
    vae = jitter(AutoencoderKL(VAE))
    pipe = StableDiffusion(None, None, UNet(UNET), vae)
    speed.optimize(vae)
    n = 64  # smooth latents: a constant plus gentle ramps
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, n), torch.linspace(-1, 1, n), indexing="ij")
    z = 0.5 + 0.1 * torch.stack([xx, yy, xx * yy, 0.5 * xx])[None]          # [1, 4, 64, 64]
    with torch.no_grad():
        whole = vae.decode(z)
        speed.enable_vae_tiling(pipe, tile_size=64, overlap=16)         # a tile as big as the latent: the plain decode
        assert torch.equal(vae.decode(z), whole)
        speed.enable_vae_tiling(pipe, tile_size=48, overlap=12)         # 2 × 2 tiles, blended over 12 latent pixels
        tiled = vae.decode(z)
        speed.disable_vae_tiling(pipe)
        assert torch.equal(vae.decode(z), whole)
        # the oracle for how close tiling can get: diffusers' tiled decode, same weights, same tile and overlap
        ref = DiffusersVAE(**{k: v for k, v in VAE.to_diffusers().items() if not k.startswith("_")}).eval()
        ref.load_state_dict({k: v.contiguous() for k, v in vae.state_dict().items()})
        ref.enable_tiling()
        ref.tile_latent_min_size, ref.tile_sample_min_size, ref.tile_overlap_factor = 48, 96, 0.25
        theirs = ref.decode(z).sample
    assert tiled.shape == whole.shape == (1, 3, 128, 128)
    # Tiles are not bit-equal to a whole decode: each tile's GroupNorm statistics and mid-block attention see only the
    # tile, and its convolutions see zero padding at its edges. With random weights that is large (measured here: mean
    # |Δ| ≈ 0.10 for an image of std ≈ 0.5, worst pixel ≈ 0.27 relative); diffusers' tiling is further off (≈ 0.17).
    err, err_diffusers = (tiled - whole).abs().mean(), (theirs - whole).abs().mean()
    assert err <= err_diffusers
    assert err < 0.3 * whole.std() and rel(tiled, whole) < 0.35
    with pytest.raises(ValueError):
        speed.enable_vae_tiling(pipe, tile_size=8, overlap=8)


def test_peak_memory_cpu():
    with speed.PeakMemory("cpu") as m:
        x = torch.ones(64, 1024, 1024)  # 256 MiB
        del x
    assert m.base_bytes is not None and m.peak_bytes >= m.base_bytes
    if m.peak_bytes - m.base_bytes < 200 * 2 ** 20:
        pytest.skip("this kernel does not reset the peak RSS (/proc/self/clear_refs)")


# ------------------------------------------------------------------------------------------------- torch.compile
def _breaks(fn, *args):
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(*args)
    return explanation.graph_break_count, [r.reason.splitlines()[0] for r in explanation.break_reasons]


def test_no_graph_breaks():
    """torch._dynamo.explain traces each network as compile_pipeline compiles it: one graph, no breaks."""
    pipe = tiny_pipe()
    speed.optimize(pipe)
    x, t, c = unet_inputs()
    ids = pipe.tokenizer(["a red circle"])
    with torch.no_grad():
        assert _breaks(pipe.unet, x, t, c) == (0, [])
        assert _breaks(pipe.vae.decoder, torch.randn(1, 4, 8, 8)) == (0, [])
        assert _breaks(pipe.text_encoder, ids) == (0, [])
        speed.enable_attention_slicing(pipe, 16)
        assert _breaks(pipe.unet, x, t, c) == (0, [])
    torch._dynamo.reset()


def test_compiled_unet_equals_eager():
    """compile_pipeline compiles in place (names unchanged); the compiled U-Net matches eager (one tiny compile)."""
    pipe = tiny_pipe()
    pipe.unet = jitter(UNet(UNetConfig(block_out_channels=(32,), layers_per_block=1, cross_attention=(True,),
                                       heads=2, cross_attention_dim=32, norm_num_groups=8)))
    names = list(pipe.unet.state_dict())
    x, t, c = unet_inputs()
    torch._dynamo.reset()
    with torch.no_grad():
        speed.optimize(pipe)
        eager = pipe.unet(x, t, c)
        speed.compile_pipeline(pipe)
        compiled = pipe.unet(x, t, c)
    torch._dynamo.reset()
    assert list(pipe.unet.state_dict()) == names
    assert rel(compiled, eager) < 1e-4
