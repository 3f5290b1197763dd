"""Every experiment file the README and the docs show is one faultline accepts as it is.

A user copies these first; two of them once failed `faultline validate` (a value with mode all,
a partition example in an old shape)."""

from __future__ import annotations

import re

import pytest

from controller.experiment import load_experiment_text
from tests.conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```ya?ml\n(.*?)^```", re.M | re.S)


def experiment_blocks() -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        for n, m in enumerate(BLOCK.finditer(path.read_text())):
            if m.group(1).lstrip().startswith("apiVersion: faultline/"):
                found.append((f"{path.relative_to(REPO)}#{n}", m.group(1)))
    return found


BLOCKS = experiment_blocks()


def test_the_docs_show_experiment_files() -> None:
    names = {name.split("#")[0] for name, _ in BLOCKS}
    assert {"README.md", "docs/faults-network.md"} <= names, names


@pytest.mark.parametrize(("where", "text"), BLOCKS, ids=[name for name, _ in BLOCKS])
def test_every_experiment_file_in_the_docs_validates(where: str, text: str) -> None:
    load_experiment_text(text, where)  # raises with the field path and the reason
