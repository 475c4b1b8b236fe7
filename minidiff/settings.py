"""The door for settings: a run's whole configuration (FinetuneConfig, the tiny recipe's Recipe, compare's arguments,
each command's flags) checked before any work — before a model is loaded, a dataset scanned or a folder created.

A settings object is described by a TABLE, one row per field: what it holds (type and range, or the choices), and the
flag that sets it on the command line. The table lives beside the object it describes (FINETUNE_FIELDS beside
FinetuneConfig); this module holds the kinds of row and the two functions that read a table:

    FIELDS = {
        "steps":      Int(0),                     # an int >= 0, flag --steps (the field's name, '_' written '-')
        "lr":         Real(gt=0),                 # a finite number > 0
        "train":      Choice(TRAIN_MODES),
        "resolution": Int(1, optional=True),      # None allowed
        "center_crop": Bool(flag="--center-crop / --random-crop"),
        "data":       Folder(holding="metadata.jsonl"),
        "output":     Output("folder"),
    }
    def needs_tokens(c):                          # a rule between fields: None, or what is wrong
        if c.train == "textual-inversion" and not c.placeholder_token:
            return "--train textual-inversion needs --placeholder-token ..."
    RULES = [needs_tokens]
    check_settings(cfg, FIELDS, RULES)            # types, ranges, choices, then the rules between fields
    check_on_this_machine(cfg, FIELDS)            # paths and devices: what the file system and torch say

A wrong type raises InputTypeError (a TypeError), a right type with a wrong value InputValueError (a ValueError), as
Python's own functions do; both are minidiff.errors.InputError, which every command prints as one line. The message is
validation's: the field, its flag, the value, what is allowed —

    lr must be a finite number > 0, got -1.0 (--lr)
    batch_size must be an int >= 1, got 0 (--batch-size)
    data must be a folder holding metadata.jsonl, got 'nothere': no such file or folder (--data)

check_settings touches nothing outside the object (a config can be built for another machine);
check_on_this_machine asks the file system (does the folder exist? can the output be written?) and torch (is there a
CUDA device?), and runs when the work is about to start. A rule between fields is a function of the object that
returns None (fine) or the message; the rules run after every field passed, so they may trust the types.
"""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import InputTypeError, InputValueError

SEED_MAX = 2 ** 64 - 1  # torch.Generator.manual_seed takes [-2**63, 2**64 - 1]; negatives alias big seeds, so: >= 0


