"""Target selection: which nodes of the fleet get an experiment's faults.

Pure functions over a snapshot of the fleet (node name -> labels), with the
random source injectable so tests are deterministic. Errors are
TargetingError with a message a user can act on.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping

from controller.experiment import Targets, percent_count
from proto.subjects import safe_token


class TargetingError(ValueError):
    """The targets cannot be resolved against this fleet."""


def _describe(targets: Targets) -> str:
    parts = []
    if targets.nodes:
        parts.append("nodes " + ", ".join(targets.nodes))
    if targets.labels:
        parts.append("labels " + ", ".join(f"{k}={v}" for k, v in sorted(targets.labels.items())))
    return " and ".join(parts) or "any node"


def agent_name(node: str) -> str:
    """The name an agent started with ``--node node`` heartbeats under (proto.subjects.safe_token)."""
    try:
        return safe_token(node)
    except ValueError:
        return node  # no usable characters: not in any fleet, and the error says so by its own name


def matching_nodes(fleet: Mapping[str, Mapping[str, str]], targets: Targets) -> list[str]:
    """Nodes named (if names are given) that carry every given label, sorted."""
    if targets.nodes:
        # as the agents name themselves: `--node w1.example.com` heartbeats as w1_example_com
        # (one NATS subject token), so a file may name a node either way
        named = {agent_name(n): n for n in targets.nodes}
        unknown = [
            n if token == n else f"{n} (as agents name it: {token})" for token, n in named.items() if token not in fleet
        ]
        if unknown:
            known = ", ".join(sorted(fleet)) or "none"
            raise TargetingError(
                f"node {', '.join(unknown)} is not in the fleet (agents seen: {known}); "
                "check `faultline agents` and the node name"
            )
        candidates: Iterable[str] = named
    else:
        candidates = fleet
    wanted = targets.labels or {}
    chosen = sorted(n for n in candidates if all(fleet[n].get(k) == v for k, v in wanted.items()))
    if not chosen:
        seen = len(fleet)
        raise TargetingError(f"no matching agents: none of the {seen} agent(s) seen matches {_describe(targets)}")
    return chosen


def pick_count(mode: str, value: float | None, available: int, rng: random.Random) -> int:
    """How many of ``available`` matching nodes the mode selects."""
    if mode == "all":
        return available
    if mode == "one":
        return 1
    if value is None:
        raise TargetingError(f"mode {mode} needs a value")
    if mode == "fixed":
        count = int(value)
        if count > available:
            raise TargetingError(f"mode fixed asks for {count} node(s) but only {available} match")
        return count
    if mode == "fixed-percent":
        return percent_count(value, available)
    if mode == "random-max-percent":
        most = max(1, min(available, math.ceil(round(value * available / 100.0, 9))))
        return rng.randint(1, most)
    raise TargetingError(f"unknown mode {mode!r}")


def select_nodes(
    fleet: Mapping[str, Mapping[str, str]],
    targets: Targets,
    rng: random.Random | None = None,
) -> list[str]:
    """The chosen node names, sorted. ``fleet`` maps node name -> labels."""
    rng = rng or random.Random()
    candidates = matching_nodes(fleet, targets)
    count = pick_count(targets.mode, targets.value, len(candidates), rng)
    if count >= len(candidates):
        return candidates
    return sorted(rng.sample(candidates, count))
