"""`minidiff shapes-eval`: generate 8 seeds × 18 prompts with a shapes model and judge them with the pixel detector
(minidiff.shapes_eval) — the evaluation behind the tiny model's card."""
from __future__ import annotations

import argparse
import json
import sys

from ..files import atomic_write
from ..shapes_eval import EVAL, evaluate, format_report, samples_grid
from . import SCHEDULER_HELP, scheduler_name


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
    import torch
    torch.set_num_threads(args.threads)
    import minidiff
    if args.seeds < 1:
        raise SystemExit(f"minidiff shapes-eval: --seeds must be at least 1, got {args.seeds}")
    try:  # a bad model path or sampler setting: one clear line, no traceback
        pipe = minidiff.load(args.model)
        r = evaluate(pipe, seeds=tuple(range(args.seeds)), steps=args.steps, scheduler=args.scheduler,
                     guidance_scale=args.guidance)
    except ValueError as e:
        print(f"minidiff shapes-eval: error: {e}", file=sys.stderr)
        return 2
    print(format_report(r))
    if args.grid:
        grid = samples_grid(r)
        atomic_write(args.grid, lambda tmp: grid.save(tmp, format="PNG"))
        print(f"grid: {args.grid}")
    if args.json:
        keep = {k: v for k, v in r.items() if k not in ("images", "judgements")}
        atomic_write(args.json, json.dumps(keep, indent=2) + "\n")
    return 0
