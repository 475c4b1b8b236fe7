"""`minidiff train-tiny --out DIR [--quick] [--resume]`: the tiny shapes model from scratch (minidiff.recipes.tiny).

    python -m minidiff.commands.train_tiny ...      the same without the `minidiff` entry point
"""
from __future__ import annotations

import os

# Two threads on two cores that other processes also use: OpenMP's default spin-waiting makes each thread burn its
# core waiting for the other, descheduled one at every barrier (a training step 40x slower). A passive wait
# must be set before torch loads its OpenMP runtime, so it is set here, where the process starts (this module is
# imported only to run the command), before minidiff.recipes.tiny imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import sys  # noqa: E402

from ..recipes.tiny import STAGES, TRAIN_FIELDS, Recipe, train  # noqa: E402
from ..settings import Int  # noqa: E402
from . import check_flags  # noqa: E402

# the flags checked before anything is written: the output folders (the recipe's train() checks them too) and threads
FLAGS_FIELDS = {**TRAIN_FIELDS, "threads": Int(1)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="weights/minidiff-shapes", help="output diffusers folder")
    p.add_argument("--resume", action="store_true", help="continue from the work folder instead of starting over")
    p.add_argument("--data", default=None,
                   help="imagefolder to train on (written there with make_dataset if it has no metadata.jsonl; "
                        "default: <work>/data)")
    p.add_argument("--quick", action="store_true", help="a very short run of every stage (smoke test, < 60 s)")
    p.add_argument("--work", default=None, help="work folder for checkpoints (default: <out>.work beside --out)")
    p.add_argument("--stop-after", default=None, choices=STAGES[:-1], help="stop after this stage (resume later)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--no-eval", action="store_true", help="skip the text-to-image evaluation at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    check_flags(args, FLAGS_FIELDS)
    import torch
    torch.set_num_threads(args.threads)
    recipe = Recipe.quick() if args.quick else Recipe()
    command = "minidiff train-tiny " + " ".join(
        [f"--out {args.out}"] + (["--quick"] if args.quick else []) + ([f"--data {args.data}"] if args.data else []))
    train(args.out, recipe, work=args.work, data=args.data, resume=args.resume, stop_after=args.stop_after,
          progress=not args.no_progress, evaluate=not args.no_eval, command=command)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="minidiff train-tiny", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
