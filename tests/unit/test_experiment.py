"""The experiment file: valid files load, invalid ones say where and why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from controller.experiment import (
    ExperimentError,
    fault_id,
    json_schema,
    load_experiment,
    load_experiment_text,
    new_experiment_id,
    parse_experiment,
    percent_count,
)
from proto.faults import ProcessKillSpec, ProcessPauseSpec
from proto.messages import Inject

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))

ISSUE_EXAMPLE = """
apiVersion: faultline/v1
kind: Experiment
metadata:
  name: kill-sleepers
spec:
  duration: 30s
  targets:
    nodes: [node-a]
    labels: {zone: a}
    mode: all
  faults:
    - kind: process-kill
      match: {name: sleep}
      signal: SIGKILL
      count: 1
    - kind: process-pause
      match: {cmdline: "worker --queue q1"}
  abort:
    heartbeatTimeout: 3s
    leaseTimeout: 5s
"""


def base(**spec: object) -> dict[str, object]:
    s: dict[str, object] = {"duration": "10s", "faults": [{"kind": "process-pause", "match": {"pid": 42}}]}
    s.update(spec)
    return {"apiVersion": "faultline/v1", "kind": "Experiment", "metadata": {"name": "t"}, "spec": s}


def error_of(data: object) -> str:
    with pytest.raises(ExperimentError) as info:
        parse_experiment(data)
    return str(info.value)


def test_issue_example_loads_with_units_parsed() -> None:
    exp = load_experiment_text(ISSUE_EXAMPLE)
    assert exp.spec.duration_s == 30.0
    assert exp.spec.abort.heartbeat_timeout_s == 3.0 and exp.spec.abort.lease_timeout_s == 5.0
    kill, pause = exp.spec.faults
    assert isinstance(kill, ProcessKillSpec) and kill.signal == 9 and kill.count == 1
    assert isinstance(pause, ProcessPauseSpec) and pause.match.cmdline == "worker --queue q1"
    assert exp.spec.targets.nodes == ["node-a"] and exp.spec.targets.labels == {"zone": "a"}


def test_defaults() -> None:
    exp = parse_experiment(base())
    assert exp.spec.abort.heartbeat_timeout_s == 3.0
    assert exp.spec.abort.lease_timeout_s == 5.0
    assert exp.spec.targets.mode == "all"
    assert exp.fault_duration_s(0) == 10.0


def test_fault_duration_overrides_experiment_duration() -> None:
    exp = parse_experiment(base(faults=[{"kind": "cpu", "load": 50, "duration": "2s"}]))
    assert exp.fault_duration_s(0) == 2.0 and exp.longest_fault_s() == 2.0


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_validate(path: Path) -> None:
    exp = load_experiment(path)
    for f in exp.spec.faults:
        match = getattr(f, "match", None)
        if match is not None:  # examples must select precisely, never by a broad name like "sleep"
            assert match.cmdline and "faultline-example" in match.cmdline


def test_examples_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"pause-worker.yaml", "kill-and-watch-restart.yaml", "zone-outage.yaml"} <= names


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"faults": [{"kind": "cpu", "load": 0.5}]}, "spec.faults[0].load: must be between 1 and 100"),
        ({"faults": [{"kind": "process-kill", "match": {}}]}, "spec.faults[0].match: "),
        ({"faults": [{"kind": "bogus"}]}, "spec.faults[0]: unknown fault kind"),
        ({"faults": [{"match": {"pid": 1}}]}, "spec.faults[0]: missing kind"),
        ({"faults": [{"kind": "process-pause", "match": {"pid": 1}, "extra": 1}]}, "spec.faults[0].extra: unknown"),
        ({"faults": []}, "spec.faults: needs at least 1 item, got 0"),
        ({"duration": None}, "spec.duration: "),
        ({"duration": "soon"}, "spec.duration: invalid duration 'soon'"),
        ({"targets": {"mode": "fixed"}}, "spec.targets: mode fixed needs a value"),
        ({"targets": {"mode": "fixed-percent", "value": 150}}, "spec.targets: mode fixed-percent needs a value"),
        ({"targets": {"mode": "sometimes"}}, "spec.targets.mode: "),
        ({"abort": {"heartbeatTimeout": "0s"}}, "spec.abort.heartbeatTimeout: "),
        ({"faults": [{"kind": "process-kill", "match": {"pid": 1}, "signal": "SIGNOPE"}]}, "spec.faults[0].signal"),
        (
            {"faults": [{"kind": "process-kill", "match": {"pid": 5}, "signal": "SIGTSTP"}]},
            "spec.faults[0].signal: SIGTSTP stops a process and process-kill never resumes it; use kind: process-pause",
        ),
        (
            {"faults": [{"kind": "process-kill", "match": {"pid": 5}, "signal": 18}]},
            "spec.faults[0].signal: SIGCONT would resume processes a process-pause fault holds stopped",
        ),
        ({"faults": [{"kind": "process-pause", "match": {"pid": 2**40}}]}, "spec.faults[0].match.pid: "),
    ],
)
def test_errors_name_field_path_and_reason(spec: dict[str, object], expected: str) -> None:
    assert expected in error_of(base(**spec))


def test_a_missing_field_says_so_in_plain_words() -> None:
    data = base()
    spec = data["spec"]
    assert isinstance(spec, dict)
    del spec["duration"]
    assert "spec.duration: required field missing" in error_of(data)


def test_all_errors_are_listed_one_per_line() -> None:
    msg = error_of(base(duration="x", faults=[{"kind": "cpu", "load": 500}]))
    lines = msg.splitlines()
    assert len(lines) == 2 and lines[0].startswith("spec.duration") and lines[1].startswith("spec.faults[0].load")


def test_top_level_errors() -> None:
    assert "apiVersion" in error_of({**base(), "apiVersion": "faultline/v2"})
    assert "kind" in error_of({**base(), "kind": "Pod"})
    assert "empty file" in error_of(None)
    assert "got list" in error_of([1, 2])


def test_yaml_syntax_error_gives_line() -> None:
    with pytest.raises(ExperimentError, match=r"line \d+, column \d+: not valid YAML"):
        load_experiment_text("apiVersion: [unclosed\n")


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    bad = tmp_path / "x.yaml"
    bad.write_text("!!python/object/apply:os.system ['true']\n")
    with pytest.raises(ExperimentError, match="not valid YAML"):
        load_experiment(bad)


def test_a_key_given_twice_is_refused_not_silently_replaced() -> None:
    """PyYAML keeps the last of two equal keys: a second `faults:` would drop the first list."""
    text = ISSUE_EXAMPLE + "  faults: []\n"
    with pytest.raises(
        ExperimentError, match=r"line \d+, column 3: not valid YAML: duplicate key 'faults' \(first at line \d+\)"
    ):
        load_experiment_text(text)
    nested = ISSUE_EXAMPLE.replace("mode: all", "mode: all\n    mode: one")
    with pytest.raises(ExperimentError, match="duplicate key 'mode'"):
        load_experiment_text(nested)
    # a merge key may override what it merges: that is what it is for
    merged = """\
