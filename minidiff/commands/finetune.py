"""`minidiff finetune --data DIR --output OUT [--train unet|last-up-blocks|lora|textual-inversion|lcm-lora] ...`:
the command line of minidiff.train (see docs/finetuning.md). Every flag is a FinetuneConfig field with '_' written '-'.

Bad input: the flags become a FinetuneConfig, whose door (FINETUNE_FIELDS, FINETUNE_RULES) refuses what the API
refuses, with the same message; train() looks at the paths, the device and a --resume's checkpoint before any work.
minidiff/cli.py prints the error as one line."""
from __future__ import annotations

import argparse
import dataclasses
import os

from ..lora import LORA_PRESETS
from ..train.consistency import LCM_LOSSES
from ..train import train
from ..train.config import PRECISIONS, PRESETS, FinetuneConfig
from ..train.optim import LR_SCHEDULES
from ..train.reports import REPORT_TO
from ..train.trainable import TRAIN_MODES
from . import SCHEDULER_HELP, read_prompt_file, scheduler_name, seed_list


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
    opt("--train", choices=TRAIN_MODES,
        help="the whole U-Net, its last N up-blocks, LoRA adapters, a new word (textual inversion), or a LoRA "
             "distilled for 1-8 step LCM sampling (lcm-lora)")
    opt("--up-blocks", type=int, help="with --train last-up-blocks: N, counted from the output end")
    opt("--lora-preset", choices=tuple(LORA_PRESETS),
        help="with --train lora: where LoRA goes (LyCORIS' presets): attn-only = the attention projections; "
             "attn-mlp = + the transformers' feed-forward and proj_in/proj_out; full = + the ResNet convolutions, "
             "time_emb_proj, the down/up-samplers, conv_in/conv_out and the time embedding (LoCon)")
    opt("--lora-rank", type=int, help="with --train lora: the rank r of every Linear and 1×1 conv")
    opt("--lora-alpha", type=float, help="with --train lora: α in ΔW = α/r · B A; none: α = r")
    opt("--lora-conv-rank", type=int,
        help="with --lora-preset full: the rank of the k×k convolutions (kohya's conv_dim); none: --lora-rank")
    opt("--lora-conv-alpha", type=float,
        help="with --lora-preset full: their α (kohya's conv_alpha); none: --lora-alpha")
    opt("--lora-export", choices=("merge", "separate"),
        help="merge: LoRA folded into OUT's weights; separate: the same, plus the LoRA alone for the base model: "
             "OUT/lora.safetensors (diffusers/PEFT: load_lora_weights, minidiff.lora.apply_lora) and "
             "OUT/lora_kohya.safetensors (kohya: AUTOMATIC1111, ComfyUI)")
    opt("--lora-text-encoder", action=argparse.BooleanOptionalAction,
        help="with --train lora: LoRA on the text encoder too (its attention projections, and its MLP but for "
             "--lora-preset attn-only)")
    opt("--placeholder-token", help="with --train textual-inversion: the new word, e.g. '<pika>' (not yet a word "
                                    "of the vocabulary); write it into the captions")
    opt("--initializer-token", help="with --train textual-inversion: one existing word the new one starts from")
    opt("--num-vectors", type=int, help="with --train textual-inversion: vectors the new word stands for")
    g = parser.add_argument_group("latent consistency distillation (--train lcm-lora; docs/few_steps.md)")
    opt("--lcm-skip", type=int, help="k: the teacher's DDIM step from t to t − k, in training timesteps; the "
                                     "sampler's grid has T/k points (LCMScheduler's original_inference_steps)")
    opt("--lcm-guidance-min", type=float, help="the teacher's guidance scale s ~ U[min, max], as generate's "
                                               "guidance_scale (LCM's ω = s − 1)")
    opt("--lcm-guidance-max", type=float, help="... its upper end (= min: a fixed guidance)")
    opt("--lcm-loss", choices=LCM_LOSSES, help="the consistency distance: pseudo-Huber or squared error")
    opt("--lcm-huber-c", type=float, help="c of the pseudo-Huber distance √(d² + c²) − c")
    opt("--lcm-ema-decay", type=float, help="μ of the target network θ⁻ ← μθ⁻ + (1 − μ)θ, the EMA of the LoRA that "
                                            "is also exported (0: the student itself)")
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
    opt("--compile", action=argparse.BooleanOptionalAction,
        help="compile the U-Net's forward and backward (torch.compile, inductor; CUDA graphs on one GPU "
             "with --grad-accum 1)")
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
    g.add_argument("--validation-seeds", default=S, type=seed_list, help="comma-separated seeds (default: 0)")
    opt("--validation-steps", type=int, help="sampler steps of the validation images (0 = no validation)")
    opt("--validation-guidance", type=float, help="guidance scale of the validation images")
    opt("--validation-scheduler", type=scheduler_name, metavar="NAME",
        help=f"validation sampler, {SCHEDULER_HELP} (none: the model's own, PNDM for SD v1)")
    opt("--resume", action="store_true", help="continue from the last checkpoint in --output up to --steps")
    opt("--export-compvis", action="store_true", help="also write OUT/model.safetensors in the CompVis layout")
    opt("--max-steps-this-run", type=int,
        help="stop after this many steps in this invocation, without export (time-boxed jobs; resume later)")
    opt("--report-to", choices=REPORT_TO, help="tensorboard: event files in OUT/tensorboard (needs tensorboard)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=S, help="no progress bar")


def _show(v):
    return "none" if v is None else ",".join(map(str, v)) if isinstance(v, (tuple, list)) else v


def config_from_args(args) -> FinetuneConfig:
    given = {k: v for k, v in vars(args).items() if k != "preset"}
    if "validation_prompts" in given:
        given["validation_prompts"] = read_prompt_file(given["validation_prompts"], "--validation-prompts")
    if given.get("max_grad_norm") == 0:
        given["max_grad_norm"] = None
    base = PRESETS[args.preset] if getattr(args, "preset", None) else {}
    return FinetuneConfig(**{**base, **given})


def run(args) -> int:
    result = train(config_from_args(args))
    if result["finished"] and int(os.environ.get("RANK", "0")) == 0:
        print(f"fine-tuned model written to {result['output']} (step {result['step']}, last loss "
              f"{result['loss']:.4f})")
    return 0
