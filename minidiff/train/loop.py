"""Training, step 5 — the loop: ONE `train_step` for everything minidiff trains (`minidiff finetune`, the tiny
model's VAE / CLIP / U-Net stages in `minidiff train-tiny`, and benchmarks/bench_train.py).

One optimizer step, in order:
  1. for each of A micro-batches: loss_a = loss_fn(batch_a) (under autocast when asked), backward of loss_a / A —
     the gradients of A micro-batches of B add up to the gradient of one batch of A·B (grad accumulation);
     with DDP the all-reduce of the gradients runs on the last micro-batch only (`no_sync` on the others)
  2. fp16 only: unscale the gradients the loss scaler had multiplied (so clipping sees the true norm)
  3. clip the gradient's global L2 norm to max_grad_norm (g ← g · min(1, c / ‖g‖))
  4. the one host sync: the mean loss, the gradient norm and loss_fn's extra numbers come to the host together
  5. the NaN guard: a non-finite mean loss stops the run BEFORE the optimizer step, so nothing bad is written
  6. optimizer step, zero the gradients, advance the LR schedule
  7. EMA: θ_ema ← d θ_ema + (1 − d) θ

Why one sync: on a GPU the host only queues work; reading a number back (`.item()`, `float(t)`) makes it wait until
the GPU has finished everything queued, and while it waits it queues nothing, so the GPU then idles while the host
catches up. The guard needs the loss before the optimizer step, so one wait per step is the least there can be: the
numbers to log are read in the same wait (steps 3–4 run before the guard only queue work and change nothing that
the guard protects: the gradients are thrown away when it fires). fp16's loss scaler reads its overflow flag in its
own step — one more sync, fp16 only.

`compile_for_training` is the other half of a fast step: the model as train_step calls it, compiled.
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
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm) if max_grad_norm else None
    # the one host sync per step: every number of the step that is still a tensor, stacked and read back at once
    logged = [k for k, v in logs.items() if torch.is_tensor(v)]
    numbers = [loss_mean, *([] if grad_norm is None else [grad_norm]), *(logs[k] for k in logged)]
    values = torch.stack([x.detach().float().reshape(()) for x in numbers]).tolist()
    loss_value = values.pop(0)
    grad_norm_value = None if grad_norm is None else values.pop(0)
    logs = {**logs, **dict(zip(logged, values))}        # the tensors' values; plain numbers stay as they came
    if not math.isfinite(loss_value):
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.update()                                    # close the scaler's step (it saw the inf/NaN: backs off)
        where = f"step {step}: " if step is not None else ""
        raise TrainingDiverged(
            f"{where}the loss is {loss_value} (NaN or infinite); stopped before the optimizer step, so nothing was "
            f"written for it. Last good checkpoint: {last_checkpoint or 'none (no checkpoint was written yet)'}. "
            f"Resume from it with --resume, e.g. with a lower --lr, a --max-grad-norm, or --mixed-precision bf16 "
            f"instead of fp16.")
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
    return StepResult(loss_value, lr_now, grad_norm_value, {k: float(v) for k, v in logs.items()})


def compile_for_training(model, device, cuda_graphs: bool = True):
    """The model (the U-Net, or its DDP wrapper) as a compiled training step calls it: torch.compile of its forward,
    and through AOTAutograd of its backward too, by inductor, with `fullgraph=True` (a graph break is an error, not
    a silent slowdown). On CUDA with `cuda_graphs` the compiled forward and backward are captured as CUDA graphs
    (mode "reduce-overhead": each replays as one launch; the shapes must stay the same from step to step, which a
    run's fixed batch size and resolution make true). Only for one micro-batch per step and one process: a replay
    reuses the memory of the previous one's outputs, and a gradient kept across micro-batches (accumulation) is such
    an output — torch 2.x then fails or accumulates wrong gradients (pytorch/pytorch#169545); DDP's hooks are no
    graph either. Options: training_compile_options. The parameters stay the module's own: checkpoints, EMA and
    export see the same tensors.

    Inside the compiled graph the kernels layer picks per op (minidiff.kernels.pick): on CUDA our Triton ops (those
    of kernels.compiled_triton_ops()), on the CPU the reference expressions, which inductor fuses into C++ loops."""
    return torch.compile(model, **training_compile_options(device, cuda_graphs))


def training_compile_options(device, cuda_graphs: bool = True) -> dict:
    """torch.compile's keyword arguments for a training step (compile_for_training; the benchmarks give them to
    diffusers' U-Net too): speed.compile_options (fullgraph; "reduce-overhead" = CUDA graphs on CUDA) with static
    shapes: a run's batch and resolution never change, and a second model or shape in the same process (a benchmark,
    a test) gets its own graph instead of a dynamic-shape one (inductor's CPU code has failed on those)."""
    from ..speed import compile_options
    return {**compile_options(device, None if cuda_graphs else "default", fullgraph=True), "dynamic": False}


__all__ = ["TrainingDiverged", "StepResult", "autocast_for", "train_step", "compile_for_training",
           "training_compile_options"]
