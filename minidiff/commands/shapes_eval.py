"""`python -m minidiff.shapes_eval`: generate 8 seeds × 18 prompts with a shapes model and judge them with the pixel
detector (minidiff.shapes_eval)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..shapes_eval import EVAL, evaluate, format_report, save_grid
from . import SCHEDULER_HELP, scheduler_name


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minidiff.shapes_eval",
                                description="Generate 8 seeds × 18 prompts and judge them with the pixel detector.")
    p.add_argument("--model", default=None, help="a diffusers folder (default: the committed weights/minidiff-shapes)")
    p.add_argument("--steps", type=int, default=EVAL["steps"])
    p.add_argument("--scheduler", default=EVAL["scheduler"], type=scheduler_name, metavar="NAME",
                   help=f"the sampler: {SCHEDULER_HELP}")
    p.add_argument("--guidance", type=float, default=EVAL["guidance_scale"])
    p.add_argument("--seeds", type=int, default=len(EVAL["seeds"]), help="seeds 0..N-1 per prompt")
    p.add_argument("--grid", default=None, help="write the images as a PNG grid (one row per prompt)")
    p.add_argument("--json", default=None, help="write the numbers as JSON")
    args = p.parse_args(argv)

    import torch
    torch.set_num_threads(2)
    import minidiff
    pipe = minidiff.load(args.model)
    r = evaluate(pipe, seeds=tuple(range(args.seeds)), steps=args.steps, scheduler=args.scheduler,
                 guidance_scale=args.guidance)
    print(format_report(r))
    if args.grid:
        save_grid(r["images"], args.grid, ncol=args.seeds)
        print(f"grid: {args.grid}")
    if args.json:
        keep = {k: v for k, v in r.items() if k not in ("images", "judgements")}
        Path(args.json).write_text(json.dumps(keep, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
