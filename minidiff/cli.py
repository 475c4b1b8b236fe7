"""The `minidiff` command line: `minidiff SUBCOMMAND ...` or `python -m minidiff SUBCOMMAND ...`.

Each subcommand is a module of minidiff/commands/ (the only place with argparse); it exposes `add_arguments(parser)` and
`run(args)`. The table below is the whole wiring: modules are imported only when their subcommand runs,
so `minidiff --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    # name:         (module,                      one-line help)
    "generate":     ("minidiff.commands.generate", "text-to-image with the embedded default model or any SD v1 model"),
    "train-tiny":   ("minidiff.commands.train_tiny", "train the tiny shapes model (VAE, CLIP, U-Net) from scratch on the CPU"),
    "data":         ("minidiff.commands.data",     "build a dataset folder (imagefolder + metadata.jsonl)"),
    "annotate":     ("minidiff.commands.annotate", "review and edit captions in a local web page"),
    "finetune":     ("minidiff.commands.finetune", "fine-tune an SD v1 model on a captioned image folder"),
    "compare":      ("minidiff.commands.compare",  "render a base-vs-tuned comparison grid"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="minidiff", description="Stable Diffusion v1.4 from scratch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        parser.print_help() if not argv or argv[0] in ("-h", "--help") else parser.error(f"unknown command {argv[0]!r}")
        return 0
    name = argv[0]
    module = importlib.import_module(SUBCOMMANDS[name][0])
    cmd = argparse.ArgumentParser(prog=f"minidiff {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(cmd)
    args = cmd.parse_args(argv[1:])
    return module.run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
