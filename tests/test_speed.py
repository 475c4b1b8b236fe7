"""minidiff.kernels and minidiff.speed: every kernel family computes what the reference kernels compute, within the
tolerance TOL states per dtype; the modules a chapter teaches are the modules that run (no class swap, weights
untouched); torch.compile sees no graph breaks; the memory savers keep the result."""

import pytest
import torch
import torch.nn.functional as F

from minidiff import kernels, speed
from minidiff.clip import CLIPTextConfig, CLIPTextTransformer
from minidiff.lora import inject_lora
from minidiff.nn import attention_impl
from minidiff.nn.attention import CrossAttention, TransformerBlock, attention
from minidiff.nn.layers import Conv2d
from minidiff.pipeline import StableDiffusion
from minidiff.tokenizer import CLIPTokenizer
from minidiff.unet import UNet, UNetConfig
from minidiff.vae import AutoencoderKL, VAEConfig

# The tolerance between two kernel families (reference PyTorch vs oneDNN on the CPU), as max |a − b| / max |b| over a
# whole network's output. The families sum in different orders (oneDNN blocks its matmuls and convolutions by the CPU's
# vector width, AVX2 / AVX-512 / AMX), so results differ by rounding that grows with depth: fp32 keeps 24 bits of
# mantissa (one op ~1e-6, a U-Net ~1e-5), bf16 keeps 8 (one op ~4e-3, a network ~1e-2). These bounds are 10× and 2–3×
# what was measured here, so that they hold on any x86 CPU.
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
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


# ------------------------------------------------------------------------------------------- the kernels, one by one
DTYPES = [torch.float32, torch.bfloat16]
IDS = ["fp32", "bf16"]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_linear_epilogues_match_reference(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 10, 16, 24, generator=g)[..., 0, :].to(dtype)      # [2, 10, 24], not contiguous
    w, b = torch.randn(12, 24, generator=g).to(dtype), torch.randn(12, generator=g).to(dtype)
    other = torch.randn(2, 12, 10, generator=g).to(dtype).transpose(1, 2)  # [2, 10, 12], not contiguous
    y = F.linear(x, w, b)
    with torch.no_grad():
        assert kernels.pick(x, w) == "onednn"
        assert rel(kernels.linear(x, w, b), y) < TOL[dtype]
        assert rel(kernels.linear(x, w, None), F.linear(x, w)) < TOL[dtype]
        assert rel(kernels.linear(x, w, b, gelu=True), F.gelu(y)) < TOL[dtype]
        assert rel(kernels.linear(x, w, b, mul=other), y * other) < TOL[dtype]
        assert rel(kernels.linear(x, w, b, add=other), other + y) < TOL[dtype]
        assert rel(kernels.linear(x, w[6:], b[6:], gelu=True), F.gelu(y[..., 6:])) < TOL[dtype]   # a row slice of W
        h = torch.randn(2, 5, 24, generator=g).to(dtype)
        assert rel(kernels.geglu(h, w, b), F.linear(h, w[:6], b[:6]) * F.gelu(F.linear(h, w[6:], b[6:]))) < TOL[dtype]


def test_kernels_pick_by_device_dtype_grad_and_switch():
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    with torch.no_grad():
        assert kernels.pick(x, w) == "onednn"
        assert kernels.pick(x.half(), w.half()) == "reference"          # no fp16 oneDNN matmul on the CPU
        with kernels.use("reference"):
            assert kernels.pick(x, w) == "reference"
        assert kernels.pick(x, w) == "onednn"                           # restored after the block
        with kernels.use("triton"):                                     # Triton runs CUDA tensors only
            assert kernels.pick(x, w) == "onednn"
    assert kernels.pick(x, w.requires_grad_()) == "reference"          # training: oneDNN has no backward
    with pytest.raises(ValueError, match="kernels backend must be one of"):
        kernels.set_backend("fast")


def test_linear_trains_through_the_reference():
    lin = jitter(torch.nn.Linear(8, 6)).requires_grad_(True)
    x = torch.randn(3, 8, requires_grad=True)
    ref = torch.autograd.grad(F.gelu(lin(x)).sum(), [x, lin.weight])
    got = torch.autograd.grad(kernels.linear(x, lin.weight, lin.bias, gelu=True).sum(), [x, lin.weight])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("geometry", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1),
                                      dict(kernel_size=1)], ids=["3x3", "3x3-stride2", "1x1"])
