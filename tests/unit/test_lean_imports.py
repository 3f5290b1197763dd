"""agent.lean: the agent imports nats-py and pydantic without importlib.metadata, and nothing changes but the cost."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import textwrap

import pytest

from agent import lean

PROBE = textwrap.dedent(
    """
    import json, sys
    import agent.main  # what faultline-agent imports
    loaded = {m: m in sys.modules for m in ("importlib.metadata", "zipfile", "csv", "nats.aio.client")}
    import nats.aio.client
    seen_version = nats.aio.client.__version__
    import importlib.metadata  # a later import gets the real module
    print(json.dumps({
        "used": agent.lean.USED,
        "loaded": loaded,
        "nats_version": seen_version,
        "real_version": importlib.metadata.version("nats-py"),
        "real_module": hasattr(importlib.metadata, "distributions"),
        "plugins": __import__("os").environ.get("PYDANTIC_DISABLE_PLUGINS"),
    }))
    """
)


def run_probe() -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, f"probe failed: {out.stderr[-2000:]}"
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_agent_imports_without_importlib_metadata_and_versions_are_unchanged() -> None:
    r = run_probe()
    assert r["used"] is True, "the stand-in was not used: something imported nats-py or a model before agent.lean"
    loaded = r["loaded"]
    assert isinstance(loaded, dict)
    assert loaded["nats.aio.client"] is True
    assert loaded["importlib.metadata"] is False, "importlib.metadata was loaded by the agent's imports"
    assert loaded["zipfile"] is False and loaded["csv"] is False
    assert r["nats_version"] == r["real_version"], "nats-py saw another version than its metadata says"
    assert r["real_module"] is True, "a later import of importlib.metadata did not get the real module"
    assert r["plugins"] == "__all__"


def test_dist_version_reads_the_dist_info_name() -> None:
    assert lean._dist_version("nats-py") == importlib.metadata.version("nats-py")
    assert lean._dist_version("NATS_py") == importlib.metadata.version("nats-py")
    assert lean._dist_version("no-such-distribution-faultline") is None


def test_version_of_an_unknown_distribution_falls_back_to_the_real_lookup() -> None:
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        lean._version("no-such-distribution-faultline")


def test_nothing_is_done_when_importlib_metadata_is_already_loaded() -> None:
    # this test process (pytest) has it loaded: the stand-in must stay out of the way
    assert "importlib.metadata" in sys.modules
    real = sys.modules["importlib.metadata"]
    assert lean.import_without_metadata() is False
    assert sys.modules["importlib.metadata"] is real
