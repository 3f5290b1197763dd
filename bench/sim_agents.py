"""Simulated agents for the control-plane benchmark: the real AgentRuntime, a no-op fault backend.

Each is the real ``agent.runtime.AgentRuntime`` (run() as a task: state-directory
lock, probe, journal recovery, its own NATS connection, subscriptions, heartbeat
loop, watchdog) with ``NoopInjector`` for process-pause: it accepts every fault
and touches nothing, so only the control plane is measured.

Imported by bench_control_plane.py (run as a script, so this folder is on sys.path).
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from raw_bounds import START_BATCH

from agent.config import AgentSettings, IdentitySettings, NatsSettings, TimingSettings
from agent.faults.base import AgentEnv, Capability, FaultContext, Injector, Plan
from agent.nodeload import LoadSampler
from agent.runtime import AgentRuntime
from controller.dispatch import request_acks
from proto.codec import encode
from proto.messages import Measurements, Revert


class NoopPlan(Plan):
    noop: bool = True


class NoopInjector(Injector):
    """Accepts every process-pause and touches nothing: measures the control plane alone."""

    kind = "process-pause"
    plan_model = NoopPlan

    def probe(self) -> list[Capability]:
        return [Capability(self.kind, True)]

    async def plan(self, spec: Any, ctx: FaultContext) -> Plan:
        return NoopPlan()

    async def apply(self, spec: Any, plan: Plan, ctx: FaultContext) -> Measurements:
        return Measurements()

    async def revert(self, plan: Plan, ctx: FaultContext) -> Measurements:
        return Measurements()


# --- the agents --------------------------------------------------------------


def agent_settings(url: str, node: str, state_root: Path) -> AgentSettings:
    return AgentSettings(
        identity=IdentitySettings(node=node),
        nats=NatsSettings(urls=[url]),
        timing=TimingSettings(heartbeat_interval_s=1.0),
        state_dir=state_root / node,
    )


# One node, many simulated agents: they share one psutil sampler (a real agent has its own),
# and one pool for their journals' disk work, the size of asyncio's default pool, which they
# shared before journals had threads of their own: a real agent's journal has one thread, and a
# thousand of them in one process would contend for the interpreter lock as no fleet does.
SHARED_LOAD = LoadSampler()
SHARED_JOURNAL_POOL = ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) + 4), thread_name_prefix="journals")


def make_runtime(url: str, node: str, state_root: Path) -> AgentRuntime:
    settings = agent_settings(url, node, state_root)
    env = AgentEnv(node=node, state_dir=settings.state_dir, instance_id="bench", protected_pids=dict)
    return AgentRuntime(
        settings,
        injectors={"process-pause": NoopInjector(env)},
        load_sampler=SHARED_LOAD,
        journal_executor=SHARED_JOURNAL_POOL,
    )


async def start_agents(
    ctl: Any, url: str, n: int, state_root: Path
) -> tuple[list[AgentRuntime], list[asyncio.Task[int]]]:
    """Start n runtimes in batches; each is proven subscribed by a harmless Revert answered."""
    runtimes: list[AgentRuntime] = []
    tasks: list[asyncio.Task[int]] = []
    for i in range(0, n, START_BATCH):
        batch = [make_runtime(url, f"bench-{j:04d}", state_root) for j in range(i, min(n, i + START_BATCH))]
        runtimes += batch
        tasks += [asyncio.create_task(rt.run(), name=f"agent:{rt.node}") for rt in batch]
        probe = Revert(experiment_id="bench-warmup", reason="bench readiness probe", expires_at=time.time() + 60)
        acks = await request_acks(ctl, {rt.node: encode(probe) for rt in batch}, timeout_s=10.0, attempts=30)
        missing = [(node, why) for node, (ack, why) in acks.items() if ack is None]
        if missing:
            raise RuntimeError(f"agents did not come up: {missing[:5]}")
    return runtimes, tasks


async def stop_agents(runtimes: list[AgentRuntime], tasks: list[asyncio.Task[int]]) -> None:
    for rt in runtimes:
        rt.request_stop()
    _, pending = await asyncio.wait(tasks, timeout=60.0)
    for t in pending:
        t.cancel()
    if pending:
        print(f"  warning: {len(pending)} agent(s) did not stop within 60s")
