"""What every faultline command shares: where it writes, and its exit codes."""

from __future__ import annotations

import sys

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def out(text: str) -> None:
    """Results (stdout): what -o json consumers and pipes read."""
    print(text, flush=True)


def err(text: str) -> None:
    """Progress, hints and errors (stderr)."""
    print(text, file=sys.stderr, flush=True)
