"""Cross-node pod routes (host-gw style): every other Node's podCIDR via its InternalIP.

Routes are installed with a dedicated routing protocol number (``proto``), so the sync
only ever lists, changes or deletes routes carrying that marker; routes made by anyone
else (the pod bridge's connected route, a default route, other agents) are invisible
to it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import structlog
from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .model import canonical_ipv4

log = structlog.get_logger(__name__)

RTPROT_NODEAGENT = 157  # not assigned in /etc/iproute2/rt_protos
MAIN_TABLE = 254


@dataclass(frozen=True)
class NodeRoute:
    node: str
    pod_cidr: str
    via: str


@dataclass
class RouteSyncResult:
    added: list[NodeRoute]
    removed: list[str]  # pod CIDRs
    errors: list[str]


def node_route(node: dict) -> NodeRoute | None:
    """The route a Node asks for, or None when it has no IPv4 podCIDR or InternalIP.
    Raises ValueError for malformed values."""
    name = (node.get("metadata") or {}).get("name") or ""
    spec = node.get("spec") or {}
    cidrs = [spec.get("podCIDR")] + list(spec.get("podCIDRs") or [])
    pod_cidr = None
    for cidr in cidrs:
        if not cidr:
            continue
        try:
            net = ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ValueError(f"node {name}: spec.podCIDR {cidr!r} is not a CIDR") from None
        if net.version == 4:
            pod_cidr = str(net)
            break
    if pod_cidr is None:
        return None
    for address in (node.get("status") or {}).get("addresses") or []:
        if address.get("type") == "InternalIP":
            ip = canonical_ipv4(address.get("address"))
            if ip is not None:
                return NodeRoute(name, pod_cidr, ip)
    return None


class PodRoutes:
    def __init__(self, *, node_name: str, netns: str | None = None,
                 proto: int = RTPROT_NODEAGENT, table: int = MAIN_TABLE) -> None:
        self.node_name = node_name
        self.netns = netns
        self.proto = proto
        self.table = table
        self._nodes: dict[str, dict] = {}

    def on_node(self, event: str, node: dict) -> None:
        name = (node.get("metadata") or {}).get("name") or ""
        if event == "DELETED":
            self._nodes.pop(name, None)
        else:
            self._nodes[name] = node

    def desired(self) -> tuple[dict[str, NodeRoute], list[str]]:
        """Pure: pod CIDR -> route for every other node; plus the reasons for skips."""
        routes: dict[str, NodeRoute] = {}
        errors: list[str] = []
        for name in sorted(self._nodes):
            if name == self.node_name:
                continue
            try:
                route = node_route(self._nodes[name])
            except ValueError as exc:
                errors.append(str(exc))
                continue
            if route is None:
                continue
            if route.pod_cidr in routes:
                errors.append(f"node {name}: podCIDR {route.pod_cidr} is already routed to "
                              f"node {routes[route.pod_cidr].node}")
                continue
            routes[route.pod_cidr] = route
        return routes, errors

    def _ipr(self) -> AsyncIPRoute:
        return AsyncIPRoute(netns=self.netns) if self.netns else AsyncIPRoute()

    async def installed(self) -> dict[str, str]:
        """Our routes in the kernel: pod CIDR -> gateway."""
        out: dict[str, str] = {}
        async with self._ipr() as ipr:
            async for msg in await ipr.route("dump", table=self.table, proto=self.proto):
                if msg["proto"] != self.proto or msg.get("table") != self.table:
                    continue
                out[f"{msg.get('dst')}/{msg['dst_len']}"] = msg.get("gateway") or ""
        return out

    async def sync(self) -> RouteSyncResult:
        routes, errors = self.desired()
        current = await self.installed()
        added: list[NodeRoute] = []
        removed: list[str] = []
        async with self._ipr() as ipr:
            for cidr in sorted(current.keys() - routes.keys()):
                await ipr.route("del", dst=cidr, table=self.table, proto=self.proto)
                removed.append(cidr)
            for cidr, route in routes.items():
                if current.get(cidr) == route.via:
                    continue
                try:
                    await ipr.route("replace", dst=cidr, gateway=route.via, table=self.table, proto=self.proto)
                    added.append(route)
                except NetlinkError as exc:
                    errors.append(f"node {route.node}: route {cidr} via {route.via}: {exc}")
        for error in errors:
            log.error("pod route not installed", error=error)
        if added or removed:
            log.info("pod routes synced", added=[r.pod_cidr for r in added], removed=removed)
        return RouteSyncResult(added, removed, errors)

    async def cleanup(self) -> list[str]:
        """Remove every route carrying our marker."""
        removed = []
        async with self._ipr() as ipr:
            for cidr in await self.installed():
                await ipr.route("del", dst=cidr, table=self.table, proto=self.proto)
                removed.append(cidr)
        return removed
