"""The `minidiff` command line: `minidiff SUBCOMMAND ...` or `python -m minidiff SUBCOMMAND ...`.

Each subcommand is a module of minidiff/commands/ (the only place with argparse); it exposes `add_arguments(parser)` and
`run(args)`. The table below is the whole wiring: modules are imported only when their subcommand runs,
so `minidiff --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import sys
from pathlib import Path

SUBCOMMANDS = {
    # name:         (module,                      one-line help)
    "generate":     ("minidiff.commands.generate", "text-to-image with the embedded default model or any SD v1 model"),
    "train-tiny":   ("minidiff.commands.train_tiny", "train the tiny shapes model (VAE, CLIP, U-Net) from scratch on the CPU"),
    "data":         ("minidiff.commands.data",     "build a dataset folder (imagefolder + metadata.jsonl)"),
    "annotate":     ("minidiff.commands.annotate", "review and edit captions in a local web page"),
    "finetune":     ("minidiff.commands.finetune", "fine-tune an SD v1 model on a captioned image folder"),
    "compare":      ("minidiff.commands.compare",  "render a base-vs-tuned comparison grid"),
    "shapes-eval":  ("minidiff.commands.shapes_eval", "judge a shapes model's images with the pixel detector"),
    "serve":        ("minidiff.commands.serve",    "a web page and the AUTOMATIC1111 API (/sdapi/v1) on one job queue"),
}


def runtime_dependencies() -> list[str]:
    """What pip installs for minidiff (pyproject.toml's [project] dependencies), read from the installed package's
    metadata; extras and platform-conditional requirements are left out. A checkout run without `pip install`
    has no metadata: its pyproject.toml is read instead (Python >= 3.11), else only torch is checked."""
    from importlib import metadata
    try:
        requirements = metadata.requires("minidiff") or []
    except metadata.PackageNotFoundError:
        requirements = _checkout_requirements()
    names = [re.match(r"[A-Za-z0-9._-]+", r.strip()).group() for r in requirements if ";" not in r]
    return names or ["torch"]


def _checkout_requirements() -> list[str]:
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        import tomllib
        return tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["dependencies"]
    except (ImportError, OSError, ValueError, KeyError):
        return []


def import_name(requirement: str) -> str:
    """pip's name -> the module it installs ("pillow" -> "PIL"): one of the top-level modules an installed
    distribution lists (top_level.txt, else the packages in its file list), its own name when that is one of them;
    a distribution that is not installed is looked for under its own name (and not found)."""
    from importlib import metadata
    guess = requirement.lower().replace("-", "_")
    try:
        dist = metadata.distribution(requirement)
    except metadata.PackageNotFoundError:
        return guess
    top = (dist.read_text("top_level.txt") or "").split() or sorted(
        {f.parts[0] for f in dist.files or [] if len(f.parts) == 2 and f.parts[1] == "__init__.py"} |
        {f.stem for f in dist.files or [] if len(f.parts) == 1 and f.suffix == ".py"})
    return guess if not top or guess in top else top[0]


def missing_dependency_message(requirement: str) -> str:
    """What to tell someone whose Python lacks one of minidiff's runtime dependencies (pip's name of it)."""
    what = requirement.lower()
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
    missing = [r for r in runtime_dependencies() if not _importable(import_name(r))]  # find_spec: nothing is imported
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
