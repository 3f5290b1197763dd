"""Fixtures of the fleet tier: a fleet per test, torn down always; the reliability table.

``fleet_factory(n, ...)`` builds a FleetHarness (skipping with the reason when
the machine cannot: not root, no `ip`, no nats-server). Its finaliser takes the
fleet apart and checks that nothing of it is left (namespaces, processes);
anything left fails the test's teardown and goes into the table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.system import report
from tests.system.fleet import FleetHarness, missing_prerequisite
from tests.system.residue import leftovers

ROW_KEY = pytest.StashKey[report.Row]()
SCENARIO_FILE = "test_scenarios.py"


@pytest.fixture
def row(request: pytest.FixtureRequest) -> Iterator[report.Row]:
    doc = (request.function.__doc__ or request.node.name).strip().splitlines()[0]
    r = report.Row(scenario=doc)
    request.node.stash[ROW_KEY] = r
    report.ROWS.append(r)
    yield r


@pytest.fixture
def fleet_factory(tmp_path: Path, row: report.Row) -> Iterator[Callable[..., FleetHarness]]:
    why = missing_prerequisite()
    if why:
        row.result = f"skipped: {why}"
        pytest.skip(why)
    built: list[FleetHarness] = []

    def make(n: int = 3, **kwargs: Any) -> FleetHarness:
        fleet = FleetHarness(tmp_path, n, **kwargs)
        built.append(fleet)
        return fleet.up()

    yield make
    left: list[str] = []
    for fleet in built:
        fleet.down()
        left += leftovers(fleet.tag)
    if left:
        row.residue += [f"after teardown: {line}" for line in left]
        raise AssertionError("teardown left things behind:\n" + "\n".join(left))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    r = item.stash.get(ROW_KEY, None)
    if r is not None:
        if rep.when == "call" or (rep.when == "setup" and not rep.passed):
            if hasattr(rep, "wasxfail"):
                r.result = "xfail (known product bug)" if rep.skipped else "XPASS"
            elif rep.skipped:
                r.result = r.result if r.result.startswith("skipped") else "skipped"
            else:
                r.result = rep.outcome
        elif rep.when == "teardown" and rep.failed and r.result == "passed":
            r.result = "failed at teardown"
    return rep


def pytest_terminal_summary(terminalreporter: Any) -> None:
    rows = report.ROWS
    if not rows:
        return
    terminalreporter.write_sep("=", "faultline reliability (tests/system/report.py)")
    terminalreporter.write_line(report.render(rows))
    complete = len(rows) >= 10 and all(not r.result.startswith(("skipped", "not run")) for r in rows)
    if complete:
        report.write_doc(rows)
        terminalreporter.write_line(f"table written to {report.DOC}")
