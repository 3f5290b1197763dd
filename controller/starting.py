"""The start of an experiment: every fault to every target, then one Start for all.

Every fault goes to every target as an Inject that waits (one batch of
requests per fault, bounded and retried). Only when every target has accepted
every fault does one Start go out: a broadcast, then, for any node not seen
starting within broadcast_wait_s, a Start of its own whose Ack names each
fault's state. A refusal or a silent target during dispatch aborts the run
before anything is applied anywhere (agents older than schema 1.2 excepted:
they get Injects that start on acceptance). Once the Start is out, a node that
refuses or does not answer its own Start aborts the run like any other
failure, and the final revert reaches it by name.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from controller.dispatch import broadcast_start, request_acks, start_experiment
from controller.experiment import fault_id
from controller.phase import Phase
from controller.tracking import PRE_ACK, Track
from proto.codec import encode
from proto.messages import START_SINCE_MINOR, TERMINAL_STATES, Ack, Inject, PodRef, schema_minor

log = logging.getLogger("controller.engine")


class Starting(Phase):
    # provided by ExperimentRunner (and see Phase)
    _awaits_start: set[str]
    start_sent_at: float | None

    async def _dispatch_all(self, targets: list[str]) -> None:
        dispatch: asyncio.Future[Any] = asyncio.ensure_future(self._dispatch_faults(targets, time.time()))
        waker: asyncio.Future[Any] = asyncio.ensure_future(self._wake_on_abort())
        try:
            await asyncio.wait({dispatch, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waker.cancel()
            if not dispatch.done():
                dispatch.cancel()  # aborted mid-dispatch: send no more; the revert and the lease cover the rest
            await asyncio.gather(dispatch, waker, return_exceptions=True)

    async def _dispatch_faults(self, targets: list[str], t0: float) -> None:
        """Fault by fault, to every target at once (one batch of requests per fault); then the start."""
        for i, f in enumerate(self.experiment.spec.faults):
            if self.aborted:
                return
            fid = fault_id(self.experiment_id, i)
            expires_at = t0 + self.experiment.fault_duration_s(i)
            shared: dict[bool, bytes] = {}  # node-level faults: one command, encoded once, for every node
            payloads: dict[str, bytes] = {}
            for node in targets:
                track = self.tracks[(node, fid)]
                wait = node in self._awaits_start
                if track.pods is None:
                    if wait not in shared:
                        shared[wait] = self._inject_command(f, fid, expires_at, None, wait)
                    payloads[node] = shared[wait]
                else:
                    payloads[node] = self._inject_command(f, fid, expires_at, track.pods, wait)
                track.expires_at = expires_at
                track.dispatched_at = time.time()
                track.move("dispatched", at=track.dispatched_at)
            results = await request_acks(
                self.nc, payloads, timeout_s=self.dispatch_timeout_s, attempts=self.dispatch_attempts
            )
            for node, (ack, why) in results.items():
                self._on_ack(self.tracks[(node, fid)], ack, why)
        if not self.aborted:
            await self._start(targets)

    def _inject_command(
        self, f: Any, fid: str, expires_at: float, pods: list[PodRef] | None, await_start: bool
    ) -> bytes:
        return encode(
            Inject(
                experiment_id=self.experiment_id,
                fault_id=fid,
                spec=f,
                expires_at=expires_at,
                lease_timeout_s=self.experiment.spec.abort.lease_timeout_s,
                pods=pods,
                await_start=await_start,
            )
        )

    def _not_started(self) -> list[Track]:
        """Faults accepted to wait for the start that no event or Ack has shown starting yet."""
        return [
            t for t in self.tracks.values() if t.node in self._awaits_start and t.accepted and t.state == "accepted"
        ]

    async def _start(self, targets: list[str]) -> None:
        """Every target accepted every fault: start them all at once. The broadcast first; then,
        for any node not seen starting within broadcast_wait_s, a Start of its own with its Ack."""
        if not self._awaits_start:
            return
        legacy = [n for n in targets if n not in self._awaits_start]
        self.progress(
            f"{self._t()} all {len(targets)} target(s) accepted; starting"
            + (f" ({len(legacy)} older agent(s) started on acceptance)" if legacy else "")
        )
        self.start_sent_at = time.time()
        why = await broadcast_start(self.nc, self.experiment_id)
        if why is not None:
            log.warning("%s; starting node by node", why)
        end = time.monotonic() + self.broadcast_wait_s
        while self._not_started() and not self.aborted and time.monotonic() < end:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), min(0.1, max(0.0, end - time.monotonic())))
            except TimeoutError:
                pass
        stragglers = sorted({t.node for t in self._not_started()})
        if not stragglers or self.aborted:
            return
        fids = [fault_id(self.experiment_id, i) for i in range(len(self.experiment.spec.faults))]
        results = await start_experiment(
            self.nc,
            stragglers,
            self.experiment_id,
            fids,
            timeout_s=self.dispatch_timeout_s,
            attempts=self.dispatch_attempts,
        )
        for node, (ack, why) in results.items():
            if ack is None or not ack.accepted:
                self.start_unsure.add(node)  # it gets the final per-node revert, whatever it holds
                self.abort(f"agent {node} did not start its faults: {why or (ack.reason if ack else None)}", node=node)
                continue
            for track in (t for t in self.tracks.values() if t.node == node and t.state == "accepted"):
                state = ack.fault_states.get(track.fault_id)
                if state is None:
                    self.start_unsure.add(node)
                    track.move("failed", "the agent no longer holds it (did it restart before the start?)")
                    self.abort(f"agent {node} lost {track.fault_id} before its start", node=node)
                elif state not in TERMINAL_STATES and state != "accepted":
                    track.move(state)
                # a fault that already ended: its event or the agent's heartbeats tell how and why

    async def _wake_on_abort(self) -> None:
        while not self.aborted:
            self._wake.clear()
            await self._wake.wait()

    def _on_ack(self, track: Track, ack: Ack | None, why: str | None) -> None:
        if ack is None:
            track.move("no-reply", why)
            self.abort(f"agent {track.node} did not acknowledge {track.fault_id}: {why}", node=track.node)
            return
        track.acked_at = time.time()
        track.accepted = ack.accepted
        if not ack.accepted:
            track.ack_reason = ack.reason
            track.move("rejected", ack.reason)
            self.abort(f"agent {track.node} rejected {track.fault_id} ({track.kind}): {ack.reason}", node=track.node)
            return
        state = ack.fault_states.get(track.fault_id, "accepted")
        if track.state in PRE_ACK:
            track.move(state)
        self.progress(f"{self._t()} {track.node} {track.fault_id} ({track.kind}): acknowledged")
        if track.node in self._awaits_start and schema_minor(ack.schema_version) < START_SINCE_MINOR:
            # read leniently, the Inject's await_start was ignored: this fault is already applied
            self.abort(
                f"agent {track.node} answered in schema {ack.schema_version}, which cannot wait for the start: "
                f"it applied {track.fault_id} at once (was it downgraded during the run?)",
                node=track.node,
            )
