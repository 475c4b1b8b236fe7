"""Atomic writes — the one helper every file minidiff writes goes through.

A reader (or a `kill -9` in the middle of a save) must see the old file or the new one, never half of one. The
recipe is the same everywhere: write to a temporary name in the SAME folder (a rename is only atomic within one
file system), flush and fsync so the bytes are on disk, then `os.replace` the temporary onto the final name — one
atomic step on POSIX and Windows. On any error the temporary is removed and the old file is left as it was.

    atomic_write(path, "text")                               # str -> UTF-8 text
    atomic_write(path, b"bytes")                             # bytes
    atomic_write(path, lambda tmp: torch.save(obj, tmp))     # anything that writes a file at a path it is given
    with atomic_dir(path) as tmp: ...write files into tmp... # a whole folder, swapped in at the end
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Union

Content = Union[str, bytes, Callable[[Path], object]]


def atomic_write(path, content: Content, mode: int | None = None) -> Path:
    """Write `content` to `path` atomically (see the module docstring). The folder is created if needed.

    content: a str (written as UTF-8 with "\\n" line ends), bytes, or a function called with the temporary path
    that writes the file there (torch.save, safetensors' save_file, PIL's Image.save, ...).
    mode: the file's permission bits; default: the old file's, or 0o644 for a new one. Returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode is None:
        mode = (path.stat().st_mode & 0o777) if path.exists() else 0o644
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        if callable(content):
            os.close(fd)
            content(tmp)
        else:
            data = content.encode("utf-8") if isinstance(content, str) else bytes(content)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        with open(tmp, "rb+") as f:        # the bytes are on disk before the rename makes them visible
            os.fsync(f.fileno())
        os.chmod(tmp, mode)                # mkstemp makes 0600
        os.replace(tmp, path)              # the atomic step
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@contextmanager
def atomic_dir(path):
    """`with atomic_dir(path) as tmp:` write a folder's files into `tmp`; on success `tmp` replaces `path` as a whole
    (the old folder is moved aside, the new one renamed in, the old one deleted), on an error `path` is untouched.
    Between the two renames a crash leaves `.NAME.old` beside a missing `path`; nothing half-written is ever at
    `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = ["atomic_write", "atomic_dir"]
