"""Chapter 12.2 — the LoRA layers: a frozen layer plus a small, trainable low-rank change to it (Hu et al. 2021).

A frozen linear layer h = W₀ x (W₀: d_out × d_in) gets a trainable detour of rank r ≪ min(d_in, d_out):

    h = W₀ x + ΔW x,    ΔW = (α / r) · B A         (Hu et al. 2021, eq. 3)
    A: r × d_in    (lora_A, "down": d_in -> r)     initialised like nn.Linear (Kaiming-uniform)
    B: d_out × r   (lora_B, "up":   r -> d_out)    initialised to ZERO

B = 0 makes ΔW = 0: at step 0 the model is exactly the base model, and training starts from it. α / r keeps the
size of the update roughly independent of r, so a learning rate tuned for one rank works for another (sec. 4.1).
Only A and B train: for SD v1.4's U-Net with r = 4 on to_q/to_k/to_v/to_out.0 that is 797,184 parameters instead
of 859,520,964 — the optimizer state shrinks by the same factor, and the trained file is ~3 MB instead of 3.4 GB.

A convolution gets the same detour ("LoCon"): A is a convolution with W₀'s kernel size and r output channels, B a
1×1 convolution back to d_out channels, so ΔW = (α/r) · (B.flatten(1) @ A.flatten(1)).reshape(W₀.shape).

After training, ΔW can be folded into W₀ (merge: W = W₀ + (α/r) B A): the layer then costs nothing extra at
inference, and unwrapping it leaves an ordinary nn.Linear / nn.Conv2d.

    layer = wrap_layer(unet, "mid_block.attentions.0.transformer_blocks.0.attn1.to_q", rank=4)   # in place
    layer.merge(); layer.unmerge(); layer.set_scale(0.5)
    unwrap_layer(unet, "mid_block.attentions.0.transformer_blocks.0.attn1.to_q")               # the base back

This module is the layer. Putting LoRA on a whole model, merging and the files are minidiff/lora.py (the user's
entry points) and minidiff/formats/lora.py (the diffusers/PEFT and kohya/A1111 layouts).
"""
from __future__ import annotations

import math

import torch
from torch import nn


class LoRALayer(nn.Module):
    """What LoRALinear and LoRAConv2d share: rank, α, the user's scale, merging. Subclasses build lora_A / lora_B
    and say how B·A becomes a weight of the base layer's shape (`_product`)."""

    def _setup(self, base, rank: int, alpha: float | None):
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base.requires_grad_(False)
        self.rank = int(rank)
        self.alpha = float(rank if alpha is None else alpha)
        self.scale = 1.0       # the user's dial: 0 = the base layer, 1 = the LoRA as trained
        self.merged = False    # True while ΔW is folded into base.weight (forward then skips the detour)

    def _init_ab(self):
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # nn.Linear's own init (as PEFT does)
        nn.init.zeros_(self.lora_B.weight)                            # ΔW = 0 at step 0

    @property
    def factor(self) -> float:
        """The number that multiplies B A: scale · α / r."""
        return self.scale * self.alpha / self.rank

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scale · (α/r) · B A, in the base weight's shape: the change merging adds to W₀."""
        return self.factor * self._product()

    @torch.no_grad()
    def merge(self):
        """W₀ ← W₀ + ΔW; forward then runs the base layer alone. Undone by unmerge()."""
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True
        return self

    @torch.no_grad()
    def unmerge(self):
        """W₀ ← W₀ − ΔW (the merged weight back to the base one, up to rounding)."""
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False
        return self

    def set_scale(self, scale: float):
        """Change the LoRA's strength; a merged layer is re-merged at the new scale."""
        merged = self.merged
        self.unmerge()
        self.scale = float(scale)
        if merged:
            self.merge()
        return self

    def forward(self, x, add=None):
        """base(x) + scale·(α/r)·B(A(x)) (+ add: a residual, as minidiff.nn.Linear takes it)."""
        y = self.base(x)
        if not self.merged:
            y = y + self.factor * self.lora_B(self.lora_A(x))
        return y if add is None else add + y

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scale={self.scale}" + (", merged" if self.merged else "")


