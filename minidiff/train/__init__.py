"""minidiff.train — one training core, in the order of a run's life cycle:

  data.py        the samples: an endless, seeded stream (one seed scheme: stream_seed / generator)
  objective.py   noise, timestep sampling, the ε / v target, min-SNR weighting: the loss of a micro-batch
  consistency.py   --train lcm-lora's loss instead: latent consistency distillation (teacher, DDIM solver, EMA target)
  trainable.py   what trains: the whole U-Net, its last N up-blocks, LoRA, or a new word (textual inversion)
  optim.py       AdamW and THE learning-rate schedule (lr_factor)
  loop.py        ONE train_step: accumulation, autocast, NaN guard, clipping, optimizer, schedule, EMA
  state.py       atomic checkpoints and exact resumption (model, optimizer, schedule, EMA, every RNG, data position)
  reports.py     train_log.jsonl, matplotlib loss/LR plots, TensorBoard, validation grids
  export.py      the diffusers folder, LoRA files, textual-inversion embeddings
  config.py      FinetuneConfig: every setting of a run, the door's table of them (FINETUNE_FIELDS), PRESETS
  finetune.py    `minidiff finetune`: train(cfg), which puts the above together

`minidiff finetune`, the tiny model's recipe (minidiff.recipes.tiny, `minidiff train-tiny`) and benchmarks/bench_train.py all
run loop.train_step.
"""
from .config import PRESETS, FinetuneConfig
from .finetune import train
from .loop import TrainingDiverged, train_step

__all__ = ["FinetuneConfig", "PRESETS", "TrainingDiverged", "train", "train_step"]
