"""Training, step 4 — the optimizer and THE learning-rate schedule (the one every minidiff training run uses).

AdamW (Loshchilov & Hutter 2019): Adam's update with the weight decay applied to the weights directly,
    m ← β₁m + (1−β₁)g,   v ← β₂v + (1−β₂)g²,   θ ← θ − η_s · ( m̂ / (√v̂ + ε) + λθ )
and η_s = lr · lr_factor(s): a linear warm-up from 0, then constant, half a cosine, or a straight line down to
`final` × lr at the last step (transformers' schedules when final = 0; the tiny recipe decays to a tenth).
"""
from __future__ import annotations

import importlib.util
import math

import torch

from ..errors import SetupError

LR_SCHEDULES = ("constant", "cosine", "linear")


def lr_factor(step: int, schedule: str, warmup: int, total: int, final: float = 0.0) -> float:
    """The learning rate at optimizer step `step` (0-based) as a fraction of the peak lr: linear warm-up from 0 over
    `warmup` steps, then constant, half a cosine, or a straight line from 1 down to `final` at step `total`."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"lr schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    return max(0.0, final + (1.0 - final) * shape)


def make_lr_scheduler(optimizer, schedule: str, warmup: int, total: int, final: float = 0.0):
    """A torch LambdaLR over lr_factor; its state_dict (the step counter) goes into every checkpoint."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, schedule, warmup, total, final))


def check_optimizer(kind: str, device: torch.device) -> None:
    """Can this machine run optimizer `kind` on `device`? adamw8bit needs a CUDA GPU and bitsandbytes (SetupError
    says what to do); called before any work, and again by make_optimizer."""
    if kind == "adamw8bit":
        if device.type != "cuda":
            raise SetupError(f"--optimizer adamw8bit needs a CUDA GPU (bitsandbytes' 8-bit optimizers); this run "
                             f"is on {device}. Use --optimizer adamw.")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise SetupError("--optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes")
    elif kind != "adamw":
        raise ValueError(f"optimizer must be 'adamw' or 'adamw8bit', got {kind!r}")


def make_optimizer(params: list, lr: float, device: torch.device, kind: str = "adamw", weight_decay: float = 1e-2,
                   betas=(0.9, 0.999), eps: float = 1e-8):
    """AdamW, fused into one kernel where torch has one (CUDA, CPU); 8-bit states (bitsandbytes) with
    kind="adamw8bit"."""
    check_optimizer(kind, device)
    kw = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps)
    if kind == "adamw8bit":
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(params, **kw)
    return torch.optim.AdamW(params, fused=True if fused_supported(device) else None, **kw)


def fused_supported(device: torch.device) -> bool:
    """Whether torch has a fused AdamW kernel for `device`: the whole update of every tensor in one pass over its
    memory (m, v and θ read and written once), instead of several elementwise passes per tensor. CUDA has one, and
    since torch 2.4 the CPU too (3–4× faster than the per-tensor loop on the CPU, equal to it up to float rounding)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        return device.type in _get_fused_kernels_supported_devices()
    except ImportError:                       # a private helper: if it moves, fuse where it always was
        return device.type == "cuda"


__all__ = ["LR_SCHEDULES", "lr_factor", "make_lr_scheduler", "check_optimizer", "make_optimizer", "fused_supported"]
