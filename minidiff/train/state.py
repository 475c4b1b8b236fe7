"""Training, step 6 — state: atomic checkpoints and exact resumption.

A checkpoint OUT/checkpoints/step-NNNNNN/ holds everything a run needs to continue as if it had never stopped:

    trainable.safetensors   the trained tensors (names as trainable.select_trainable gives them)
    ema.safetensors         the EMA shadow (with --ema)
    state.pt                optimizer, LR schedule, loss scaler, EMA counters, step, every RNG state, the config

The data position needs no state: the samples of step s are a function of (seed, s) (data.positions). The folder is
written whole into a temporary folder and renamed into place (files.atomic_dir): a kill during the write leaves the
previous checkpoint as the latest. state.pt holds only tensors, numbers and strings, so it loads with
torch.load(weights_only=True) — no pickle runs.
"""
from __future__ import annotations

import dataclasses
import pickle
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import InputValueError
from ..files import atomic_dir, atomic_write
from ..formats.weights import UNREADABLE, CheckpointError

CKPT_DIR = "checkpoints"


# ---------------------------------------------------------------------------------------------- RNG states
def rng_state() -> dict:
    """The process-wide RNG states (python, numpy, torch CPU, torch CUDA). The training draws use none of them (see
    data.py), but a checkpoint keeps them so anything else that does is also resumed exactly."""
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


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch from the run's seed (LoRA's A init is the one draw that uses them)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------- single files
def save_state(obj, path) -> Path:
    """torch.save(obj) atomically. obj must hold only tensors, numbers, strings, lists, tuples and dicts."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_state(path):
    """A file save_state wrote (or None when there is none), loaded with weights_only=True: no pickle code runs."""
    path = Path(path)
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


# ---------------------------------------------------------------------------------------------- checkpoints
def list_checkpoints(out) -> list[Path]:
    """OUT/checkpoints/step-NNNNNN folders, oldest first (half-written temporary folders are not listed)."""
    root = Path(out) / CKPT_DIR
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit() and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def remove_stale(out) -> None:
    """Delete what a killed run left half-written (.step-* temporaries)."""
    for stale in (Path(out) / CKPT_DIR).glob(".step-*"):
        shutil.rmtree(stale, ignore_errors=True)


def config_dict(cfg) -> dict:
    d = dataclasses.asdict(cfg)
    d["validation_seeds"] = list(d["validation_seeds"])
    return d


def save_checkpoint(out, step: int, trainable: dict, optimizer, scheduler, scaler, ema, cfg, keep_last: int,
                    world: int = 1) -> Path:
    """Write OUT/checkpoints/step-NNNNNN atomically (see the module docstring), then keep the last `keep_last`."""
    final = Path(out) / CKPT_DIR / f"step-{step:06d}"
    with atomic_dir(final) as tmp:
        save_file({n: p.detach().cpu().contiguous() for n, p in trainable.items()}, str(tmp / "trainable.safetensors"))
        if ema is not None:
            save_file({n: t.cpu().contiguous() for n, t in ema.shadow.items()}, str(tmp / "ema.safetensors"))
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "ema": None if ema is None else {"decay": ema.decay, "num_updates": ema.num_updates},
                    "rng": rng_state(), "config": {**config_dict(cfg), "_world": world}}, tmp / "state.pt")
    for old in list_checkpoints(out)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, trainable: dict, optimizer, scheduler, scaler, ema) -> dict:
    """Restore everything save_checkpoint wrote; returns the state dict (step, config, ...)."""
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    weights = load_file(str(path / "trainable.safetensors"))
    if set(weights) != set(trainable) or any(weights[n].shape != p.shape for n, p in trainable.items()):
        diff = sorted(set(weights) ^ set(trainable)) or [n for n, p in trainable.items()
                                                          if weights[n].shape != p.shape]   # e.g. another rank
        raise InputValueError(f"{path}: the checkpoint trains other tensors than this run (e.g. {diff[:3]}); "
                              f"resume with the same --train / --up-blocks / --lora-preset / --lora-rank / "
                              f"--lora-conv-rank / --num-vectors")
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(weights[n])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if ema is not None:
        if not (path / "ema.safetensors").is_file():
            raise InputValueError(f"{path}: no EMA weights in this checkpoint, but --ema is on", field="ema")
        ema.load_state_dict({**state["ema"], "shadow": load_file(str(path / "ema.safetensors"))})
    set_rng_state(state["rng"])
    return state


# settings that change which samples, noises or updates a step sees: a resume must keep them to be exact
RESUME_EXACT = ("seed", "batch_size", "grad_accum", "lr", "resolution", "lr_schedule", "warmup_steps",
                "caption_dropout", "min_snr_gamma", "noise_offset", "center_crop", "random_flip", "weight_decay",
                "mixed_precision", "optimizer", "ema_decay", "max_grad_norm", "lcm_skip", "lcm_guidance_min",
                "lcm_guidance_max", "lcm_loss", "lcm_huber_c", "lcm_ema_decay")
# settings that change WHAT trains: a resume with another value cannot load the checkpoint's tensors
RESUME_SAME = ("train", "up_blocks", "lora_preset", "lora_rank", "lora_alpha", "lora_conv_rank", "lora_conv_alpha",
               "lora_text_encoder", "placeholder_token", "initializer_token", "num_vectors", "ema")


def read_checkpoint_config(path: Path) -> dict:
    """The settings a checkpoint was saved with (state.pt's "config"), read without loading its tensors: the file is
    memory-mapped and only the small dict is touched, so a resume is checked before the model loads."""
    try:
        state = torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=True, mmap=True)
        return dict(state["config"])
    except (*UNREADABLE, pickle.UnpicklingError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}/state.pt: not a readable training checkpoint ({e}); delete this checkpoint "
                              f"folder to resume from the one before, or start again in another --output") from None


def check_resume_config(saved: dict, cfg, world: int, path: Path) -> None:
    """A resume continues the run saved at `path`: what trains must be the same (RESUME_SAME: else the saved tensors
    do not fit, an InputValueError names the field, its flag and both values); a change of what a step sees
    (RESUME_EXACT) is allowed with a warning that lists them, since the run will not match an uninterrupted one."""
    for key in RESUME_SAME:
        if key not in saved:                          # a checkpoint from before the setting existed
            continue
        if saved.get(key) != getattr(cfg, key) and not (key == "up_blocks" and cfg.train != "last-up-blocks"):
            flag = "--" + key.replace("_", "-")
            raise InputValueError(f"--resume: {path} was saved with {key}={saved.get(key)!r}, this run has "
                                  f"{key}={getattr(cfg, key)!r} ({flag}): resume with the same {flag}, or start "
                                  f"a new run in another --output", field=key)
    changed = [f"{k}: {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in RESUME_EXACT
               if saved.get(k) != getattr(cfg, k)]
    if saved.get("_world", world) != world:
        changed.append(f"processes: {saved['_world']} -> {world} (the global batch changes)")
    if changed:
        warnings.warn(f"resuming {path} with changed settings; the run will not match an uninterrupted one: "
                      + "; ".join(changed), stacklevel=3)


__all__ = ["CKPT_DIR", "rng_state", "set_rng_state", "seed_everything", "save_state", "load_state",
           "list_checkpoints", "remove_stale", "config_dict", "save_checkpoint", "load_checkpoint",
           "RESUME_EXACT", "RESUME_SAME", "read_checkpoint_config", "check_resume_config"]
