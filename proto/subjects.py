"""NATS subjects, versioned so v1 and v2 agents can coexist during a rollout."""

from __future__ import annotations

import re

PREFIX = "faultline.v1"
HALT = f"{PREFIX}.halt"
ALL_HEARTBEATS = f"{PREFIX}.agent.*.hb"
ALL_LEASES = f"{PREFIX}.exp.*.lease"
ALL_ABORTS = f"{PREFIX}.exp.*.abort"
ALL_STARTS = f"{PREFIX}.exp.*.start"

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def safe_token(name: str) -> str:
    """Make a node or experiment name one subject token: no '.', '*', '>', spaces."""
    token = _UNSAFE.sub("_", name.strip())
    if not token:
        raise ValueError(f"name {name!r} has no usable characters for a subject")
    return token


def agent_cmd(node: str) -> str:
    return f"{PREFIX}.agent.{safe_token(node)}.cmd"


def agent_hb(node: str) -> str:
    return f"{PREFIX}.agent.{safe_token(node)}.hb"


def exp_lease(experiment_id: str) -> str:
    return f"{PREFIX}.exp.{safe_token(experiment_id)}.lease"


def exp_abort(experiment_id: str) -> str:
    """Broadcast Revert of a whole experiment: one publish reaches every agent at NATS fan-out speed."""
    return f"{PREFIX}.exp.{safe_token(experiment_id)}.abort"


def exp_start(experiment_id: str) -> str:
    """Broadcast Start of a whole experiment: every target applies its waiting faults at once."""
    return f"{PREFIX}.exp.{safe_token(experiment_id)}.start"


def exp_events(experiment_id: str) -> str:
    return f"{PREFIX}.exp.{safe_token(experiment_id)}.events"


def exp_control(experiment_id: str) -> str:
    """Request-reply to the controller running the experiment (used by `faultline abort`)."""
    return f"{PREFIX}.exp.{safe_token(experiment_id)}.control"


def experiment_from_subject(subject: str) -> str | None:
    parts = subject.split(".")
    if len(parts) == 5 and parts[0] == "faultline" and parts[1] == "v1" and parts[2] == "exp":
        return parts[3]
    return None
