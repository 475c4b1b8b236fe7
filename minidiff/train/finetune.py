"""Chapter 12 — fine-tuning a text-to-image model on a captioned image folder: the run, step by step.

    data (data.py) -> objective (objective.py) -> what trains (trainable.py) -> optimizer + LR schedule (optim.py)
    -> train_step (loop.py) -> checkpoints (state.py) -> reports (reports.py) -> export (export.py)

What trains: the whole U-Net, its last N up-blocks (the decoder end, nearest the pixels), LoRA adapters on the
attention projections (minidiff.lora; optionally the text encoder's too), or a new word (textual inversion). The VAE
stays frozen throughout; the text encoder too except for its LoRA or the new word's embedding.

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

from ..lora import LORA_PRESETS
from . import loop, objective
from .data import SampleStream, cache_latents, collate, default_validation_prompts, positions
from .export import export_model
from .loop import TrainingDiverged
from .optim import LR_SCHEDULES, make_lr_scheduler, make_optimizer
from .reports import REPORT_TO, Reporter, render_validation
from .state import (CKPT_DIR, check_resume_config, config_dict, list_checkpoints, load_checkpoint, remove_stale,
                    save_checkpoint, seed_everything)
from .trainable import TRAIN_MODES, select_trainable, text_encoder_trains

PRECISIONS = ("no", "bf16", "fp16")
# validation prompts that have nothing to do with a fine-tuning set: watch them to see what the model forgets
UNRELATED_PROMPTS = ("A toucan", "A horse")


@dataclass
class FinetuneConfig:
    """Every setting of a fine-tuning run (the CLI flags, with '-' written '_'). See docs/finetuning.md."""
    data: str                                   # an imagefolder: images + metadata.jsonl
    output: str                                 # OUT: logs, checkpoints, validation grids, then the model
    model: str | None = None                    # a diffusers folder / CompVis file; None = the embedded tiny model
    steps: int = 1000                           # optimizer steps in total (a resumed run continues up to here)
    batch_size: int = 1                         # samples per process per micro-step
    grad_accum: int = 1                         # micro-steps per optimizer step
    lr: float = 1e-5
    resolution: int | None = None               # training side in pixels; None = the model's native size
    seed: int = 0
    # what trains
    train: str = "unet"                         # "unet" | "last-up-blocks" | "lora" | "textual-inversion"
    up_blocks: int = 1                          # with train="last-up-blocks": how many (from the output end)
    # with train="lora": where LoRA goes, LyCORIS' "attn-only" | "attn-mlp" | "full" (minidiff.lora.LORA_PRESETS).
    # full at rank 8: the smallest LoRA that learned the new concept as well as the full U-Net (docs/finetuning.md §6)
    lora_preset: str = "full"
    lora_rank: int = 8                          # r of every Linear and 1×1 conv
    lora_alpha: float | None = None             # None = the rank (α/r = 1)
    lora_conv_rank: int | None = None           # r of the k×k convs (preset "full"); None = lora_rank
    lora_conv_alpha: float | None = None        # their α; None = lora_alpha (None: α = their rank)
    lora_export: str = "merge"                  # "merge" | "separate" (+ OUT/lora.safetensors, lora_kohya.safetensors)
    lora_text_encoder: bool = False             # with train="lora": LoRA on the text encoder too (the preset's layers)
    placeholder_token: str | None = None        # with train="textual-inversion": the new word, e.g. "<pika>"
    initializer_token: str | None = None        # ... a word whose vector it starts from, e.g. "pokemon"
    num_vectors: int = 1                        # ... vectors the new word stands for
    # loss
    min_snr_gamma: float | None = None
    noise_offset: float = 0.0
    caption_dropout: float = 0.1
    # optimizer and schedule
    optimizer: str = "adamw"                    # "adamw" | "adamw8bit" (bitsandbytes, CUDA)
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    lr_schedule: str = "constant"               # after warm-up: "constant" | "cosine" | "linear" (to 0 at `steps`)
    max_grad_norm: float | None = 1.0           # None or 0: no clipping
    ema: bool = False
    ema_decay: float = 0.9999
    ema_on_cpu: bool = False
    # speed and memory
    mixed_precision: str = "no"                 # "no" | "bf16" | "fp16" (autocast; fp16 with loss scaling)
    gradient_checkpointing: bool = False
    cache_latents: bool = False
    compile: bool = False
    device: str | None = None                   # None: cuda:<local rank> when CUDA is there, else cpu
    num_workers: int = 0                        # DataLoader worker processes for image loading
    # augmentation
    center_crop: bool = True                    # False = random crop
    random_flip: bool = False
    # checkpoints, validation, export
    checkpoint_every: int = 500
    keep_last: int = 2
    validation_prompts: list | None = None      # None = 2 captions of the dataset + UNRELATED_PROMPTS; [] = none
    validation_seeds: tuple = (0,)
    validation_steps: int = 25
    validation_guidance: float = 7.5
    validation_scheduler: str | None = None     # None = the model's own (from its scheduler_config.json)
    resume: bool = False
    export_compvis: bool = False
    max_steps_this_run: int | None = None       # stop after this many steps in this invocation (like a kill)
    progress: bool = True
    report_to: str = "none"                     # "none" | "tensorboard" (event files in OUT/tensorboard)

    def __post_init__(self):
        checks = [(self.train in TRAIN_MODES, f"train must be one of {TRAIN_MODES}, got {self.train!r}"),
                  (self.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {LR_SCHEDULES}"),
                  (self.mixed_precision in PRECISIONS, f"mixed_precision must be one of {PRECISIONS}"),
                  (self.optimizer in ("adamw", "adamw8bit"), "optimizer must be 'adamw' or 'adamw8bit'"),
                  (self.lora_export in ("merge", "separate"), "lora_export must be 'merge' or 'separate'"),
                  (self.steps >= 0 and self.batch_size >= 1 and self.grad_accum >= 1,
                   "steps >= 0, batch_size >= 1 and grad_accum >= 1 are required"),
                  (0.0 <= self.caption_dropout <= 1.0, "caption_dropout is a probability in [0, 1]"),
                  (self.checkpoint_every >= 1 and self.keep_last >= 1, "checkpoint_every and keep_last must be >= 1"),
                  (self.report_to in REPORT_TO, f"report_to must be one of {REPORT_TO}, got {self.report_to!r}"),
                  (self.train != "textual-inversion" or (self.placeholder_token and self.initializer_token),
                   "--train textual-inversion needs --placeholder-token (the new word, e.g. '<pika>') and "
                   "--initializer-token (a word it starts from, e.g. 'pokemon')"),
                  (self.num_vectors >= 1, f"num_vectors must be >= 1, got {self.num_vectors}"),
                  (not self.lora_text_encoder or self.train == "lora", "lora_text_encoder needs train='lora'"),
                  (self.lora_preset in LORA_PRESETS,
                   f"lora_preset must be one of {tuple(LORA_PRESETS)}, got {self.lora_preset!r}"),
                  (self.lora_rank >= 1 and (self.lora_conv_rank is None or self.lora_conv_rank >= 1),
                   f"lora_rank and lora_conv_rank must be >= 1, got {self.lora_rank} and {self.lora_conv_rank}"),
                  (all(a is None or a > 0 for a in (self.lora_alpha, self.lora_conv_alpha)),
                   f"lora_alpha and lora_conv_alpha must be > 0 (or none: α = r), got {self.lora_alpha} and "
                   f"{self.lora_conv_alpha}"),
                  (self.lora_conv_rank is None and self.lora_conv_alpha is None
                   or self.train == "lora" and self.lora_preset == "full",
                   "lora_conv_rank / lora_conv_alpha set the k×k convolutions' LoRA: they need train='lora' and "
                   f"lora_preset='full' (got train={self.train!r}, lora_preset={self.lora_preset!r}, whose LoRA "
                   "has no k×k convolution)"),
                  (self.cache_latents is False or self.center_crop,
                   "cache_latents needs center_crop: a cached latent is one fixed crop (random flips are cached "
                   "both ways)")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.validation_seeds = tuple(int(s) for s in self.validation_seeds)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "FinetuneConfig":
        """A preset's settings with `overrides` winning: FinetuneConfig.from_preset("pokemon", data=..., output=...)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# The monograph's recipe for ~750 Pokémon images on one 24 GB GPU (docs/finetuning.md derives its memory and time):
