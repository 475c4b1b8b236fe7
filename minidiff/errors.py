"""The errors minidiff raises on purpose, and how a command tells them from a bug.

A command that gets bad input must answer with one line that names the flag, the value and what is allowed
(`minidiff finetune: error: lr must be a finite number > 0, got -1.0 (--lr)`), and exit 2 — argparse's convention.
But an exception we did not expect is a bug of ours, and its traceback is what a user can report: it must not be
turned into a tidy line that hides where it came from. Catching ValueError broadly would do exactly that — a
ValueError from deep inside torch or numpy is as much a ValueError as our door's. So the errors that are *meant* for
the user have a class of their own, and the commands (minidiff/cli.py, once for all of them) print only those as one
line:

    MinidiffError                       raised on purpose; the message is the whole story (what, which, what to do)
      InputError                        bad input refused at the door; .field names the argument (None: a file, ...)
        InputValueError (ValueError)    right type, wrong value: out of range, not a choice, a path that is not there
        InputTypeError  (TypeError)     wrong type: "10" where an int belongs
        CheckpointError (ValueError)    formats/weights.py: a file that is not a loadable model or weights file
        ImageLoadError  (OSError)       data/imagefolder.py: an image that cannot be decoded
      SetupError (RuntimeError)         this machine cannot do what was asked: a package or tool is missing, a
                                        download failed, no CUDA GPU for a CUDA-only option (the message says what
                                        to do)
      NonFiniteError (FloatingPointError)  validation.py: sampling turned NaN/inf (names the step)
      TrainingDiverged (RuntimeError)   train/loop.py: the loss turned NaN/inf (names the step, the last checkpoint)

Each keeps the built-in base a Python user expects (`except ValueError` still catches a bad value), so the API is
unchanged; the class only marks intent. Besides these, the operating system's own answers about a path the user
gave — no such file (FileNotFoundError), not a folder (NotADirectoryError), a folder where a file belongs
(IsADirectoryError), no permission (PermissionError), already there (FileExistsError), a port in use, a full disk —
are the user's to fix, not ours, and are printed as one line too (`clear_os_error`). Everything else keeps its
traceback.

This module imports nothing, so every layer may raise these (the format readers and the datasets sit below the door).
"""
from __future__ import annotations

import errno


class MinidiffError(Exception):
    """An error minidiff raises on purpose, with a message that says what is wrong and what to do. The commands print
    it as one line, `minidiff COMMAND: error: MESSAGE`, and exit 2."""


class InputError(MinidiffError):
    """Bad input, refused where it comes in (minidiff.validation, the settings' door, the file readers).

    field: the argument or setting the message is about ("steps", "lr"), or None. A command whose flag has another
    name than the argument (generate's --guidance for guidance_scale) uses it to name its flag."""

    def __init__(self, message: str = "", field: str | None = None):
        super().__init__(message)
        self.field = field


class InputValueError(InputError, ValueError):
    """A value of the right type that is not allowed: out of range, not one of the choices, a missing path, ..."""


class InputTypeError(InputError, TypeError):
    """A value of the wrong type (a str where an int belongs, a bool where a number does)."""


class SetupError(MinidiffError, RuntimeError):
    """What was asked cannot be done on this machine as it is: a package or program is missing, a download failed,
    an option needs hardware that is not there. The message says what to install or change."""


# the operating system's answers about a path or a port the user gave: theirs to fix, printed as one line
CLEAR_OS_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)
CLEAR_ERRNOS = (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.ENOSPC, errno.EROFS, errno.ENAMETOOLONG)


def clear_os_error(e: BaseException) -> bool:
    return isinstance(e, CLEAR_OS_ERRORS) or (isinstance(e, OSError) and e.errno in CLEAR_ERRNOS)


def is_clear(e: BaseException) -> bool:
    """True for the errors a command prints as one line (see the module doc); False for a bug's, which keep their
    traceback."""
    return isinstance(e, MinidiffError) or clear_os_error(e)


def one_line(e: BaseException) -> str:
    """The message of a clear error, on one line. An OSError raised by the system for a path reads
    'PATH: No such file or directory' (not '[Errno 2] No such file or directory: PATH')."""
    if isinstance(e, OSError) and not isinstance(e, MinidiffError) and e.strerror:
        text = e.strerror if e.filename is None else f"{e.filename}: {e.strerror}"
        if e.filename2 is not None:
            text += f" (-> {e.filename2})"
    else:
        text = str(e) or type(e).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())   # one line: the last of stderr


__all__ = ["MinidiffError", "InputError", "InputValueError", "InputTypeError", "SetupError", "CLEAR_OS_ERRORS",
           "clear_os_error", "is_clear", "one_line"]
