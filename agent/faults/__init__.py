"""Fault kinds, registered by name in one table (as uvicorn picks its protocols).

Modules are imported lazily: a kind whose module is missing or fails to
import is reported as "not supported by this agent" instead of crashing it.
"""

from __future__ import annotations

import importlib
import logging

from agent.faults.base import AgentEnv, Injector

log = logging.getLogger(__name__)

INJECTORS: dict[str, str] = {
    "process-kill": "agent.faults.process:ProcessKill",
    "process-pause": "agent.faults.process:ProcessPause",
    # lazy (agent.faults.lazy): loaded on their first fault, not by an idle agent
    "cpu": "agent.faults.lazy:LazyCpu",
    "memory": "agent.faults.lazy:LazyMemory",
    "network": "agent.faults.network_lazy:LazyNetworkFault",  # pyroute2 too
}


def load_injectors(env: AgentEnv, table: dict[str, str] | None = None) -> tuple[dict[str, Injector], dict[str, str]]:
    """Instantiate every injector in the table. Returns (kind -> injector, kind -> why unavailable)."""
    injectors: dict[str, Injector] = {}
    missing: dict[str, str] = {}
    for kind, target in (table or INJECTORS).items():
        module_name, _, attr = target.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
            injectors[kind] = cls(env)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                log.error("fault kind %s: cannot import %s: %s", kind, module_name, exc)
            missing[kind] = f"{kind} faults are not supported by this agent"
        except Exception as exc:  # an injector that fails to load must not take the agent down
            log.error("fault kind %s: failed to load: %s", kind, exc)
            missing[kind] = f"{kind} faults are not supported by this agent ({exc})"
    return injectors, missing
