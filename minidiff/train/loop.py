"""Training, step 5 — the loop: ONE `train_step` for everything minidiff trains (`minidiff finetune`, the tiny
model's VAE / CLIP / U-Net stages in `minidiff train-tiny`, and benchmarks/bench_train.py).

One optimizer step, in order:
  1. for each of A micro-batches: loss_a = loss_fn(batch_a) (under autocast when asked), backward of loss_a / A —
     the gradients of A micro-batches of B add up to the gradient of one batch of A·B (grad accumulation);
     with DDP the all-reduce of the gradients runs on the last micro-batch only (`no_sync` on the others)
  2. the NaN guard: a non-finite mean loss stops the run BEFORE the optimizer step, so nothing bad is written
  3. fp16 only: unscale the gradients the loss scaler had multiplied (so clipping sees the true norm)
  4. clip the gradient's global L2 norm to max_grad_norm (g ← g · min(1, c / ‖g‖))
  5. optimizer step, zero the gradients, advance the LR schedule
  6. EMA: θ_ema ← d θ_ema + (1 − d) θ
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from ..errors import MinidiffError


class TrainingDiverged(MinidiffError, RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


@dataclass
class StepResult:
    loss: float                       # the mean loss over the micro-batches (and processes)
    lr: float                         # the learning rate this step used
    grad_norm: float | None = None    # the gradient's L2 norm before clipping (None without clipping)
    logs: dict = field(default_factory=dict)   # the last micro-batch's extra numbers from loss_fn


def autocast_for(device: torch.device, precision: str = "no"):
    """-> a function giving the autocast context of a precision ("no" | "bf16" | "fp16")."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext


def train_step(micro_batches, loss_fn, optimizer, params, *, lr_scheduler=None, scaler=None, ema=None,
               ema_params=None, max_grad_norm: float | None = None, autocast=nullcontext, mean=None, no_sync=None,
               sync_grads=None, step: int | None = None, last_checkpoint=None) -> StepResult:
    """One optimizer step over `micro_batches` (an iterable of A batches; see the module docstring).

    loss_fn(batch) -> loss, or (loss, {name: number}); params: the trained tensors (clipping);
    ema / ema_params: a minidiff.ema.EMA and the {name: Parameter} it averages; mean(x): the average of a tensor
    over DDP processes (None: one process); no_sync(): the DDP model's no_sync context for all but the last
    micro-batch; sync_grads(): averages the gradients DDP does not (tensors outside the DDP model), after the
    backward passes; step / last_checkpoint: only for the NaN message. Raises TrainingDiverged on a NaN/inf loss."""
    batches = list(micro_batches)
    A = len(batches)
    loss_sum, logs = None, {}
    for m, batch in enumerate(batches):
        sync = no_sync is None or m == A - 1
        with (nullcontext() if sync else no_sync()):
            with autocast():
                out = loss_fn(batch)
            loss, logs = out if isinstance(out, tuple) else (out, {})
            scaled = loss.float() / A
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum = loss.detach().float() if loss_sum is None else loss_sum + loss.detach().float()
    if sync_grads is not None:
        sync_grads()
    loss_mean = loss_sum / A
    if mean is not None:
        loss_mean = mean(loss_mean)
    loss_value = float(loss_mean)                              # the one host sync per step
    if not math.isfinite(loss_value):
        optimizer.zero_grad(set_to_none=True)
        where = f"step {step}: " if step is not None else ""
        raise TrainingDiverged(
            f"{where}the loss is {loss_value} (NaN or infinite); stopped before the optimizer step, so nothing was "
            f"written for it. Last good checkpoint: {last_checkpoint or 'none (no checkpoint was written yet)'}. "
            f"Resume from it with --resume, e.g. with a lower --lr, a --max-grad-norm, or --mixed-precision bf16 "
            f"instead of fp16.")
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm) if max_grad_norm else None
    lr_now = optimizer.param_groups[0]["lr"]
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if lr_scheduler is not None:
        lr_scheduler.step()
    if ema is not None:
        ema.update(ema_params)
    logs = {k: float(v.detach() if torch.is_tensor(v) else v) for k, v in logs.items()}
    return StepResult(loss_value, lr_now, None if grad_norm is None else float(grad_norm), logs)


__all__ = ["TrainingDiverged", "StepResult", "autocast_for", "train_step"]
