"""Faster than diffusers: the fast inference path, torch.compile, and the memory savers.

Nothing here changes WHAT is computed — every fast path equals the reference modules within the precision's rounding
(tests/test_speed.py) — only HOW. Where the time goes in one SD v1.4 U-Net step (batch 2, 64×64 latents, measured
on a 2-core AMD EPYC with AVX-512, see docs/benchmarks.md):

  * convolutions ~35%, linear layers ~35% in fp32 (~15% in bf16), attention ~20% in fp32 (~45% in bf16);
  * the linear layers are where eager PyTorch leaves the most on the table on an AMD CPU: `F.linear` calls MKL, which
    runs its AVX2 code there (~100 GFLOP/s per core), while oneDNN — the library PyTorch already uses for the
    convolutions — runs AVX-512 (~240 GFLOP/s). A matmul y = x Wᵀ + b also costs a separate pass to copy b into y;
    oneDNN adds b (and a following GELU, ×, or + residual) inside the matmul's epilogue, while y is in registers.

So `optimize(pipe)` (what `StableDiffusion.generate` applies by default) does, without renaming a single parameter:

  1. oneDNN linears with fused epilogues, on the CPU at inference (no autograd; fp32/bf16);
       GEGLU:       h = (x W + b) ⊙ GELU(x V + c)   ->  two matmuls, the GELU and the ⊙ in their epilogues
       residuals:   x = x + Attn(LN(x)) W_o          ->  the + x in the output projection's epilogue
  2. fused QKV for self-attention: one [3C, C] matmul instead of three [C, C] ones (and K, V of a cross-attention
     in one [2C, d] matmul); the concatenated weight is cached and rebuilt when a weight changes (its version counter);
  3. channels-last (NHWC) activations for every convolution, the layout oneDNN's kernels are written for; it also
     makes the U-Net's pixels-as-tokens reshape ([B, C, H, W] -> [B, HW, C]) a free view instead of a copy;
  4. convolution weights handed to oneDNN already reordered into its blocked layout (cached per input shape): F.conv2d
     reorders them on every call, which for the 1280-channel convolutions at 16×16 and 8×8 costs about as much as
     the convolution itself.

`compile_pipeline(pipe)` runs torch.compile on top (inductor fuses GroupNorm+SiLU and the other elementwise chains;
on CUDA it also captures CUDA graphs). The memory savers trade time for memory: attention in query slices, VAE decoding
in overlapping tiles, and model offload (each network on the accelerator only while it runs).

    pipe = minidiff.load(path)                        # generate() applies optimize(pipe) on first use
    minidiff.speed.compile_pipeline(pipe)             # or minidiff.load(path, compile=True)
    minidiff.speed.enable_attention_slicing(pipe, 1024)
    minidiff.speed.enable_vae_tiling(pipe, tile_size=64, overlap=16)
    minidiff.speed.enable_model_offload(pipe, "cuda")
"""
from __future__ import annotations

import re
import types
import weakref
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .nn.attention import CrossAttention, FeedForward, TransformerBlock, attention
from .unet import SpatialTransformer, UNet

_HAS_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


# ------------------------------------------------------------------------------------- 1. oneDNN linear, fused epilogue
def _use_onednn(x, weight) -> bool:
    """oneDNN's fused linear (and FastConv2d's packed conv) apply to CPU inference in fp32/bf16 (they have no
    backward: training takes F.linear / F.conv2d)."""
    return (_HAS_ONEDNN and x.device.type == "cpu" and x.dtype == weight.dtype
            and x.dtype in (torch.float32, torch.bfloat16)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


@torch.library.custom_op("minidiff::onednn_linear", mutates_args=())
def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, post: str,
                   other: torch.Tensor | None) -> torch.Tensor:
    """x Wᵀ + b with the epilogue `post` ("none" | "gelu" | "mul" | "add" other) inside oneDNN's matmul.
    An opaque custom op, so that torch.compile keeps it as one call (inductor fuses what is around it)."""
    if other is not None:
        return torch.ops.mkldnn._linear_pointwise.binary(x, other.contiguous(), weight, bias, post)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, post, [], "none" if post == "gelu" else "")


