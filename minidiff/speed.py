"""Speed and memory on top of the kernels layer: torch.compile, and the memory savers.

The fast kernels themselves live in minidiff.kernels (oneDNN on the CPU, Triton on CUDA) and run by default, inside
the very modules the chapters teach: there is nothing to switch on (`pipe.fast = False` runs the reference kernels).
This module adds what sits around them:

  * `compile_pipeline(pipe)` runs torch.compile over the U-Net, the VAE decoder and the text encoder (inductor fuses
    the elementwise chains between the kernels; on CUDA it also captures CUDA graphs, so the ~50 sampling steps replay
    one graph with no per-kernel launch cost);
  * the memory savers trade time for memory: attention in query slices, VAE decoding in overlapping tiles, and model
    offload (each network on the accelerator only while it runs).

    pipe = minidiff.load(path)
    minidiff.speed.compile_pipeline(pipe)             # or minidiff.load(path, compile=True)
    minidiff.speed.enable_attention_slicing(pipe, 1024)
    minidiff.speed.enable_vae_tiling(pipe, tile_size=64, overlap=16)
    minidiff.speed.enable_model_offload(pipe, "cuda")
"""
from __future__ import annotations

import types

import torch

from .networks import networks
from .nn.attention import CrossAttention


# ------------------------------------------------------------------------------------------------ 1. torch.compile
def compile_options(device, mode: str | None = None, fullgraph: bool = True) -> dict:
    """The torch.compile keyword arguments minidiff uses for the U-Net on `device` (the benchmarks use them too).

    mode None = "reduce-overhead" on CUDA (CUDA graphs: the ~50 steps replay one captured graph, no per-kernel
    launch cost) and inductor's default elsewhere. fullgraph=True: a graph break is an error, not a silent slowdown
    (tests/test_speed.py checks there are none)."""
    if mode is None and torch.device(device).type == "cuda":
        mode = "reduce-overhead"
    return {"mode": mode, "fullgraph": fullgraph}


def compile_pipeline(pipe, mode: str | None = None, fullgraph: bool = True):
    """torch.compile the U-Net, the VAE decoder and the text encoder in place (`nn.Module.compile`: parameters and
    state_dict keys stay as they are, so save() still works). Compilation happens on the first call of each.

    mode: the U-Net's torch.compile mode (see compile_options). The VAE decoder and text encoder run once or twice
    per image and get the default mode (no CUDA-graph capture). Returns pipe."""
    pipe.unet.compile(**compile_options(pipe.device, mode, fullgraph))
    pipe.vae.decoder.compile(fullgraph=fullgraph)
    pipe.text_encoder.compile(fullgraph=fullgraph)
    return pipe


# --------------------------------------------------------------------------------------------- 2. memory savers
def enable_attention_slicing(pipe_or_model, slice_size: int | None = 1024):
    """Compute every attention in chunks of `slice_size` queries: at most [B, h, slice_size, S] scores at a time
    instead of [B, h, L, S] (the fused SDPA kernels already avoid the full matrix; the naive path and older
    kernels do not). None turns it off. Returns its argument."""
    for model in networks(pipe_or_model).values():
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
    models = list(networks(pipe).values())
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
        for model in networks(pipe).values():
            model.to(target)
    return pipe


def _device_of(model):
    return next(model.parameters()).device


__all__ = ["compile_options", "compile_pipeline", "enable_attention_slicing", "disable_attention_slicing",
           "enable_vae_tiling", "disable_vae_tiling", "tiled_decode", "enable_model_offload", "disable_model_offload"]