# the full U-Net at 512 px, lr 1e-5, EMA; bf16 autocast, gradient checkpointing and cached latents keep a batch of
# 4 within 24 GB, and 2 accumulated micro-batches make an optimizer step of 8 images. 15,000 steps x 8 = 120,000
# samples = 160 epochs of 750 images.
PRESETS = {
    "pokemon": dict(resolution=512, lr=1e-5, batch_size=4, grad_accum=2, steps=15000, ema=True, ema_decay=0.9999,
                    mixed_precision="bf16", gradient_checkpointing=True, cache_latents=True, random_flip=True,
                    center_crop=True, caption_dropout=0.1, lr_schedule="constant", warmup_steps=0, max_grad_norm=1.0,
                    checkpoint_every=1000, keep_last=2, validation_seeds=(0, 1), validation_steps=30,
                    validation_prompts=["a yellow electric type pokemon, pikachu", "a green grass type pokemon",
                                        "A water type fridge", "A toucan", "A horse"]),
}


# ---------------------------------------------------------------------------------------------- distributed
class Dist:
    """This process's place in a torchrun job (RANK, WORLD_SIZE, LOCAL_RANK from the environment), or a single process.

    Only rank 0 writes files. Gradients are averaged across processes by DistributedDataParallel."""

    def __init__(self, device: str | None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
        if device is None:
            device = f"cuda:{self.local_rank}" if cuda else "cpu"
        elif device == "cuda" and self.world > 1:
            device = f"cuda:{self.local_rank}"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.owned = False
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.owned = True

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

    Raises TrainingDiverged when the loss becomes NaN/inf (nothing is written for that step)."""
    ctx = Dist(cfg.device)
    try:
        return _train(cfg, ctx)
    finally:
        ctx.close()


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
    from ..ema import EMA
    from ..schedulers import DDPMScheduler

    out = Path(cfg.output)
    device = ctx.device
    if not cfg.resume and list_checkpoints(out):
        raise FileExistsError(f"{out} already holds checkpoints of a run (latest: {list_checkpoints(out)[-1].name}): "
                              f"pass --resume to continue it, or use another --output")
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale(out)                                        # a checkpoint half-written by a killed run
    seed_everything(cfg.seed)                                    # LoRA's A init; everything else has its own seed

    # ---- the model: everything frozen but what trains; trained tensors in fp32 (autocast does the low precision)
    pipe = load(cfg.model, device=device, dtype=torch.float32)
    noise_sched = DDPMScheduler.from_config(pipe.scheduler_config)
    prediction_type = pipe.scheduler_config.get("prediction_type", "epsilon")
    alphas_cumprod = noise_sched.alphas_cumprod.to(device)
    unet = pipe.unet
    trainable = select_trainable(pipe, cfg)
    text_trains = text_encoder_trains(trainable)
    unet.train()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    f = pipe.vae_scale_factor
    R = cfg.resolution or (unet.config.sample_size or 64) * f
    if R % f:
        raise ValueError(f"--resolution must be a multiple of {f} (the VAE's downsampling), got {R}")
    latent_shape = (unet.config.in_channels, R // f, R // f)

    # ---- data
    dataset = ImageFolderDataset(cfg.data, R, center_crop=cfg.center_crop, random_flip=False)
    if len(dataset) == 0:
        raise ValueError(f"{cfg.data}: no usable images (see the warnings above)")
    if cfg.train == "textual-inversion" and not any(cfg.placeholder_token in r["text"] for r in dataset.rows):
        warnings.warn(f"no caption of {cfg.data} contains the placeholder {cfg.placeholder_token!r}: its embedding "
                      f"gets no gradient. Write it into the captions, e.g. 'a drawing of {cfg.placeholder_token}'.",
                      stacklevel=3)
    cache = cache_latents(dataset, pipe.vae, device, cfg.random_flip, progress=cfg.progress and ctx.main) \
        if cfg.cache_latents else None
    stream = SampleStream(dataset, cfg, noise_sched.num_train_timesteps, latent_shape, cache)

    # ---- optimizer, schedule, loss scaling, EMA
    optimizer = make_optimizer(list(trainable.values()), cfg.lr, device, cfg.optimizer, cfg.weight_decay,
                               (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_eps)
    scheduler = make_lr_scheduler(optimizer, cfg.lr_schedule, cfg.warmup_steps, cfg.steps)
    scaler = torch.amp.GradScaler(device.type) if cfg.mixed_precision == "fp16" else None
    ema = EMA(trainable, cfg.ema_decay, device="cpu" if cfg.ema_on_cpu else None) if cfg.ema else None
    autocast = loop.autocast_for(device, cfg.mixed_precision)

    # ---- resume
    start, last_ckpt = 0, None
    if cfg.resume:
        found = list_checkpoints(out)
        if found:
            last_ckpt = found[-1]
            state = load_checkpoint(last_ckpt, trainable, optimizer, scheduler, scaler, ema)
            check_resume_config(state["config"], cfg, ctx.world, last_ckpt)
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
    if cfg.compile:
        model = torch.compile(model)
    end = cfg.steps if cfg.max_steps_this_run is None else min(cfg.steps, start + cfg.max_steps_this_run)
    loader = torch.utils.data.DataLoader(stream, batch_size=cfg.batch_size, collate_fn=collate,
                                         sampler=list(positions(start, end, cfg, ctx.rank, ctx.world)),
                                         num_workers=cfg.num_workers, pin_memory=device.type == "cuda")

    def loss_fn(batch):
        return objective.micro_step_loss(batch, pipe, model, noise_sched, alphas_cumprod, prediction_type, cfg,
                                         device, autocast, text_trains)

    val_prompts = cfg.validation_prompts if cfg.validation_prompts is not None else \
        default_validation_prompts(dataset, UNRELATED_PROMPTS)
    return Run(out, pipe, model, trainable, dataset, iter(loader), loss_fn, optimizer, scheduler, scaler, ema,
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
                run.last_ckpt = run.out / CKPT_DIR / f"step-{done:06d}"
                if ctx.main:
                    save_checkpoint(run.out, done, run.trainable, run.optimizer, run.scheduler, run.scaler, run.ema,
                                    cfg, cfg.keep_last, ctx.world)
                    reporter.plots()
                    if run.val_prompts and cfg.validation_steps > 0:
                        with (run.ema.swapped_in(run.trainable) if run.ema is not None else nullcontext()):
                            grid = render_validation(run.pipe, run.val_prompts, cfg, run.resolution, run.autocast)
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
    export_model(run.pipe, run.out, cfg, run.end)


__all__ = ["FinetuneConfig", "PRESETS", "PRECISIONS", "TRAIN_MODES", "LR_SCHEDULES", "UNRELATED_PROMPTS", "Dist",
           "Run", "TrainingDiverged", "train"]