@_onednn_linear.register_fake
def _(x, weight, bias, post, other):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def linear(x, weight, bias=None, *, gelu: bool = False, mul=None, add=None):
    """F.linear(x, weight, bias) = x Wᵀ + b, then at most one of: GELU (erf), ⊙ mul, + add.

    x [..., in], weight [out, in], bias [out], mul / add [..., out] -> [..., out]. On the CPU at inference the
    epilogue runs inside oneDNN's matmul (one pass over the output); elsewhere it is the plain PyTorch expression."""
    if _use_onednn(x, weight):
        if torch.compiler.is_compiling():  # through the custom op (the raw mkldnn ops have no fake kernels)
            post = "gelu" if gelu else "mul" if mul is not None else "add" if add is not None else "none"
            return _onednn_linear(x, weight, bias, post, mul if mul is not None else add)
        if mul is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, mul.contiguous(), weight, bias, "mul")
        if add is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, add.contiguous(), weight, bias, "add")
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [],
                                                  "none" if gelu else "")
    y = F.linear(x, weight, bias)
    if gelu:
        return F.gelu(y)
    if mul is not None:
        return y * mul
    return y if add is None else add + y


class FastLinear(nn.Linear):
    """nn.Linear through `linear` (oneDNN on the CPU). Same parameters, same state_dict."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


_CONVS: dict[int, weakref.ref] = {}   # id -> FastConv2d, for the compiled path's custom op


def _register_conv(m):
    """Let the custom op find module m by its id (the entry goes when m does)."""
    if id(m) not in _CONVS:
        _CONVS[id(m)] = weakref.ref(m)
        weakref.finalize(m, _CONVS.pop, id(m), None)


def _layout(x):
    """The memory format oneDNN gives the output of a convolution of x (channels-last in, channels-last out)."""
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


@torch.library.custom_op("minidiff::packed_conv2d", mutates_args=())
def _packed_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_id: int) -> torch.Tensor:
    """FastConv2d's packed-weight convolution as one opaque call for torch.compile (inductor would otherwise lower
    the convolution itself and reorder the weight on every call). conv_id names the module that holds the cache."""
    return _CONVS[conv_id]()._packed(x).contiguous(memory_format=_layout(x))


@_packed_conv2d.register_fake
def _(x, weight, bias, conv_id):
    conv = _CONVS[conv_id]()
    out = [x.shape[0], weight.shape[0]]
    for i, n in enumerate(x.shape[2:]):   # (n + 2p − d·(k − 1) − 1) // s + 1
        k, p, d, s = weight.shape[2 + i], conv.padding[i], conv.dilation[i], conv.stride[i]
        out.append((n + 2 * p - d * (k - 1) - 1) // s + 1)
    return x.new_empty(out).contiguous(memory_format=_layout(x))


class FastConv2d(nn.Conv2d):
    """nn.Conv2d whose weight is handed to oneDNN already in its blocked layout, on the CPU at inference.

    F.conv2d reorders the weight into oneDNN's blocked format on every call; for the 1280-channel convolutions of the
    U-Net's low resolutions that reorder costs as much as the convolution itself (the weights are big, the images
    small). The reordered copy is cached per input shape and rebuilt when the weight changes (its version counter).
    The price: a second copy of the convolution weights in memory (`optimize(..., pack_conv_weights=False)` opts out).
    """

    pack = True

    def __init__(self, *args, **kwargs):   # built directly (optimize swaps the class of an existing nn.Conv2d instead)
        super().__init__(*args, **kwargs)
        _register_conv(self)

    def forward(self, x):
        w = self.weight
        # the linears' test (CPU inference, fp32/bf16), plus what the packed call supports: zero padding given as ints
        if (not self.pack or not _use_onednn(x, w) or self.padding_mode != "zeros" or isinstance(self.padding, str)
                or x.dim() != 4):
            return super().forward(x)
        if torch.compiler.is_compiling():
            return _packed_conv2d(x, w, self.bias, id(self))
        return self._packed(x)

    def _packed(self, x):
        w = self.weight
        geometry = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
        key = (w.data_ptr(), w._version, w.dtype, tuple(x.shape))
        cache = self.__dict__.get("_packed_weight")
        if cache is None or cache[0] != key:   # one input shape at a time: a new resolution repacks
            packed = torch.ops.mkldnn._reorder_convolution_weight(w, *geometry, list(x.shape))
            cache = self.__dict__["_packed_weight"] = (key, packed)
        return torch.ops.mkldnn._convolution_pointwise(x, cache[1], self.bias, *geometry, "none", [], "")

    def _apply(self, fn, recurse=True):  # .to(), .half(), ...: drop the packed copy
        self.__dict__.pop("_packed_weight", None)
        return super()._apply(fn, recurse)


class FastCrossAttention(CrossAttention):
    """CrossAttention with fused projections and the residual added in the output projection's epilogue.

    forward(x [B, L, C], context [B, S, d] | None, mask, residual [B, L, C] | None) -> [B, L, C] (+ residual)."""

    fuse_qkv = True

    def forward(self, x, context=None, mask=None, residual=None):
        B, L, _ = x.shape
        h = self.heads
        if context is None and self.fuse_qkv:       # self-attention: Q, K, V = x [W_q; W_k; W_v]ᵀ in one matmul
            qkv = linear(x, *self._fused(("to_q", "to_k", "to_v")))        # [B, L, 3·h·d]
            q, k, v = qkv.view(B, L, 3, h, -1).permute(2, 0, 3, 1, 4)      # 3 × [B, h, L, d] (views)
        else:
            context = x if context is None else context
            S = context.shape[1]
            q = linear(x, self.to_q.weight, self.to_q.bias).view(B, L, h, -1).transpose(1, 2)  # [B, h, L, d]
            if self.fuse_qkv:                       # cross-attention: K and V both read the context
                kv = linear(context, *self._fused(("to_k", "to_v")))        # [B, S, 2·h·d]
                k, v = kv.view(B, S, 2, h, -1).permute(2, 0, 3, 1, 4)       # 2 × [B, h, S, d]
            else:
                k = linear(context, self.to_k.weight, self.to_k.bias).view(B, S, h, -1).transpose(1, 2)
                v = linear(context, self.to_v.weight, self.to_v.bias).view(B, S, h, -1).transpose(1, 2)
        out = attention(q, k, v, mask=mask, slice_size=self.slice_size)     # [B, h, L, d]
        out = out.transpose(1, 2).reshape(B, L, -1)                         # [B, L, h·d]
        o = self.to_out[0]
        return linear(out, o.weight, o.bias, add=residual)

    def _fused(self, names):
        """(weight [n·out, in], bias [n·out] | None) of the named projections stacked along the output dimension."""
        mods = [getattr(self, n) for n in names]
        if torch.compiler.is_compiling() or torch.is_grad_enabled():   # traced / differentiable: concatenate each call
            return _cat(mods)
        # inference: cache the concatenation; a weight that was replaced, moved, or changed in place (every in-place
        # op bumps a tensor's version counter: load_state_dict, optimizer steps) invalidates it
        key = tuple((p.data_ptr(), p._version) for m in mods for p in (m.weight, m.bias) if p is not None)
        cache = self.__dict__.setdefault("_fused_cache", {})
        if names not in cache or cache[names][0] != key:
            cache[names] = (key, _cat(mods))
        return cache[names][1]

    def _apply(self, fn, recurse=True):  # .to(), .half(), ...: the cached copies would be stale and keep memory
        self.__dict__.pop("_fused_cache", None)
        return super()._apply(fn, recurse)


def _cat(mods):
    weight = torch.cat([m.weight for m in mods])
    bias = None if mods[0].bias is None else torch.cat([m.bias for m in mods])
    return weight, bias


class FastFeedForward(FeedForward):
    """GEGLU MLP as three matmuls with fused epilogues: g = GELU(x V + c); h = (x W + b) ⊙ g; y = h W₂ + b₂ (+ residual).
    [B, L, dim] -> [B, L, dim]."""

    def forward(self, x, residual=None):
        proj, out = self.net["0"].proj, self.net["2"]
        if not _use_onednn(x, proj.weight):
            y = super().forward(x)
            return y if residual is None else residual + y
        n = proj.out_features // 2               # GEGLU's projection is [x half; gate half] (chunk(2) order)
        gate = linear(x, proj.weight[n:], proj.bias[n:], gelu=True)          # [B, L, 4·dim]
        hidden = linear(x, proj.weight[:n], proj.bias[:n], mul=gate)         # [B, L, 4·dim]
        return linear(hidden, out.weight, out.bias, add=residual)


class FastTransformerBlock(TransformerBlock):
    """The same three residual steps, each residual added inside the preceding matmul."""

    def forward(self, x, context=None):
        x = self.attn1(self.norm1(x), residual=x)
        if hasattr(self, "attn2"):
            x = self.attn2(self.norm2(x), context, residual=x)
        return self.ff(self.norm3(x), residual=x)


class FastSpatialTransformer(SpatialTransformer):
    """proj_in / proj_out (1×1 convs) as matmuls over the tokens, the input added in proj_out's epilogue.
    With channels-last activations [B, C, H, W] <-> [B, HW, C] are views (no copies)."""

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)        # [B, HW, C]
        h = linear(h, self.proj_in.weight.view(C, C), self.proj_in.bias)  # 1×1 conv = matmul per pixel
        for block in self.transformer_blocks:
            h = block(h, context)                                         # [B, HW, C]
        res = x.permute(0, 2, 3, 1).reshape(B, H * W, C)                  # [B, HW, C]
        h = linear(h, self.proj_out.weight.view(C, C), self.proj_out.bias, add=res)
        return h.view(B, H, W, C).permute(0, 3, 1, 2)                     # [B, C, H, W] (channels-last)


class FastUNet(UNet):
    """UNet whose output is contiguous again (the channels-last convolutions hand back NHWC strides)."""

    def forward(self, latents, t, context):
        return super().forward(latents, t, context).contiguous()


_FAST = {nn.Linear: FastLinear, nn.Conv2d: FastConv2d, CrossAttention: FastCrossAttention, FeedForward: FastFeedForward,
         TransformerBlock: FastTransformerBlock, SpatialTransformer: FastSpatialTransformer, UNet: FastUNet}
_REFERENCE = {fast: ref for ref, fast in _FAST.items()}


def _models(obj) -> list[nn.Module]:
    if isinstance(obj, nn.Module):
        return [obj]
    return [m for m in (getattr(obj, "text_encoder", None), getattr(obj, "unet", None), getattr(obj, "vae", None))
            if m is not None]


def optimize(pipe_or_model, channels_last: bool = True, fuse_qkv: bool = True, pack_conv_weights: bool = True):
    """The fast inference path, in place: swap the modules for their Fast* twins (same parameters and names; a
    class swap, so state_dict, save() and training are untouched) and put conv weights in channels-last.
    pack_conv_weights=False: no cached oneDNN copy of the convolution weights (saves that memory, costs speed).

    Works on a StableDiffusion (text encoder, U-Net, VAE) or on one nn.Module. Idempotent. Returns its argument."""
    for model in _models(pipe_or_model):
        for m in model.modules():
            fast = _FAST.get(type(m))
            if fast is not None:
                m.__class__ = fast
            if isinstance(m, FastCrossAttention):
                m.fuse_qkv = fuse_qkv
            if isinstance(m, FastConv2d):
                m.pack = pack_conv_weights
                _register_conv(m)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        model._minidiff_optimized = True
    return pipe_or_model


def restore(pipe_or_model):
    """Undo `optimize`: the reference module classes and contiguous (NCHW) weights. Returns its argument."""
    for model in _models(pipe_or_model):
        for m in model.modules():
            ref = _REFERENCE.get(type(m))
            if ref is not None:
                m.__class__ = ref
                m.__dict__.pop("_fused_cache", None)
                m.__dict__.pop("_packed_weight", None)
                m.__dict__.pop("pack", None)
                m.__dict__.pop("fuse_qkv", None)
        model.to(memory_format=torch.contiguous_format)
        model.__dict__.pop("_minidiff_optimized", None)
    return pipe_or_model


def is_optimized(model: nn.Module) -> bool:
    return getattr(model, "_minidiff_optimized", False)


def channels_last(pipe_or_model):
    """Only the memory-format part of `optimize`: conv weights (hence activations) in NHWC. Returns its argument."""
    for model in _models(pipe_or_model):
        model.to(memory_format=torch.channels_last)
    return pipe_or_model


# ------------------------------------------------------------------------------------------------ 2. torch.compile
def compile_options(device, mode: str | None = None, fullgraph: bool = True) -> dict:
    """The torch.compile keyword arguments minidiff uses for the U-Net on `device` (the benchmarks use them too).

    mode None = "reduce-overhead" on CUDA (CUDA graphs: the ~50 steps replay one captured graph, no per-kernel
    launch cost) and inductor's default elsewhere. fullgraph=True: a graph break is an error, not a silent slowdown
    (tests/test_speed.py checks there are none)."""
    if mode is None and torch.device(device).type == "cuda":
        mode = "reduce-overhead"
    return {"mode": mode, "fullgraph": fullgraph}


def compile_pipeline(pipe, mode: str | None = None, optimize_first: bool = True, fullgraph: bool = True):
    """torch.compile the U-Net, the VAE decoder and the text encoder in place (`nn.Module.compile`: parameters and
    state_dict keys stay as they are, so save() still works). Compilation happens on the first call of each.

    mode: the U-Net's torch.compile mode (see compile_options). The VAE decoder and text encoder run once or twice
    per image and get the default mode (no CUDA-graph capture). Returns pipe."""
    if optimize_first:
        optimize(pipe)
    pipe.unet.compile(**compile_options(pipe.device, mode, fullgraph))
    pipe.vae.decoder.compile(fullgraph=fullgraph)
    pipe.text_encoder.compile(fullgraph=fullgraph)
    return pipe


# --------------------------------------------------------------------------------------------- 3. memory savers
def enable_attention_slicing(pipe_or_model, slice_size: int | None = 1024):
    """Compute every attention in chunks of `slice_size` queries: at most [B, h, slice_size, S] scores at a time
    instead of [B, h, L, S] (the fused SDPA kernels already avoid the full matrix; the naive path and older
    kernels do not). None turns it off. Returns its argument."""
    for model in _models(pipe_or_model):
        for m in model.modules():
            if isinstance(m, CrossAttention):
                if slice_size:
                    m.slice_size = int(slice_size)
                else:
                    m.__dict__.pop("slice_size", None)
    return pipe_or_model


def disable_attention_slicing(pipe_or_model):
    return enable_attention_slicing(pipe_or_model, None)


def _tile_starts(n: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of length `tile` covering 0..n, `stride` apart, the last one flush with the end."""
    if n <= tile:
        return [0]
    starts = list(range(0, n - tile, stride))
    return starts + [n - tile]


