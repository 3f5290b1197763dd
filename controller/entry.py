"""The `faultline` command's entry point: a Ctrl-C while the CLI is still loading exits quietly.

Importing the CLI (pydantic models, nats-py, uvloop) takes a few tenths of a second; a SIGINT
in that time met Python's default handler and printed a traceback from whatever import it
interrupted. Nothing has been sent then. controller.cli.main installs its own handling as
soon as it runs.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

EXIT_INTERRUPTED = 130  # as controller.console's; not imported: that is what this module avoids


def _wants_json(argv: list[str]) -> bool:
    """-o json / --output json, read by hand: argparse is what is still loading."""
    pairs = zip(argv, argv[1:], strict=False)
    return any(a in ("-o", "--output") and b == "json" for a, b in pairs) or any(
        a in ("-ojson", "--output=json") for a in argv
    )


def _while_loading(signum: int, _frame: FrameType | None) -> None:
    sys.stderr.write(f"faultline: {signal.Signals(signum).name} while starting: exited, nothing sent\n")
    if _wants_json(sys.argv[1:]):  # a script always has JSON to read
        sys.stdout.write(
            '{"outcome": "interrupted", "stage": "start", "error": "interrupted while starting", '
            f'"sent": false, "exit_code": {EXIT_INTERRUPTED}}}\n'
        )
        sys.stdout.flush()
    os._exit(EXIT_INTERRUPTED)


def main() -> None:
    signal.signal(signal.SIGINT, _while_loading)
    signal.signal(signal.SIGTERM, _while_loading)
    from controller.cli import main as cli_main

    cli_main()
