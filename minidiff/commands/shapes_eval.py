"""`minidiff shapes-eval`: generate 8 seeds × 18 prompts with a shapes model and judge them with the pixel detector
(minidiff.shapes_eval) — the evaluation behind the tiny model's card."""
from __future__ import annotations

import argparse
import json

from ..files import atomic_write
from ..settings import Existing, Int, Output, Real
from ..shapes_eval import EVAL, evaluate, format_report, samples_grid
from . import SCHEDULER_HELP, check_flags, load_model, scheduler_name

FLAGS = {"guidance_scale": "--guidance"}
# the flags checked before the model loads; generate()'s door checks the sampler settings against the model
FLAGS_FIELDS = {
    "model": Existing(what="a diffusers folder or a CompVis .ckpt/.safetensors file", optional=True),
    "steps": Int(1),
    "guidance": Real(0),
    "seeds": Int(1),
    "grid": Output("file", optional=True),
    "json": Output("file", optional=True),
    "threads": Int(1),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="a diffusers folder (default: the committed weights/minidiff-shapes)")
    p.add_argument("--steps", type=int, default=EVAL["steps"], help="sampler steps")
    p.add_argument("--scheduler", default=EVAL["scheduler"], type=scheduler_name, metavar="NAME",
                   help=f"the sampler: {SCHEDULER_HELP}")
    p.add_argument("--guidance", type=float, default=EVAL["guidance_scale"], help="classifier-free guidance scale")
    p.add_argument("--seeds", type=int, default=len(EVAL["seeds"]), help="seeds 0..N-1 per prompt")
    p.add_argument("--grid", default=None, help="write the images as a PNG grid (one row per prompt)")
    p.add_argument("--json", default=None, help="write the numbers as JSON")
    p.add_argument("--threads", type=int, default=2, help="torch threads")


def run(args) -> int:
    check_flags(args, FLAGS_FIELDS)
    import torch
    torch.set_num_threads(args.threads)
    pipe = load_model(args.model)
    r = evaluate(pipe, seeds=tuple(range(args.seeds)), steps=args.steps, scheduler=args.scheduler,
                 guidance_scale=args.guidance)
    print(format_report(r))
    if args.grid:
        grid = samples_grid(r)
        atomic_write(args.grid, lambda tmp: grid.save(tmp, format="PNG"))
        print(f"grid: {args.grid}")
    if args.json:
        keep = {k: v for k, v in r.items() if k not in ("images", "judgements")}
        atomic_write(args.json, json.dumps(keep, indent=2) + "\n")
    return 0
