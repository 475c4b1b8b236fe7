"""Chapter 12.2 — LoRA: fine-tune a big layer by learning a small low-rank change to it (Hu et al. 2021).

A frozen linear layer h = W₀ x (W₀: d_out × d_in) gets a trainable detour of rank r ≪ min(d_in, d_out):

    h = W₀ x + ΔW x,    ΔW = (α / r) · B A         (Hu et al. 2021, eq. 3)
    A: r × d_in    (lora_A, "down": d_in -> r)     initialised like nn.Linear (Kaiming-uniform)
    B: d_out × r   (lora_B, "up":   r -> d_out)    initialised to ZERO

B = 0 makes ΔW = 0: at step 0 the model is exactly the base model, and training starts from it. α / r keeps the
size of the update roughly independent of r, so a learning rate tuned for one rank works for another (sec. 4.1).
Only A and B train: for SD v1.4's U-Net with r = 4 on to_q/to_k/to_v/to_out.0 that is 797,184 parameters instead
of 859,520,964 — the optimizer state shrinks by the same factor, and the trained file is ~3 MB instead of 3.4 GB.

After training, ΔW can be folded into W₀ (merge: W = W₀ + (α/r) B A) — the model is then an ordinary SD model with
no extra cost at inference — or kept apart in a small file and added to any copy of the base model later:

    lora = inject_lora(pipe.unet, rank=4, alpha=4)     # wraps the attention projections; returns the new layers
    ...train the parameters of lora_parameters(pipe.unet)...
    save_lora(pipe.unet, "lora.safetensors")           # only A and B (+ rank, alpha in the metadata)
    merge_lora(pipe.unet)                              # W₀ += (α/r) B A, wrappers removed: plain nn.Linear again
    apply_lora(base_pipe, "lora.safetensors", scale=1.0)   # the same on a freshly loaded base model

The file's key names follow PEFT's convention: "unet.<module path>.lora_A.weight" [r, d_in] and
"unet.<module path>.lora_B.weight" [d_out, r].
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

# the four projections of every attention layer (self- and cross-attention) of the U-Net, as LoRA's paper does
# for W_q, W_k, W_v, W_o (sec. 4.2)
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank detour. x [..., d_in] -> [..., d_out].

    forward: base(x) + scale · (α/r) · lora_B(lora_A(x)); `scale` (default 1) dials the LoRA's strength."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base.requires_grad_(False)
        self.rank = int(rank)
        self.alpha = float(rank if alpha is None else alpha)
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=dev, dtype=dt)   # A: [r, d_in]
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=dev, dtype=dt)  # B: [d_out, r]
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # nn.Linear's own init (as PEFT does)
        nn.init.zeros_(self.lora_B.weight)                            # ΔW = 0 at step 0
        self.scale = 1.0

    @property
    def factor(self) -> float:
        """The number that multiplies B A: scale · α / r."""
        return self.scale * self.alpha / self.rank

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scale · (α/r) · B A -> [d_out, d_in], the change merging adds to W₀."""
        return self.factor * (self.lora_B.weight @ self.lora_A.weight)  # [d_out, r] @ [r, d_in]

    def forward(self, x, add=None):
        """base(x) + scale·(α/r)·B(A(x)), plus `add` (a residual, as minidiff.nn.layers.Linear takes it)."""
        y = self.base(x) + self.factor * self.lora_B(self.lora_A(x))
        return y if add is None else add + y

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def _target_paths(model: nn.Module, targets=TARGETS) -> list[str]:
    """The names of the nn.Linear layers whose path ends with one of `targets` (e.g. '...attn2.to_out.0')."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)]


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def inject_lora(model: nn.Module, rank: int, alpha: float | None = None, targets=TARGETS) -> dict[str, LoRALinear]:
    """Wrap every target nn.Linear of `model` in a LoRALinear (in place) and freeze everything else.

    Returns {module path: LoRALinear}. The model's output is unchanged until B moves away from zero. Note the
    state_dict keys change while wrapped ('to_q.weight' -> 'to_q.base.weight'): merge_lora() undoes that."""
    paths = _target_paths(model, targets)
    if not paths:
        raise ValueError(f"no nn.Linear named {targets} in {type(model).__name__}: nothing to put LoRA on")
    model.requires_grad_(False)
    layers = {}
    for path in paths:
        layers[path] = LoRALinear(model.get_submodule(path), rank, alpha)
        _set_submodule(model, path, layers[path])
    return layers


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """{module path: LoRALinear} of the wrappers currently in `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


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


def save_lora(model: nn.Module, path, extra_metadata: dict | None = None) -> Path:
    """Write the LoRA weights of `model` (still wrapped) to one .safetensors file; rank and alpha go in its metadata.
    Written to a temporary name, then renamed."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save")
    first = next(iter(layers.values()))
    meta = {"format": "pt", "minidiff_lora": json.dumps(
        {"rank": first.rank, "alpha": first.alpha, "targets": list(TARGETS), **(extra_metadata or {})})}
    from .files import atomic_write
    return atomic_write(path, lambda tmp: save_file(lora_state_dict(model), str(tmp), metadata=meta))


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRALinear into its base layer, W₀ ← W₀ + ΔW, and put the plain nn.Linear back (in place).
    Afterwards the model has the original state_dict keys and no LoRA cost at inference."""
    for path, m in lora_layers(model).items():
        m.base.weight += m.delta_weight().to(m.base.weight.dtype)
        _set_submodule(model, path, m.base)
    return model


def read_lora(path) -> tuple[dict[str, torch.Tensor], dict]:
    """A LoRA file -> ({key: tensor}, {"rank", "alpha", ...})."""
    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("minidiff_lora", "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, meta


@torch.no_grad()
def apply_lora(pipe, path, scale: float = 1.0):
    """Add a saved LoRA to a loaded model, merged into its weights: W ← W + scale · (α/r) · B A (in place).

    pipe: a minidiff StableDiffusion (its U-Net is changed) or a U-Net itself. Use it on the BASE model the LoRA was
    trained from (a fine-tune's output folder already has it merged). Raises KeyError naming a module the model lacks.
    Returns pipe."""
    unet = pipe.unet if hasattr(pipe, "unet") else pipe
    tensors, meta = read_lora(path)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if not key.startswith("unet.") or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise KeyError(f"{path}: unexpected key {key!r} (expected unet.<module>.lora_A/lora_B.weight)")
        module, ab, _ = key[len("unet."):].rsplit(".", 2)   # "<module>", "lora_A" | "lora_B", "weight"
        groups.setdefault(module, {})[ab] = t
    for module, ab in groups.items():
        try:
            layer = unet.get_submodule(module)
        except AttributeError:
            raise KeyError(f"{path}: the model has no module {module!r}") from None
        if isinstance(layer, LoRALinear):  # still wrapped: add to its base weight
            layer = layer.base
        A, B = ab["lora_A"], ab["lora_B"]                       # [r, d_in], [d_out, r]
        rank = A.shape[0]
        alpha = float(meta.get("alpha", rank))
        delta = scale * alpha / rank * (B.to(torch.float32) @ A.to(torch.float32))  # [d_out, d_in]
        if delta.shape != layer.weight.shape:
            raise ValueError(f"{path}: {module}: LoRA gives {tuple(delta.shape)}, the layer is "
                             f"{tuple(layer.weight.shape)}")
        layer.weight += delta.to(layer.weight.device, layer.weight.dtype)
    return pipe


__all__ = ["TARGETS", "LoRALinear", "inject_lora", "lora_layers", "lora_parameters", "lora_state_dict", "save_lora",
           "merge_lora", "read_lora", "apply_lora"]
