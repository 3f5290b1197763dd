"""What the engine's phase mixins (controller/starting.py, controller/ending.py) read
from ExperimentRunner, declared once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from controller.experiment import Experiment
from controller.tracking import Track


class Phase:
    # provided by ExperimentRunner
    nc: Any
    experiment: Experiment
    experiment_id: str
    tracks: dict[tuple[str, str], Track]
    progress: Callable[[str], None]
    dispatch_timeout_s: float
    dispatch_attempts: int
    broadcast_wait_s: float
    start_unsure: set[str]
    """Targets whose start was refused, went unanswered or lost a fault: the final revert names them."""
    _wake: asyncio.Event

    if TYPE_CHECKING:
        # Declared for the type checker only: ExperimentRunner defines them.
        def abort(self, reason: str, node: str | None = None) -> None: ...
        @property
        def aborted(self) -> bool: ...
        def _t(self) -> str: ...