def test_conv_with_packed_weight_equals_conv2d(dtype, geometry):
    """The oneDNN conv (weight reordered once, cached per weight and input shape) == F.conv2d, across shapes, in-place
    weight updates and .to(); the user's weight is never changed; training takes the reference."""
    conv = jitter(Conv2d(8, 16, **geometry)).to(dtype)
    weight = conv.weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for shape in [(2, 8, 12, 12), (1, 8, 7, 9), (2, 8, 12, 12)]:             # a new shape repacks
            x = torch.randn(shape, generator=g).to(dtype)
            ref = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)
            assert rel(conv(x), ref) < TOL[dtype]
            assert rel(conv(x.to(memory_format=torch.channels_last)), ref) < TOL[dtype]
        assert torch.equal(conv.weight, weight) and conv.weight.is_contiguous()
        conv.weight.mul_(-0.5)                                                   # in place, as an optimizer step
        assert rel(conv(x), F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)) < TOL[dtype]
        conv.to(torch.float64)                                                   # not oneDNN's: the reference
        xd = x.double()
        assert torch.equal(conv(xd), F.conv2d(xd, conv.weight, conv.bias, conv.stride, conv.padding))
    conv = conv.to(dtype).requires_grad_(True)
    x = torch.randn(2, 8, 6, 6, generator=g).to(dtype)
    conv(x).square().sum().backward()
    grad = conv.weight.grad.clone()
    conv.weight.grad = None
    F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding).square().sum().backward()
    assert torch.equal(grad, conv.weight.grad)


def test_stacked_qkv_cache_follows_weight_changes():
    attn = jitter(CrossAttention(16, None, heads=2, dim_head=8))
    x = torch.randn(2, 5, 16)

    def reference():
        with kernels.use("reference"):
            return attn(x)
    with torch.no_grad():
        assert kernels.can_stack(attn.to_q, attn.to_k, attn.to_v)
        torch.testing.assert_close(attn(x), reference(), rtol=TOL[torch.float32], atol=1e-6)
        attn.to_k.weight.mul_(1.5)                 # an in-place update (as an optimizer step does)
        torch.testing.assert_close(attn(x), reference(), rtol=TOL[torch.float32], atol=1e-6)
        attn.load_state_dict({k: torch.randn_like(v) for k, v in attn.state_dict().items()})
        torch.testing.assert_close(attn(x), reference(), rtol=TOL[torch.float32], atol=1e-5)
        attn.to(torch.float64)                     # new tensors: restacked
        torch.testing.assert_close(attn(x.double()), reference_double(attn, x), rtol=1e-12, atol=1e-12)


def reference_double(attn, x):
    with kernels.use("reference"):
        return attn(x.double())


# ------------------------------------------------------------------------------------------------------ the U-Net
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_unet_fast_kernels_equal_reference_kernels(dtype):
    """One model, two kernel families: the same U-Net (same modules, same weights) on the default kernels and under
    kernels.use("reference")."""
    model = jitter(UNet(UNET)).to(dtype)
    x, t, c = (a.to(dtype) if a.is_floating_point() else a for a in unet_inputs())
    with torch.no_grad():
        out = model(x, t, c)
        with kernels.use("reference"):
            ref = model(x, t, c)
    assert out.is_contiguous() and out.dtype == dtype
    assert rel(out, ref) < TOL[dtype]


def test_transformer_block_trains_as_the_reference():
    """With autograd on, the chapter's expressions run (no stacking, no oneDNN): gradients are bit-identical."""
    block = jitter(TransformerBlock(16, heads=2, dim_head=8, context_dim=12)).requires_grad_(True)
    x, ctx = torch.randn(2, 6, 16), torch.randn(2, 4, 12)
    got = torch.autograd.grad(block(x, ctx).square().sum(), list(block.parameters()))
    with kernels.use("reference"):
        ref = torch.autograd.grad(block(x, ctx).square().sum(), list(block.parameters()))
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


