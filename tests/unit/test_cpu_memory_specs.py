"""cpu and memory faults: spec validation, check() rejections naming the field, plans, cgroup parsing.

No stressor is started here; tests that do start them are in tests/integration/test_stressors.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest
from pydantic import TypeAdapter, ValidationError

from agent import cgroups
from agent.faults.base import AgentEnv, FaultContext, Rejected
from agent.faults.cpu import CpuPlan, CpuStress
from agent.faults.memory import MemoryPlan, MemoryStress
from agent.faults.stress_marks import agent_tag, find_marked
from proto.faults import CpuSpec, FaultSpec, MemorySpec

SPEC = TypeAdapter(FaultSpec)


def make_env(tmp_path: Path, node: str = "node-a") -> AgentEnv:
    return AgentEnv(node=node, state_dir=tmp_path / "state", instance_id="i1", protected_pids=dict)


def make_ctx(env: AgentEnv, fault_id: str = "f1") -> FaultContext:
    import time

    return FaultContext(
        fault_id=fault_id, experiment_id="e1", deadline=time.time() + 30, pods=None, env=env, emit=lambda *a: None
    )


# --- spec validation at the edge (pydantic), each error names the field


@pytest.mark.parametrize("load", [0, 101, "0%", "150%", -5, "lots"])
def test_cpu_load_out_of_range_is_rejected_naming_load(load: object) -> None:
    with pytest.raises(ValidationError) as err:
        SPEC.validate_python({"kind": "cpu", "load": load})
    assert "load" in str(err.value)


@pytest.mark.parametrize("size", ["-5Mi", "lots", "12 potatoes", 0, -1, "Mi"])
def test_memory_bad_size_is_rejected_naming_size(size: object) -> None:
    with pytest.raises(ValidationError) as err:
        SPEC.validate_python({"kind": "memory", "size": size})
    assert "size" in str(err.value)


def test_memory_size_and_percent_together_are_rejected() -> None:
    with pytest.raises(ValidationError) as err:
        SPEC.validate_python({"kind": "memory", "size": "1Mi", "percent": 5})
    assert "size or percent" in str(err.value)


def test_cpu_negative_core_is_rejected() -> None:
    with pytest.raises(ValidationError) as err:
        SPEC.validate_python({"kind": "cpu", "load": 10, "cores": [-1]})
    assert "cores" in str(err.value)


# --- check(): node-specific rejections, before anything starts


def test_cores_outside_node_rejected_naming_cores(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    bad = max(os.sched_getaffinity(0)) + 1
    with pytest.raises(Rejected, match=r"^cores: \[" + str(bad)):
        CpuStress(env).check(CpuSpec(load=50, cores=[0, bad]), make_ctx(env))


def test_load_checked_again_by_injector(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    spec = CpuSpec.model_construct(load_percent=0.0, workers=None, cores=None, cgroup=None, kind="cpu")
    with pytest.raises(Rejected, match=r"^load:"):
        CpuStress(env).check(spec, make_ctx(env))


@pytest.mark.parametrize("cls,spec", [(CpuStress, CpuSpec(load=10, cgroup="faultline-no-such-cgroup/x"))])
def test_nonexistent_cgroup_rejected_naming_cgroup(tmp_path: Path, cls: type[CpuStress], spec: CpuSpec) -> None:
    env = make_env(tmp_path)
    with pytest.raises(Rejected, match=r"^cgroup: "):
        cls(env).check(spec, make_ctx(env))


def test_memory_nonexistent_cgroup_rejected_naming_cgroup(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    with pytest.raises(Rejected, match=r"^cgroup: "):
        MemoryStress(env).check(MemorySpec(size="1Mi", cgroup="faultline-no-such-cgroup"), make_ctx(env))


def test_cgroup_path_escape_rejected(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    with pytest.raises(Rejected, match=r"^cgroup: .*'\.\.'"):
        CpuStress(env).check(CpuSpec(load=10, cgroup="../../etc"), make_ctx(env))


def test_memory_beyond_available_minus_reserve_rejected(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    too_big = psutil.virtual_memory().available
    with pytest.raises(Rejected, match=r"^size: .*reserve.*allowOvercommit"):
        MemoryStress(env).check(MemorySpec(size=too_big), make_ctx(env))
    MemoryStress(env).check(MemorySpec(size=too_big, allow_overcommit=True), make_ctx(env))


def test_concurrent_memory_faults_are_checked_against_memory_together(tmp_path: Path) -> None:
    """Two faults accepted before either stressor allocated: the second sees the first's share."""
    env = make_env(tmp_path)
    inj = MemoryStress(env)
    vm = psutil.virtual_memory()
    share = int(0.6 * (vm.available - vm.total * env.memory_reserve_percent / 100))
    first, second = make_ctx(env, "e.0"), make_ctx(env, "e.1")
    inj.check(MemorySpec(size=share), first)
    inj.check(MemorySpec(size=share), first)  # the same fault checked again (at its plan): not counted twice
    with pytest.raises(Rejected, match=r"^size: .*other memory faults may still take.*allowOvercommit"):
        inj.check(MemorySpec(size=share), second)
    inj.release(first)  # the first fault ended
    inj.check(MemorySpec(size=share), second)


