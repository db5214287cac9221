"""Typed views of Kubernetes Service / EndpointSlice objects, with validation.

The proxy receives plain dicts in Kubernetes JSON form. Everything that reaches the
ruleset builder has been checked here, so a bad Service is reported once, by name and
field, and can never produce a kernel error that would fail the batch for everyone.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import NamedTuple

DEFAULT_AFFINITY_TIMEOUT = 10800  # seconds, core/v1 default for ClientIP affinity
MAX_AFFINITY_TIMEOUT = 86400
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
PROTOCOLS = {"TCP": "tcp", "UDP": "udp", "SCTP": "sctp"}


@dataclass(frozen=True)
class ServiceError:
    """A Service (or part of one) that was not programmed."""

    service: str  # "namespace/name"
    field: str  # e.g. "spec.ports[1].nodePort"
    message: str

    def __str__(self) -> str:
        return f"service {self.service}: {self.field}: {self.message}"


class InvalidService(Exception):
    def __init__(self, error: ServiceError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(frozen=True, order=True)
class ServicePortName:
    namespace: str
    name: str
    port: str  # the port's name ("" for a single unnamed port)
    protocol: str  # tcp / udp / sctp

    @property
    def service(self) -> str:
        return f"{self.namespace}/{self.name}"

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}:{self.port}" if self.port else self.service


@dataclass(frozen=True)
class ServicePort:
    name: ServicePortName
    cluster_ip: str
    port: int
    node_port: int | None = None
    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()
    affinity_timeout: int | None = None  # None: no session affinity
    external_policy_local: bool = False
    internal_policy_local: bool = False

    @property
    def protocol(self) -> str:
        return self.name.protocol

    @property
    def chain_id(self) -> str:
        """Readable, unique per service port; used in chain and set names."""
        n = self.name
        return f"{n.namespace}/{n.name}/{n.protocol}/{n.port or self.port}"

    @property
    def has_external(self) -> bool:
        return bool(self.node_port or self.external_ips or self.load_balancer_ips)


class Endpoint(NamedTuple):
    """One address:port of a service port (a named tuple: a large cluster has 100,000
    of them, and named tuples are cheaper to build than dataclasses)."""

    ip: str
    port: int
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str | None = None

    @property
    def key(self) -> str:
        return f"{self.ip}/{self.port}"


@dataclass
class ParsedService:
    key: tuple[str, str]
    ports: list[ServicePort] = field(default_factory=list)


def canonical_ipv4(value: object) -> str | None:
    """``value`` if it is an IPv4 address in canonical dotted-quad form, else None.
    (inet_pton accepts exactly that: no "10.1" shorthand, no leading zeros, no spaces;
    and it is much faster than the ipaddress module.)"""
    if not isinstance(value, str):
        return None
    try:
        socket.inet_pton(socket.AF_INET, value)
    except OSError:
        return None
    return value


def _ipv4(value: object, service: str, where: str) -> str:
    ip = canonical_ipv4(value)
    if ip is None:
        raise InvalidService(ServiceError(service, where, f"{value!r} is not an IPv4 address"))
    return ip


def _port(value: object, service: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise InvalidService(ServiceError(service, where, f"{value!r} is not a port (1-65535)"))
    return value


def service_key(obj: dict) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return (meta.get("namespace") or "default", meta.get("name") or "")


def parse_service(svc: dict, nodeport_range: tuple[int, int] = (30000, 32767)) -> ParsedService:
    """Turn a core/v1 Service into ServicePorts, or raise InvalidService.

    Services that are not proxied (headless, ExternalName) give an empty port list.
    """
    key = service_key(svc)
    name = f"{key[0]}/{key[1]}"
    if not key[1]:
        raise InvalidService(ServiceError(name, "metadata.name", "missing"))
    spec = svc.get("spec") or {}
    svc_type = spec.get("type") or "ClusterIP"
    if svc_type not in ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName"):
        raise InvalidService(ServiceError(name, "spec.type", f"unknown type {svc_type!r}"))
    parsed = ParsedService(key)
    cluster_ip = spec.get("clusterIP") or next(iter(spec.get("clusterIPs") or []), "")
    if svc_type == "ExternalName" or cluster_ip == "None":
        return parsed
    if not cluster_ip:
        raise InvalidService(ServiceError(name, "spec.clusterIP", "not allocated"))
    cluster_ip = _ipv4(cluster_ip, name, "spec.clusterIP")

    external_ips = tuple(
        _ipv4(ip, name, f"spec.externalIPs[{i}]") for i, ip in enumerate(spec.get("externalIPs") or [])
    )
    lb_ips: list[str] = []
    if svc_type == "LoadBalancer":
        ingress = ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
        for i, item in enumerate(ingress):
            if item.get("ip"):
                lb_ips.append(_ipv4(item["ip"], name, f"status.loadBalancer.ingress[{i}].ip"))

    affinity_timeout = None
    if spec.get("sessionAffinity") == "ClientIP":
        config = ((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {})
        affinity_timeout = config.get("timeoutSeconds", DEFAULT_AFFINITY_TIMEOUT)
        if (isinstance(affinity_timeout, bool) or not isinstance(affinity_timeout, int)
                or not 1 <= affinity_timeout <= MAX_AFFINITY_TIMEOUT):
            raise InvalidService(ServiceError(
                name, "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                f"{affinity_timeout!r} is not in 1-{MAX_AFFINITY_TIMEOUT}"))
    elif spec.get("sessionAffinity") not in (None, "", "None"):
        raise InvalidService(ServiceError(name, "spec.sessionAffinity",
                                          f"unknown value {spec.get('sessionAffinity')!r}"))

    external_local = (spec.get("externalTrafficPolicy") == "Local"
                      and svc_type in ("NodePort", "LoadBalancer"))
    internal_local = spec.get("internalTrafficPolicy") == "Local"

    ports = spec.get("ports") or []
    if not isinstance(ports, list):
        raise InvalidService(ServiceError(name, "spec.ports", "must be a list"))
    seen: set[tuple[int, str]] = set()
    seen_names: set[tuple[str, str]] = set()
    low, high = nodeport_range
    for i, port_spec in enumerate(ports):
        where = f"spec.ports[{i}]"
        proto_name = port_spec.get("protocol") or "TCP"
        if proto_name not in PROTOCOLS:
            raise InvalidService(ServiceError(name, f"{where}.protocol", f"unsupported protocol {proto_name!r}"))
        proto = PROTOCOLS[proto_name]
        port = _port(port_spec.get("port"), name, f"{where}.port")
        if (port, proto) in seen:
            raise InvalidService(ServiceError(name, f"{where}.port", f"duplicate port {port}/{proto_name}"))
        seen.add((port, proto))
        port_name = port_spec.get("name") or ""
        if (port_name, proto) in seen_names:
            raise InvalidService(ServiceError(name, f"{where}.name", f"duplicate port name {port_name!r}"))
        seen_names.add((port_name, proto))
        node_port = port_spec.get("nodePort")
        if svc_type in ("NodePort", "LoadBalancer") and node_port not in (None, 0):
            node_port = _port(node_port, name, f"{where}.nodePort")
            if not low <= node_port <= high:
                raise InvalidService(ServiceError(
                    name, f"{where}.nodePort", f"{node_port} is outside the NodePort range {low}-{high}"))
        else:
            node_port = None
        parsed.ports.append(ServicePort(
            name=ServicePortName(key[0], key[1], port_name, proto),
            cluster_ip=cluster_ip,
            port=port,
            node_port=node_port,
            external_ips=external_ips,
            load_balancer_ips=tuple(lb_ips),
            affinity_timeout=affinity_timeout,
            external_policy_local=external_local,
            internal_policy_local=internal_local,
        ))
    return parsed


def slice_service(slice_: dict) -> tuple[str, str] | None:
    meta = slice_.get("metadata") or {}
    owner = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
    if not owner:
        return None
    return (meta.get("namespace") or "default", owner)


def slice_endpoints(slice_: dict) -> dict[tuple[str, str], list[Endpoint]]:
    """Endpoints of one discovery.k8s.io/v1 EndpointSlice, keyed by (port name, protocol).

    Per the API, a nil ``ready`` means ready, a nil ``serving`` means "same as ready" and
    a nil ``terminating`` means not terminating.
    """
    if (slice_.get("addressType") or "IPv4") != "IPv4":
        return {}
    out: dict[tuple[str, str], list[Endpoint]] = {}
    for port_spec in slice_.get("ports") or []:
        proto = PROTOCOLS.get(port_spec.get("protocol") or "TCP")
        port = port_spec.get("port")
        if proto is None or isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            continue
        eps = out.setdefault((port_spec.get("name") or "", proto), [])
        for ep in slice_.get("endpoints") or []:
            conditions = ep.get("conditions") or {}
            ready = conditions.get("ready")
            ready = True if ready is None else bool(ready)
            serving = conditions.get("serving")
            serving = ready if serving is None else bool(serving)
            terminating = bool(conditions.get("terminating"))
            node = ep.get("nodeName")
            for address in ep.get("addresses") or []:
                ip = canonical_ipv4(address)
                if ip is not None:
                    eps.append(Endpoint(ip, port, ready, serving, terminating, node))
    return out


def usable_endpoints(endpoints: list[Endpoint]) -> list[Endpoint]:
    """Ready endpoints; or, only when none is ready, the serving terminating ones."""
    ready = [ep for ep in endpoints if ep.ready and not ep.terminating]
    if ready:
        return ready
    return [ep for ep in endpoints if ep.serving and ep.terminating]


def merge_endpoints(groups: list[list[Endpoint]]) -> list[Endpoint]:
    """Merge endpoints from several slices; one entry per ip:port, the best state wins."""
    if len(groups) == 1 and len({(ep.ip, ep.port) for ep in groups[0]}) == len(groups[0]):
        return sorted(groups[0], key=lambda ep: (socket.inet_pton(socket.AF_INET, ep.ip), ep.port))
    best: dict[tuple[str, int], Endpoint] = {}
    for group in groups:
        for ep in group:
            key = (ep.ip, ep.port)
            old = best.get(key)
            if old is None or _rank(ep) > _rank(old):
                best[key] = ep
    return sorted(best.values(), key=lambda ep: (socket.inet_pton(socket.AF_INET, ep.ip), ep.port))


def _rank(ep: Endpoint) -> tuple[bool, bool, bool]:
    return (ep.ready and not ep.terminating, ep.serving, not ep.terminating)


@dataclass(frozen=True)
class HostPortMapping:
    """A container's hostPort: DNAT node:host_port -> pod_ip:container_port."""

    protocol: str  # "TCP" / "UDP" / "SCTP" (case-insensitive)
    host_port: int
    pod_ip: str
    container_port: int
    host_ip: str | None = None  # only this node address; None/"0.0.0.0" = all node addresses
