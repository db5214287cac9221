"""UDP conntrack cleanup through pyroute2's ctnetlink socket (blocking).

UDP has no connection teardown: a client that keeps sending to a service keeps its
conntrack entry, and with it the DNAT to an endpoint that may be gone. kube-proxy
deletes such entries when an endpoint is removed, and entries to a service IP that
had no endpoint (they were rejected) when it gets one. The same is done here.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import structlog
from pyroute2.conntrack import Conntrack
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

from .ruleset import ServiceView

log = structlog.get_logger(__name__)

PROTOCOL_NUMBERS = {"udp": socket.IPPROTO_UDP, "sctp": 132}


@dataclass(frozen=True)
class FlushTarget:
    """Entries whose original destination is ``dst_ip:dst_port`` (any destination
    address when ``dst_ip`` is None: NodePorts), optionally only those DNATed to
    ``endpoint_ip``."""

    protocol: str
    dst_ip: str | None
    dst_port: int
    endpoint_ip: str | None = None


def _destinations(view: ServiceView) -> list[tuple[str | None, int]]:
    port = view.port
    out: list[tuple[str | None, int]] = [(port.cluster_ip, port.port)]
    out += [(ip, port.port) for ip in port.external_ips + port.load_balancer_ips]
    if port.node_port:
        out.append((None, port.node_port))
    return out


def _endpoint_ips(view: ServiceView | None) -> set[str]:
    if view is None:
        return set()
    return {ep.ip for ep in view.cluster_endpoints + view.local_endpoints}


def stale_udp_targets(old: list[ServiceView], new: list[ServiceView]) -> list[FlushTarget]:
    """What to flush after moving from ``old`` to ``new`` views of one service."""
    new_by_id = {view.port.chain_id: view for view in new}
    old_by_id = {view.port.chain_id: view for view in old}
    targets: list[FlushTarget] = []
    for chain_id in old_by_id.keys() | new_by_id.keys():
        before, after = old_by_id.get(chain_id), new_by_id.get(chain_id)
        view = after or before
        assert view is not None
        if view.port.protocol not in PROTOCOL_NUMBERS:
            continue
        before_ips, after_ips = _endpoint_ips(before), _endpoint_ips(after)
        for ip in sorted(before_ips - after_ips):
            for dst_ip, dst_port in _destinations(before or view):
                targets.append(FlushTarget(view.port.protocol, dst_ip, dst_port, ip))
        if after is not None and after_ips and not before_ips:
            for dst_ip, dst_port in _destinations(after):
                targets.append(FlushTarget(view.port.protocol, dst_ip, dst_port, None))
    return targets


def flush(targets: list[FlushTarget], netns: str | None) -> int:
    """Delete matching entries; returns how many were deleted. Blocking."""
    if not targets:
        return 0
    kwargs = {"netns": netns} if netns else {}
    deleted = 0
    with Conntrack(**kwargs) as ct:
        for target in targets:
            match = NFCTAttrTuple(proto=PROTOCOL_NUMBERS[target.protocol], dport=target.dst_port)
            if target.dst_ip:
                match.daddr = target.dst_ip
            for entry in list(ct.dump_entries(tuple_orig=match)):
                orig, reply = entry.tuple_orig, entry.tuple_reply
                if orig.dport != target.dst_port or (target.dst_ip and orig.daddr != target.dst_ip):
                    continue
                if target.endpoint_ip and reply.saddr != target.endpoint_ip:
                    continue
                try:
                    ct.delete(entry)
                    deleted += 1
                except Exception as exc:  # the entry may have expired meanwhile
                    log.debug("conntrack delete failed", entry=str(entry), error=str(exc))
    return deleted