def _ramp(n: int, fade_in: int, fade_out: int, device) -> torch.Tensor:
    """[n] blending weights: rising linearly over the first `fade_in` entries, falling over the last `fade_out`."""
    w = torch.ones(n, device=device)
    if fade_in:
        w[:fade_in] = torch.minimum(w[:fade_in], (torch.arange(fade_in, device=device) + 0.5) / fade_in)
    if fade_out:
        w[n - fade_out:] = torch.minimum(w[n - fade_out:], (torch.arange(fade_out, device=device).flip(0) + 0.5) / fade_out)
    return w


def tiled_decode(vae, z: torch.Tensor, tile_size: int = 64, overlap: int = 16) -> torch.Tensor:
    """VAE decode of a big latent in overlapping tiles: z [B, 4, h, w] -> images [B, 3, h·f, w·f].

    Each tile_size×tile_size latent tile is decoded alone (memory ∝ tile, not image) and the decoded tiles are
    averaged where they overlap with weights that ramp linearly across the overlap, so no seam is a hard edge:
        image = Σ_tiles w_tile · D(z_tile) / Σ_tiles w_tile
    Not bit-equal to a whole decode — GroupNorm statistics and the mid-block attention see one tile, and the
    convolutions see zero padding at tile edges — but close on smooth content. A latent no bigger than a tile is
    decoded whole (exactly `vae.decode`)."""
    B, _, h, w = z.shape
    if h <= tile_size and w <= tile_size:
        return type(vae).decode(vae, z)
    f = vae.config.downsample_factor
    stride = max(1, tile_size - overlap)
    out = weight = None
    for y0 in _tile_starts(h, tile_size, stride):
        for x0 in _tile_starts(w, tile_size, stride):
            th, tw = min(tile_size, h), min(tile_size, w)
            tile = type(vae).decode(vae, z[:, :, y0:y0 + th, x0:x0 + tw])       # [B, 3, th·f, tw·f]
            if out is None:
                out = torch.zeros(B, tile.shape[1], h * f, w * f, device=tile.device, dtype=torch.float32)
                weight = torch.zeros(1, 1, h * f, w * f, device=tile.device, dtype=torch.float32)
            ov = overlap * f  # fade only on sides that have a neighbour
            wy = _ramp(th * f, ov if y0 > 0 else 0, ov if y0 + th < h else 0, tile.device)
            wx = _ramp(tw * f, ov if x0 > 0 else 0, ov if x0 + tw < w else 0, tile.device)
            wt = wy[:, None] * wx[None, :]                                        # [th·f, tw·f]
            out[:, :, y0 * f:(y0 + th) * f, x0 * f:(x0 + tw) * f] += tile.float() * wt
            weight[:, :, y0 * f:(y0 + th) * f, x0 * f:(x0 + tw) * f] += wt
    return (out / weight).to(tile.dtype)


