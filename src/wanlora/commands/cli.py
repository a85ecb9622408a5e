"""How every ``wanlora-*`` command reports a user error: one line, exit status 2.

A user error is one whose message already names the file, the field and the fix: a
``ValueError`` (and its subclasses: ``CheckpointError``, ``PromptFileError``, ``LoraFormatError``,
``DatasetConfigError``, ``ConfigFileError``, ...), a ``FileNotFoundError``, or an ``ImportError``
for an optional package (attention kernels, bitsandbytes, matplotlib, LyCORIS). It is printed as
``<prog>: error: <message>`` on stderr, the way argparse prints a flag error, with no traceback;
``WANLORA_TRACEBACK=1`` in the environment re-raises it to show the traceback. Anything else
(a bug, out of memory) propagates with its traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

__all__ = ["USER_ERRORS", "run_cli", "print_user_error"]

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, ImportError)


def run_cli(prog: str, fn: Callable[[Sequence[str] | None], int | None],
            argv: Sequence[str] | None = None) -> int:
    """Run ``fn(argv)`` (a command's body, returning its exit status; ``None`` counts as 0).

    A :data:`USER_ERRORS` exception is printed as ``f"{prog}: error: {message}"`` on stderr and
    gives exit status 2 (re-raised instead when ``WANLORA_TRACEBACK`` is set and not ``0``).
    """
    try:
        rc = fn(argv)
    except USER_ERRORS as e:
        if os.environ.get("WANLORA_TRACEBACK", "0") not in ("", "0"):
            raise
        print_user_error(prog, e)
        return 2
    return 0 if rc is None else int(rc)


def print_user_error(prog: str, error: BaseException) -> None:
    """Print a user error as one line ``<prog>: error: <message>`` on stderr (the line of
    :func:`run_cli`; also each bad line of ``wanlora-generate --interactive``, which goes on)."""
    print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
