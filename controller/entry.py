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


def _while_loading(signum: int, _frame: FrameType | None) -> None:
    sys.stderr.write(f"faultline: {signal.Signals(signum).name} while starting: exited, nothing sent\n")
    os._exit(EXIT_INTERRUPTED)


def main() -> None:
    signal.signal(signal.SIGINT, _while_loading)
    signal.signal(signal.SIGTERM, _while_loading)
    from controller.cli import main as cli_main

    cli_main()
