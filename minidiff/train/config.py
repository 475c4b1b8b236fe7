"""What a fine-tuning run is told: FinetuneConfig (every setting, the CLI's flags with '-' written '_'), the door's
table of those settings (FINETUNE_FIELDS, one row per field: type, range or choices, flag) with the rules between
fields (FINETUNE_RULES), and the named recipes (PRESETS). A config checks itself when it is made, before any work;
paths and the device are looked at when train() starts (check_before_work in finetune.py). docs/finetuning.md lists
every setting with its default."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputValueError
from ..lora import LORA_PRESETS
from ..settings import (SEED_MAX, Bool, Choice, Device, Existing, Folder, Int, Ints, Output, Real, Sampler, Text,
                        Texts, check_settings)
from .consistency import LCM_LOSSES
from .optim import LR_SCHEDULES
from .reports import REPORT_TO
from .trainable import TRAIN_MODES

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
    train: str = "unet"                         # "unet" | "last-up-blocks" | "lora" | "textual-inversion" | "lcm-lora"
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
    # latent consistency distillation (train="lcm-lora"; consistency.py)
    lcm_skip: int = 20                          # k: the teacher's DDIM step t_{n+k} -> t_n in timesteps (grid T/k)
    lcm_guidance_min: float = 3.0               # the teacher's guidance scale s ~ U[min, max] (generate's
    lcm_guidance_max: float = 7.0               #   guidance_scale; LCM's ω = s − 1); min = max: fixed
    lcm_loss: str = "huber"                     # "huber" (pseudo-Huber, c = lcm_huber_c) | "l2"
    lcm_huber_c: float = 0.001
    lcm_ema_decay: float = 0.95                 # μ of the target network θ⁻ ← μ θ⁻ + (1 − μ) θ (0: the student)
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
    compile: bool = False                       # the U-Net's forward + backward compiled (loop.compile_for_training)
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
        # the door (minidiff.settings): every field by its row of FINETUNE_FIELDS, then the rules between fields —
        # so FinetuneConfig(...) in Python and `minidiff finetune` on the command line refuse the same things alike
        check_settings(self, FINETUNE_FIELDS, FINETUNE_RULES)
        self.validation_seeds = tuple(self.validation_seeds)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "FinetuneConfig":
        """A preset's settings with `overrides` winning: FinetuneConfig.from_preset("pokemon", data=..., output=...)."""
        if name not in PRESETS:
            raise InputValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}", field="preset")
        return cls(**{**PRESETS[name], **overrides})


# The door's table: one row per field of FinetuneConfig — what it holds, the flag that sets it (None: --field-name).
# A new field gets its row here; a rule between fields goes into FINETUNE_RULES. Paths and the device are looked at
# when train() starts (check_on_this_machine), the rest when the config is made.
OPTIMIZERS = ("adamw", "adamw8bit")
LORA_EXPORTS = ("merge", "separate")
FINETUNE_FIELDS = {
    "data": Folder(holding="metadata.jsonl"),
    "output": Output("folder"),
    "model": Existing(what="a diffusers folder or a CompVis .ckpt/.safetensors file", optional=True),
    "steps": Int(0),
    "batch_size": Int(1),
    "grad_accum": Int(1),
    "lr": Real(gt=0),
    "resolution": Int(1, optional=True),            # and a multiple of the VAE's factor: checked with the model
    "seed": Int(0, SEED_MAX),
    "train": Choice(TRAIN_MODES),
    "up_blocks": Int(1),                            # and at most the U-Net's up-blocks: checked with the model
    "lora_preset": Choice(tuple(LORA_PRESETS)),
    "lora_rank": Int(1),
    "lora_alpha": Real(gt=0, optional=True),       # None: α = r
    "lora_conv_rank": Int(1, optional=True),        # None: lora_rank
    "lora_conv_alpha": Real(gt=0, optional=True),   # None: lora_alpha
    "lora_export": Choice(LORA_EXPORTS),
    "lora_text_encoder": Bool(),
    "placeholder_token": Text(optional=True),
    "initializer_token": Text(optional=True),
    "num_vectors": Int(1),
    "lcm_skip": Int(1),                             # and a divisor of the model's timesteps: checked with the model
    "lcm_guidance_min": Real(1),
    "lcm_guidance_max": Real(1),
    "lcm_loss": Choice(LCM_LOSSES),
    "lcm_huber_c": Real(gt=0),
    "lcm_ema_decay": Real(0, lt=1),
    "min_snr_gamma": Real(gt=0, optional=True),
    "noise_offset": Real(0),
    "caption_dropout": Real(0, 1),
    "optimizer": Choice(OPTIMIZERS),
    "weight_decay": Real(0),
    "adam_beta1": Real(0, lt=1),
    "adam_beta2": Real(0, lt=1),
    "adam_eps": Real(gt=0),
    "warmup_steps": Int(0),
    "lr_schedule": Choice(LR_SCHEDULES),
    "max_grad_norm": Real(0, optional=True),        # None or 0: no clipping
    "ema": Bool(),
    "ema_decay": Real(0, 1),
    "ema_on_cpu": Bool(),
    "mixed_precision": Choice(PRECISIONS),
    "gradient_checkpointing": Bool(),
    "cache_latents": Bool(),
    "compile": Bool(),
    "device": Device(optional=True),
    "num_workers": Int(0),
    "center_crop": Bool(flag="--center-crop / --random-crop"),
    "random_flip": Bool(),
    "checkpoint_every": Int(1),
    "keep_last": Int(1),
    "validation_prompts": Texts(optional=True),
    "validation_seeds": Ints(0, SEED_MAX),
    "validation_steps": Int(0),
    "validation_guidance": Real(0),
    "validation_scheduler": Sampler(optional=True),
    "resume": Bool(),
    "export_compvis": Bool(),
    "max_steps_this_run": Int(0, optional=True),
    "progress": Bool(flag="--no-progress"),
    "report_to": Choice(REPORT_TO),
}


