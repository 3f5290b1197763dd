"""`faultline run FILE --preview`: a dry run that also asks each target what each fault
would touch there now.

Read-only on the agents (a Preview): the checks and the selection of an Inject,
with nothing applied, claimed, recorded or journaled.

- process faults (schema 1.4): which processes would be hit, which skipped and why;
- network faults (1.5): the interface (the default route's when none is given),
  the network namespace, what `force` would replace, and what stays untouched
  (every NATS server the agent may use, the exempt CIDRs);
- cpu and memory faults (1.5): where the stressors would run, how many workers,
  how much memory against what is available and the agent's reserve.

A check an Inject would fail (a foreign qdisc, too little memory, an interface
that is not there) comes back as the reason that target cannot take the fault.
"""

from __future__ import annotations

import time
from typing import Any

from controller.dispatch import request_acks
from controller.fleet import Fleet
from controller.tracking import Plan
from proto.codec import encode
from proto.messages import PREVIEW_ALL_KINDS_SINCE_MINOR, PREVIEW_SINCE_MINOR, Preview, schema_minor
from proto.units import format_size

PROCESS_KINDS = ("process-kill", "process-pause")
PREVIEW_TIMEOUT_S = 10.0  # a scan of every process; one attempt (a second would queue behind the first)


async def preview_faults(nc: Any, fleet: Fleet, faults: list[Any], plan: Plan) -> list[dict[str, Any]]:
    """Per fault: its index, kind, name and, per target, the agent's PreviewResult as a dict or
    ``{"error": why}``. One batch of requests per fault, as dispatch sends Injects."""
    out: list[dict[str, Any]] = []
    for i, f in enumerate(faults):
        since = PREVIEW_SINCE_MINOR if f.kind in PROCESS_KINDS else PREVIEW_ALL_KINDS_SINCE_MINOR
        nodes: dict[str, Any] = {}
        payloads: dict[str, bytes] = {}
        for n in plan.targets:
            view = fleet.get(n)
            if view is not None and schema_minor(view.heartbeat.schema_version) < since:
                nodes[n] = {
                    "error": f"agent {view.heartbeat.version} (schema {view.heartbeat.schema_version}) cannot "
                    f"preview {f.kind} faults; upgrade it to schema 1.{since} or newer"
                }
                if f.kind not in PROCESS_KINDS:
                    # nothing to show, and nothing wrong: a mixed fleet mid-rollout is not a failed preview
                    nodes[n]["unsupported"] = True
                continue
            payloads[n] = encode(Preview(spec=f, pods=plan.pods.get(n), expires_at=time.time() + 30.0))
        results = await request_acks(nc, payloads, timeout_s=PREVIEW_TIMEOUT_S, attempts=1) if payloads else {}
        for n, (ack, why) in results.items():
            if ack is None:
                nodes[n] = {"error": why or "no answer"}
            elif not ack.accepted:  # the preview itself not answered (busy, stopping, too old a kind)
                nodes[n] = {"error": ack.reason or "refused"}
            elif ack.preview is not None and ack.preview.refused is not None:  # what an Inject would get
                nodes[n] = {"error": ack.preview.refused, "refused": True}
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
                lines.append(f"  {node}: {'would be refused' if r.get('refused') else 'cannot preview'}: {r['error']}")
                continue
            if r.get("network") or r.get("stress"):
                lines += _resource_lines(node, r)
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


def _resource_lines(node: str, r: dict[str, Any]) -> list[str]:
    """A network, cpu or memory fault's preview on one node."""
    out = []
    if net := r.get("network"):
        where = f" in netns {net['netns']}" if net.get("netns") else ""
        via = f" (through {net['device']})" if net["device"] != net["interface"] else ""
        out.append(
            f"  {node}: would shape {net['interface']}{where}, {net['direction']}{via}, {net['filters']} filter(s)"
        )
        for u in net["unaffected"]:
            out.append(f"    untouched: {u}")
        for q in net["replaces"]:
            out.append(f"    force: true deletes {q} (not restored)")
    if st := r.get("stress"):
        if st.get("size_bytes") is not None:
            room = ""
            if st.get("available_bytes") is not None:
                room = (
                    f"; available {format_size(st['available_bytes'])}, reserve {format_size(st['reserve_bytes'])}"
                    + (f", other memory faults {format_size(st['promised_bytes'])}" if st.get("promised_bytes") else "")
                )
            out.append(f"  {node}: would allocate {format_size(st['size_bytes'])} in {st['cgroup']}{room}")
        else:
            out.append(
                f"  {node}: would run {st['workers']} worker(s) at {st['load_percent']:g}% of a core each in {st['cgroup']}"
            )
    if r.get("note"):
        out.append(f"    note: {r['note']}")
    return out


def preview_shortfalls(previews: list[dict[str, Any]]) -> list[str]:
    """Why the run would not go as planned: a target that could not answer, or a fault that would
    hit nothing there (its Inject would be refused)."""
    out = []
    for p in previews:
        for node, r in p["nodes"].items():
            if r.get("refused"):
                out.append(f"fault {p['fault']} on {node}: would be refused: {r['error']}")
            elif "error" in r and not r.get("unsupported"):
                out.append(f"fault {p['fault']} on {node}: no preview ({r['error']})")
            elif p["kind"] in PROCESS_KINDS and r["would_hit"] == 0:
                out.append(f"fault {p['fault']} on {node}: would hit no process; the run would fail there")
    return out
