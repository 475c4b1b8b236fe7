"""Tiny random-weight minidiff models for the kernels-layer and speed tests (tests/test_kernels.py, tests/test_speed.py)
and benchmarks/bf16_isa_spread.py: small enough that a 3-step generate() takes a fraction of a second."""
from __future__ import annotations

import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from minidiff.clip import CLIPTextConfig, CLIPTextTransformer
from minidiff.pipeline import StableDiffusion
from minidiff.tokenizer import CLIPTokenizer
from minidiff.unet import UNet, UNetConfig
from minidiff.vae import AutoencoderKL, VAEConfig

UNET = UNetConfig(block_out_channels=(32, 64), layers_per_block=1, cross_attention=(True, True), heads=4,
                  cross_attention_dim=32, norm_num_groups=8, sample_size=8)
VAE = VAEConfig(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8)
TEXT = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2)

# The tolerance between two kernel families (reference PyTorch vs oneDNN on the CPU), as max |a − b| / max |b|.
# fp32: the families sum in different orders (oneDNN blocks its matmuls and convolutions by the CPU's vector width,
# AVX2 / AVX-512 / AMX): one op ~1e-6, a small network ~1e-5; the bound is 10× that. bf16, one op: each family rounds
# a result to 8 bits (an error of at most u = 2⁻⁸ ≈ 0.0039 of it) once or twice — the reference also between a matmul
# and its epilogue, three times in GEGLU, oneDNN once inside the fused kernel — so the two differ by at most 5
# roundings, 5u ≈ 0.02 < 3e-2. Whole networks in bf16 are held to the budget of their counted roundings instead
# (bf16_budget below).
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def rel(a, b) -> float:
    """max |a - b| / max |b|: the worst element's error, relative to the largest value."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def norm_rel(a, b) -> float:
    """‖a - b‖₂ / ‖b‖₂"""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def jitter(model, seed=0, scale=0.05):
    """Default inits leave norms at exactly 1/0 and biases at 0: randomise everything so equality means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval().requires_grad_(False)


def tiny_pipe(seed=0, fast=True) -> StableDiffusion:
    torch.manual_seed(seed)
    return StableDiffusion(tokenizer=CLIPTokenizer(), text_encoder=jitter(CLIPTextTransformer(TEXT), seed),
                           unet=jitter(UNet(UNET), seed + 1), vae=jitter(AutoencoderKL(VAE), seed + 2), fast=fast)


def unet_inputs(dtype=torch.float32, size=8):
    """(latents [2, 4, size, size], timesteps [2], context [2, 7, 32])"""
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, size, size, generator=g).to(dtype), torch.tensor([10, 700]),
            torch.randn(2, 7, 32, generator=g).to(dtype))


def generate(pipe, **kw) -> torch.Tensor:
    """3 PNDM steps (4 U-Net calls) from fixed latents -> image [1, 3, 16, 16] in [0, 1] (float32)."""
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    return pipe.generate("a red circle", steps=3, seed=0, latents=latents, output="tensor", progress=False, **kw)


# ------------------------------------------------------------------------------------------------ bf16 rounding
U_BF16 = 2 ** -8   # bf16 keeps 8 significant bits: rounding to nearest errs by at most 2⁻⁸ of the value rounded
# aten ops whose bf16 result is a copy of bf16 values (no rounding): views, concatenation, gathers, nearest resizing
_EXACT = {"_unsafe_view", "cat", "stack", "clone", "copy", "embedding", "upsample_nearest2d", "abs", "neg",
          "constant_pad_nd", "index", "slice_scatter", "select_scatter", "repeat", "repeat_interleave", "flip"}


class _CountRoundings(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and func.__name__.split(".")[0] not in _EXACT and \
                any(isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 for t in tree_leaves(out)):
            self.n += 1
        return out


def count_bf16_roundings(fn, *args, **kwargs):
    """-> (fn's result, n): n = how many times fn rounds a result to bf16, i.e. the aten ops it runs that write a
    computed bf16 tensor (every matmul, convolution, norm, activation, sum, product... ; not views and copies)."""
    with _CountRoundings() as counter:
        out = fn(*args, **kwargs)
    return out, counter.n


def bf16_budget(n: int) -> float:
    """The error of n bf16 roundings, each of at most u = 2⁻⁸ relative, of either sign and independent of the others:
    they add like a random walk, to about √n·u — not the worst case n·u, where every rounding errs the same way
    (Higham & Mary, "A new approach to probabilistic rounding error analysis", SIAM J. Sci. Comput. 41(5), 2019)."""
    return math.sqrt(n) * U_BF16
