"""Server-side printing (meta.k8s.io/v1 Table) for `kubectl get`, following the column
sets and cell rules of the upstream printers."""

from __future__ import annotations

import datetime as dt
from typing import Any, Callable

Column = tuple[str, str, str, int]  # name, type, format, priority


def parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def human_duration(seconds: float) -> str:
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        rest = s % 60
        return f"{minutes}m" if rest == 0 else f"{minutes}m{rest}s"
    if minutes < 180:
        return f"{minutes}m"
    hours = s // 3600
    if hours < 8:
        rest = minutes % 60
        return f"{hours}h" if rest == 0 else f"{hours}h{rest}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        rest = hours % 24
        return f"{hours // 24}d" if rest == 0 else f"{hours // 24}d{rest}h"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        days = (hours // 24) % 365
        return f"{hours // 24 // 365}y" if days == 0 else f"{hours // 24 // 365}y{days}d"
    return f"{hours // 24 // 365}y"


def since(value: str | None, now: dt.datetime) -> str:
    when = parse_time(value)
    if when is None:
        return "<unknown>"
    return human_duration((now - when).total_seconds())


def _meta(obj: dict) -> dict:
    return obj.get("metadata") or {}


def _age(obj: dict, now: dt.datetime) -> str:
    return since(_meta(obj).get("creationTimestamp"), now)


# --- pods ---------------------------------------------------------------------------

def _pod_row(pod: dict, now: dt.datetime) -> list[Any]:
    spec, status = pod.get("spec") or {}, pod.get("status") or {}
    init_specs = spec.get("initContainers") or []
    restartable_init = {c["name"] for c in init_specs if c.get("restartPolicy") == "Always"}
    total = len(spec.get("containers") or []) + len(restartable_init)
    ready = 0
    restarts = 0
    last_restart: dt.datetime | None = None
    reason = status.get("phase") or ""
    if status.get("reason"):
        reason = status["reason"]
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("reason") == "SchedulingGated":
            reason = "SchedulingGated"

    def note_restart(cs: dict) -> None:
        nonlocal last_restart
        term = (cs.get("lastState") or {}).get("terminated") or {}
        finished = parse_time(term.get("finishedAt"))
        if finished and (last_restart is None or finished > last_restart):
            last_restart = finished

    initializing = False
    init_statuses = status.get("initContainerStatuses") or []
    for i, cs in enumerate(init_statuses):
        restarts += int(cs.get("restartCount") or 0)
        note_restart(cs)
        state = cs.get("state") or {}
        term, waiting = state.get("terminated"), state.get("waiting")
        if term is not None and term.get("exitCode") == 0:
            continue
        if cs.get("name") in restartable_init and cs.get("started"):
            if cs.get("ready"):
                ready += 1
            continue
        if term is not None:
            if term.get("reason"):
                reason = "Init:" + term["reason"]
            elif term.get("signal"):
                reason = f"Init:Signal:{term['signal']}"
            else:
                reason = f"Init:ExitCode:{term.get('exitCode', 0)}"
        elif waiting is not None and waiting.get("reason") and waiting["reason"] != "PodInitializing":
            reason = "Init:" + waiting["reason"]
        else:
            reason = f"Init:{i}/{len(init_specs)}"
        initializing = True
        break
    initialized = any(c.get("type") == "Initialized" and c.get("status") == "True"
                      for c in status.get("conditions") or [])
    if not initializing or initialized:
        restarts = sum(int(cs.get("restartCount") or 0) for cs in init_statuses
                       if cs.get("name") in restartable_init)
        has_running = False
        for cs in reversed(status.get("containerStatuses") or []):
            restarts += int(cs.get("restartCount") or 0)
            note_restart(cs)
            state = cs.get("state") or {}
            waiting, term = state.get("waiting"), state.get("terminated")
            if waiting is not None and waiting.get("reason"):
                reason = waiting["reason"]
            elif term is not None and term.get("reason"):
                reason = term["reason"]
            elif term is not None:
                reason = (f"Signal:{term['signal']}" if term.get("signal")
                          else f"ExitCode:{term.get('exitCode', 0)}")
            elif cs.get("ready") and state.get("running") is not None:
                has_running = True
                ready += 1
        if reason == "Completed" and has_running:
            ready_cond = any(c.get("type") == "Ready" and c.get("status") == "True"
                             for c in status.get("conditions") or [])
            reason = "Running" if ready_cond else "NotReady"
    if _meta(pod).get("deletionTimestamp"):
        if status.get("reason") == "NodeLost":
            reason = "Unknown"
        elif status.get("phase") not in ("Succeeded", "Failed"):
            reason = "Terminating"
    restarts_text = str(restarts)
    if restarts and last_restart is not None:
        restarts_text = f"{restarts} ({human_duration((now - last_restart).total_seconds())} ago)"
    gates = spec.get("readinessGates") or []
    if gates:
        true_conds = {c.get("type") for c in status.get("conditions") or [] if c.get("status") == "True"}
        gates_text = f"{sum(1 for g in gates if g.get('conditionType') in true_conds)}/{len(gates)}"
    else:
        gates_text = "<none>"
    return [
        _meta(pod).get("name"), f"{ready}/{total}", reason, restarts_text, _age(pod, now),
        status.get("podIP") or "<none>", spec.get("nodeName") or "<none>",
        status.get("nominatedNodeName") or "<none>", gates_text,
    ]


POD_COLUMNS: list[Column] = [
    ("Name", "string", "name", 0), ("Ready", "string", "", 0), ("Status", "string", "", 0),
    ("Restarts", "string", "", 0), ("Age", "string", "", 0), ("IP", "string", "", 1),
    ("Node", "string", "", 1), ("Nominated Node", "string", "", 1),
    ("Readiness Gates", "string", "", 1),
]


# --- nodes --------------------------------------------------------------------------

def _node_row(node: dict, now: dt.datetime) -> list[Any]:
    spec, status = node.get("spec") or {}, node.get("status") or {}
    conds = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    ready = conds.get("Ready")
    state = {"True": "Ready", "False": "NotReady"}.get(ready or "", "Unknown")
    states = [state]
    if spec.get("unschedulable"):
        states.append("SchedulingDisabled")
    labels = _meta(node).get("labels") or {}
    roles = sorted({k.split("/", 1)[1] for k in labels if k.startswith("node-role.kubernetes.io/")
                    and k.split("/", 1)[1]}
                   | ({labels["kubernetes.io/role"]} if labels.get("kubernetes.io/role") else set()))
    info = status.get("nodeInfo") or {}
    addresses = status.get("addresses") or []

    def address(kind: str) -> str:
        return next((a.get("address") for a in addresses if a.get("type") == kind), "<none>")

    return [
        _meta(node).get("name"), ",".join(states), ",".join(roles) or "<none>", _age(node, now),
        info.get("kubeletVersion", ""), address("InternalIP"), address("ExternalIP"),
        info.get("osImage") or "<unknown>", info.get("kernelVersion") or "<unknown>",
        info.get("containerRuntimeVersion") or "<unknown>",
    ]


NODE_COLUMNS: list[Column] = [
    ("Name", "string", "name", 0), ("Status", "string", "", 0), ("Roles", "string", "", 0),
    ("Age", "string", "", 0), ("Version", "string", "", 0), ("Internal-IP", "string", "", 1),
    ("External-IP", "string", "", 1), ("OS-Image", "string", "", 1),
    ("Kernel-Version", "string", "", 1), ("Container-Runtime", "string", "", 1),
]


# --- the rest -----------------------------------------------------------------------

def _service_row(svc: dict, now: dt.datetime) -> list[Any]:
    spec = svc.get("spec") or {}
    ingress = ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    external = spec.get("externalIPs") or []
    if spec.get("type") == "LoadBalancer":
        external = external + [i.get("ip") or i.get("hostname") for i in ingress]
        external_text = ",".join(external) if external else "<pending>"
    elif spec.get("type") == "ExternalName":
        external_text = spec.get("externalName", "")
    else:
        external_text = ",".join(external) if external else "<none>"
    ports = []
    for p in spec.get("ports") or []:
        text = f"{p.get('port')}"
        if p.get("nodePort"):
            text += f":{p['nodePort']}"
        ports.append(f"{text}/{p.get('protocol', 'TCP')}")
    selector = spec.get("selector") or {}
    return [
        _meta(svc).get("name"), spec.get("type", ""), spec.get("clusterIP") or "<none>",
        external_text, ",".join(ports) or "<none>", _age(svc, now),
        ",".join(f"{k}={v}" for k, v in sorted(selector.items())) or "<none>",
    ]


def _event_row(ev: dict, now: dt.datetime) -> list[Any]:
    inv = ev.get("involvedObject") or {}
    last = ev.get("lastTimestamp") or (ev.get("series") or {}).get("lastObservedTime") \
        or ev.get("eventTime") or _meta(ev).get("creationTimestamp")
    first = ev.get("firstTimestamp") or ev.get("eventTime") or _meta(ev).get("creationTimestamp")
    source = ev.get("source") or {}
    source_text = source.get("component") or ev.get("reportingComponent") or ""
    if source.get("host"):
        source_text += f", {source['host']}"
    obj = f"{(inv.get('kind') or '').lower()}/{inv.get('name', '')}"
    return [
        since(last, now), ev.get("type", ""), ev.get("reason", ""), obj,
        (ev.get("message") or "").strip(), inv.get("fieldPath", ""), source_text,
        since(first, now), int(ev.get("count") or (ev.get("series") or {}).get("count") or 1),
        _meta(ev).get("name"),
    ]


def _csr_row(csr: dict, now: dt.datetime) -> list[Any]:
    spec, status = csr.get("spec") or {}, csr.get("status") or {}
    conds = [c.get("type") for c in status.get("conditions") or []]
    state = ",".join(conds) if conds else "Pending"
    if status.get("certificate") and "Approved" in conds:
        state += ",Issued"
    duration = spec.get("expirationSeconds")
    return [
        _meta(csr).get("name"), _age(csr, now), spec.get("signerName", ""), spec.get("username", ""),
        human_duration(duration) if duration else "<none>", state,
    ]


def _slice_row(es: dict, now: dt.datetime) -> list[Any]:
    ports = ",".join(str(p.get("port", "")) for p in es.get("ports") or []) or "<unset>"
    addrs = [a for e in es.get("endpoints") or [] for a in e.get("addresses") or []]
    text = ",".join(addrs[:3]) + (f" + {len(addrs) - 3} more..." if len(addrs) > 3 else "")
    return [_meta(es).get("name"), es.get("addressType", ""), ports, text or "<unset>",
            _age(es, now)]


def _endpoints_row(ep: dict, now: dt.datetime) -> list[Any]:
    items = []
    for subset in ep.get("subsets") or []:
        for a in subset.get("addresses") or []:
            for p in subset.get("ports") or [{}]:
                items.append(f"{a.get('ip')}:{p.get('port')}" if p else a.get("ip"))
    text = ",".join(items[:3]) + (f" + {len(items) - 3} more..." if len(items) > 3 else "")
    return [_meta(ep).get("name"), text or "<none>", _age(ep, now)]


TABLES: dict[str, tuple[list[Column], Callable[[dict, dt.datetime], list[Any]]]] = {
    "Pod": (POD_COLUMNS, _pod_row),
    "Node": (NODE_COLUMNS, _node_row),
    "Namespace": ([("Name", "string", "name", 0), ("Status", "string", "", 0), ("Age", "string", "", 0)],
                  lambda o, now: [_meta(o).get("name"), (o.get("status") or {}).get("phase", ""),
                                  _age(o, now)]),
    "ConfigMap": ([("Name", "string", "name", 0), ("Data", "integer", "", 0), ("Age", "string", "", 0)],
                  lambda o, now: [_meta(o).get("name"),
                                  len(o.get("data") or {}) + len(o.get("binaryData") or {}),
                                  _age(o, now)]),
    "Secret": ([("Name", "string", "name", 0), ("Type", "string", "", 0), ("Data", "integer", "", 0),
                ("Age", "string", "", 0)],
               lambda o, now: [_meta(o).get("name"), o.get("type", ""),
                               len(o.get("data") or {}), _age(o, now)]),
    "ServiceAccount": ([("Name", "string", "name", 0), ("Secrets", "integer", "", 0),
                        ("Age", "string", "", 0)],
                       lambda o, now: [_meta(o).get("name"), len(o.get("secrets") or []),
                                       _age(o, now)]),
    "Service": ([("Name", "string", "name", 0), ("Type", "string", "", 0),
                 ("Cluster-IP", "string", "", 0), ("External-IP", "string", "", 0),
                 ("Port(s)", "string", "", 0), ("Age", "string", "", 0),
                 ("Selector", "string", "", 1)], _service_row),
    "Lease": ([("Name", "string", "name", 0), ("Holder", "string", "", 0), ("Age", "string", "", 0)],
              lambda o, now: [_meta(o).get("name"), (o.get("spec") or {}).get("holderIdentity", ""),
                              _age(o, now)]),
    "Event": ([("Last Seen", "string", "", 0), ("Type", "string", "", 0), ("Reason", "string", "", 0),
               ("Object", "string", "", 0), ("Message", "string", "", 0),
               ("Subobject", "string", "", 1), ("Source", "string", "", 1),
               ("First Seen", "string", "", 1), ("Count", "string", "", 1),
               ("Name", "string", "name", 1)], _event_row),
    "CertificateSigningRequest": ([("Name", "string", "name", 0), ("Age", "string", "", 0),
                                   ("SignerName", "string", "", 0), ("Requestor", "string", "", 0),
                                   ("RequestedDuration", "string", "", 0),
                                   ("Condition", "string", "", 0)], _csr_row),
    "EndpointSlice": ([("Name", "string", "name", 0), ("AddressType", "string", "", 0),
                       ("Ports", "string", "", 0), ("Endpoints", "string", "", 0),
                       ("Age", "string", "", 0)], _slice_row),
    "Endpoints": ([("Name", "string", "name", 0), ("Endpoints", "string", "", 0),
                   ("Age", "string", "", 0)], _endpoints_row),
}

DEFAULT_TABLE: tuple[list[Column], Callable[[dict, dt.datetime], list[Any]]] = (
    [("Name", "string", "name", 0), ("Created At", "date", "", 0)],
    lambda o, now: [_meta(o).get("name"), _meta(o).get("creationTimestamp")],
)


def partial_metadata(obj: dict) -> dict:
    return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
            "metadata": obj.get("metadata") or {}}


def to_table(kind: str, objects: list[dict], *, resource_version: str, include_object: str,
             now: dt.datetime | None = None, continue_token: str = "",
             api_version: str = "v1") -> dict:
    now = now or dt.datetime.now(dt.timezone.utc)
    columns, row_of = TABLES.get(kind, DEFAULT_TABLE)
    rows = []
    for obj in objects:
        row: dict[str, Any] = {"cells": row_of(obj, now)}
        if include_object == "Object":
            row["object"] = dict(obj, kind=kind, apiVersion=obj.get("apiVersion", api_version))
        elif include_object != "None":
            row["object"] = partial_metadata(obj)
        rows.append(row)
    meta: dict[str, Any] = {"resourceVersion": resource_version}
    if continue_token:
        meta["continue"] = continue_token
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": meta,
        "columnDefinitions": [
            {"name": n, "type": t, "format": f, "description": n, "priority": p}
            for n, t, f, p in columns
        ],
        "rows": rows,
    }
