"""Human-readable view of what the proxy programmed (``nodeagent proxy show``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .model import Endpoint, ServiceError
from .ruleset import HOSTPORT_IPS, HOSTPORTS, ProxyConfig, ServiceView
from .stmts import DNAT

if TYPE_CHECKING:
    from .diff import AppliedState


def _frontends(view: ServiceView) -> str:
    port = view.port
    parts = [f"{port.cluster_ip}:{port.port}"]
    if port.node_port:
        parts.append(f"*:{port.node_port} (NodePort)")
    parts += [f"{ip}:{port.port} (external)" for ip in port.external_ips]
    parts += [f"{ip}:{port.port} (LB)" for ip in port.load_balancer_ips]
    return ", ".join(parts)


def _endpoint(ep: Endpoint, view: ServiceView, node_name: str) -> str:
    notes = []
    if ep.node_name == node_name:
        notes.append("local")
    used = ep in view.cluster_endpoints or ep in view.local_endpoints
    if ep.terminating:
        notes.append("terminating")
    if not ep.ready and not ep.terminating:
        notes.append("not ready")
    if not used:
        notes.append("unused")
    return f"{ep.ip}:{ep.port}" + (f" ({', '.join(notes)})" if notes else "")


def _policies(view: ServiceView) -> str:
    port = view.port
    notes = []
    if port.external_policy_local:
        notes.append("externalTrafficPolicy=Local")
    if port.internal_policy_local:
        notes.append("internalTrafficPolicy=Local")
    if port.affinity_timeout:
        notes.append(f"sessionAffinity=ClientIP({port.affinity_timeout}s)")
    return ", ".join(notes)


def describe_state(config: ProxyConfig, state: "AppliedState", errors: list[ServiceError],
                   host_port_errors: list[str]) -> str:
    lines = [
        f"table ip {config.table}  node {config.node_name} ({', '.join(config.node_ips) or 'no addresses'})  "
        f"cluster CIDR {config.cluster_cidr}  service CIDR {config.service_cidr}",
        "",
    ]
    views: list[ServiceView] = []
    for frag in state.fragments.values():
        views.extend(frag.services)
    views.sort(key=lambda v: v.port.name)
    rows = [("SERVICE", "PROTO", "FRONTENDS", "ENDPOINTS")]
    for view in views:
        if view.all_endpoints:
            endpoints = ", ".join(_endpoint(ep, view, config.node_name) for ep in view.all_endpoints)
        else:
            endpoints = "-"
        if not view.cluster_endpoints:
            endpoints += "  [no usable endpoint: rejected]"
        policies = _policies(view)
        if policies:
            endpoints += f"  [{policies}]"
        rows.append((str(view.port.name), view.port.protocol.upper(), _frontends(view), endpoints))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:3])) + "  " + row[3])
    host_ports = []
    chains = state.chains()
    for (set_name, key), holders in sorted(state.claims.items(), key=lambda kv: str(kv[0])):
        if set_name not in (HOSTPORTS, HOSTPORT_IPS) or not holders or holders[0][1] is None:
            continue
        chain = chains.get(holders[0][1].chain or "")
        dnat = next((stmt for rule in (chain.rules if chain else ()) for stmt in rule if isinstance(stmt, DNAT)), None)
        target = f"{dnat.ip}:{dnat.port}" if dnat else "?"
        where = f"{key[0]}:{key[2]}/{key[1]}" if set_name == HOSTPORT_IPS else f"*:{key[1]}/{key[0]}"
        host_ports.append(f"  {where} -> {target}")
    if host_ports:
        lines += ["", "hostPorts:"] + host_ports
    if errors or host_port_errors:
        lines += ["", "not programmed:"]
        lines += [f"  {error}" for error in errors]
        lines += [f"  {error}" for error in host_port_errors]
    return "\n".join(lines) + "\n"
