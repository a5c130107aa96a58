"""User errors: one line on stderr (`error: what, how to fix`), exit 2, from rank 0 only; a traceback only with --debug.

Stages raise what they raise (ValueError for bad values, FileNotFoundError for missing paths, UserError where the
message is written for the user); `run` is the one place that turns those into the one-line form. Everything else
(a bug, an OOM, a NCCL timeout) keeps its traceback: hiding those would hide the cause.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

EXIT_USAGE = 2
DEBUG_ENV = "BIOBERT_DEBUG"
_RANK_VARS = ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


class UserError(ValueError):
    """A mistake in what the user gave (paths, config, data), with a message written for them: one line, exit 2."""


# Exceptions whose message is meant for the user. OSError covers missing files, permissions, not-a-directory.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


def debug_requested(argv: list[str] | None = None) -> bool:
    return "--debug" in (sys.argv[1:] if argv is None else argv) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def strip_debug(argv: list[str]) -> list[str]:
    return [a for a in argv if a != "--debug"]


def is_rank_zero() -> bool:
    """From the launcher's environment: torch.distributed may not be up (or may be what failed)."""
    for var in _RANK_VARS:
        if var in os.environ:
            return os.environ[var].strip() in ("0", "")
    return True


def one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
        text = f"{e.filename}: {text}"
    if isinstance(e, KeyError):
        text = text.strip("'\"")
    return "error: " + " ".join(text.split())  # one line, whatever the message's own layout


def run(fn: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """Call ``fn(argv)``; user errors -> one line + exit 2 (rank 0 prints), ``--debug`` -> re-raise with traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    try:
        rc = fn(strip_debug(argv))
    except USER_ERRORS as e:
        if debug:
            raise
        if is_rank_zero():
            print(one_line(e), file=sys.stderr, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    return 0 if rc is None else int(rc)
