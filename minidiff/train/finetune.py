"""Chapter 12 — fine-tuning a text-to-image model on a captioned image folder: the run, step by step.

    data (data.py) -> objective (objective.py) -> what trains (trainable.py) -> optimizer + LR schedule (optim.py)
    -> train_step (loop.py) -> checkpoints (state.py) -> reports (reports.py) -> export (export.py)

What trains: the whole U-Net, its last N up-blocks (the decoder end, nearest the pixels), LoRA adapters on the
attention projections (minidiff.lora; optionally the text encoder's too), or a new word (textual inversion). The VAE
stays frozen throughout; the text encoder too except for its LoRA or the new word's embedding. `--train lcm-lora`
trains a LoRA with another objective: latent consistency distillation of the model into a 1-8 step sampler
(consistency.py; the model being tuned is its own teacher).

Exact resumption: every random choice of a sample is drawn from a generator seeded by (seed, the sample's position
in the stream of samples) (data.py), and a checkpoint holds the model's trained tensors, the optimizer, the LR
schedule, the loss scaler, the EMA and every RNG state (state.py): a run killed at any step and resumed ends with
the weights of one that was never stopped, and DDP ranks that split each global batch draw exactly what one process
drawing the whole batch would have drawn.

    cfg = FinetuneConfig(data="pokemon/", output="out/", model="sd-v1-4/", steps=15000, ...)
    result = train(cfg)                 # -> {"step", "finished", "output", "loss"}
    minidiff finetune --preset pokemon --model sd-v1-4/ --data pokemon/ --output out/
    torchrun --nproc_per_node 2 -m minidiff finetune ...         (DDP: --batch-size is per process)
"""
from __future__ import annotations

import json
import os
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..errors import InputValueError
from ..settings import check_on_this_machine, check_settings
from . import consistency, loop, objective
from .config import FINETUNE_FIELDS, FINETUNE_RULES, UNRELATED_PROMPTS, FinetuneConfig
from .data import SampleStream, cache_latents, collate, default_validation_prompts, positions
from .export import export_model
from .loop import TrainingDiverged
from .optim import check_optimizer, make_lr_scheduler, make_optimizer
from .reports import Reporter, render_validation, require_tensorboard
from .state import (CKPT_DIR, check_resume_config, config_dict, list_checkpoints, load_checkpoint,
                    read_checkpoint_config, remove_stale, save_checkpoint, seed_everything)
from .trainable import select_trainable, text_encoder_trains

