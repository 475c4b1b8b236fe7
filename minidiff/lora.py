"""Chapter 12.2 — LoRA: fine-tune a big layer by learning a small low-rank change to it (Hu et al. 2021).

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

After training, ΔW can be folded into W₀ (merge: W = W₀ + (α/r) B A) — the model is then an ordinary SD model with
no extra cost at inference — or kept apart in a small file and added to any copy of the base model later:

    lora = inject_lora(pipe.unet, rank=4, alpha=4)     # wraps the attention projections; returns the new layers
    ...train the parameters of lora_parameters(pipe.unet)...
    save_lora(pipe, "lora.safetensors")                # only A and B (diffusers/PEFT names; format="kohya" for A1111)
    merge_lora(pipe.unet)                              # W₀ += (α/r) B A, wrappers removed: plain nn.Linear again
    apply_lora(base_pipe, "lora.safetensors", scale=1.0)   # the same on a freshly loaded base model

This module is the layer; reading and writing the files (diffusers/PEFT, kohya/A1111, LoCon) is
minidiff/formats/lora.py, which `save_lora`, `apply_lora`, `load_lora` and `read_lora` below call.
"""
from __future__ import annotations

import math

import torch
from torch import nn

# Where LoRA goes. A target matches a Linear / Conv2d whose module path is the target or ends with "." + target.
# The U-Net's attention projections (self- and cross-attention), as LoRA's paper does for W_q, W_k, W_v, W_o
# (sec. 4.2): the default, and what kohya's sd-scripts trains by default too.
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
UNET_FF_TARGETS = ("ff.net.0.proj", "ff.net.2")             # the transformer blocks' GEGLU MLP
UNET_PROJ_TARGETS = ("proj_in", "proj_out")                 # the spatial transformers' 1×1 convs (LoCon) in SD v1
UNET_TARGETS = TARGETS + UNET_FF_TARGETS + UNET_PROJ_TARGETS   # every layer of the transformers (kohya's default set)
UNET_CONV_TARGETS = ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")  # ResNets (LoCon)
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # CLIP: attention and MLP


class _LoRA(nn.Module):
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


class LoRALinear(_LoRA):
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


class LoRAConv2d(_LoRA):
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


LORA_LAYERS = {nn.Linear: LoRALinear, nn.Conv2d: LoRAConv2d}


def _wrapper_for(module):
    for cls, wrapper in LORA_LAYERS.items():
        if isinstance(module, cls):
            return wrapper
    return None


def _target_paths(model: nn.Module, targets=TARGETS) -> list[str]:
    """The names of the nn.Linear / nn.Conv2d layers whose path ends with one of `targets` (e.g. '...attn2.to_out.0')."""
    return [name for name, m in model.named_modules()
            if _wrapper_for(m) and any(name == t or name.endswith("." + t) for t in targets)]


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def wrap_layer(model: nn.Module, path: str, rank: int, alpha: float | None = None) -> _LoRA:
    """Replace the Linear / Conv2d at `path` in `model` by its LoRA wrapper (in place); returns the wrapper."""
    base = model.get_submodule(path)
    wrapper = _wrapper_for(base)
    if wrapper is None:
        raise TypeError(f"{path} is a {type(base).__name__}: LoRA wraps nn.Linear and nn.Conv2d layers")
    layer = wrapper(base, rank, alpha)
    _set_submodule(model, path, layer)
    return layer


def inject_lora(model: nn.Module, rank: int, alpha: float | None = None, targets=TARGETS) -> dict[str, _LoRA]:
    """Wrap every target nn.Linear / nn.Conv2d of `model` in a LoRA layer (in place) and freeze everything else.

    targets: TARGETS (the U-Net's attention, default), UNET_TARGETS (+ feed-forward and proj_in/proj_out),
    TEXT_ENCODER_TARGETS (for pipe.text_encoder), UNET_CONV_TARGETS, or any tuple of module-path endings.
    Returns {module path: layer}. The model's output is unchanged until B moves away from zero. Note the
    state_dict keys change while wrapped ('to_q.weight' -> 'to_q.base.weight'): merge_lora() undoes that."""
    paths = _target_paths(model, targets)
    if not paths:
        raise ValueError(f"no nn.Linear or nn.Conv2d named {targets} in {type(model).__name__}: "
                         f"nothing to put LoRA on")
    model.requires_grad_(False)
    return {path: wrap_layer(model, path, rank, alpha) for path in paths}


