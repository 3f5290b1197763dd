"""agent.lean: the agent imports nats-py and pydantic without importlib.metadata or email, and nothing changes but the cost."""

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
    agent.main.build_parser().format_help()  # and what it runs before it is ready
    watched = (
        "importlib.metadata", "zipfile", "csv", "email", "email.parser", "shutil", "nats.aio.client", "nats.js.api"
    )
    loaded = {m: m in sys.modules for m in watched}
    import nats.aio.client
    seen_version = nats.aio.client.__version__
    status = str(nats.aio.client.nats.js.api.Header.STATUS.value)  # the client's own lookup: the real package
    js_real = not getattr(sys.modules["nats.js"], "__lean_stand_in__", False) and "nats.js.api" in sys.modules
    import nats.js.client
    parser = nats.js.client.BytesParser()  # JetStream's header parser: a real one, made on demand
    parsed = dict(parser.parsebytes(b"Nats-Msg-Id: 7\\r\\n\\r\\n"))
    import email.parser
    import importlib.metadata  # a later import gets the real module
    print(json.dumps({
        "used": agent.lean.USED,
        "loaded": loaded,
        "nats_version": seen_version,
        "real_version": importlib.metadata.version("nats-py"),
        "real_module": hasattr(importlib.metadata, "distributions"),
        "parser_is_real": type(parser) is email.parser.BytesParser,
        "parsed": parsed,
        "real_email_parser": hasattr(email.parser, "HeaderParser"),
        "plugins": __import__("os").environ.get("PYDANTIC_DISABLE_PLUGINS"),
        "status_header": status,
        "jetstream_real": js_real,
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
    assert loaded["email"] is False and loaded["email.parser"] is False, "the email package was loaded"
    assert loaded["shutil"] is False, "shutil (and bz2, lzma) loaded: argparse's default help formatter?"
    assert r["nats_version"] == r["real_version"], "nats-py saw another version than its metadata says"
    assert r["real_module"] is True, "a later import of importlib.metadata did not get the real module"
    assert r["plugins"] == "__all__"
    assert r["parser_is_real"] is True, "the BytesParser stand-in did not give a real email parser"
    assert r["parsed"] == {"Nats-Msg-Id": "7"}
    assert r["real_email_parser"] is True, "a later import of email.parser did not get the real module"
    assert loaded["nats.js.api"] is False, "nats-py's JetStream package was loaded by an idle agent's imports"
    assert r["status_header"] == "Status" and r["jetstream_real"] is True, "JetStream is not real once used"


def test_a_jetstream_submodule_imported_first_gets_the_real_package() -> None:
    probe = textwrap.dedent(
        """
        import sys
        import agent.main
        from nats.js.errors import NotFoundError  # a submodule first, before any attribute lookup
        import nats.js
        assert not getattr(nats.js, "__lean_stand_in__", False) and sys.modules["nats.js"] is nats.js
        assert sys.modules["nats.js.errors"].NotFoundError is NotFoundError is nats.js.errors.NotFoundError
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


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
    assert lean.import_lean() is False
    assert sys.modules["importlib.metadata"] is real


def test_help_width_follows_columns_as_shutil_would(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent import main

    monkeypatch.setenv("COLUMNS", "50")
    assert main.terminal_columns() == 50
    assert main.HelpFormatter("faultline-agent")._width == 48  # as argparse's own: columns less 2
    monkeypatch.setenv("COLUMNS", "not-a-number")
    assert main.terminal_columns() > 0


IDLE = textwrap.dedent(
    """
    import asyncio, json, sys
    from pathlib import Path
    import agent.main
    from agent.faults import load_injectors
    from agent.faults.base import AgentEnv
    env = AgentEnv(node="lean-test", state_dir=Path(sys.argv[1]), instance_id="i", protected_pids=dict)
    injectors, missing = load_injectors(env)
    kinds = [k for k in injectors if k != "network"]  # network's start-up child has its own tests
    caps = {k: [c.name for c in injectors[k].probe()] for k in kinds}
    swept = {k: asyncio.run(injectors[k].sweep([])) for k in kinds}
    heavy = ("agent.faults.stressor", "agent.faults.cpu", "agent.faults.memory", "pyroute2")
    print(json.dumps({"loaded": [m for m in heavy if m in sys.modules], "caps": caps, "swept": swept,
                      "missing": missing}))
    """
)


def test_an_idle_agent_probes_and_sweeps_without_loading_the_stressor_code(tmp_path: object) -> None:
    out = subprocess.run(
        [sys.executable, "-c", IDLE, str(tmp_path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, f"probe failed: {out.stderr[-2000:]}"
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["missing"] == {}
    assert r["loaded"] == [], f"loaded by an idle agent's start: {r['loaded']}"
    assert r["caps"]["cpu"] == ["cpu", "cgroup"] and r["caps"]["memory"] == ["memory", "cgroup"]
    assert r["swept"] == {"process-kill": [], "process-pause": [], "cpu": [], "memory": []}