def is_int(v) -> bool:
    """An int, not a bool (True is an int to Python, never a count to a user), not a float that happens to be whole."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def show(v) -> str:
    """A value as an error message shows it: its repr (shortened) and, when that is ambiguous, its type."""
    r = repr(v)
    r = r if len(r) <= 60 else r[:57] + "..."
    plain = isinstance(v, (int, float, str, type(None))) and not isinstance(v, bool)
    return r if plain else f"{r} ({type(v).__name__})"


def _is_path(v) -> bool:
    return isinstance(v, (str, os.PathLike))


def _nonempty_path(v) -> bool:
    return str(v) != ""


# ------------------------------------------------------------------------------------------------ the kinds of row
@dataclass(frozen=True)
class Spec:
    """One row of a settings table.

    allowed:  what the message says is allowed ("an int >= 1"; " or None" is added for an optional field)
    is_type:  the type test (failing it: TypeError); ok: the value test (failing it: ValueError)
    optional: None is allowed too
    flag:     the command-line flag that sets the field; None: "--" + the field's name with '-' for '_';
              "" for a setting no flag sets (the tiny recipe's)
    machine:  a test that asks the file system or torch: value -> None (fine) or what is wrong (check_on_this_machine)
    """
    allowed: str
    is_type: Callable = lambda v: True
    ok: Callable = lambda v: True
    optional: bool = False
    flag: str | None = None
    machine: Callable | None = None


def _range_text(lo=None, hi=None, gt=None, lt=None) -> str:
    low = (f"[{lo}", lo) if lo is not None else (f"({gt}", gt) if gt is not None else None
    high = (f"{hi}]", hi) if hi is not None else (f"{lt})", lt) if lt is not None else None
    if low and high:
        return f" in {low[0]}, {high[0]}"
    if low:
        return f" >= {lo}" if lo is not None else f" > {gt}"
    if high:
        return f" <= {hi}" if hi is not None else f" < {lt}"
    return ""


def _in_range(v, lo=None, hi=None, gt=None, lt=None) -> bool:
    return ((lo is None or v >= lo) and (hi is None or v <= hi) and (gt is None or v > gt)
            and (lt is None or v < lt))


def Int(lo=None, hi=None, *, optional=False, flag=None) -> Spec:
    """An int (not a bool, not a float that happens to be whole) in [lo, hi]."""
    return Spec(f"an int{_range_text(lo, hi)}", is_int, lambda v: _in_range(v, lo, hi),
                optional, flag)


def Real(lo=None, hi=None, *, gt=None, lt=None, optional=False, flag=None) -> Spec:
    """A finite number (int or float, not a bool) in [lo, hi] / (gt, lt); NaN and inf are refused."""
    return Spec(f"a finite number{_range_text(lo, hi, gt, lt)}", is_real,
                lambda v: math.isfinite(v) and _in_range(v, lo, hi, gt, lt), optional, flag)


def Bool(*, flag=None) -> Spec:
    return Spec("True or False", lambda v: isinstance(v, bool), flag=flag)


def Choice(options, *, optional=False, flag=None) -> Spec:
    """One of `options` (strings)."""
    options = tuple(options)
    return Spec(f"one of {', '.join(map(repr, options))}", lambda v: isinstance(v, str),
                lambda v: v in options, optional, flag)


def Text(*, nonempty=True, optional=False, flag=None) -> Spec:
    """A str (a non-empty one unless nonempty=False)."""
    return Spec("a non-empty str" if nonempty else "a str", lambda v: isinstance(v, str),
                lambda v: v != "" or not nonempty, optional, flag)


def Texts(*, n=None, nonempty=False, optional=False, flag=None) -> Spec:
    """A list (or tuple) of str; of n entries when n is given."""
    what = f"a list of {n} str" if n else "a non-empty list of str" if nonempty else "a list of str"
    return Spec(what,
                lambda v: isinstance(v, (list, tuple)) and all(isinstance(s, str) for s in v),
                lambda v: (n is None or len(v) == n) and (not nonempty or len(v) > 0), optional, flag)


def Ints(lo=None, hi=None, *, nonempty=True, optional=False, flag=None) -> Spec:
    """A list (or tuple) of ints in [lo, hi]."""
    what = f"a {'non-empty ' if nonempty else ''}list of ints{_range_text(lo, hi)}"
    return Spec(what, lambda v: isinstance(v, (list, tuple)) and all(is_int(i) for i in v),
                lambda v: (len(v) > 0 or not nonempty) and all(_in_range(i, lo, hi) for i in v), optional, flag)


def Bools(*, flag=None) -> Spec:
    return Spec("a list of True/False", lambda v: isinstance(v, (list, tuple)) and all(isinstance(b, bool) for b in v),
                lambda v: len(v) > 0, flag=flag)


def Sampler(*, optional=False, flag=None) -> Spec:
    """A sampler name minidiff.schedulers.resolve knows (minidiff's or AUTOMATIC1111's, any case)."""
    def ok(v):
        from .schedulers import resolve
        try:
            resolve(v)
            return True
        except ValueError:
            return False
    return Spec("a sampler name such as 'ddim', 'euler_a' or 'DPM++ 2M Karras'",
                lambda v: isinstance(v, str), ok, optional, flag)


# ---- paths and devices: their type is checked with the rest, what they point at by check_on_this_machine
def _where(path) -> str | None:
    """None when `path` exists; else why not, naming the first part of it that is missing or not a folder."""
    p = Path(path)
    if p.exists():
        return None
    for parent in [*reversed(p.parents)][1:] + [p]:   # the first ancestor that is missing or is a file
        if parent.exists() and not parent.is_dir():
            return f"{str(parent)!r} is a file, not a folder"
        if not parent.exists():
            break
    return "no such file or folder"


def Folder(*, holding: str | None = None, optional=False, flag=None) -> Spec:
    """An existing folder (holding the file `holding`, e.g. an imagefolder's metadata.jsonl)."""
    def machine(v):
        p = Path(v)
        if not p.is_dir():
            return _where(p) or "a file, not a folder"
        if holding and not (p / holding).is_file():
            return f"no {holding} in it"
        return None
    what = f"a folder holding {holding}" if holding else "an existing folder"
    return Spec(what, _is_path, _nonempty_path, optional, flag, machine)


def File(*, what: str = "an existing file", optional=False, flag=None) -> Spec:
    """An existing file."""
    def machine(v):
        p = Path(v)
        if p.is_dir():
            return "a folder, not a file"
        return _where(p) if not p.is_file() else None
    return Spec(what, _is_path, _nonempty_path, optional, flag, machine)


def Existing(*, what: str = "an existing file or folder", optional=False, flag=None) -> Spec:
    """A file or a folder that exists (a model: a diffusers folder or a single file; the loader says more)."""
    return Spec(what, _is_path, _nonempty_path, optional, flag, _where)


def Output(kind: str = "file", *, optional=False, flag=None) -> Spec:
    """A file or folder to be written: it may not exist yet, but it can be — it is not under a file, not the other
    kind of thing, and its nearest existing folder is writable. Nothing is created by the check."""
    def machine(v):
        p = Path(v)
        if p.exists():
            if kind == "folder" and not p.is_dir():
                return "a file, not a folder"
            if kind == "file" and p.is_dir():
                return "a folder, not a file"
            target = p if kind == "folder" else p.parent
        else:
            target = p.parent
            while not target.exists():
                target = target.parent
            if not target.is_dir():
                return f"{str(target)!r} is a file, not a folder"
        if not os.access(target, os.W_OK | os.X_OK):
            return f"{str(target)!r} cannot be written (permission denied)"
        return None
    what = "a folder that can be created or written" if kind == "folder" else "a file that can be written"
    return Spec(what, _is_path, _nonempty_path, optional, flag, machine)


def Device(*, optional=False, flag=None) -> Spec:
    """A torch device this machine has: cpu, cuda, cuda:N (N < the number of GPUs), mps (others as torch names them:
    only CUDA and MPS can be asked whether they are there)."""
    def machine(v):
        import torch
        try:
            d = torch.device(v)
        except (RuntimeError, ValueError, TypeError):
            return "not a device name"
        if d.type == "cuda":
            if not torch.cuda.is_available():
                return "this machine has no CUDA GPU that torch can use (torch.cuda.is_available() is False)"
            if d.index is not None and d.index >= torch.cuda.device_count():
                return f"this machine has {torch.cuda.device_count()} CUDA GPU(s): cuda:0 .. " \
                       f"cuda:{torch.cuda.device_count() - 1}"
        elif d.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            return "this machine has no MPS device"
        return None                                     # cpu, or a device type torch knows and we cannot ask about
    return Spec("a torch device this machine has (cpu, cuda, cuda:N, mps)", lambda v: isinstance(v, str),
                optional=optional, flag=flag, machine=machine)


def Host(*, flag=None) -> Spec:
    """An address this machine can bind a server to: a name it resolves (localhost) or an IP address."""
    def machine(v):
        import socket
        try:
            socket.getaddrinfo(v, None)
        except (socket.gaierror, UnicodeError) as e:
            return f"not an address this machine resolves ({e})"
        return None
    return Spec("a host name or IP address", lambda v: isinstance(v, str), _nonempty_path, flag=flag, machine=machine)


def Port(*, flag=None) -> Spec:
    return Int(0, 65535, flag=flag)


# ------------------------------------------------------------------------------------------------ the door
def flag_of(field: str, spec: Spec) -> str:
    return spec.flag if spec.flag is not None else "--" + field.replace("_", "-")


def _message(field: str, spec: Spec, text: str) -> str:
    flag = flag_of(field, spec)
    return f"{field} {text} ({flag})" if flag else f"{field} {text}"


def check_settings(obj, fields: dict, rules=()) -> None:
    """Check every field of `obj` (an object with these attributes: a dataclass, argparse's Namespace) against its
    row of `fields`, in the table's order, then the rules between fields. Raises InputTypeError / InputValueError
    (see the module doc) for the first that fails. A field the object does not have is skipped (a table may serve
    several commands)."""
    for field, spec in fields.items():
        if not hasattr(obj, field):
            continue
        v = getattr(obj, field)
        if v is None and spec.optional:
            continue
        allowed = f"{spec.allowed} or None" if spec.optional else spec.allowed
        if v is None or not spec.is_type(v):
            raise InputTypeError(_message(field, spec, f"must be {allowed}, got {show(v)}"), field=field)
        if not spec.ok(v):
            raise InputValueError(_message(field, spec, f"must be {allowed}, got {show(v)}"), field=field)
    for rule in rules:
        message = rule(obj)
        if message is not None:
            raise InputValueError(message)


def check_on_this_machine(obj, fields: dict) -> None:
    """The rows that ask the file system or torch (paths, devices): every path is what its field needs and every
    device is there. Call it when the work is about to start (after check_settings). Creates nothing."""
    for field, spec in fields.items():
        v = getattr(obj, field, None)
        if spec.machine is None or v is None:
            continue
        problem = spec.machine(v)
        if problem:
            raise InputValueError(_message(field, spec, f"must be {spec.allowed}, got {str(v)!r}: {problem}"),
                                  field=field)


__all__ = ["Spec", "Int", "Real", "Bool", "Choice", "Text", "Texts", "Ints", "Bools", "Sampler", "Folder", "File",
           "Existing", "Output", "Device", "Host", "Port", "flag_of", "check_settings", "check_on_this_machine",
           "SEED_MAX", "is_int", "is_real", "show"]
