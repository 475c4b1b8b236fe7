"""`minidiff compare --tuned OUT [--base M] ...`: base vs fine-tuned, the same prompts and seeds side by side
(minidiff.compare). compare() checks its settings (COMPARE_FIELDS) before any model loads; --out and the prompt
file are checked here first."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..settings import Output
from . import SCHEDULER_HELP, check_flags, read_prompt_file, scheduler_name, seed_list

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
FLAGS = {"negative_prompt": "--negative"}
FLAGS_FIELDS = {"out": Output("file")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default=None, help="the model before fine-tuning (default: the embedded tiny model)")
    p.add_argument("--tuned", required=True, help="the fine-tuned model (e.g. minidiff finetune's --output folder)")
    p.add_argument("--prompts", default=None,
                   help="a text file, one prompt per line (default: the monograph's 15 prompts, "
                        "minidiff/prompts/monograph.txt)")
    p.add_argument("--seeds", default=(0, 1), type=seed_list,
                   help="comma-separated seeds, one pair of columns each (default: 0,1)")
    p.add_argument("--out", default="compare.png", help="output PNG (default: compare.png)")
    p.add_argument("--steps", type=int, default=50, help="sampler steps (default: 50)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default: 7.5)")
    p.add_argument("--scheduler", default=None, type=scheduler_name, metavar="NAME",
                   help=f"sampler, {SCHEDULER_HELP} (default: the model's own, from its scheduler_config.json: "
                        "PNDM for SD v1)")
    p.add_argument("--negative", default=None, help="negative prompt for every image")
    p.add_argument("--height", type=int, default=None, help="image height (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="image width (default: the model's)")
    p.add_argument("--cell", type=int, default=None,
                   help="cell side in the grid, px (default: the image size; tiny images enlarged to >= 128)")
    p.add_argument("--labels", default="base,tuned", help="the two column names (default: base,tuned)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="weights dtype (default: fp32)")


def run(args) -> int:
    import torch

    from ..compare import compare, read_prompts
    from ..errors import InputValueError
    from ..files import atomic_write

    check_flags(args, FLAGS_FIELDS)
    labels = tuple(s.strip() for s in args.labels.split(","))
    if len(labels) != 2:
        raise InputValueError(f"--labels needs two names separated by a comma, got {args.labels!r}", field="labels")
    prompts = read_prompt_file(args.prompts, "--prompts") if args.prompts else read_prompts()
    title = (f"{labels[0]}: {args.base or 'embedded model'}   {labels[1]}: {args.tuned}   "
             f"({args.scheduler or 'its own sampler'}, {args.steps} steps, guidance {args.guidance})")
    grid = compare(args.base, args.tuned, prompts, args.seeds, steps=args.steps, guidance=args.guidance,
                   scheduler=args.scheduler, height=args.height, width=args.width, negative_prompt=args.negative,
                   device=args.device, dtype=getattr(torch, DTYPES[args.dtype]), labels=labels, cell=args.cell,
                   title=title)
    out = Path(args.out)
    atomic_write(out, lambda tmp: grid.save(tmp, format="PNG"))
    print(out)
    return 0