def _textual_inversion_needs_its_tokens(c):
    if c.train == "textual-inversion" and not (c.placeholder_token and c.initializer_token):
        return ("--train textual-inversion needs --placeholder-token (the new word, e.g. '<pika>') and "
                "--initializer-token (a word it starts from, e.g. 'pokemon')")


def _tokens_need_textual_inversion(c):
    given = [f for f in ("placeholder_token", "initializer_token") if getattr(c, f) is not None]
    if given and c.train != "textual-inversion":
        return (f"{given[0]} (--{given[0].replace('_', '-')}) is for --train textual-inversion; this run has "
                f"train={c.train!r}")


def _lora_text_encoder_needs_lora(c):
    if c.lora_text_encoder and c.train != "lora":
        return f"lora_text_encoder (--lora-text-encoder) needs train='lora' (--train lora), got train={c.train!r}"


def _conv_lora_needs_the_full_preset(c):
    given = [f for f in ("lora_conv_rank", "lora_conv_alpha") if getattr(c, f) is not None]
    if not given:
        return None
    what = f"{given[0]} (--{given[0].replace('_', '-')}) sets the LoRA of the k×k convolutions"
    if c.train != "lora":
        return f"{what}: it needs train='lora' (--train lora), got train={c.train!r}"
    if c.lora_preset != "full":
        return (f"{what}: it needs lora_preset='full' (--lora-preset full); preset {c.lora_preset!r} puts no LoRA "
                f"on a k×k convolution")


def _lcm_guidance_range(c):
    if c.lcm_guidance_min > c.lcm_guidance_max:
        return (f"lcm_guidance_min (--lcm-guidance-min) must be <= lcm_guidance_max (--lcm-guidance-max), got "
                f"{c.lcm_guidance_min} and {c.lcm_guidance_max} (equal: a fixed guidance)")


def _lcm_lora_keeps_its_own_ema(c):
    if c.train == "lcm-lora" and c.ema:
        return ("ema (--ema) is not for --train lcm-lora: its EMA is the target network (--lcm-ema-decay), which is "
                "also what it exports")


def _lcm_lora_takes_no_denoising_tweaks(c):
    given = [f for f in ("min_snr_gamma", "noise_offset") if getattr(c, f)]
    if c.train == "lcm-lora" and given:
        return (f"{given[0]} (--{given[0].replace('_', '-')}) tweaks the denoising loss; --train lcm-lora minimises "
                f"the consistency loss (--lcm-loss) and takes neither --min-snr-gamma nor --noise-offset")


def _cache_latents_needs_center_crop(c):
    if c.cache_latents and not c.center_crop:
        return ("cache_latents (--cache-latents) needs center_crop (--center-crop): a cached latent is one fixed "
                "crop (random flips are cached both ways)")


FINETUNE_RULES = [_textual_inversion_needs_its_tokens, _tokens_need_textual_inversion, _lora_text_encoder_needs_lora,
                  _conv_lora_needs_the_full_preset, _lcm_guidance_range, _lcm_lora_keeps_its_own_ema,
                  _lcm_lora_takes_no_denoising_tweaks, _cache_latents_needs_center_crop]


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


__all__ = ["FinetuneConfig", "FINETUNE_FIELDS", "FINETUNE_RULES", "PRESETS", "PRECISIONS", "OPTIMIZERS", "LORA_EXPORTS",
           "UNRELATED_PROMPTS"]