class LoRALinear(LoRALayer):
    """A frozen nn.Linear plus a trainable low-rank detour. x [..., d_in] -> [..., d_out].

    forward(x, add=None): base(x) + scale · (α/r) · lora_B(lora_A(x)) (+ add)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        self._setup(base, rank, alpha)
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=dev, dtype=dt)   # A: [r, d_in]
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=dev, dtype=dt)  # B: [d_out, r]
        self._init_ab()

    def _product(self):
        return self.lora_B.weight @ self.lora_A.weight  # [d_out, r] @ [r, d_in] -> [d_out, d_in]

    in_features = property(lambda self: self.base.in_features)
    out_features = property(lambda self: self.base.out_features)


class LoRAConv2d(LoRALayer):
    """A frozen nn.Conv2d plus a low-rank detour (LoCon): A = conv with W₀'s kernel, stride and padding to r
    channels ("down"), B = 1×1 conv back to d_out ("up"). x [B, C_in, H, W] -> [B, C_out, H', W'].

    ΔW = scale · (α/r) · (B.flatten(1) @ A.flatten(1)).reshape(W₀.shape): [d_out, r] @ [r, C_in·k·k]."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float | None = None):
        super().__init__()
        if base.groups != 1:
            raise ValueError(f"LoRA on a grouped convolution is not supported (groups={base.groups})")
        self._setup(base, rank, alpha)
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation,
                                bias=False, device=dev, dtype=dt)                       # A: [r, C_in, k, k]
        self.lora_B = nn.Conv2d(rank, base.out_channels, 1, bias=False, device=dev, dtype=dt)  # B: [C_out, r, 1, 1]
        self._init_ab()

    def _product(self):
        W = self.base.weight
        return (self.lora_B.weight.flatten(1) @ self.lora_A.weight.flatten(1)).reshape(W.shape)

    in_channels = property(lambda self: self.base.in_channels)
    out_channels = property(lambda self: self.base.out_channels)
    kernel_size = property(lambda self: self.base.kernel_size)


# The layers LoRA can wrap (minidiff.nn.Linear / Conv2d are subclasses of these), and the wrapper of each.
LORA_LAYERS = {nn.Linear: LoRALinear, nn.Conv2d: LoRAConv2d}


def lora_class(layer: nn.Module) -> type[LoRALayer] | None:
    """The LoRA wrapper class for `layer` (LoRALinear for an nn.Linear, LoRAConv2d for an nn.Conv2d), else None."""
    for cls, wrapper in LORA_LAYERS.items():
        if isinstance(layer, cls):
            return wrapper
    return None


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def wrap_layer(model: nn.Module, path: str, rank: int, alpha: float | None = None) -> LoRALayer:
    """Replace the Linear / Conv2d at `path` in `model` by its LoRA wrapper (in place); returns the wrapper."""
    base = model.get_submodule(path)
    wrapper = lora_class(base)
    if wrapper is None:
        raise TypeError(f"{path} is a {type(base).__name__}: LoRA wraps nn.Linear and nn.Conv2d layers")
    layer = wrapper(base, rank, alpha)
    _set_submodule(model, path, layer)
    return layer


def unwrap_layer(model: nn.Module, path: str) -> nn.Module:
    """Put the base layer of the LoRA wrapper at `path` back in its place (in place; merged or not, its weight is
    what it is now); returns the base layer."""
    layer = model.get_submodule(path)
    if not isinstance(layer, LoRALayer):
        raise TypeError(f"{path} is a {type(layer).__name__}, not a LoRA layer")
    _set_submodule(model, path, layer.base)
    return layer.base


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """{module path: LoRALinear | LoRAConv2d} of the wrappers currently in `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


__all__ = ["LoRALayer", "LoRALinear", "LoRAConv2d", "LORA_LAYERS", "lora_class", "wrap_layer", "unwrap_layer",
           "lora_layers"]
