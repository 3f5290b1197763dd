"""Fault kinds whose code is loaded on their first fault, not by an idle agent.

An idle agent needs two things from a fault kind: what this node can do (the
probe) and a sweep of leftovers at start. A lazy kind answers those cheaply
and loads the real injector (``real = "module:Class"``) the first time it has
more to do: a fault to check, a journaled plan to revert, a leftover to remove.
From then on every call goes to that one instance, so an injector's own state
(the memory kind's share of free memory, a running stressor) lives in one place.

Worth it for kinds whose apply takes tens of milliseconds anyway (spawning
stressors, netlink): the import is a small part of their first fault. Process
faults stay loaded: their Ack is due within milliseconds.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, ClassVar

from agent.faults.base import Capability, FaultContext, Injector, Plan
from agent.faults.stress_marks import agent_tag, find_marked, make_marker, stress_capabilities
from proto.messages import Measurements, PreviewResult

log = logging.getLogger(__name__)


class LazyInjector(Injector):
    real: ClassVar[str]
    """``module:Class`` of the injector this one stands for."""
    plan_model = Plan  # the real one's comes with load_plan()

    def __init__(self, env: Any) -> None:
        super().__init__(env)
        self._real: Injector | None = None

    @property
    def loaded(self) -> bool:
        return self._real is not None

    def _load(self) -> Injector:
        if self._real is None:
            module_name, _, attr = self.real.partition(":")
            cls = getattr(importlib.import_module(module_name), attr)
            self._real = cls(self.env)
            self._on_load(self._real)
            log.info("fault kind %s loaded (%s)", self.kind, self.real)
        return self._real

    def _on_load(self, real: Any) -> None:  # noqa: B027 - optional hook
        """Hand the real injector what the cheap probe or sweep already learnt."""

    def probe(self) -> list[Capability]:
        return self._load().probe()

    async def sweep(self, journaled: list[Plan]) -> list[str]:
        return await self._load().sweep(journaled)

    def load_plan(self, raw: dict[str, Any]) -> Plan:
        return self._load().load_plan(raw)

    def check(self, spec: Any, ctx: FaultContext) -> None:
        self._load().check(spec, ctx)

    def release(self, ctx: FaultContext) -> None:
        if self._real is not None:  # nothing was set aside by an injector never loaded
            self._real.release(ctx)

    async def plan(self, spec: Any, ctx: FaultContext) -> Plan:
        return await self._load().plan(spec, ctx)

    async def preview(self, spec: Any, ctx: FaultContext) -> PreviewResult | None:
        return await self._load().preview(spec, ctx)

    async def apply(self, spec: Any, plan: Plan, ctx: FaultContext) -> Measurements:
        return await self._load().apply(spec, plan, ctx)

    def applied(self, plan: Plan, ctx: FaultContext) -> Plan | None:
        return self._real.applied(plan, ctx) if self._real is not None else None

    async def revert(self, plan: Plan, ctx: FaultContext) -> Measurements:
        return await self._load().revert(plan, ctx)


class LazyStress(LazyInjector):
    """A stressor kind (cpu, memory): probed and swept with agent.faults.stress_marks alone."""

    def probe(self) -> list[Capability]:
        return stress_capabilities(self.kind)

    async def sweep(self, journaled: list[Plan]) -> list[str]:
        if journaled or self.loaded:
            return await self._load().sweep(journaled)
        tag = agent_tag(self.env.node, self.env.state_dir)
        if find_marked(make_marker(self.kind, tag, "")):
            return await self._load().sweep(journaled)  # a stray to kill: the real sweep does it and says so
        log.info("sweep: no stray %s stressors of this agent (tag %s)", self.kind, tag)
        return []


class LazyCpu(LazyStress):
    kind = "cpu"
    real = "agent.faults.cpu:CpuStress"


class LazyMemory(LazyStress):
    kind = "memory"
    real = "agent.faults.memory:MemoryStress"
