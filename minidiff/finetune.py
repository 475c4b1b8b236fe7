"""Chapter 12 — fine-tuning. The code lives in the `minidiff.train` package now (data -> objective -> what trains ->
optimizer -> train_step -> state -> reports -> export); this module keeps `import minidiff.finetune` and
`from minidiff.finetune import FinetuneConfig, train` working for existing code."""
from .train.data import SampleStream, cache_latents, collate, default_validation_prompts, positions, stream_seed
from .train.export import export_model
from .train.finetune import PRECISIONS, PRESETS, UNRELATED_PROMPTS, Dist, FinetuneConfig, train
from .train.loop import TrainingDiverged, train_step
from .train.objective import diffusion_loss, micro_step_loss, min_snr_weights, snr
from .train.optim import LR_SCHEDULES, lr_factor, make_optimizer
from .train.reports import draw_loss_curve, draw_lr_curve, render_validation
from .train.state import (CKPT_DIR, list_checkpoints, load_checkpoint, rng_state, save_checkpoint,
                          set_rng_state)
from .train.trainable import TRAIN_MODES, select_trainable

__all__ = ["FinetuneConfig", "PRESETS", "TrainingDiverged", "train", "diffusion_loss", "min_snr_weights", "snr",
           "lr_factor", "select_trainable", "list_checkpoints", "save_checkpoint", "load_checkpoint",
           "draw_loss_curve", "export_model", "SampleStream", "positions", "cache_latents", "stream_seed",
           "collate", "train_step", "micro_step_loss", "render_validation", "default_validation_prompts",
           "draw_lr_curve", "make_optimizer", "rng_state", "set_rng_state", "Dist", "CKPT_DIR", "TRAIN_MODES",
           "LR_SCHEDULES", "PRECISIONS", "UNRELATED_PROMPTS"]
