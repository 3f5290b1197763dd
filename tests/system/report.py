"""The reliability table: scenario, bound, measured time to revert, residue found, result.

Scenarios fill a ``Row`` while they run; the conftest records the test's
outcome and the residue found at teardown, prints the table at the end of the
session and, when every scenario ran, keeps it in docs/reliability.md with the
command that produced it.
"""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent.parent / "docs" / "reliability.md"


@dataclass
class Row:
    scenario: str
    bound: str = "-"
    measured: str = "-"
    """Measured time to revert (or what the scenario measures instead)."""
    residue: list[str] = field(default_factory=list)
    result: str = "not run"
    notes: list[str] = field(default_factory=list)

    def seconds(self, value_s: float) -> None:
        self.measured = f"{value_s:.2f} s"


ROWS: list[Row] = []


def render(rows: list[Row]) -> str:
    lines = [
        "| scenario | bound | measured | residue found | result |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        residue = "; ".join(r.residue) if r.residue else "none"
        measured = r.measured + (f" ({'; '.join(r.notes)})" if r.notes else "")
        cells = [r.scenario, r.bound, measured, residue, r.result]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def command_line() -> str:
    args = sys.argv[1:]
    return "pytest " + " ".join(shlex.quote(a) for a in args) if args else "pytest"


def write_doc(rows: list[Row], path: Path = DOC) -> None:
    text = "\n".join(
        [
            "# Reliability: faultline's faults thrown at faultline itself",
            "",
            "Produced by the system tier (root, network namespaces, a real nats-server, real agents,",
            "a real controller and real victim processes; see tests/system/test_scenarios.py) with:",
            "",
            "```",
            f"sudo /work/venv/bin/{command_line()}",
            "```",
            "",
            f"Run at {time.strftime('%Y-%m-%d %H:%M:%S %Z')} on {_machine()}.",
            "Timings: heartbeat interval 0.5 s, heartbeatTimeout 2 s, leaseTimeout 3 s.",
            '"measured" is taken from the machine (victim processes\' state polled every 20 ms),',
            'not from what the agents report; "residue found" is the residue check of',
            "tests/system/residue.py during the test plus leftovers after teardown.",
            "",
            render(rows),
            "",
        ]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _machine() -> str:
    import os
    import platform

    return f"Linux {platform.release()}, {os.cpu_count()} cores, Python {platform.python_version()}"
