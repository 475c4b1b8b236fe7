"""The one safe reader of weights files: every model, LoRA and embedding file minidiff opens goes through here.

    .safetensors            tensors and a string header, no code: read with safetensors
    .ckpt .bin .pt .pth     a pickle: read with torch's weights-only unpickler, which builds tensors, dicts, lists,
                            strings and numbers, and the few classes on the allow-list below, and runs no code

A pickle that needs anything else is refused with a message that says so; `unsafe_pickle=True` (for a file the user
trusts) unpickles it the ordinary way, which can run any code the file holds. Nothing here knows what the tensors
mean: minidiff/checkpoint.py, minidiff/formats/lora.py and minidiff/formats/embeddings.py read their files with it.
"""
from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open

from ..errors import InputValueError

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
# what a file that is there but cannot be read raises from torch.load: truncated, corrupt, not a pickle
UNREADABLE = (RuntimeError, EOFError, zipfile.BadZipFile, OSError)


class CheckpointError(InputValueError):
    """A file or folder that is not a loadable SD v1 model or weights file; the message names the file and the
    first bad key. (minidiff.CheckpointError; minidiff/checkpoint.py raises it for everything it refuses.) An InputError
    (minidiff/errors.py): the commands print it as one line."""


# --------------------------------------------------------------------------------------------------- the allow-list
class _LightningCallbackStub(dict):
    """Stands in for pytorch_lightning's ModelCheckpoint, which the 2022 CompVis .ckpt files name in their
    `callbacks` entry. It lets those files load with torch's weights-only unpickler, which runs no code."""

    def __setstate__(self, state):
        self.update(state if isinstance(state, dict) else {"state": state})


def _safe_extras():
    """The classes the weights-only unpickler may build beyond its own: the Lightning stub above, and numpy's dtypes
    and scalars (the 2022 files hold numpy numbers in their training notes). None of them runs code."""
    import numpy as np
    extras = [(_LightningCallbackStub, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
              np.dtype, np._core.multiarray.scalar,  # numpy 2's name, and numpy 1's (the 2022 files):
              (np._core.multiarray.scalar, "numpy.core.multiarray.scalar")]
    extras += [type(np.dtype(c)) for c in "?bhilqBHILQefdg"]  # numpy's per-dtype classes (numpy.dtypes.Float64DType ...)
    return extras


def unpickle(path, unsafe_pickle: bool = False):
    """The object a pickle holds, read with torch's weights-only unpickler and the allow-list (unsafe_pickle=True:
    torch's full unpickler, with a warning). Raises pickle.UnpicklingError for a pickle that needs more, and one of
    UNREADABLE for a file that is not a readable pickle; the callers turn these into their own errors."""
    if unsafe_pickle:
        warnings.warn(f"{path}: unpickling with weights_only=False runs any code the file contains")
        return torch.load(path, map_location="cpu", weights_only=False)
    with torch.serialization.safe_globals(_safe_extras()):
        return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------------------------------- state_dicts
def read_state_dict(path, unsafe_pickle: bool = False) -> tuple[dict, dict]:
    """One weights file -> (state_dict, metadata): the tensors by name and the safetensors header ({} for a pickle;
    a pickle holding {"state_dict": ...}, as the CompVis files do, gives that dict). CheckpointError for a file
    that is missing, empty, of an unknown type, unreadable, or not a dict of tensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            return load_file(str(path)), metadata
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    if path.suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: unknown weights file type {path.suffix!r} "
                              f"(expected .safetensors or one of {', '.join(PICKLE_SUFFIXES)})")
    try:
        obj = unpickle(path, unsafe_pickle)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: the pickle needs more than plain tensors to load (it may run arbitrary code). "
            f"Pass unsafe_pickle=True only if you trust where this file came from. Detail: {str(e).splitlines()[0]}"
        ) from None
    except UNREADABLE as e:
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): {e}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state_dict (a dict of tensors), got {type(obj).__name__}")
    return obj, {}


__all__ = ["PICKLE_SUFFIXES", "UNREADABLE", "CheckpointError", "unpickle", "read_state_dict"]
