"""What a keeper (agent/keeper_main.py) runs when its agent is frozen or gone: the revert of
one journal entry, as the agent's crash recovery does it (the journaled plan alone)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from agent.faults import INJECTORS, load_injectors
from agent.faults.base import AgentEnv, FaultContext, Injector
from agent.journal import Journal
from proto.messages import Measurements


def revert_entry(
    state_dir: str, fault_id: str, timeout_s: float, injectors: dict[str, Injector] | None = None
) -> Measurements:
    """Revert the fault's journaled plan; what the revert measured. Raises when it could not be
    done. Nothing journaled (the agent finished first, or never applied it): nothing to do.
    ``injectors``: kind -> injector, filled as kinds are needed (one keeper reverts many faults)."""
    journal = Journal(Path(state_dir))
    try:
        entry = journal.read(fault_id)
    finally:
        journal.close()
    if entry is None or entry.plan is None:
        return Measurements(note="nothing journaled: nothing to revert")
    kind = entry.spec.kind
    if kind not in INJECTORS:
        raise RuntimeError(f"no injector for {kind} faults")
    env = AgentEnv(node="keeper", state_dir=Path(state_dir), instance_id=f"keeper-{os.getpid()}", protected_pids=dict)
    cache = injectors if injectors is not None else {}
    if kind not in cache:
        loaded, missing = load_injectors(env, {kind: INJECTORS[kind]})
        if kind not in loaded:
            raise RuntimeError(missing.get(kind, f"{kind} faults cannot be loaded"))
        cache[kind] = loaded[kind]
    inj = cache[kind]
    plan = inj.load_plan(entry.plan)
    ctx = FaultContext(
        fault_id=entry.fault_id,
        experiment_id=entry.experiment_id,
        deadline=entry.expires_at,
        pods=entry.pods,
        env=env,
        emit=lambda *_: None,
        recovered=True,
    )

    async def run() -> Measurements:
        return await asyncio.wait_for(inj.revert(plan, ctx), timeout_s)

    return asyncio.run(run())