def enable_vae_tiling(pipe, tile_size: int = 64, overlap: int = 16):
    """Make `pipe.vae.decode` decode in overlapping tiles of tile_size latent pixels (64 = 512 image pixels), blended
    over `overlap` latent pixels. Returns pipe."""
    if overlap >= tile_size:
        raise ValueError(f"overlap ({overlap}) must be smaller than tile_size ({tile_size})")
    vae = pipe.vae
    vae.decode = types.MethodType(lambda self, z: tiled_decode(self, z, tile_size, overlap), vae)
    return pipe


def disable_vae_tiling(pipe):
    pipe.vae.__dict__.pop("decode", None)
    return pipe


def enable_model_offload(pipe, device="cuda"):
    """Keep the three networks in CPU memory and move each to `device` only while it runs (the others go back to the
    CPU first): peak accelerator memory = the biggest network plus activations, instead of all three. The pipeline
    computes on `device` (its latents live there). Costs one host<->device copy per switch (the U-Net stays resident
    through all the sampling steps). Returns pipe."""
    disable_model_offload(pipe, move_to=None)
    device = torch.device(device)
    models = _models(pipe)
    for model in models:
        model.to("cpu")

    def make_hook(model):
        def hook(module, args, kwargs):
            for other in models:
                if other is not model and _device_of(other) != torch.device("cpu"):
                    other.to("cpu")
            if _device_of(model) != device:
                model.to(device)
            move = lambda a: a.to(device) if torch.is_tensor(a) else a  # noqa: E731
            return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}
        return hook

    handles = []
    for model in models:
        hook = make_hook(model)
        # the VAE is used through encode() / decode(), which call these submodules, never vae.forward
        parts = [model] if model is not pipe.vae else [m for m in (model.encoder, model.decoder, model.quant_conv,
                                                                    model.post_quant_conv) if m is not None]
        handles += [p.register_forward_pre_hook(hook, with_kwargs=True) for p in parts]
    pipe._offload = (device, handles)
    pipe.execution_device = device
    return pipe


