"""What every faultline command shares: where it writes, and its exit codes."""

from __future__ import annotations

import os
import sys

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C

output_lost = False
"""Set when stdout could not take a result (a full disk, a closed pipe): the exit code says so."""


def out(text: str) -> None:
    """Results (stdout): what -o json consumers and pipes read. If stdout cannot take them, say
    so once on stderr, never with a traceback: the command itself (a run, its reverts) is done.
    A closed pipe is not reported (the reader, `| head`, stopped on purpose); the exit code still
    says the result did not all reach it."""
    global output_lost
    if output_lost:
        return
    try:
        print(text, flush=True)
    except OSError as exc:
        output_lost = True
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), sys.stdout.fileno())  # Python's own flush at exit must not fail too
        if not isinstance(exc, BrokenPipeError):  # a reader that stopped reading (`| head`) knows it did
            err(f"faultline: could not write the result to stdout ({exc.strerror or exc})")


def err(text: str) -> None:
    """Progress, hints and errors (stderr)."""
    print(text, file=sys.stderr, flush=True)