apiVersion: faultline/v1
kind: Experiment
metadata: {name: merged}
spec:
  duration: 30s
  faults:
    - &base {kind: process-pause, match: {name: a}}
    - <<: *base
      match: {name: b}
"""
    exp = load_experiment_text(merged)
    assert [f.match.name for f in exp.spec.faults] == ["a", "b"]


def test_a_number_of_thousands_of_digits_is_refused_not_crashed_on() -> None:
    text = ISSUE_EXAMPLE.replace("duration: 30s", "duration: " + "9" * 5000, 1)
    assert text != ISSUE_EXAMPLE
    with pytest.raises(ExperimentError, match="not valid YAML"):
        load_experiment_text(text)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ExperimentError, match="cannot read"):
        load_experiment(tmp_path / "missing.yaml")


def test_experiment_id_is_subject_safe_and_fits_the_wire() -> None:
    eid = new_experiment_id("a.b c*" + "x" * 42)
    assert "." not in eid and " " not in eid and "*" not in eid
    fid = fault_id(eid, 3)
    assert fid.endswith(".3")
    exp = parse_experiment(base())
    Inject(experiment_id=eid, fault_id=fid, spec=exp.spec.faults[0], expires_at=1.0, lease_timeout_s=5.0)


def test_name_too_long_is_refused() -> None:
    assert "metadata.name" in error_of({**base(), "metadata": {"name": "n" * 80}})


def test_schema_uses_file_names_and_is_json() -> None:
    schema = json_schema()
    text = json.dumps(schema)
    assert "apiVersion" in text and "heartbeatTimeout" in text and "watchRestart" in text
    assert "heartbeat_timeout_s" not in text


def test_schema_accepts_examples() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json_schema()
    for path in EXAMPLES:
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)


@pytest.mark.parametrize(("pct", "total", "count"), [(50, 3, 2), (30, 10, 3), (1, 10, 1), (100, 4, 4), (10, 0, 0)])
def test_percent_count_rounds_up(pct: float, total: int, count: int) -> None:
    assert percent_count(pct, total) == count


def test_a_network_delay_needs_a_unit_where_a_bare_number_would_be_seconds() -> None:
    """`delay: 100` read as 100 s, where an SRE used to tc or Chaos Mesh means milliseconds."""
    net = {"kind": "network", "delay": 100, "jitter": 5}
    text = error_of(base(faults=[{"kind": "process-pause", "match": {"pid": 42}}, net]))
    assert text.splitlines() == [
        "spec.faults[1].delay: give a unit, for example '100ms' or '100s' (a bare number is read as seconds: 100 s)",
        "spec.faults[1].jitter: give a unit, for example '5ms' or '5s' (a bare number is read as seconds: 5 s)",
    ]
    parse_experiment(base(duration=30, faults=[{"kind": "network", "delay": "100ms", "jitter": 0}]))  # fine


@pytest.mark.parametrize("lease", ["1us", "50ms", "0.9s"])
def test_a_lease_shorter_than_a_second_is_refused_with_the_reason(lease: str) -> None:
    """A new user's review: leaseTimeout 1us validated, then the run aborted at once."""
    doc = {
        "apiVersion": "faultline/v1",
        "kind": "Experiment",
        "metadata": {"name": "t"},
        "spec": {
            "duration": "5s",
            "faults": [{"kind": "process-pause", "match": {"pid": 2}}],
            "abort": {"leaseTimeout": lease},
        },
    }
    with pytest.raises(ExperimentError) as refused:
        parse_experiment(doc)
    assert "spec.abort.leaseTimeout: must be at least 1s" in str(refused.value), str(refused.value)
    doc["spec"]["abort"] = {"leaseTimeout": "1s"}  # type: ignore[index]
    assert parse_experiment(doc).spec.abort.lease_timeout_s == 1.0
