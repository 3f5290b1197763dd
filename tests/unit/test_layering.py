"""The layering contract (as kopf's .importlinter): agent and controller never
import each other; proto imports neither. Checked on the source, so it holds
for lazy imports inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {"proto": {"agent", "controller"}, "agent": {"controller"}, "controller": {"agent"}}


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers(package: str) -> None:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        crossed = imports(path) & FORBIDDEN[package]
        if crossed:
            bad.append(f"{path.relative_to(ROOT)} imports {sorted(crossed)}")
    assert not bad, "layering broken:\n" + "\n".join(bad)