# ---------------------------------------------------------------------------------------------- distributed
class Dist:
    """This process's place in a torchrun job (RANK, WORLD_SIZE, LOCAL_RANK from the environment), or a single process.

    Only rank 0 writes files. Gradients are averaged across processes by DistributedDataParallel."""

    def __init__(self, device: str | None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = self.device_for(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.owned = False
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.owned = True

    @staticmethod
    def device_for(device: str | None) -> torch.device:
        """The device this process trains on: --device, or cuda:<local rank> when CUDA is there, else the CPU; a
        plain "cuda" in a multi-process job is this process's GPU."""
        local_rank, world = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        if device is None:
            return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        return torch.device(f"cuda:{local_rank}" if device == "cuda" and world > 1 else device)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """The average of a tensor over all processes (itself when alone)."""
        if self.world > 1:
            x = x.clone()
            dist.all_reduce(x)
            x /= self.world
        return x

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def close(self):
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()




# ---------------------------------------------------------------------------------------------- the run
def train(cfg: FinetuneConfig) -> dict:
    """Run (or resume) a fine-tuning run. Returns {"step", "finished", "output", "loss"}.

    Bad settings are refused before any work (check_before_work): nothing is loaded, scanned or created. Raises
    TrainingDiverged when the loss becomes NaN/inf (nothing is written for that step); a run stopped by any error
    keeps its last good checkpoint and says where it is."""
    check_before_work(cfg)
    ctx = Dist(cfg.device)
    try:
        return _train(cfg, ctx)
    finally:
        ctx.close()


def check_before_work(cfg: FinetuneConfig) -> None:
    """What FinetuneConfig's own check cannot know: the paths and the device as this machine has them, an --output
    that already holds a run, a --resume whose checkpoint was saved with other settings (read without loading it),
    a --resolution the model's VAE cannot take (its config read, not the weights), an optimizer or report this
    machine cannot run. Raises before any model is loaded, any image scanned or any folder created."""
    from ..checkpoint import vae_scale_factor
    check_settings(cfg, FINETUNE_FIELDS, FINETUNE_RULES)   # again: the fields may have been changed since __init__
    check_on_this_machine(cfg, FINETUNE_FIELDS)
    out = Path(cfg.output)
    found = list_checkpoints(out)
    if found and not cfg.resume:
        raise FileExistsError(f"--output {out} already holds checkpoints of a run (latest: {found[-1].name}): pass "
                              f"--resume to continue it, or use another --output")
    if found and cfg.resume:
        check_resume_config(read_checkpoint_config(found[-1]), cfg, int(os.environ.get("WORLD_SIZE", "1")), found[-1])
    f = vae_scale_factor(cfg.model)                      # None: a pickle; checked once the model is loaded
    if f is not None and cfg.resolution is not None and cfg.resolution % f:
        raise InputValueError(f"--resolution must be a multiple of {f} for this model's VAE, got {cfg.resolution}",
                              field="resolution")
    check_optimizer(cfg.optimizer, Dist.device_for(cfg.device))
    if cfg.report_to == "tensorboard":
        require_tensorboard()


@dataclass
class Run:
    """Everything a run holds between its setup and its end (the names of the module docstring's stages)."""
    out: Path
    pipe: object                  # the StableDiffusion being trained
    model: torch.nn.Module        # the U-Net as the loop calls it (DDP / compiled)
    trainable: dict               # {name: Parameter}: what the optimizer updates and a checkpoint saves
    dataset: object
    batches: object               # iterator of micro-batches (data.collate's dicts)
    loss_fn: object               # micro-batch -> loss (objective.micro_step_loss with its arguments bound)
    optimizer: object
    scheduler: object
    scaler: object
    ema: object
    autocast: object
    resolution: int
    start: int                    # optimizer steps done before this invocation
    end: int                      # ... and after it
    last_ckpt: Path | None
    val_prompts: list


def _train(cfg: FinetuneConfig, ctx: Dist) -> dict:
    run = _setup(cfg, ctx)
    reporter = Reporter(run.out, cfg.report_to, run.start, enabled=ctx.main)
    try:
        loss = _loop(cfg, ctx, run, reporter)
    except BaseException as e:                  # Ctrl+C, a full disk, a bug: say what is kept (TrainingDiverged does)
        if ctx.main and not isinstance(e, TrainingDiverged):
            print(f"fine-tuning stopped ({type(e).__name__}); the last good checkpoint is "
                  f"{run.last_ckpt or 'none (no checkpoint was written yet)'}: continue from it with --resume "
                  f"(resume=True)", file=sys.stderr)
        raise
    finally:
        reporter.close()
    finished = run.end >= cfg.steps
    if finished and ctx.main:
        _finish(cfg, ctx, run)
        reporter.plots()
    ctx.barrier()
    return {"step": run.end, "finished": finished, "output": str(run.out), "loss": loss}


def _setup(cfg: FinetuneConfig, ctx: Dist) -> Run:
    """The model with what trains, the data stream, optimizer + schedule + EMA, and the state of a resumed run."""
    from ..checkpoint import load
    from ..data.imagefolder import ImageFolderDataset
    from ..formats.weights import CheckpointError
    from ..ema import EMA
    from ..schedulers import DDPMScheduler

    out = Path(cfg.output)
    device = ctx.device
    seed_everything(cfg.seed)                                    # LoRA's A init; everything else has its own seed

    # ---- the model: everything frozen but what trains; trained tensors in fp32 (autocast does the low precision)
    try:
        pipe = load(cfg.model, device=device, dtype=torch.float32)
    except CheckpointError as e:                                 # the file is --model's
        raise CheckpointError(str(e), field="model") from None
    noise_sched = DDPMScheduler.from_config(pipe.scheduler_config)
    if cfg.train == "lcm-lora":          # the distilled model samples with LCM on the distillation's grid: its own
        lcm_sched = consistency.lcm_scheduler(pipe.scheduler_config, cfg.lcm_skip)   # sampler (validation, export)
        pipe.scheduler_config = consistency.lcm_scheduler_config(lcm_sched)
    prediction_type = pipe.scheduler_config.get("prediction_type", "epsilon")
    alphas_cumprod = noise_sched.alphas_cumprod = noise_sched.alphas_cumprod.to(device)   # ᾱ_t [T], on the device
    # once: add_noise would otherwise copy it from the host every micro-step (on CUDA a copy that waits for the GPU)
    unet = pipe.unet
    trainable = select_trainable(pipe, cfg)
    text_trains = text_encoder_trains(trainable)
    unet.train()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    f = pipe.vae_scale_factor
    R = cfg.resolution or (unet.config.sample_size or 64) * f
    if R % f:                                                    # a pickled model: its factor is known only now
        raise InputValueError(f"--resolution must be a multiple of {f} for this model's VAE, got {R}",
                              field="resolution")
    latent_shape = (unet.config.in_channels, R // f, R // f)

    # ---- data
    dataset = ImageFolderDataset(cfg.data, R, center_crop=cfg.center_crop, random_flip=False)
    if len(dataset) == 0:
        raise InputValueError(f"data (--data): no usable image in {cfg.data} (the warnings above say why)",
                              field="data")
    if cfg.train == "textual-inversion" and not any(cfg.placeholder_token in r["text"] for r in dataset.rows):
        warnings.warn(f"no caption of {cfg.data} contains the placeholder {cfg.placeholder_token!r}: its embedding "
                      f"gets no gradient. Write it into the captions, e.g. 'a drawing of {cfg.placeholder_token}'.",
                      stacklevel=3)
    cache = cache_latents(dataset, pipe.vae, device, cfg.random_flip, progress=cfg.progress and ctx.main) \
        if cfg.cache_latents else None
    stream = SampleStream(dataset, noise_sched.num_train_timesteps, latent_shape, cfg.seed, cfg.caption_dropout,
                          cfg.random_flip, cache)

    # ---- optimizer, schedule, loss scaling, EMA
    optimizer = make_optimizer(list(trainable.values()), cfg.lr, device, cfg.optimizer, cfg.weight_decay,
                               (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_eps)
    scheduler = make_lr_scheduler(optimizer, cfg.lr_schedule, cfg.warmup_steps, cfg.steps)
    scaler = torch.amp.GradScaler(device.type) if cfg.mixed_precision == "fp16" else None
    ema = EMA(trainable, cfg.ema_decay, device="cpu" if cfg.ema_on_cpu else None) if cfg.ema else None
    if cfg.train == "lcm-lora":          # the target network θ⁻: train_step updates it after every optimizer step
        ema = EMA(trainable, cfg.lcm_ema_decay, device="cpu" if cfg.ema_on_cpu else None)
    autocast = loop.autocast_for(device, cfg.mixed_precision)

    # ---- the output folder: made only now, when nothing above refused the run
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale(out)                                        # a checkpoint half-written by a killed run

    # ---- resume (its settings were checked before any work: check_before_work)
    start, last_ckpt = 0, None
    if cfg.resume:
        found = list_checkpoints(out)
        if found:
            last_ckpt = found[-1]
            state = load_checkpoint(last_ckpt, trainable, optimizer, scheduler, scaler, ema)
            start = int(state["step"])
            if ctx.main:
                print(f"resuming from {last_ckpt} (step {start})", file=sys.stderr)
        elif ctx.main:
            print(f"--resume: no checkpoint in {out / CKPT_DIR}; starting from step 0", file=sys.stderr)

    # ---- the model as the training loop calls it, and the samples of steps [start, end)
    model = unet
    if ctx.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(unet, device_ids=[device.index] if device.type == "cuda"
                                                          else None)
    if cfg.compile:   # forward + backward compiled; CUDA graphs only for one process and one micro-batch per step
        model = loop.compile_for_training(model, device, cuda_graphs=ctx.world == 1 and cfg.grad_accum == 1)
    end = cfg.steps if cfg.max_steps_this_run is None else min(cfg.steps, start + cfg.max_steps_this_run)
    read = list(positions(start, end, cfg.batch_size, cfg.grad_accum, ctx.rank, ctx.world))
    loader = torch.utils.data.DataLoader(stream, batch_size=cfg.batch_size, collate_fn=collate, sampler=read,
                                         num_workers=cfg.num_workers, pin_memory=device.type == "cuda")

    def loss_fn(batch):
        return objective.micro_step_loss(batch, pipe, model, noise_sched, alphas_cumprod, prediction_type, device,
                                         autocast, cfg.noise_offset, cfg.min_snr_gamma, text_trains)

    def lcm_loss_fn(batch):  # --train lcm-lora: the consistency distillation loss instead of the denoising one
        target = {n: w.to(device) for n, w in ema.shadow.items()}           # θ⁻ (already there unless ema_on_cpu)
        return consistency.lcm_micro_step_loss(batch, pipe, model, lcm_sched, target, device, autocast, cfg.lcm_skip,
                                               (cfg.lcm_guidance_min, cfg.lcm_guidance_max), cfg.lcm_loss,
                                               cfg.lcm_huber_c)

    val_prompts = cfg.validation_prompts if cfg.validation_prompts is not None else \
        default_validation_prompts(dataset, UNRELATED_PROMPTS)
    objective_fn = lcm_loss_fn if cfg.train == "lcm-lora" else loss_fn
    return Run(out, pipe, model, trainable, dataset, iter(loader), objective_fn, optimizer, scheduler, scaler, ema,
               autocast, R, start, end, last_ckpt, val_prompts)


def _loop(cfg: FinetuneConfig, ctx: Dist, run: Run, reporter: Reporter) -> float:
    """Optimizer steps run.start+1 .. run.end: train_step, one log row each, checkpoint + plots + validation grid every
    --checkpoint-every steps and at the last one. -> the last step's loss."""
    A = cfg.grad_accum
    global_batch = cfg.batch_size * ctx.world * A
    params = list(run.trainable.values())
    outside_ddp = [p for n, p in run.trainable.items() if n.startswith("text_encoder.")]

    def sync_grads():                                       # DDP averages the U-Net's gradients; these, here
        for p in outside_ddp:
            if p.grad is not None:
                p.grad.copy_(ctx.mean(p.grad))

    # validation samples under bf16 autocast when training uses it, in fp32 otherwise: fp16 would also run the VAE
    # decoder in fp16, whose activations overflow into black images
    validation_autocast = run.autocast if cfg.mixed_precision == "bf16" else nullcontext

    bar = tqdm(total=cfg.steps, initial=run.start, desc="fine-tuning", disable=not (cfg.progress and ctx.main))
    t_start, loss = time.perf_counter(), float("nan")
    try:
        for step in range(run.start, run.end):              # `step` optimizer steps are done; this makes step + 1
            t0 = time.perf_counter()
            r = loop.train_step([next(run.batches) for _ in range(A)], run.loss_fn, run.optimizer, params,
                                lr_scheduler=run.scheduler, scaler=run.scaler, ema=run.ema, ema_params=run.trainable,
                                max_grad_norm=cfg.max_grad_norm, mean=ctx.mean if ctx.world > 1 else None,
                                no_sync=run.model.no_sync if ctx.world > 1 else None,
                                sync_grads=sync_grads if ctx.world > 1 and outside_ddp else None, step=step + 1,
                                last_checkpoint=run.last_ckpt)
            loss, done, dt = r.loss, step + 1, time.perf_counter() - t0
            row = {"step": done, "loss": r.loss, "lr": r.lr, "samples_per_s": global_batch / dt,
                   "epoch": done * global_batch / len(run.dataset), "time_s": time.perf_counter() - t_start}
            if r.grad_norm is not None:
                row["grad_norm"] = r.grad_norm
            if run.scaler:
                row["loss_scale"] = float(run.scaler.get_scale())
            reporter.log(row)
            bar.update(1)
            bar.set_postfix(loss=f"{r.loss:.4f}", lr=f"{r.lr:.2e}", samples_s=f"{row['samples_per_s']:.1f}")
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                if ctx.main:
                    save_checkpoint(run.out, done, run.trainable, run.optimizer, run.scheduler, run.scaler, run.ema,
                                    cfg, cfg.keep_last, ctx.world)
                run.last_ckpt = run.out / CKPT_DIR / f"step-{done:06d}"   # once it is written whole
                if ctx.main:
                    reporter.plots()
                    if run.val_prompts and cfg.validation_steps > 0:
                        with (run.ema.swapped_in(run.trainable) if run.ema is not None else nullcontext()):
                            grid = render_validation(run.pipe, run.val_prompts, cfg.validation_seeds, run.resolution,
                                                     cfg.validation_steps, cfg.validation_guidance,
                                                     cfg.validation_scheduler, validation_autocast)
                        reporter.validation(grid, done)
    finally:
        bar.close()
    return loss


def _finish(cfg: FinetuneConfig, ctx: Dist, run: Run) -> None:
    """The end of a finished run (rank 0): the EMA weights in, training switches off, the config and the model out."""
    from ..files import atomic_write
    if run.ema is not None:
        run.ema.copy_to(run.trainable)                      # the exported model is the averaged one
    unet = run.pipe.unet
    if cfg.gradient_checkpointing:
        unet.disable_gradient_checkpointing()
    unet.eval().requires_grad_(False)
    atomic_write(run.out / "finetune_config.json", json.dumps({**config_dict(cfg), "_world": ctx.world}, indent=2))
    lcm = cfg.train == "lcm-lora"                     # LCM-LoRA: the file is the point, on LCM-LoRA's layers
    export_model(run.pipe, run.out, cfg.placeholder_token, "separate" if lcm else cfg.lora_export, cfg.model,
                 cfg.export_compvis, "lcm-lora" if lcm else cfg.lora_preset)


__all__ = ["Dist", "Run", "check_before_work", "train"]