def disable_model_offload(pipe, move_to="same"):
    """Remove the offload hooks; move_to: a device for all three networks ("same" = the offload device, None = leave)."""
    device, handles = getattr(pipe, "_offload", (None, []))
    for h in handles:
        h.remove()
    pipe._offload = None
    pipe.execution_device = None
    target = device if move_to == "same" else move_to
    if target is not None:
        for model in _models(pipe):
            model.to(target)
    return pipe


def _device_of(model):
    return next(model.parameters()).device


# ------------------------------------------------------------------------------------------------ 4. measuring
class PeakMemory:
    """`with PeakMemory(device) as m: ...` then m.peak_bytes: the peak memory of the block.

    CUDA: torch.cuda.max_memory_allocated (the caching allocator's tensors). CPU: the process's peak resident set
    size (Linux VmHWM, reset at entry through /proc/self/clear_refs; None where that is unavailable) — it counts the
    weights already loaded too, so compare it with `base_bytes`, the resident size at entry."""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.peak_bytes = self.base_bytes = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self.base_bytes = _proc_status("VmRSS")
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak_bytes = _proc_status("VmHWM")
        return False


def _proc_status(field: str):
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


__all__ = ["optimize", "restore", "is_optimized", "channels_last", "compile_options", "compile_pipeline", "linear",
           "enable_attention_slicing", "disable_attention_slicing", "enable_vae_tiling", "disable_vae_tiling",
           "tiled_decode", "enable_model_offload", "disable_model_offload", "PeakMemory",
           "FastLinear", "FastConv2d", "FastCrossAttention", "FastFeedForward", "FastTransformerBlock", "FastSpatialTransformer",
           "FastUNet"]
