"""The `minidiff` command line: `minidiff SUBCOMMAND ...` or `python -m minidiff SUBCOMMAND ...`.

Each subcommand is a module of minidiff/commands/ (the only place with argparse); it exposes `add_arguments(parser)` and
`run(args)`. The table below is the whole wiring: modules are imported only when their subcommand runs,
so `minidiff --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

SUBCOMMANDS = {
    # name:         (module,                      one-line help)
    "generate":     ("minidiff.commands.generate", "text-to-image with the embedded default model or any SD v1 model"),
    "train-tiny":   ("minidiff.commands.train_tiny", "train the tiny shapes model (VAE, CLIP, U-Net) from scratch on the CPU"),
    "data":         ("minidiff.commands.data",     "build a dataset folder (imagefolder + metadata.jsonl)"),
    "annotate":     ("minidiff.commands.annotate", "review and edit captions in a local web page"),
    "finetune":     ("minidiff.commands.finetune", "fine-tune an SD v1 model on a captioned image folder"),
    "compare":      ("minidiff.commands.compare",  "render a base-vs-tuned comparison grid"),
    "serve":        ("minidiff.commands.serve",    "a web page and the AUTOMATIC1111 API (/sdapi/v1) on one job queue"),
}


# import name -> what pip installs it as (pyproject.toml's dependencies)
RUNTIME_DEPENDENCIES = {"torch": "torch", "numpy": "numpy", "einops": "einops", "tokenizers": "tokenizers",
                        "safetensors": "safetensors", "PIL": "pillow", "tqdm": "tqdm"}


def missing_dependency_message(module: str) -> str:
    """What to tell someone whose Python lacks one of minidiff's runtime dependencies."""
    what = RUNTIME_DEPENDENCIES[module]
    how = ("pip install torch   (for a CPU-only build: pip install torch --index-url "
           "https://download.pytorch.org/whl/cpu)" if what == "torch" else f"pip install {what}")
    return (f"minidiff: error: {what} is not installed in this Python ({sys.executable}); minidiff needs it.\n"
            f"  install it:   {how}\n"
            f"  or, in a checkout of minidiff, run `make demo` (or `make setup`): it installs torch and every "
            f"other dependency, then draws a first image.")


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="minidiff", description="Stable Diffusion v1.4 from scratch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        parser.print_help() if not argv or argv[0] in ("-h", "--help") else parser.error(f"unknown command {argv[0]!r}")
        if not argv and not _importable("torch"):  # a bare `minidiff` is how a new user finds out what is missing
            print("\n" + missing_dependency_message("torch"), file=sys.stderr)
            return 1
        return 0
    name = argv[0]
    missing = [m for m in RUNTIME_DEPENDENCIES if not _importable(m)]  # find_spec only: nothing heavy is imported
    if missing:
        print(missing_dependency_message(missing[0]), file=sys.stderr)
        return 1
    module = importlib.import_module(SUBCOMMANDS[name][0])
    cmd = argparse.ArgumentParser(prog=f"minidiff {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(cmd)
    args = cmd.parse_args(argv[1:])
    return module.run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
