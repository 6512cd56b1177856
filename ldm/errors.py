"""User errors and the one place that turns them into what a command line prints.

A *user error* is a problem with what the user gave: a missing or unreadable file, a checkpoint of the wrong
family, a bad data row, an impossible flag. It is reported as one line, `error: <what, naming the file>`, and exit
status 2; anything else is a bug and keeps its traceback. Every command line runs through `command_line`, so a
new error type cannot slip past one script: it only has to subclass `UserError`.

Library errors that a user's file or environment causes are user errors too: an `OSError` that names a file
(not found, permission denied, a folder where a file should be, a full disk) and PIL's refusal of an image
too large to decode safely. Set `CONTROLNET_DEBUG=1` (or pass `--debug`) to see the traceback of a user error.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import sys
from collections.abc import Callable, Sequence

#: Exit status of a user error (argparse uses 2 for bad flags too).
USER_ERROR_STATUS = 2
DEBUG_FLAG = "--debug"
DEBUG_ENV = "CONTROLNET_DEBUG"
#: For each command's --help.
DEBUG_HELP = f"errors in your input are reported in one line; {DEBUG_FLAG} (or {DEBUG_ENV}=1) shows their traceback"
#: `OSError`s that say something about the user's files or machine, not about this code.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.ENOSPC,
                                errno.EROFS, errno.EEXIST, errno.ENAMETOOLONG, errno.EDQUOT})


class UserError(Exception):
    """A problem with the user's input, reported as one line; not a bug."""


class InputError(UserError, ValueError):
    """A bad value: a flag, a setting, the content of a file."""


class MissingFileError(UserError, FileNotFoundError):
    """A file the user named (or that a step needs) is not there; the message says what to put where."""


class OutputExistsError(UserError, FileExistsError):
    """An output would replace an existing file."""


class TrainingDiverged(UserError, FloatingPointError):
    """The loss, the gradients or the weights became non-finite: training stops before anything is lost.

    A user error in the sense that the settings (learning rate, precision) caused it; the message says at which
    step, and the training script adds which checkpoint is the last finite one.
    """


def one_line(err: BaseException) -> str:
    """The first line of an error's message, without terminal colour codes (torch styles some of its messages).

    An error raised in a DataLoader worker reaches the main process as "Caught X in DataLoader worker process N"
    followed by the worker's traceback, whose last line is the original message: that line is the one shown.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.splitlines()[-1]
        return re.sub(r"^[\w.]+: ", "", last, count=1)
    return text.splitlines()[0] if text else type(err).__name__


def user_message(err: BaseException) -> str | None:
    """The one line to print for a user error, or None when `err` is a bug (or an exit) to pass on."""
    if isinstance(err, UserError):
        return one_line(err)
    if isinstance(err, OSError) and err.errno in ENVIRONMENT_ERRNOS:
        where = err.filename if err.filename is not None else "a file"
        reason = err.strerror or one_line(err)
        return f"{where}: {reason}" if err.filename is not None else f"{reason} ({where})"
    if type(err).__name__ == "DecompressionBombError":  # PIL: an image too large to decode safely
        return one_line(err)
    return None


def _debugging(argv: list[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def command_line(main: Callable[[list[str] | None], int]) -> Callable[[Sequence[str] | None], int]:
    """Wrap a script's `main(argv) -> exit status`: a user error prints `error: ...` on stderr and returns 2.

    `--debug` is taken out of `argv` before `main` sees it; with it (or `CONTROLNET_DEBUG=1`) user errors
    raise as they are. Ctrl-C ends the command with status 130 and no traceback.
    """

    @functools.wraps(main)
    def run(argv: Sequence[str] | None = None) -> int:
        args = list(sys.argv[1:] if argv is None else argv)
        debug = _debugging(args)
        args = [a for a in args if a != DEBUG_FLAG]
        try:
            return main(args)
        except KeyboardInterrupt:
            if debug:
                raise
            print("interrupted", file=sys.stderr)
            return 130
        except Exception as err:
            message = user_message(err)
            if message is None or debug:
                raise
            print(f"error: {message}", file=sys.stderr)
            return USER_ERROR_STATUS

    return run
