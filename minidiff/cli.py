"""The `minidiff` command line: `minidiff SUBCOMMAND ...` or `python -m minidiff SUBCOMMAND ...`.

Each subcommand is a module of minidiff/commands/ (the only place with argparse); it exposes `add_arguments(parser)` and
`run(args)`. The table below is the whole wiring: modules are imported only when their subcommand runs,
so `minidiff --help` stays fast.

Errors, once for every command (`run`): the errors minidiff raises on purpose (minidiff.errors: bad input refused at
the door, a file that is not a model, a missing package, NaN during sampling or training) and the system's answers
about a path the user gave (no such file, not a folder, permission denied, ...) are printed as one line,
`minidiff COMMAND: error: MESSAGE`, naming the flag, and the command exits 2 — argparse's convention for its own
usage errors. Any other exception is a bug of ours and keeps its traceback, so it can be reported. A warning from
minidiff's own code (a dataset's skipped image) is printed as one line too: `minidiff COMMAND: warning: ...`.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

from .errors import is_clear, one_line

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
    with short_warnings(cmd.prog):
        try:
            return module.run(args) or 0
        except Exception as e:
            if not is_clear(e):
                raise                                    # a bug of ours: its traceback is what to report
            print(f"{cmd.prog}: error: {error_line(e, cmd, getattr(module, 'FLAGS', {}))}", file=sys.stderr)
            return 2


def error_line(e: BaseException, parser: argparse.ArgumentParser, flags: dict) -> str:
    """The one line a clear error is printed as: its message, and the flag it is about when the message does not
    name it yet. The flag of an InputError's field: the command's FLAGS[field] (a flag named otherwise than the
    library's argument, e.g. generate's --guidance for guidance_scale), else the option whose dest is the field."""
    text = one_line(e)
    field = getattr(e, "field", None)
    flag = flags.get(field) or next((a.option_strings[-1] for a in parser._actions
                                     if a.dest == field and a.option_strings), None)
    return f"{text} ({flag})" if flag and flag not in text else text


@contextmanager
def short_warnings(prog: str):
    """While a command runs, a warning raised by minidiff's own code is one line `PROG: warning: MESSAGE` (Python's
    default adds the file, the line and its source); warnings from other packages keep Python's format."""
    package = str(Path(__file__).resolve().parent)
    default = warnings.formatwarning

    def short(message, category, filename, lineno, line=None):
        if str(Path(filename).resolve()).startswith(package):
            return f"{prog}: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = short
    try:
        yield
    finally:
        warnings.formatwarning = default


if __name__ == "__main__":
    sys.exit(main())
