"""Chapter 12 — fine-tuning a text-to-image model on a captioned image folder.

The objective is the one SD was trained with (Rombach et al. 2022, eq. 2; Ho et al. 2020, eq. 14): encode an image
into latents z₀ = s · E(x) (s = 0.18215), draw a timestep t ~ U{0..T-1} and noise ε ~ N(0, I), noise the latents
with the forward process, and teach the U-Net to find the noise again, given the caption y:

    z_t = √ᾱ_t z₀ + √(1−ᾱ_t) ε                                          (DDPM eq. 4, DDPMScheduler.add_noise)
    L   = E_{z₀, y, t, ε} [ w(t) · ‖ target − ε_θ(z_t, t, τ(y)) ‖² ]
    target = ε                         for an ε-prediction model (SD v1)
    target = v = √ᾱ_t ε − √(1−ᾱ_t) z₀  when the scheduler config says prediction_type = "v_prediction"

Three optional tweaks of the loss:
  * min-SNR-γ weighting (Hang et al. 2023): SNR(t) = ᾱ_t / (1−ᾱ_t); low-noise timesteps (high SNR) have easy,
    tiny losses that still pull the gradient in their own direction; cap their weight:
        w(t) = min(SNR(t), γ) / SNR(t)          (ε-prediction),      min(SNR(t), γ) / (SNR(t) + 1)   (v-prediction)
    γ = 5 is the paper's choice.
  * noise offset (Guttenberg 2023): ε ← ε + o · δ, δ ~ N(0, I) of shape [B, C, 1, 1] — a per-channel constant shift
    the model must also remove, which lets it learn very dark or very bright images.
  * caption dropout: with probability p the caption is replaced by "" — the model keeps learning the unconditional
    ε_θ(z_t, t, τ("")) that classifier-free guidance subtracts at sampling time (Ho & Salimans 2022).

What trains: the whole U-Net, its last N up-blocks (the decoder end, nearest the pixels), or LoRA adapters on the
attention projections (minidiff.lora; with --lora-text-encoder also on the text encoder's projections and MLP). The
VAE and the text encoder's own weights stay frozen throughout.

Exact resumption: every random choice of a sample — its place in the epoch's shuffle, its crop and flip, its
caption dropout, its t, its ε and the VAE posterior sample — is drawn from a generator seeded by
(seed, the sample's global position in the stream of samples), never from a shared RNG stream. A run resumed from a
checkpoint therefore sees exactly the samples and noise it would have seen, and DDP ranks that split each global
batch draw exactly what one process drawing the whole batch would have drawn.

    cfg = FinetuneConfig(data="pokemon/", output="out/", model="sd-v1-4/", steps=15000, ...)
    result = train(cfg)                 # -> {"step", "finished", "output", "loss"}
    minidiff finetune --preset pokemon --model sd-v1-4/ --data pokemon/ --output out/
    torchrun --nproc_per_node 2 -m minidiff finetune ...         (DDP: --batch-size is per process)
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

# ---------------------------------------------------------------------------------------------- configuration
TRAIN_MODES = ("unet", "last-up-blocks", "lora")
LR_SCHEDULES = ("constant", "cosine", "linear")
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
    train: str = "unet"                         # "unet" | "last-up-blocks" | "lora"
    up_blocks: int = 1                          # with train="last-up-blocks": how many (from the output end)
    lora_rank: int = 4
    lora_alpha: float | None = None             # None = the rank (α/r = 1)
    lora_export: str = "merge"                  # "merge" | "separate" (also writes OUT/lora.safetensors)
    lora_text_encoder: bool = False             # with train="lora": LoRA on the text encoder's attention and MLP too
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

    def __post_init__(self):
        checks = [(self.train in TRAIN_MODES, f"train must be one of {TRAIN_MODES}, got {self.train!r}"),
                  (self.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {LR_SCHEDULES}"),
                  (self.mixed_precision in PRECISIONS, f"mixed_precision must be one of {PRECISIONS}"),
                  (self.optimizer in ("adamw", "adamw8bit"), "optimizer must be 'adamw' or 'adamw8bit'"),
                  (self.lora_export in ("merge", "separate"), "lora_export must be 'merge' or 'separate'"),
                  (not self.lora_text_encoder or self.train == "lora",
                   f"lora_text_encoder needs train='lora', got train={self.train!r}"),
                  (self.steps >= 0 and self.batch_size >= 1 and self.grad_accum >= 1,
                   "steps >= 0, batch_size >= 1 and grad_accum >= 1 are required"),
                  (0.0 <= self.caption_dropout <= 1.0, "caption_dropout is a probability in [0, 1]"),
                  (self.checkpoint_every >= 1 and self.keep_last >= 1, "checkpoint_every and keep_last must be >= 1"),
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


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


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


# ---------------------------------------------------------------------------------------------- randomness
def stream_seed(*parts) -> int:
    """A 63-bit seed from any tuple of ints/strings: independent generators for independent purposes."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def rng_state() -> dict:
    """The process-wide RNG states (python, numpy, torch CPU, torch CUDA). The training draws use none of them (see
    the module docstring), but a checkpoint keeps them so anything else that does is also resumed exactly."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- data
class SampleStream(torch.utils.data.Dataset):
    """The training data as an endless stream of samples: position p -> everything random about sample p.

    Epoch e = p // N visits the images in the order torch.randperm(N) under seed (seed, "epoch", e). A sample's
    crop, flip, caption dropout, timestep and noises come from a generator seeded by (seed, p) (the image's crop and
    flip by (seed, e, index), so cached latents see the same flips). Item p:
        pixel_values [3, R, R] (or moments [2C, h, w] with cached latents), text, t (long []), noise [C, h, w],
        offset [C, 1, 1], posterior_eps [C, h, w]
    """

    def __init__(self, dataset, cfg: FinetuneConfig, num_train_timesteps: int, latent_shape: tuple, cache=None):
        self.ds, self.cfg, self.T = dataset, cfg, num_train_timesteps
        self.latent_shape, self.cache = latent_shape, cache
        self.n = len(dataset)
        self._perms: dict[int, torch.Tensor] = {}

    def index(self, p: int) -> tuple[int, int]:
        """Position -> (epoch, dataset index)."""
        e = p // self.n
        if e not in self._perms:
            self._perms = {e: torch.randperm(self.n, generator=torch.Generator().manual_seed(
                stream_seed(self.cfg.seed, "epoch", e)))}
        return e, int(self._perms[e][p % self.n])

    def __len__(self):
        return 2 ** 62   # endless; the sampler decides which positions are read

    def __getitem__(self, p: int) -> dict:
        cfg = self.cfg
        epoch, i = self.index(p)
        aug = torch.Generator().manual_seed(stream_seed(cfg.seed, "augment", epoch, i))
        flip = bool(cfg.random_flip and torch.rand((), generator=aug) < 0.5)
        item = {}
        if self.cache is not None:
            item["moments"] = self.cache["moments"][int(flip)][i]          # [2C, h, w]
            item["text"] = self.cache["text"][i]
        else:
            with torch.random.fork_rng(devices=[]):                         # the dataset's random crop uses torch's RNG
                torch.manual_seed(stream_seed(cfg.seed, "crop", epoch, i))
                sample = self.ds[i]
            pixels = sample["pixel_values"]                                 # [3, R, R] in [-1, 1]
            item["pixel_values"] = pixels.flip(-1) if flip else pixels      # left-right flip
            item["text"] = sample["text"]
        g = torch.Generator().manual_seed(stream_seed(cfg.seed, "sample", p))
        item["posterior_eps"] = torch.randn(self.latent_shape, generator=g)  # z₀ = μ + σ · this
        item["noise"] = torch.randn(self.latent_shape, generator=g)          # ε
        item["offset"] = torch.randn((self.latent_shape[0], 1, 1), generator=g)
        item["t"] = torch.randint(0, self.T, (), generator=g)
        if torch.rand((), generator=g) < cfg.caption_dropout:
            item["text"] = ""
        return item


def positions(start_step: int, end_step: int, cfg: FinetuneConfig, rank: int, world: int):
    """The stream positions this process reads for optimizer steps [start_step, end_step), in order.

    Global micro-batch k holds positions [k·B·W, (k+1)·B·W); process r takes every W-th one from r (as
    DistributedSampler does), so W processes of batch B see the samples of one process with batch B·W."""
    B, W, A = cfg.batch_size, world, cfg.grad_accum
    for k in range(start_step * A, end_step * A):
        for j in range(B):
            yield k * B * W + j * W + rank


def collate(items: list[dict]) -> dict:
    out = {"text": [it["text"] for it in items]}
    for key in items[0]:
        if key != "text":
            out[key] = torch.stack([it[key] for it in items])
    return out


@torch.no_grad()
def cache_latents(dataset, vae, device, flip: bool, batch: int = 8, progress: bool = True) -> dict:
    """Encode every image once with the frozen VAE: {"moments": [unflipped [N, 2C, h, w], flipped (or the same)],
    "text": [N captions]}. The moments are the posterior's (mean | log σ²); a latent is sampled from them each
    time it is used, exactly as an uncached step would. Kept on the CPU."""
    moments, flipped, texts = [], [], []
    for s in tqdm(range(0, len(dataset), batch), desc="caching latents", disable=not progress):
        items = [dataset[i] for i in range(s, min(s + batch, len(dataset)))]
        x = torch.stack([it["pixel_values"] for it in items]).to(device)        # [b, 3, R, R]
        moments.append(vae.encode(x).moments.float().cpu())                     # [b, 2C, h, w]
        if flip:
            flipped.append(vae.encode(x.flip(-1)).moments.float().cpu())
        texts += [it["text"] for it in items]
    m = torch.cat(moments)
    return {"moments": [m, torch.cat(flipped) if flip else m], "text": texts}


# ---------------------------------------------------------------------------------------------- loss
def snr(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """SNR(t) = ᾱ_t / (1 − ᾱ_t) for timesteps t [B] -> [B]."""
    a = alphas_cumprod.to(t.device)[t].float()
    return a / (1 - a)


def min_snr_weights(alphas_cumprod, t, gamma: float, prediction_type: str = "epsilon") -> torch.Tensor:
    """Hang et al. 2023: w(t) = min(SNR, γ) / SNR for ε-prediction, min(SNR, γ) / (SNR + 1) for v. [B] -> [B]."""
    s = snr(alphas_cumprod, t)
    capped = torch.clamp(s, max=gamma)
    return capped / (s + 1) if prediction_type == "v_prediction" else capped / s


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
                   min_snr_gamma: float | None = None, prediction_type: str = "epsilon") -> torch.Tensor:
    """The (weighted) MSE of one batch. pred, target [B, C, h, w]; t [B] -> a scalar (fp32)."""
    if not min_snr_gamma:
        return F.mse_loss(pred.float(), target.float())
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))   # [B]
    return (per_sample * min_snr_weights(alphas_cumprod, t, min_snr_gamma, prediction_type)).mean()


# ---------------------------------------------------------------------------------------------- schedule, optimizer
def lr_factor(step: int, schedule: str, warmup: int, total: int) -> float:
    """The learning rate at optimizer step `step` (0-based) as a fraction of --lr (transformers' schedules):
    linear warm-up from 0 over `warmup` steps, then constant, half a cosine to 0, or a straight line to 0 at `total`."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return max(0.0, (total - step) / max(1, total - warmup))


def make_optimizer(params: list, cfg: FinetuneConfig, device: torch.device):
    """AdamW (Loshchilov & Hutter 2019): Adam's update with the weight decay applied to the weights directly.
    Fused into one kernel on CUDA; 8-bit states (bitsandbytes) with --optimizer adamw8bit."""
    kw = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    if cfg.optimizer == "adamw8bit":
        if device.type != "cuda":
            raise RuntimeError(f"--optimizer adamw8bit needs a CUDA GPU (bitsandbytes' 8-bit optimizers); this run "
                               f"is on {device}. Use --optimizer adamw.")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise RuntimeError("--optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(params, **kw)
    return torch.optim.AdamW(params, fused=True if device.type == "cuda" else None, **kw)


# ---------------------------------------------------------------------------------------------- what trains
def select_trainable(unet, cfg: FinetuneConfig) -> dict:
    """Freeze the U-Net, then unfreeze (or add) what this run trains. -> {name: Parameter} of the trainable tensors."""
    unet.requires_grad_(False)
    if cfg.train == "unet":
        unet.requires_grad_(True)
    elif cfg.train == "last-up-blocks":
        n = len(unet.up_blocks)
        if not 1 <= cfg.up_blocks <= n:
            raise ValueError(f"--up-blocks must be in 1..{n} (this U-Net has {n} up-blocks), got {cfg.up_blocks}")
        for block in unet.up_blocks[n - cfg.up_blocks:]:   # the blocks nearest the output
            block.requires_grad_(True)
    else:
        from .lora import inject_lora
        inject_lora(unet, cfg.lora_rank, cfg.lora_alpha)
    return {name: p for name, p in unet.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------- checkpoints
CKPT_DIR = "checkpoints"


def list_checkpoints(out) -> list[Path]:
    """OUT/checkpoints/step-NNNNNN folders, oldest first (half-written temporary folders are not listed)."""
    root = Path(out) / CKPT_DIR
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit() and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def save_checkpoint(out, step: int, trainable: dict, optimizer, scheduler, scaler, ema, cfg, keep_last: int,
                    world: int = 1) -> Path:
    """Write OUT/checkpoints/step-NNNNNN atomically (a temporary folder, then one rename), then keep the last M.

    trainable.safetensors   the trained tensors (names as in unet.named_parameters())
    ema.safetensors         the EMA shadow (with --ema)
    state.pt                optimizer, LR schedule, loss scaler, EMA counters, step, RNG states, config"""
    root = Path(out) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:06d}.", dir=root))
    try:
        save_file({n: p.detach().cpu().contiguous() for n, p in trainable.items()}, str(tmp / "trainable.safetensors"))
        if ema is not None:
            save_file({n: t.cpu().contiguous() for n, t in ema.shadow.items()}, str(tmp / "ema.safetensors"))
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "ema": None if ema is None else {"decay": ema.decay, "num_updates": ema.num_updates},
                    "rng": rng_state(), "config": {**_config_dict(cfg), "_world": world}}, tmp / "state.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(out)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, trainable: dict, optimizer, scheduler, scaler, ema) -> dict:
    """Restore everything save_checkpoint wrote; returns the state dict (step, config, ...)."""
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    weights = load_file(str(path / "trainable.safetensors"))
    if set(weights) != set(trainable):
        diff = sorted(set(weights) ^ set(trainable))
        raise ValueError(f"{path}: the checkpoint trains other tensors than this run (e.g. {diff[:3]}); "
                         f"resume with the same --train / --up-blocks / --lora-rank")
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(weights[n])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if ema is not None:
        if not (path / "ema.safetensors").is_file():
            raise ValueError(f"{path}: no EMA weights in this checkpoint, but --ema is on")
        ema.load_state_dict({**state["ema"], "shadow": load_file(str(path / "ema.safetensors"))})
    set_rng_state(state["rng"])
    return state


def _config_dict(cfg: FinetuneConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["validation_seeds"] = list(d["validation_seeds"])
    return d


# settings that change which samples, noises or updates a step sees: a resume must keep them to be exact
_RESUME_EXACT = ("seed", "batch_size", "grad_accum", "lr", "resolution", "lr_schedule", "warmup_steps",
                 "caption_dropout", "min_snr_gamma", "noise_offset", "center_crop", "random_flip", "weight_decay",
                 "mixed_precision", "optimizer", "ema_decay", "max_grad_norm")


def _check_resume_config(saved: dict, cfg: FinetuneConfig, world: int, path: Path) -> None:
    for key in ("train", "up_blocks", "lora_rank", "lora_alpha", "ema"):
        if saved.get(key) != getattr(cfg, key) and not (key == "up_blocks" and cfg.train != "last-up-blocks"):
            raise ValueError(f"{path}: saved with {key}={saved.get(key)!r}, this run has {getattr(cfg, key)!r}")
    changed = [f"{k}: {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in _RESUME_EXACT
               if saved.get(k) != getattr(cfg, k)]
    if saved.get("_world", world) != world:
        changed.append(f"processes: {saved['_world']} -> {world} (the global batch changes)")
    if changed:
        warnings.warn(f"resuming {path} with changed settings; the run will not match an uninterrupted one: "
                      + "; ".join(changed), stacklevel=3)


# ---------------------------------------------------------------------------------------------- pictures
def draw_loss_curve(rows: list[dict], path, size=(720, 360)) -> Path:
    """The loss per optimizer step (grey) and its exponential moving average (blue), as a PNG (PIL only).
    The average's α = 20 / steps (within [0.01, 0.3]): it spans about a tenth of the run."""
    W, H = size
    ml, mr, mt, mb = 64, 16, 28, 36                         # margins: left, right, top, bottom
    im = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(im)
    from .compare import _font
    font = _font(12)
    pts = [(r["step"], r["loss"]) for r in rows if math.isfinite(r.get("loss", float("nan")))]
    d.text((ml, 6), "training loss per step (grey) and its moving average (blue)", fill=(0, 0, 0), font=font)
    d.rectangle([ml, mt, W - mr, H - mb], outline=(0, 0, 0))
    if pts:
        steps = [p[0] for p in pts]
        losses = [p[1] for p in pts]
        alpha = min(0.3, max(0.01, 20 / len(losses)))
        smooth, s = [], losses[0]
        for v in losses:
            s = (1 - alpha) * s + alpha * v
            smooth.append(s)
        lo, hi = min(losses), max(losses)
        hi = lo + 1e-12 if hi <= lo else hi
        x0, x1 = steps[0], max(steps[-1], steps[0] + 1)

        def xy(step, v):
            return (ml + (step - x0) / (x1 - x0) * (W - ml - mr), H - mb - (v - lo) / (hi - lo) * (H - mt - mb))

        for series, colour, width in ((losses, (170, 170, 170), 1), (smooth, (30, 90, 200), 2)):
            line = [xy(st, v) for st, v in zip(steps, series)]
            if len(line) > 1:
                d.line(line, fill=colour, width=width)
            else:
                d.ellipse([line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2], fill=colour)
        for v in (lo, (lo + hi) / 2, hi):                    # y ticks
            y = xy(x0, v)[1]
            d.line([ml - 4, y, ml, y], fill=(0, 0, 0))
            d.text((4, y - 7), f"{v:.4g}", fill=(0, 0, 0), font=font)
        for st in (x0, (x0 + x1) // 2, x1):                   # x ticks
            x = xy(st, lo)[0]
            d.line([x, H - mb, x, H - mb + 4], fill=(0, 0, 0))
            d.text((x - 10, H - mb + 6), str(st), fill=(0, 0, 0), font=font)
        d.text((W // 2 - 15, H - 16), "step", fill=(0, 0, 0), font=font)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    im.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def default_validation_prompts(dataset) -> list[str]:
    """Two distinct captions of the dataset (what it should learn) + UNRELATED_PROMPTS (what it may forget)."""
    seen = []
    for row in dataset.rows:
        if row["text"] and row["text"] not in seen:
            seen.append(row["text"])
        if len(seen) == 2:
            break
    return seen + list(UNRELATED_PROMPTS)


@torch.no_grad()
def render_validation(pipe, prompts, cfg: FinetuneConfig, resolution: int, autocast) -> Image.Image:
    """One image per (prompt, seed) with fixed seeds, as a grid: rows = prompts, columns = seeds.
    Sampled under bf16 autocast when training uses it; in fp32 otherwise (fp16 would also run the VAE decoder in
    fp16, whose activations overflow into black images)."""
    from .compare import make_grid
    was_training = pipe.unet.training
    pipe.unet.eval()
    rows = []
    with autocast() if cfg.mixed_precision == "bf16" else nullcontext():
        for prompt in prompts:
            rows.append([pipe.generate(prompt, steps=cfg.validation_steps, guidance_scale=cfg.validation_guidance,
                                       scheduler=cfg.validation_scheduler, seed=s, height=resolution,
                                       width=resolution, progress=False)[0] for s in cfg.validation_seeds])
    pipe.unet.train(was_training)
    side = max(rows[0][0].size)
    return make_grid(rows, prompts, [f"seed {s}" for s in cfg.validation_seeds],
                     cell=side * max(1, -(-128 // side)))


# ---------------------------------------------------------------------------------------------- export
def export_model(pipe, out, cfg: FinetuneConfig) -> Path:
    """Write the model into OUT as a diffusers folder without touching OUT's logs and checkpoints: saved whole into
    a temporary OUT/.export-*, then each part renamed into place, model_index.json last."""
    import minidiff
    from .lora import lora_layers, merge_lora, save_lora

    out = Path(out)
    if lora_layers(pipe.unet) or lora_layers(pipe.text_encoder):
        if cfg.lora_export == "separate":   # the U-Net's LoRA layers and the text encoder's, if it has any
            save_lora(pipe, out / "lora.safetensors", extra_metadata={"base_model": str(cfg.model or "embedded")})
        merge_lora(pipe)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    try:
        minidiff.save(pipe, staging / "model", format="diffusers")
        parts = sorted(p for p in (staging / "model").iterdir() if p.name != "model_index.json")
        for part in [*parts, staging / "model" / "model_index.json"]:
            target = out / part.name
            if target.is_dir():
                old = staging / f"old-{part.name}"
                os.replace(target, old)
            os.replace(part, target)
        if cfg.export_compvis:
            minidiff.save(pipe, out / "model.safetensors", format="compvis")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------- training
def train(cfg: FinetuneConfig) -> dict:
    """Run (or resume) a fine-tuning run. Returns {"step", "finished", "output", "loss"}.

    Raises TrainingDiverged when the loss becomes NaN/inf (nothing is written for that step)."""
    ctx = Dist(cfg.device)
    try:
        return _train(cfg, ctx)
    finally:
        ctx.close()


def _train(cfg: FinetuneConfig, ctx: Dist) -> dict:
    import minidiff
    from .data.imagefolder import ImageFolderDataset
    from .ema import EMA
    from .schedulers import DDPMScheduler

    out = Path(cfg.output)
    device = ctx.device
    if not cfg.resume and list_checkpoints(out):
        raise FileExistsError(f"{out} already holds checkpoints of a run (latest: {list_checkpoints(out)[-1].name}): "
                              f"pass --resume to continue it, or use another --output")
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        for stale in (out / CKPT_DIR).glob(".step-*"):            # a checkpoint half-written by a killed run
            shutil.rmtree(stale, ignore_errors=True)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2 ** 32)
    torch.manual_seed(cfg.seed)                                  # LoRA's A init; everything else has its own seed

    # ---- the model: everything frozen but what trains; trained tensors in fp32 (autocast does the low precision)
    pipe = minidiff.load(cfg.model, device=device, dtype=torch.float32)
    noise_sched = DDPMScheduler.from_config(pipe.scheduler_config)
    prediction_type = pipe.scheduler_config.get("prediction_type", "epsilon")
    T = noise_sched.num_train_timesteps
    alphas_cumprod = noise_sched.alphas_cumprod.to(device)
    unet = pipe.unet
    trainable = select_trainable(unet, cfg)
    if cfg.lora_text_encoder:   # CLIP's q/k/v/out projections and MLP get LoRA too; its A and B train with the U-Net's
        from .lora import TEXT_ENCODER_TARGETS, inject_lora
        inject_lora(pipe.text_encoder, cfg.lora_rank, cfg.lora_alpha, targets=TEXT_ENCODER_TARGETS)
        trainable.update({f"text_encoder.{n}": p for n, p in pipe.text_encoder.named_parameters() if p.requires_grad})
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
    cache = cache_latents(dataset, pipe.vae, device, cfg.random_flip, progress=cfg.progress and ctx.main) \
        if cfg.cache_latents else None
    stream = SampleStream(dataset, cfg, T, latent_shape, cache)

    # ---- optimizer, schedule, loss scaling, EMA
    params = list(trainable.values())
    optimizer = make_optimizer(params, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.lr_schedule, cfg.warmup_steps, cfg.steps))
    scaler = torch.amp.GradScaler(device.type) if cfg.mixed_precision == "fp16" else None
    ema = EMA(trainable, cfg.ema_decay, device="cpu" if cfg.ema_on_cpu else None) if cfg.ema else None
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()

    # ---- resume
    start, last_ckpt = 0, None
    if cfg.resume:
        found = list_checkpoints(out)
        if found:
            last_ckpt = found[-1]
            state = load_checkpoint(last_ckpt, trainable, optimizer, scheduler, scaler, ema)
            _check_resume_config(state["config"], cfg, ctx.world, last_ckpt)
            start = int(state["step"])
            if ctx.main:
                print(f"resuming from {last_ckpt} (step {start})", file=sys.stderr)
        elif ctx.main:
            print(f"--resume: no checkpoint in {out / CKPT_DIR}; starting from step 0", file=sys.stderr)
    log_path = out / "train_log.jsonl"
    log_rows = _prepare_log(log_path, start) if ctx.main else []

    # ---- the model as the training loop calls it
    model = unet
    if ctx.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(unet, device_ids=[device.index] if device.type == "cuda"
                                                          else None)
    if cfg.compile:
        model = torch.compile(model)
    val_prompts = cfg.validation_prompts if cfg.validation_prompts is not None else default_validation_prompts(dataset)

    end = cfg.steps if cfg.max_steps_this_run is None else min(cfg.steps, start + cfg.max_steps_this_run)
    loader = torch.utils.data.DataLoader(stream, batch_size=cfg.batch_size, collate_fn=collate,
                                         sampler=list(positions(start, end, cfg, ctx.rank, ctx.world)),
                                         num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
    batches = iter(loader)
    A = cfg.grad_accum
    global_batch = cfg.batch_size * ctx.world * A
    bar = tqdm(total=cfg.steps, initial=start, desc="fine-tuning", disable=not (cfg.progress and ctx.main))
    log_file = open(log_path, "a", encoding="utf-8") if ctx.main else None
    t_start, loss_value = time.perf_counter(), float("nan")
    try:
        for step in range(start, end):                      # `step` optimizer steps are done; this makes step + 1
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            for m in range(A):
                batch = next(batches)
                sync = ctx.world == 1 or m == A - 1         # DDP: all-reduce the gradients on the last micro-step only
                with (nullcontext() if sync else model.no_sync()):
                    loss = _micro_step(batch, pipe, model, noise_sched, alphas_cumprod, prediction_type, cfg,
                                       device, autocast)
                    scaled = loss / A
                    (scaler.scale(scaled) if scaler else scaled).backward()
                loss_sum += loss.detach()
            if ctx.world > 1 and cfg.lora_text_encoder:     # DDP averages the U-Net's gradients; these, here
                for name, p in trainable.items():
                    if name.startswith("text_encoder.") and p.grad is not None:
                        p.grad.copy_(ctx.mean(p.grad))
            loss_mean = ctx.mean(loss_sum / A)
            loss_value = float(loss_mean)                   # the one host sync per step
            if not math.isfinite(loss_value):
                raise TrainingDiverged(
                    f"step {step + 1}: the loss is {loss_value} (NaN or infinite); stopped before the optimizer "
                    f"step, so nothing was written for it. Last good checkpoint: "
                    f"{last_ckpt or 'none (no checkpoint was written yet)'}. Resume from it with --resume, "
                    f"e.g. with a lower --lr, a --max-grad-norm, or --mixed-precision bf16 instead of fp16.")
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm else None
            lr_now = scheduler.get_last_lr()[0]
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if ema is not None:
                ema.update(trainable)
            done = step + 1
            dt = time.perf_counter() - t0
            row = {"step": done, "loss": loss_value, "lr": lr_now, "samples_per_s": global_batch / dt,
                   "epoch": done * global_batch / len(dataset), "time_s": time.perf_counter() - t_start}
            if grad_norm is not None:
                row["grad_norm"] = float(grad_norm)
            if scaler:
                row["loss_scale"] = float(scaler.get_scale())
            if ctx.main:
                log_file.write(json.dumps(row) + "\n")
                log_file.flush()
                log_rows.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr_now:.2e}", samples_s=f"{row['samples_per_s']:.1f}")
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                if ctx.main:
                    last_ckpt = save_checkpoint(out, done, trainable, optimizer, scheduler, scaler, ema, cfg,
                                                cfg.keep_last, ctx.world)
                    _validate_and_plot(pipe, trainable, ema, val_prompts, cfg, R, autocast, out, done, log_rows)
                else:
                    last_ckpt = out / CKPT_DIR / f"step-{done:06d}"
    finally:
        bar.close()
        if log_file:
            log_file.close()

    finished = end >= cfg.steps
    if finished and ctx.main:
        if ema is not None:
            ema.copy_to(trainable)                          # the exported model is the averaged one
        if cfg.gradient_checkpointing:
            unet.disable_gradient_checkpointing()
        unet.eval().requires_grad_(False)
        pipe.text_encoder.requires_grad_(False)
        with open(out / "finetune_config.json", "w") as fh:
            json.dump({**_config_dict(cfg), "_world": ctx.world}, fh, indent=2)
        export_model(pipe, out, cfg)
        if log_rows:
            draw_loss_curve(log_rows, out / "loss.png")
    ctx.barrier()
    return {"step": end, "finished": finished, "output": str(out), "loss": loss_value}


def _micro_step(batch, pipe, model, noise_sched, alphas_cumprod, prediction_type, cfg, device, autocast):
    """One forward pass on one micro-batch -> the loss (fp32 scalar, not yet divided by grad_accum)."""
    from .vae import DiagonalGaussian
    with torch.no_grad():
        if "moments" in batch:                                   # cached: the VAE posterior's moments
            posterior = DiagonalGaussian(batch["moments"].to(device))
        else:                                                    # the frozen VAE runs in fp32 (no autocast)
            posterior = pipe.vae.encode(batch["pixel_values"].to(device))
        eps_post = batch["posterior_eps"].to(device)
        z0 = (posterior.mean + posterior.std * eps_post) * pipe.latent_scale       # [B, C, h, w], unit variance
        noise = batch["noise"].to(device)                                          # ε [B, C, h, w]
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * batch["offset"].to(device)          # + o · δ [B, C, 1, 1]
        t = batch["t"].to(device)                                                  # [B]
        zt = noise_sched.add_noise(z0, noise, t)                                   # √ᾱ z₀ + √(1−ᾱ) ε
        ids = pipe.tokenizer(batch["text"]).to(device)                             # [B, 77]; "" when dropped
        with autocast(), torch.set_grad_enabled(cfg.lora_text_encoder):          # its LoRA trains, if it has one
            context = pipe.text_encoder(ids)                                       # [B, 77, d]
        target = noise_sched.get_velocity(z0, noise, t) if prediction_type == "v_prediction" else noise
    with autocast():
        pred = model(zt, t, context)                                               # ε_θ(z_t, t, τ(y))
    return diffusion_loss(pred, target, t, alphas_cumprod, cfg.min_snr_gamma, prediction_type)


def _prepare_log(path: Path, start: int) -> list[dict]:
    """Keep the log lines of steps <= start (a resumed run drops what it will redo), atomically; return them."""
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= start:
                rows.append(row)
    from .data.imagefolder import _atomic_write_text
    _atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _validate_and_plot(pipe, trainable, ema, prompts, cfg, R, autocast, out: Path, step: int, log_rows):
    draw_loss_curve(log_rows, out / "loss.png")
    if not prompts or cfg.validation_steps <= 0:
        return
    (out / "validation").mkdir(exist_ok=True)
    with (ema.swapped_in(trainable) if ema is not None else nullcontext()):
        grid = render_validation(pipe, prompts, cfg, R, autocast)
    grid.save(out / "validation" / f"step-{step:06d}.png")


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS   # an option not given stays out of args, so a --preset value is only overridden on purpose
    d = FinetuneConfig.__dataclass_fields__
    dflt = {k: v.default for k, v in d.items() if v.default is not dataclasses.MISSING}

    def opt(*names, help, **kw):  # an option of the current argument group `g`
        key = names[0].lstrip("-").replace("-", "_")
        g.add_argument(*names, default=S, help=f"{help} (default: {_show(dflt.get(key))})", **kw)

    g = parser.add_argument_group("run")
    g.add_argument("--data", required=True, help="dataset folder: images + metadata.jsonl (imagefolder)")
    g.add_argument("--output", required=True, help="output folder: train_log.jsonl, loss.png, checkpoints/, "
                                                    "validation/, and at the end the fine-tuned diffusers model")
    g.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="a recipe of defaults (see docs/finetuning.md); flags given explicitly win")
    opt("--model", help="base model: diffusers folder or CompVis .ckpt/.safetensors; embedded tiny model if omitted")
    opt("--steps", type=int, help="optimizer steps in total")
    opt("--batch-size", type=int, help="samples per process per micro-step")
    opt("--grad-accum", type=int, help="micro-steps accumulated per optimizer step")
    opt("--lr", type=float, help="peak learning rate")
    opt("--resolution", type=int, help="training image side in px; none: the model's native size (512 for SD v1)")
    opt("--seed", type=int, help="seed of every random choice (data order, augmentation, noise, LoRA init)")
    opt("--device", help="cpu, cuda, cuda:1 ...; none: cuda:<local rank> when CUDA is there, else cpu")
    opt("--num-workers", type=int, help="DataLoader processes that load and augment images")
    g = parser.add_argument_group("what trains")
    opt("--train", choices=TRAIN_MODES, help="the whole U-Net, its last N up-blocks, or LoRA adapters")
    opt("--up-blocks", type=int, help="with --train last-up-blocks: N, counted from the output end")
    opt("--lora-rank", type=int, help="with --train lora: the rank r")
    opt("--lora-alpha", type=float, help="with --train lora: α in ΔW = α/r · B A; none: α = r")
    opt("--lora-text-encoder", action=argparse.BooleanOptionalAction,
        help="with --train lora: LoRA on the text encoder's q/k/v/out projections and MLP too")
    opt("--lora-export", choices=("merge", "separate"),
        help="merge: LoRA folded into OUT's weights; separate: the same, plus OUT/lora.safetensors for "
             "minidiff.lora.apply_lora on the base model")
    g = parser.add_argument_group("loss")
    opt("--min-snr-gamma", type=float, help="min-SNR-γ loss weighting (Hang et al. 2023; 5 is usual)")
    opt("--noise-offset", type=float, help="noise offset strength (0.05-0.1 is usual)")
    opt("--caption-dropout", type=float, help="probability of training on the empty caption")
    g = parser.add_argument_group("optimizer")
    opt("--optimizer", choices=("adamw", "adamw8bit"), help="adamw8bit: bitsandbytes, CUDA only")
    opt("--weight-decay", type=float, help="AdamW weight decay")
    opt("--adam-beta1", type=float, help="AdamW β1")
    opt("--adam-beta2", type=float, help="AdamW β2")
    opt("--adam-eps", type=float, help="AdamW ε")
    opt("--warmup-steps", type=int, help="linear LR warm-up from 0")
    opt("--lr-schedule", choices=LR_SCHEDULES, help="after warm-up")
    opt("--max-grad-norm", type=float, help="clip the gradient's global L2 norm (0 = no clipping)")
    opt("--ema", action=argparse.BooleanOptionalAction, help="keep an EMA of the trained weights; export it")
    opt("--ema-decay", type=float, help="EMA decay d")
    opt("--ema-on-cpu", action=argparse.BooleanOptionalAction, help="keep the EMA copy in CPU memory")
    g = parser.add_argument_group("speed and memory")
    opt("--mixed-precision", choices=PRECISIONS, help="autocast dtype (fp16 adds loss scaling)")
    opt("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
        help="recompute U-Net block activations in the backward pass (less memory, ~1/3 more compute)")
    opt("--cache-latents", action=argparse.BooleanOptionalAction,
        help="encode the dataset once with the frozen VAE (both flips with --random-flip)")
    opt("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the U-Net")
    g = parser.add_argument_group("augmentation")
    crop = g.add_mutually_exclusive_group()
    crop.add_argument("--center-crop", dest="center_crop", action="store_true", default=S,
                      help="resize the shorter side to the resolution, crop the centre (default)")
    crop.add_argument("--random-crop", dest="center_crop", action="store_false", default=S,
                      help="... crop at a random place instead")
    opt("--random-flip", action=argparse.BooleanOptionalAction, help="flip left-right with probability 1/2")
    g = parser.add_argument_group("checkpoints, validation, export")
    opt("--checkpoint-every", type=int, help="K: checkpoint + validation grid + loss curve every K steps")
    opt("--keep-last", type=int, help="M: checkpoints kept")
    g.add_argument("--validation-prompts", default=S, metavar="FILE",
                   help="one prompt per line (default: 2 dataset captions + 'A toucan', 'A horse')")
    g.add_argument("--validation-seeds", default=S, help="comma-separated seeds (default: 0)")
    opt("--validation-steps", type=int, help="sampler steps of the validation images (0 = no validation)")
    opt("--validation-guidance", type=float, help="guidance scale of the validation images")
    opt("--validation-scheduler", choices=("pndm", "ddim", "ddpm", "euler", "dpmpp"),
        help="validation sampler (none: the model's own, PNDM for SD v1)")
    opt("--resume", action="store_true", help="continue from the last checkpoint in --output up to --steps")
    opt("--export-compvis", action="store_true", help="also write OUT/model.safetensors in the CompVis layout")
    opt("--max-steps-this-run", type=int,
        help="stop after this many steps in this invocation, without export (time-boxed jobs; resume later)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=S, help="no progress bar")


def _show(v):
    return "none" if v is None else ",".join(map(str, v)) if isinstance(v, (tuple, list)) else v


def config_from_args(args) -> FinetuneConfig:
    given = {k: v for k, v in vars(args).items() if k != "preset"}
    if "validation_prompts" in given:
        from .compare import read_prompts
        given["validation_prompts"] = read_prompts(given["validation_prompts"])
    if "validation_seeds" in given:
        given["validation_seeds"] = tuple(int(s) for s in str(given["validation_seeds"]).split(",") if s.strip())
    if given.get("max_grad_norm") == 0:
        given["max_grad_norm"] = None
    base = PRESETS[args.preset] if getattr(args, "preset", None) else {}
    return FinetuneConfig(**{**base, **given})


def run(args) -> int:
    cfg = config_from_args(args)
    try:
        result = train(cfg)
    except TrainingDiverged as e:
        print(f"minidiff finetune: training diverged at {e}", file=sys.stderr)
        return 1
    if result["finished"] and int(os.environ.get("RANK", "0")) == 0:
        print(f"fine-tuned model written to {result['output']} (step {result['step']}, last loss "
              f"{result['loss']:.4f})")
    return 0


__all__ = ["FinetuneConfig", "PRESETS", "TrainingDiverged", "train", "diffusion_loss", "min_snr_weights", "snr",
           "lr_factor", "select_trainable", "list_checkpoints", "save_checkpoint", "load_checkpoint",
           "draw_loss_curve", "export_model", "SampleStream", "positions", "cache_latents", "stream_seed"]
