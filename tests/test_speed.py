"""minidiff.speed, the features around the kernels layer (tests/test_kernels.py tests the kernels themselves):
attention slicing, VAE tiling and model offload keep the result; torch.compile sees no graph breaks, matches eager."""

import pytest
import torch
import torch.nn.functional as F

from kernel_fixtures import TOL, UNET, VAE, generate, jitter, rel, tiny_pipe, unet_inputs
from minidiff import kernels, speed
from minidiff.nn.attention import CrossAttention, attention
from minidiff.pipeline import StableDiffusion
from minidiff.unet import UNet, UNetConfig
from minidiff.vae import AutoencoderKL, VAEConfig


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


# ------------------------------------------------------------------------------------------------- memory savers
def test_model_offload_on_cpu():
    """The offload hooks (move each network in before it runs) on device="cpu": the same images, and the models
    are left on the CPU; disable removes every hook."""
    pipe = tiny_pipe()
    expected = generate(pipe)
    speed.enable_model_offload(pipe, "cpu")
    assert pipe.device == torch.device("cpu") and len(pipe._offload[1]) == 2 + 4  # text, unet, 4 VAE parts
    torch.testing.assert_close(generate(pipe), expected, rtol=0, atol=0)
    speed.disable_model_offload(pipe)
    assert pipe.execution_device is None
    assert not any(m._forward_pre_hooks for model in (pipe.unet, pipe.text_encoder, pipe.vae)
                   for m in model.modules())


class _LocalDecoder:
    """A stand-in VAE whose decode is pointwise (nearest ×2, affine): tiles cannot disagree, so any difference between
    the tiled and the whole decode is a blending bug."""
    config = VAEConfig(block_out_channels=(8, 8), norm_num_groups=8)  # downsample_factor 2

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