def test_frozen_layers_on_onednn_feed_trained_layers():
    """Fine-tuning the last up block: the frozen layers before it need no gradient, so they run on oneDNN (channels-last
    outputs), and the trained block backpropagates through the reference kernels — with the reference's gradients
    (this crashed in torch's GroupNorm backward before kernels.group_norm made such an input contiguous)."""
    model = jitter(UNet(UNET))
    model.up_blocks[-1].requires_grad_(True)
    x, t, c = unet_inputs()
    grads = []
    for backend in ("auto", "reference"):
        with kernels.use(backend):
            model.zero_grad()
            model(x, t, c).square().sum().backward()
        grads.append([p.grad.clone() for p in model.up_blocks[-1].parameters()])
    for a, b in zip(*grads):
        assert rel(a, b) < TOL[torch.float32]


# ---------------------------------------------------------------------------------------------- attention slicing
def test_attention_slicing_function():
    q, k, v = torch.randn(2, 3, 10, 4), torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 4)
    mask = torch.rand(2, 1, 10, 7) > 0.3
    mask[..., 0] = True
    for impl in ("sdpa", "naive"):
        for kw in ({}, {"mask": mask}, {"causal": True}, {"mask": torch.randn(2, 3, 1, 7), "causal": True}):
            torch.testing.assert_close(attention(q, k, v, impl=impl, slice_size=3, **kw),
                                       attention(q, k, v, impl=impl, **kw), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_sliced_unet_equals_unsliced(backend):
    model = jitter(UNet(UNET))
    x, t, c = unet_inputs(size=16)  # 256 tokens at the top level: slices of 48 leave a ragged last slice
    with torch.no_grad(), kernels.use(backend):
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
    """generate(): the default (fast kernels, SDPA) against the reference kernels on the naive attention."""
    fast, ref = tiny_pipe(fast=True), tiny_pipe(fast=False)
    with attention_impl("naive"):
        expected = _generate(ref)
    assert rel(_generate(fast), expected) < TOL[torch.float32]


def test_generate_runs_the_chapters_modules():
    """After generate(): every module is still its chapter's class, the parameters are the same tensor objects with
    unchanged values and memory format, and a forward hook on a CrossAttention fires (a student's breakpoint is hit)."""
    pipe = tiny_pipe()
    models = (pipe.text_encoder, pipe.unet, pipe.vae)
    classes = [[type(m) for m in model.modules()] for model in models]
    params = [[(p, p.detach().clone()) for p in model.parameters()] for model in models]
    calls = []
    attn = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    unet_calls = []
    handles = [attn.register_forward_hook(lambda module, args, out: calls.append(out.shape)),
               pipe.unet.register_forward_hook(lambda module, args, out: unet_calls.append(1))]
    _generate(pipe)
    for h in handles:
        h.remove()
    assert len(calls) == len(unet_calls) >= 3                 # once per U-Net call (PNDM: steps + 1)
    seen = []                                                 # a hook on a projection inside the stacked QKV fires too
    handle = attn.to_k.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    _generate(pipe)
    handle.remove()
    assert len(seen) == len(unet_calls)
    assert [[type(m) for m in model.modules()] for model in models] == classes
    assert not any(type(m).__name__.startswith("Fast") for model in models for m in model.modules())
    for model, before in zip(models, params):
        for p, (q, value) in zip(model.parameters(), before):
            assert p is q and torch.equal(p, value) and p.is_contiguous()


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
def test_lora_wrapped_layers_run_in_generate(fast):
    """A LoRA-wrapped projection works wherever the plain layer does (the stacked-QKV path leaves it to its own
    forward): generate() runs, and with B = 0 the image is the base model's."""
    pipe = tiny_pipe(fast=fast)
    base = _generate(pipe)
    inject_lora(pipe.unet, rank=2)
    out = _generate(pipe)
    assert rel(out, base) < TOL[torch.float32]


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
        eager = pipe.unet(x, t, c)
        speed.compile_pipeline(pipe)
        compiled = pipe.unet(x, t, c)
    torch._dynamo.reset()
    assert list(pipe.unet.state_dict()) == names
    assert rel(compiled, eager) < TOL[torch.float32]