def test_memory_percent_beyond_reserve_rejected_naming_percent(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    env.memory_reserve_percent = 100.0 - 1e-9
    with pytest.raises(Rejected, match=r"^percent: "):
        MemoryStress(env).check(MemorySpec(percent=1), make_ctx(env))


def test_rejected_check_starts_nothing(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    inj = CpuStress(env)
    with pytest.raises(Rejected):
        inj.check(CpuSpec(load=50, cores=[4096]), make_ctx(env))
    assert find_marked(inj.marker_for("")) == {}


# --- plans: defaults, markers, journal round trip


async def test_cpu_plan_defaults_and_roundtrip(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    inj = CpuStress(env)
    plan = await inj.plan(CpuSpec(load=50), make_ctx(env, "fault-7"))
    assert plan.workers == len(os.sched_getaffinity(0))
    assert (
        plan.marker.endswith(":fault-7")
        and inj.tag in plan.marker
        and plan.marker.startswith("faultline-stressor:cpu:")
    )
    assert CpuPlan.model_validate_json(plan.model_dump_json()) == plan
    pinned = await inj.plan(CpuSpec(load=50, cores=[0]), make_ctx(env))
    assert pinned.workers == 1 and pinned.cores == [0]
    explicit = await inj.plan(CpuSpec(load=50, workers=3, cores=[0]), make_ctx(env))
    assert explicit.workers == 3


async def test_memory_plan_percent_of_node(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    plan = await MemoryStress(env).plan(MemorySpec(percent=1, ramp="2s"), make_ctx(env))
    assert plan.size_bytes == int(psutil.virtual_memory().total / 100)
    assert plan.ramp_s == 2.0
    assert MemoryPlan.model_validate_json(plan.model_dump_json()) == plan


def test_agent_tags_differ_per_state_dir_and_node(tmp_path: Path) -> None:
    a = agent_tag("n1", tmp_path / "a")
    assert a != agent_tag("n1", tmp_path / "b")
    assert a != agent_tag("n2", tmp_path / "a")
    assert ":" not in agent_tag("odd:name", tmp_path)


# --- cgroup layout and limits, against fake trees


def _mounts(tmp_path: Path, lines: list[str]) -> Path:
    f = tmp_path / "mounts"
    f.write_text("\n".join(lines) + "\n")
    return f


def test_detect_hybrid_layout(tmp_path: Path) -> None:
    f = _mounts(
        tmp_path,
        [
            "cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,relatime,cpu,cpuacct 0 0",
            "cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0",
            "cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0",
            "proc /proc proc rw 0 0",
        ],
    )
    layout = cgroups.detect_layout(f)
    assert layout.version == "hybrid"
    assert layout.mount_for("cpu") == ("v1", Path("/sys/fs/cgroup/cpu,cpuacct"))
    assert layout.mount_for("memory") == ("v1", Path("/sys/fs/cgroup/memory"))


def test_detect_pure_v2_and_none(tmp_path: Path) -> None:
    layout = cgroups.detect_layout(_mounts(tmp_path, ["cgroup2 /sys/fs/cgroup cgroup2 rw 0 0"]))
    assert layout.version == "v2" and layout.mount_for("memory") == ("v2", Path("/sys/fs/cgroup"))
    empty = cgroups.detect_layout(_mounts(tmp_path, ["proc /proc proc rw 0 0"]))
    assert empty.version is None and empty.mount_for("cpu") is None


def _cg(root: Path, rel: str, files: dict[str, str]) -> Path:
    d = root / rel
    d.mkdir(parents=True)
    (d / "cgroup.procs").write_text("")
    for name, text in files.items():
        (d / name).write_text(text)
    return d


def test_v2_limits(tmp_path: Path) -> None:
    _cg(tmp_path, "pod/c1", {"cpu.max": "150000 100000\n", "memory.max": "536870912\n"})
    _cg(tmp_path, "pod/c2", {"cpu.max": "max 100000\n", "memory.max": "max\n"})
    layout = cgroups.CgroupLayout(v2=tmp_path)
    t1 = cgroups.resolve("/pod/c1", "cpu", layout)
    assert t1.procs_files() == [tmp_path / "pod/c1/cgroup.procs"]
    assert cgroups.cpu_quota_cores(t1) == 1.5 and cgroups.cpu_quota_workers(t1) == 2
    assert cgroups.memory_limit_bytes(t1) == 512 << 20
    t2 = cgroups.resolve("pod/c2", "memory", layout)
    assert cgroups.cpu_quota_workers(t2) is None and cgroups.memory_limit_bytes(t2) is None


def test_v1_limits_and_missing_secondary_controller(tmp_path: Path) -> None:
    cpu_root, mem_root = tmp_path / "cpu", tmp_path / "memory"
    _cg(cpu_root, "job", {"cpu.cfs_quota_us": "250000\n", "cpu.cfs_period_us": "100000\n"})
    _cg(mem_root, "job", {"memory.limit_in_bytes": "1073741824\n"})
    _cg(cpu_root, "cpuonly", {"cpu.cfs_quota_us": "-1\n", "cpu.cfs_period_us": "100000\n"})
    layout = cgroups.CgroupLayout(v1={"cpu": cpu_root, "memory": mem_root})
    job = cgroups.resolve("job", "cpu", layout)
    assert len(job.procs_files()) == 2
    assert cgroups.cpu_quota_workers(job) == 3 and cgroups.memory_limit_bytes(job) == 1 << 30
    cpuonly = cgroups.resolve("cpuonly", "cpu", layout)
    assert list(cpuonly.dirs) == ["cpu"] and cgroups.cpu_quota_workers(cpuonly) is None
    with pytest.raises(cgroups.CgroupError, match="does not exist"):
        cgroups.resolve("cpuonly", "memory", layout)
    unlimited = _cg(mem_root, "big", {"memory.limit_in_bytes": "9223372036854771712\n"})
    assert cgroups.memory_limit_bytes(cgroups.resolve("big", "memory", layout)) is None
    assert unlimited.is_dir()


# --- moving stressors: plain write, then from PID 1's cgroup namespace ---------------------------


def _target(d: Path) -> cgroups.CgroupTarget:
    return cgroups.CgroupTarget(path="t", dirs={"cpu": d}, versions={"cpu": "v2"})


def test_move_pids_writes_into_every_procs_file(tmp_path: Path) -> None:
    v1_cpu, v1_mem = tmp_path / "cpu", tmp_path / "memory"
    for d in (v1_cpu, v1_mem):
        d.mkdir()
        (d / "cgroup.procs").write_text("")
    target = cgroups.CgroupTarget(path="t", dirs={"cpu": v1_cpu, "memory": v1_mem}, versions={})
    cgroups.move_pids(target, [11, 12])  # one write per pid and file; a plain file keeps the last
    assert (v1_cpu / "cgroup.procs").read_text() == "12\n" and (v1_mem / "cgroup.procs").read_text() == "12\n"


def test_a_refused_move_in_our_own_namespace_is_not_retried(tmp_path: Path) -> None:
    with pytest.raises(cgroups.CgroupError, match=r"cannot move pid 7 into .*missing/cgroup.procs") as err:
        cgroups.move_pids(_target(tmp_path / "missing"), [7], root_ns="/proc/self/ns/cgroup")
    assert "namespace" not in str(err.value)


def test_a_refused_move_is_retried_from_the_other_namespace_and_both_reasons_are_given(tmp_path: Path) -> None:
    # a namespace file that is not a cgroup namespace: readlink differs, and joining it fails
    with pytest.raises(cgroups.CgroupError) as err:
        cgroups.move_pids(_target(tmp_path / "missing"), [7], root_ns="/proc/self/ns/net")
    text = str(err.value)
    assert "cannot move pid 7" in text and "from the cgroup namespace of PID 1" in text
    assert "cannot join the cgroup namespace /proc/self/ns/net" in text, text


def test_joining_a_namespace_that_does_not_exist_says_which(tmp_path: Path) -> None:
    with pytest.raises(cgroups.CgroupError, match="cannot open the cgroup namespace /nonexistent/ns"):
        cgroups.in_cgroupns("/nonexistent/ns", lambda: None)


def test_shares_cgroupns_with_ourselves_and_when_unreadable() -> None:
    assert cgroups.shares_cgroupns("/proc/self/ns/cgroup")
    assert cgroups.shares_cgroupns("/nonexistent/ns")  # cannot tell: write from where we are
    assert not cgroups.shares_cgroupns("/proc/self/ns/net")


async def test_a_memory_preview_shows_the_room_and_sets_nothing_aside(tmp_path: Path) -> None:
    """A preview decides as check() does, and an Inject after it is checked as if it never ran."""
    env = make_env(tmp_path)
    inj = MemoryStress(env)
    vm = psutil.virtual_memory()
    share = int(0.6 * (vm.available - vm.total * env.memory_reserve_percent / 100))
    first = make_ctx(env, "e.0")
    inj.check(MemorySpec(size=share), first)  # a fault held: it counts against what a preview sees
    shown = await inj.preview(MemorySpec(size=4096), make_ctx(env, "preview"))
    assert shown.stress is not None and shown.stress.size_bytes == 4096 and shown.stress.cgroup == "the node"
    assert shown.stress.promised_bytes == share and shown.stress.reserve_bytes == int(
        vm.total * env.memory_reserve_percent / 100
    )
    with pytest.raises(Rejected, match=r"^size: .*other memory faults may still take"):
        await inj.preview(MemorySpec(size=share), make_ctx(env, "preview"))  # as an Inject would be
    assert set(inj._promised) == {"e.0"}, "a preview set memory aside"
    forced = await inj.preview(MemorySpec(size=share, allow_overcommit=True), make_ctx(env, "preview"))
    assert forced.note is not None and "not checked" in forced.note


async def test_a_cpu_preview_shows_its_workers(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    shown = await CpuStress(env).preview(CpuSpec(load="40%", workers=3), make_ctx(env, "preview"))
    assert shown.stress is not None and (shown.stress.workers, shown.stress.load_percent) == (3, 40.0)
    every = await CpuStress(env).preview(CpuSpec(load=10), make_ctx(env, "preview"))
    assert every.stress is not None and every.stress.workers == len(os.sched_getaffinity(0))