def lora_layers(model: nn.Module) -> dict[str, _LoRA]:
    """{module path: LoRALinear | LoRAConv2d} of the wrappers currently in `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _LoRA)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable tensors: every A and B (nothing else)."""
    return [p for m in lora_layers(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


def lora_state_dict(model: nn.Module, prefix: str = "unet.") -> dict[str, torch.Tensor]:
    """{'unet.<path>.lora_A.weight': [r, d_in], 'unet.<path>.lora_B.weight': [d_out, r], ...} on the CPU."""
    out = {}
    for path, m in lora_layers(model).items():
        out[f"{prefix}{path}.lora_A.weight"] = m.lora_A.weight.detach().cpu().contiguous()
        out[f"{prefix}{path}.lora_B.weight"] = m.lora_B.weight.detach().cpu().contiguous()
    return out


def _networks(model) -> list[nn.Module]:
    """A network itself, or the U-Net and text encoder of a StableDiffusion."""
    if isinstance(model, nn.Module):
        return [model]
    return [m for m in (getattr(model, "unet", None), getattr(model, "text_encoder", None)) if m is not None]


def set_lora_scale(model, scale: float):
    """Every LoRA layer of `model` (a network or a StableDiffusion) at strength `scale` (merged layers are
    re-merged). Returns model."""
    for net in _networks(model):
        for m in lora_layers(net).values():
            m.set_scale(scale)
    return model


@torch.no_grad()
def merge_lora(model, unload: bool = True):
    """Fold every LoRA layer of `model` (a network or a StableDiffusion) into its base layer, W₀ ← W₀ + ΔW (in place).

    unload=True (default): put the plain nn.Linear / nn.Conv2d back — the model has its original state_dict keys and
    no LoRA cost at inference, and the LoRA is gone. unload=False: keep the wrappers (merged), so unmerge_lora can
    take ΔW out again and set_lora_scale can change it."""
    for net in _networks(model):
        for path, m in lora_layers(net).items():
            m.merge()
            if unload:
                _set_submodule(net, path, m.base)
    return model


@torch.no_grad()
def unmerge_lora(model):
    """Take ΔW out of every merged (still wrapped) LoRA layer: W₀ ← W₀ − ΔW. Returns model."""
    for net in _networks(model):
        for m in lora_layers(net).values():
            m.unmerge()
    return model


# ---------------------------------------------------------------------------------------------- files
# The file formats live in minidiff/formats/lora.py; these are the public entry points (imported on call, so this
# module, the layer, does not depend on the formats).
def save_lora(model, path, format: str = "diffusers", extra_metadata: dict | None = None):
    """Write the LoRA layers `model` carries (a StableDiffusion: U-Net and text encoder; a U-Net: its own) to one
    .safetensors file. format: "diffusers" (PEFT names, what diffusers' load_lora_weights reads) or "kohya"
    (lora_unet_… / lora_te_…, what AUTOMATIC1111 and ComfyUI read). `save_lora(unet, path, {"k": "v"})` (metadata
    as third argument) is the older call and still works. Returns the path."""
    from .formats.lora import save_lora as _save
    if isinstance(format, dict):   # save_lora(unet, path, extra_metadata): the call minidiff finetune makes
        format, extra_metadata = "diffusers", format
    return _save(model, path, format=format, extra_metadata=extra_metadata)


def apply_lora(pipe, path, scale: float = 1.0):
    """Add a LoRA file (diffusers/PEFT or kohya/A1111, detected from its keys) to a loaded model, merged into its
    weights: W ← W + scale · (α/r) · B A for every layer it names (in place), U-Net and text encoder alike (as
    diffusers' fuse_lora(lora_scale=scale)). pipe: a StableDiffusion, or a U-Net alone. Returns pipe."""
    from .formats.lora import apply_lora as _apply
    return _apply(pipe, path, scale=scale)


def load_lora(pipe, path, scale: float = 1.0) -> dict[str, _LoRA]:
    """Like apply_lora, but as LoRA layers (not merged): the strength can change later (set_lora_scale), and
    merge_lora / unmerge_lora fold it in and out. Returns {"unet.<path>" | "text_encoder.<path>": layer}."""
    from .formats.lora import load_lora as _load
    return _load(pipe, path, scale=scale)


def read_lora(path) -> tuple[dict[str, torch.Tensor], dict]:
    """A LoRA file -> ({key: tensor}, minidiff's metadata {"rank", "alpha", ...} or {} for a file from elsewhere)."""
    from .formats.lora import read_lora as _read
    return _read(path)


__all__ = ["TARGETS", "UNET_FF_TARGETS", "UNET_PROJ_TARGETS", "UNET_TARGETS", "UNET_CONV_TARGETS",
           "TEXT_ENCODER_TARGETS", "LoRALinear", "LoRAConv2d", "inject_lora", "wrap_layer", "lora_layers",
           "lora_parameters", "lora_state_dict", "set_lora_scale", "save_lora", "merge_lora", "unmerge_lora",
           "read_lora", "apply_lora", "load_lora"]
