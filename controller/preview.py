"""`faultline run FILE --preview`: a dry run that also asks each target which processes
each process fault would touch there now.

Read-only on the agents (a Preview, schema 1.4): the selector, the pods, the
protections and count/percent are applied as for an Inject, and nothing is
signalled, recorded or journaled. Only process faults have something to show;
the other kinds are checked by the dry run's capability check alone.
"""

from __future__ import annotations

import time
from typing import Any

from controller.dispatch import request_acks
from controller.fleet import Fleet
from controller.tracking import Plan
from proto.codec import encode
from proto.messages import PREVIEW_SINCE_MINOR, Preview, schema_minor

PREVIEW_KINDS = ("process-kill", "process-pause")
PREVIEW_TIMEOUT_S = 10.0  # a scan of every process; one attempt (a second would queue behind the first)


async def preview_faults(nc: Any, fleet: Fleet, faults: list[Any], plan: Plan) -> list[dict[str, Any]]:
    """Per process fault: its index, kind, name and, per target, the agent's PreviewResult as a
    dict or ``{"error": why}``. One batch of requests per fault, as dispatch sends Injects."""
    out: list[dict[str, Any]] = []
    for i, f in enumerate(faults):
        if f.kind not in PREVIEW_KINDS:
            continue
        nodes: dict[str, Any] = {}
        payloads: dict[str, bytes] = {}
        for n in plan.targets:
            view = fleet.get(n)
            if view is not None and schema_minor(view.heartbeat.schema_version) < PREVIEW_SINCE_MINOR:
                nodes[n] = {
                    "error": f"agent {view.heartbeat.version} (schema {view.heartbeat.schema_version}) cannot "
                    f"preview; upgrade it to schema 1.{PREVIEW_SINCE_MINOR} or newer"
                }
                continue
            payloads[n] = encode(Preview(spec=f, pods=plan.pods.get(n), expires_at=time.time() + 30.0))
        results = await request_acks(nc, payloads, timeout_s=PREVIEW_TIMEOUT_S, attempts=1) if payloads else {}
        for n, (ack, why) in results.items():
            if ack is None:
                nodes[n] = {"error": why or "no answer"}
            elif not ack.accepted:
                nodes[n] = {"error": ack.reason or "refused"}
            elif ack.preview is None:
                nodes[n] = {"error": "the agent answered without a preview"}
            else:
                nodes[n] = ack.preview.model_dump(mode="json")
        out.append({"fault": i, "kind": f.kind, "name": f.name, "nodes": dict(sorted(nodes.items()))})
    return out


def preview_lines(previews: list[dict[str, Any]]) -> list[str]:
    """The text form: per fault and node, what would be hit, what matched, what is protected."""
    lines: list[str] = []
    for p in previews:
        label = f"fault {p['fault']} ({p['kind']}{', ' + p['name'] if p['name'] else ''})"
        lines.append(f"{label}:")
        for node, r in p["nodes"].items():
            if "error" in r:
                lines.append(f"  {node}: cannot preview: {r['error']}")
                continue
            lines.append(
                f"  {node}: would hit {r['would_hit']} of {r['matched_total'] + r['skipped_total']} matching "
                "process(es)"
                + (f"; {r['skipped_total']} skipped (protected, held or already stopped)" if r["skipped_total"] else "")
            )
            for m in r["matched"]:
                who = f" [{m['user']}]" if m.get("user") else ""
                lines.append(f"    {m['pid']:>7} {m['name']}{who}  {m['cmdline'][:100]}")
            if r["matched_total"] > len(r["matched"]):
                lines.append(f"    ... and {r['matched_total'] - len(r['matched'])} more")
            for s in r["skipped"]:
                lines.append(f"    {s['pid']:>7} {s['name']}: skipped, {s['reason']}")
            if r["skipped_total"] > len(r["skipped"]):
                lines.append(f"    ... and {r['skipped_total'] - len(r['skipped'])} more skipped")
            if r.get("note"):
                lines.append(f"    note: {r['note']}")
    return lines


def preview_shortfalls(previews: list[dict[str, Any]]) -> list[str]:
    """Why the run would not go as planned: a target that could not answer, or a fault that would
    hit nothing there (its Inject would be refused)."""
    out = []
    for p in previews:
        for node, r in p["nodes"].items():
            if "error" in r:
                out.append(f"fault {p['fault']} on {node}: no preview ({r['error']})")
            elif r["would_hit"] == 0:
                out.append(f"fault {p['fault']} on {node}: would hit no process; the run would fail there")
    return out
