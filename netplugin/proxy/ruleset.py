"""Desired nftables objects for the proxy: pure functions, no kernel access.

The ruleset is the union of *fragments*: one global fragment (base chains, dispatch
chains, the shared maps and sets, hostPorts, egress masquerade) and one fragment per
Service. A fragment owns its chains and sets (service objects carry the service's
namespace/name/protocol/port in their names, so they never collide); map elements and
the shared ``pick-*`` chains may be wanted by several fragments, and the diff
(``diff.py``) reference-counts them.

Layout (table ``ip <name>``)::

    nat-prerouting (nat, prerouting, dstnat)   jump services; jump hostports
    nat-output     (nat, output, dstnat)       jump services; jump hostports
    nat-postrouting(nat, postrouting, srcnat)  jump masquerading; hairpin; pod egress
    services        mark ClusterIP traffic from outside the cluster CIDR
                    ip daddr . meta l4proto . th dport vmap @service-ips
                    fib daddr type local ... meta l4proto . th dport vmap @service-nodeports
    pick-N          choose one of N endpoints: numgen random mod N, looked up with the
                    frontend (address . protocol . port, or protocol . NodePort) in the
                    data maps @endpoints / @nodeport-endpoints, and DNAT to the result
    pick-local-N    the same over this node's endpoints (stored at slot offset 65536)
    pick-masquerade-N  mark for masquerade, then pick-N (external traffic)
    external-<svc>  externalTrafficPolicy=Local entry: source kept, local endpoints
    service-<svc>, local-<svc>, endpoint-<svc>__<ip>/<port>
                    sessionAffinity=ClientIP services only: remembered client -> its
                    endpoint chain, else a random one; the endpoint chain refreshes the
                    client's affinity entry and DNATs
    filter-*        reject services without endpoints; drop unallocated service IPs

docs/PROXY.md explains the choices (and the kernel costs that forced them).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Iterable

from .model import Endpoint, HostPortMapping, ServicePort, usable_endpoints
from .stmts import (
    DNAT,
    AddrPairInSet,
    MapDNAT,
    CtStateNew,
    FibLocal,
    IPInSet,
    IPMatch,
    MarkOr,
    MarkUnset,
    MarkXor,
    Masquerade,
    NumgenVmap,
    Reject,
    Rule,
    UpdateSaddr,
    Verdict,
    Vmap,
    numgen_pick,
)

# set / map names
SERVICE_IPS = "service-ips"
SERVICE_NODEPORTS = "service-nodeports"
NO_ENDPOINT_SERVICES = "no-endpoint-services"
NO_ENDPOINT_NODEPORTS = "no-endpoint-nodeports"
CLUSTER_IPS = "cluster-ips"
HOSTPORTS = "hostports"
HOSTPORT_IPS = "hostport-ips"
HAIRPIN = "hairpin-endpoints"
ENDPOINTS = "endpoints"
NODEPORT_ENDPOINTS = "nodeport-endpoints"

# regular chains of the global fragment
SERVICES_CHAIN = "services"
HOSTPORTS_CHAIN = "hostports"
MASQUERADING_CHAIN = "masquerading"
SERVICE_ENDPOINTS_CHECK = "service-endpoints-check"
NODEPORT_ENDPOINTS_CHECK = "nodeport-endpoints-check"
CLUSTER_IPS_CHECK = "cluster-ips-check"
REJECT_CHAIN = "reject-chain"

KEY_IP_PROTO_PORT = ("ipv4_addr", "inet_proto", "inet_service")
KEY_PROTO_PORT = ("inet_proto", "inet_service")
KEY_IP = ("ipv4_addr",)
KEY_IP_IP = ("ipv4_addr", "ipv4_addr")
KEY_IP_PROTO_PORT_SLOT = ("ipv4_addr", "inet_proto", "inet_service", "mark")
KEY_PROTO_PORT_SLOT = ("inet_proto", "inet_service", "mark")
DATA_IP_PORT = ("ipv4_addr", "inet_service")
# Slots of a frontend's endpoint list: the cluster-wide list at 0..N-1, this node's
# endpoints (traffic policy Local) at LOCAL_SLOTS..LOCAL_SLOTS+M-1. (A service port
# with 65,536 endpoints is far beyond what Kubernetes allows.)
LOCAL_SLOTS = 0x10000

LOOPBACK = "127.0.0.0/8"
DISPATCH_KEYS = ("daddr", "l4proto", "dport")
NODEPORT_KEYS = ("l4proto", "dport")


@dataclass(frozen=True)
class ProxyConfig:
    table: str
    node_name: str
    cluster_cidr: str
    service_cidr: str = "10.96.0.0/12"
    node_ips: tuple[str, ...] = ()
    pod_cidr: str | None = None  # egress masquerade source; defaults to the cluster CIDR
    masquerade_bit: int = 0x4000
    # sessionAffinity services choose among endpoint chains: with a cascade of numgen
    # rules up to this many endpoints, with an anonymous verdict map above it
    cascade_limit: int = 32
    egress_masquerade: bool = True


@dataclass(frozen=True)
class SetSpec:
    name: str
    key: tuple[str, ...]
    verdict_map: bool = False
    dynamic: bool = False  # flags dynamic,timeout: written from the packet path
    data: tuple[str, ...] | None = None  # a data map: the value's fields


@dataclass(frozen=True)
class Chain:
    name: str
    rules: tuple[Rule, ...]
    hook: tuple[str, str, int] | None = None  # (type, hook, priority) for base chains
    # the rules' netlink encoding, filled in by the first encode (chains are immutable,
    # so periodic full resyncs reuse it); not part of the chain's identity
    encoded: tuple[bytes, ...] | None = field(default=None, compare=False, repr=False)


ElementKey = tuple
# a verdict (verdict maps), an (address, port) tuple (data maps), or None (plain sets)
ElementValue = Verdict | tuple | None


@dataclass
class Fragment:
    chains: dict[str, Chain] = field(default_factory=dict)
    sets: dict[str, SetSpec] = field(default_factory=dict)
    elements: dict[tuple[str, ElementKey], ElementValue] = field(default_factory=dict)
    # chains several fragments may need, identical by name (pick-N): reference-counted
    shared_chains: dict[str, Chain] = field(default_factory=dict)
    # what the fragment stands for, for `describe` and conntrack cleanup
    services: list["ServiceView"] = field(default_factory=list)

    def add_chain(self, name: str, rules: Iterable[Rule], hook: tuple[str, str, int] | None = None) -> None:
        self.chains[name] = Chain(name, tuple(rules), hook)


@dataclass(frozen=True)
class ServiceView:
    """A service port as programmed: addresses and the endpoints each path uses."""

    port: ServicePort
    cluster_endpoints: tuple[Endpoint, ...]
    local_endpoints: tuple[Endpoint, ...]
    all_endpoints: tuple[Endpoint, ...]

    @property
    def internal_endpoints(self) -> tuple[Endpoint, ...]:
        return self.local_endpoints if self.port.internal_policy_local else self.cluster_endpoints

    @property
    def external_endpoints(self) -> tuple[Endpoint, ...]:
        return self.local_endpoints if self.port.external_policy_local else self.cluster_endpoints


GLOBAL_SETS = (
    SetSpec(SERVICE_IPS, KEY_IP_PROTO_PORT, verdict_map=True),
    SetSpec(SERVICE_NODEPORTS, KEY_PROTO_PORT, verdict_map=True),
    SetSpec(NO_ENDPOINT_SERVICES, KEY_IP_PROTO_PORT, verdict_map=True),
    SetSpec(NO_ENDPOINT_NODEPORTS, KEY_PROTO_PORT, verdict_map=True),
    SetSpec(CLUSTER_IPS, KEY_IP),
    SetSpec(HOSTPORTS, KEY_PROTO_PORT, verdict_map=True),
    SetSpec(HOSTPORT_IPS, KEY_IP_PROTO_PORT, verdict_map=True),
    SetSpec(HAIRPIN, KEY_IP_IP),
    SetSpec(ENDPOINTS, KEY_IP_PROTO_PORT_SLOT, data=DATA_IP_PORT),
    SetSpec(NODEPORT_ENDPOINTS, KEY_PROTO_PORT_SLOT, data=DATA_IP_PORT),
)

# kube-proxy's priorities: filter checks run just before DNAT (-110) and, for locally
# generated traffic, once more right after it (-90).
DSTNAT = -100
SRCNAT = 100
FILTER_PRE_DNAT = -110
FILTER_POST_DNAT = -90


def global_fragment(config: ProxyConfig, host_ports: list[HostPortMapping] | None = None) -> Fragment:
    frag = Fragment()
    for spec in GLOBAL_SETS:
        frag.sets[spec.name] = spec
    mark = config.masquerade_bit
    new = CtStateNew()

    frag.add_chain("nat-prerouting", [(Verdict("jump", SERVICES_CHAIN),), (Verdict("jump", HOSTPORTS_CHAIN),)],
                   ("nat", "prerouting", DSTNAT))
    frag.add_chain("nat-output", [(Verdict("jump", SERVICES_CHAIN),), (Verdict("jump", HOSTPORTS_CHAIN),)],
                   ("nat", "output", DSTNAT))
    postrouting: list[Rule] = [
        (Verdict("jump", MASQUERADING_CHAIN),),
        # a pod that reached itself through a service: without SNAT it would see a
        # packet from its own address and answer itself, bypassing the DNAT
        (AddrPairInSet(HAIRPIN), Masquerade()),
    ]
    if config.egress_masquerade:
        postrouting.append((IPMatch("saddr", config.pod_cidr or config.cluster_cidr),
                            IPMatch("daddr", config.cluster_cidr, negate=True), Masquerade()))
    frag.add_chain("nat-postrouting", postrouting, ("nat", "postrouting", SRCNAT))
    frag.add_chain("filter-input", [(new, Verdict("jump", NODEPORT_ENDPOINTS_CHECK)),
                                    (new, Verdict("jump", SERVICE_ENDPOINTS_CHECK))],
                   ("filter", "input", FILTER_PRE_DNAT))
    frag.add_chain("filter-forward", [(new, Verdict("jump", SERVICE_ENDPOINTS_CHECK)),
                                      (new, Verdict("jump", CLUSTER_IPS_CHECK))],
                   ("filter", "forward", FILTER_PRE_DNAT))
    frag.add_chain("filter-output", [(new, Verdict("jump", SERVICE_ENDPOINTS_CHECK))],
                   ("filter", "output", FILTER_PRE_DNAT))
    frag.add_chain("filter-output-post-dnat", [(new, Verdict("jump", CLUSTER_IPS_CHECK))],
                   ("filter", "output", FILTER_POST_DNAT))

    frag.add_chain(SERVICES_CHAIN, [
        # ClusterIP traffic from outside the cluster CIDR (the node itself, other
        # hosts) is masqueraded so that replies come back through this node
        (IPInSet("daddr", CLUSTER_IPS), IPMatch("saddr", config.cluster_cidr, negate=True), MarkOr(mark)),
        (Vmap(DISPATCH_KEYS, SERVICE_IPS),),
        (FibLocal("daddr"), IPMatch("daddr", LOOPBACK, negate=True), Vmap(NODEPORT_KEYS, SERVICE_NODEPORTS)),
    ])
    frag.add_chain(HOSTPORTS_CHAIN, [
        (Vmap(DISPATCH_KEYS, HOSTPORT_IPS),),
        (FibLocal("daddr"), IPMatch("daddr", LOOPBACK, negate=True), Vmap(NODEPORT_KEYS, HOSTPORTS)),
    ])
    frag.add_chain(MASQUERADING_CHAIN, [
        (MarkUnset(mark), Verdict("return")),
        (MarkXor(mark),),
        (Masquerade(),),
    ])
    frag.add_chain(SERVICE_ENDPOINTS_CHECK, [(Vmap(DISPATCH_KEYS, NO_ENDPOINT_SERVICES),)])
    frag.add_chain(NODEPORT_ENDPOINTS_CHECK, [
        (FibLocal("daddr"), IPMatch("daddr", LOOPBACK, negate=True), Vmap(NODEPORT_KEYS, NO_ENDPOINT_NODEPORTS)),
    ])
    frag.add_chain(CLUSTER_IPS_CHECK, [
        (IPInSet("daddr", CLUSTER_IPS), Reject()),
        (IPMatch("daddr", config.service_cidr), Verdict("drop")),
    ])
    frag.add_chain(REJECT_CHAIN, [(Reject(),)])

    for mapping in host_ports or []:
        add_host_port(frag, config, mapping)
    return frag


def normalize_host_port(mapping: HostPortMapping) -> HostPortMapping:
    """Validated copy (protocol lower-case, host_ip None for "all"); raises ValueError."""
    proto = (mapping.protocol or "TCP").lower()
    if proto not in ("tcp", "udp", "sctp"):
        raise ValueError(f"protocol {mapping.protocol!r} is not TCP, UDP or SCTP")
    for what, port in (("host_port", mapping.host_port), ("container_port", mapping.container_port)):
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError(f"{what} {port!r} is not a port (1-65535)")
    pod_ip = str(ipaddress.IPv4Address(mapping.pod_ip))
    host_ip = mapping.host_ip or None
    if host_ip is not None:
        host_ip = str(ipaddress.IPv4Address(host_ip))
        if host_ip == "0.0.0.0":
            host_ip = None
    return HostPortMapping(proto, mapping.host_port, pod_ip, mapping.container_port, host_ip)


def host_port_chain(mapping: HostPortMapping) -> str:
    return f"hostport-{mapping.protocol}/{mapping.host_ip or '*'}/{mapping.host_port}"


def add_host_port(frag: Fragment, config: ProxyConfig, mapping: HostPortMapping) -> None:
    """``mapping`` must be normalized. DNAT node:hostPort to the pod (hairpin: postrouting)."""
    chain = host_port_chain(mapping)
    frag.add_chain(chain, [(DNAT(mapping.protocol, mapping.pod_ip, mapping.container_port),)])
    frag.elements[(HAIRPIN, (mapping.pod_ip, mapping.pod_ip))] = None
    if mapping.host_ip:
        frag.elements[(HOSTPORT_IPS, (mapping.host_ip, mapping.protocol, mapping.host_port))] = Verdict("goto", chain)
    else:
        frag.elements[(HOSTPORTS, (mapping.protocol, mapping.host_port))] = Verdict("goto", chain)


# ---------------------------------------------------------------- services


def endpoint_chain(port: ServicePort, ep: Endpoint) -> str:
    return f"endpoint-{port.chain_id}__{ep.key}"


def affinity_set(port: ServicePort, ep: Endpoint) -> str:
    return f"affinity-{port.chain_id}__{ep.key}"


def service_chain(port: ServicePort) -> str:
    return f"service-{port.chain_id}"


def local_chain(port: ServicePort) -> str:
    return f"local-{port.chain_id}"


def external_chain(port: ServicePort) -> str:
    return f"external-{port.chain_id}"


def pick_chain(count: int, local: bool = False) -> Chain:
    """The shared chain choosing one of ``count`` endpoints of whatever frontend the
    packet was sent to: a ClusterIP/externalIP/LB address, or else a NodePort."""
    offset = LOCAL_SLOTS if local else 0
    name = f"pick-local-{count}" if local else f"pick-{count}"
    return Chain(name, (
        (MapDNAT(DISPATCH_KEYS, count, offset, ENDPOINTS),),
        # only reached when the first lookup missed: the packet came to a NodePort
        (MapDNAT(NODEPORT_KEYS, count, offset, NODEPORT_ENDPOINTS),),
    ))


def masquerade_pick_chain(count: int, mark: int) -> Chain:
    return Chain(f"pick-masquerade-{count}", ((MarkOr(mark),), (Verdict("goto", f"pick-{count}"),)))


def service_fragment(config: ProxyConfig, ports: list[ServicePort],
                     endpoints: dict[tuple[str, str], list[Endpoint]]) -> Fragment:
    """All objects of one Service. ``endpoints`` maps (port name, protocol) to the
    merged endpoints of all the service's slices."""
    frag = Fragment()
    for port in ports:
        eps = endpoints.get((port.name.port, port.protocol), [])
        if port.affinity_timeout:
            _add_affinity_port(frag, config, port, eps)
        else:
            _add_port(frag, config, port, eps)
    return frag


def _lists(config: ProxyConfig, port: ServicePort, eps: list[Endpoint]) -> "ServiceView":
    cluster_eps = tuple(usable_endpoints(eps))
    local_eps = tuple(usable_endpoints([ep for ep in eps if ep.node_name == config.node_name]))
    return ServiceView(port, cluster_eps, local_eps, tuple(eps))


def _use_pick(frag: Fragment, count: int, local: bool = False) -> Verdict:
    chain = pick_chain(count, local)
    frag.shared_chains[chain.name] = chain
    return Verdict("goto", chain.name)


def _add_slots(frag: Fragment, set_name: str, frontend: tuple, eps: tuple[Endpoint, ...], first: int) -> None:
    for slot, ep in enumerate(eps, first):
        frag.elements[(set_name, frontend + (slot,))] = (ep.ip, ep.port)


def _add_port(frag: Fragment, config: ProxyConfig, port: ServicePort, eps: list[Endpoint]) -> None:
    """A service port without session affinity: everything is map elements, plus an
    external-<svc> chain when externalTrafficPolicy is Local."""
    view = _lists(config, port, eps)
    frag.services.append(view)
    cluster_eps, local_eps = view.cluster_endpoints, view.local_endpoints
    proto = port.protocol
    reject = Verdict("goto", REJECT_CHAIN)

    # internal traffic: the ClusterIP, whose slots hold the internal policy's list
    frag.elements[(CLUSTER_IPS, (port.cluster_ip,))] = None
    cluster_key = (port.cluster_ip, proto, port.port)
    internal = view.internal_endpoints
    if internal:
        frag.elements[(SERVICE_IPS, cluster_key)] = _use_pick(frag, len(internal))
        _add_slots(frag, ENDPOINTS, cluster_key, internal, 0)
    elif port.internal_policy_local and cluster_eps:
        # endpoints exist, but none here: kube-proxy drops rather than rejects
        frag.elements[(NO_ENDPOINT_SERVICES, cluster_key)] = Verdict("drop")
    else:
        frag.elements[(NO_ENDPOINT_SERVICES, cluster_key)] = reject
    used = set(internal)

    if port.has_external:
        external_keys = [(ip, proto, port.port) for ip in port.external_ips + port.load_balancer_ips]
        node_key = (proto, port.node_port) if port.node_port else None
        if not cluster_eps:
            for key in external_keys:
                frag.elements[(NO_ENDPOINT_SERVICES, key)] = reject
            if node_key:
                frag.elements[(NO_ENDPOINT_NODEPORTS, node_key)] = reject
        else:
            # every external frontend holds the cluster-wide list at slots 0.. (also
            # used by pods and the node itself under policy Local) and, with policy
            # Local, this node's endpoints from LOCAL_SLOTS on
            local_list = local_eps if port.external_policy_local else ()
            for key in external_keys:
                _add_slots(frag, ENDPOINTS, key, cluster_eps, 0)
                _add_slots(frag, ENDPOINTS, key, local_list, LOCAL_SLOTS)
            if node_key:
                _add_slots(frag, NODEPORT_ENDPOINTS, node_key, cluster_eps, 0)
                _add_slots(frag, NODEPORT_ENDPOINTS, node_key, local_list, LOCAL_SLOTS)
            used.update(cluster_eps)
            used.update(local_list)
            to_cluster = _use_pick(frag, len(cluster_eps))
            if not port.external_policy_local:
                chain = masquerade_pick_chain(len(cluster_eps), config.masquerade_bit)
                frag.shared_chains[chain.name] = chain
                target = Verdict("goto", chain.name)
            else:
                # pods and the node itself still reach every endpoint (local sources
                # are masqueraded so that replies come back here); other clients keep
                # their address and reach this node's endpoints only, or are dropped
                target = Verdict("goto", external_chain(port))
                frag.add_chain(external_chain(port), [
                    (IPMatch("saddr", config.cluster_cidr), to_cluster),
                    (FibLocal("saddr"), MarkOr(config.masquerade_bit)),
                    (FibLocal("saddr"), to_cluster),
                    (_use_pick(frag, len(local_eps), local=True),) if local_eps else (Verdict("drop"),),
                ])
            for key in external_keys:
                frag.elements[(SERVICE_IPS, key)] = target
            if node_key:
                frag.elements[(SERVICE_NODEPORTS, node_key)] = target
    for ep in used:
        frag.elements[(HAIRPIN, (ep.ip, ep.ip))] = None


def _affinity_pick(port: ServicePort, endpoints: tuple[Endpoint, ...], limit: int) -> list[Rule]:
    """A client seen recently goes to its endpoint's chain; others are spread uniformly:
    a cascade where rule i fires with probability 1/(N-i), or above ``limit`` endpoints
    one numgen lookup in an anonymous verdict map."""
    targets = [endpoint_chain(port, ep) for ep in endpoints]
    rules: list[Rule] = [(IPInSet("saddr", affinity_set(port, ep)), Verdict("goto", target))
                         for ep, target in zip(endpoints, targets)]
    n = len(targets)
    if n > limit:
        rules.append((NumgenVmap(tuple(targets)),))
        return rules
    for i, target in enumerate(targets[:-1]):
        rules.append((numgen_pick(n - i), Verdict("goto", target)))
    rules.append((Verdict("goto", targets[-1]),))
    return rules


def _add_affinity_port(frag: Fragment, config: ProxyConfig, port: ServicePort, eps: list[Endpoint]) -> None:
    """sessionAffinity: ClientIP needs per-endpoint state (a dynamic set of clients per
    endpoint, refreshed by the endpoint's chain), so these services keep kube-proxy's
    chain-per-endpoint layout."""
    mark = config.masquerade_bit
    view = _lists(config, port, eps)
    frag.services.append(view)
    cluster_eps, local_eps = view.cluster_endpoints, view.local_endpoints
    proto = port.protocol
    reject = Verdict("goto", REJECT_CHAIN)

    need_cluster_chain = bool(cluster_eps) and (not port.internal_policy_local or port.has_external)
    need_local_chain = bool(local_eps) and (port.internal_policy_local or
                                           (port.has_external and port.external_policy_local))
    chosen: dict[Endpoint, None] = {}
    if need_cluster_chain:
        chosen.update(dict.fromkeys(cluster_eps))
    if need_local_chain:
        chosen.update(dict.fromkeys(local_eps))
    for ep in chosen:
        frag.elements[(HAIRPIN, (ep.ip, ep.ip))] = None
        name = affinity_set(port, ep)
        frag.sets[name] = SetSpec(name, KEY_IP, dynamic=True)
        frag.add_chain(endpoint_chain(port, ep), [
            (UpdateSaddr(name, port.affinity_timeout or 0),),
            (DNAT(proto, ep.ip, ep.port),),
        ])
    if need_cluster_chain:
        frag.add_chain(service_chain(port), _affinity_pick(port, cluster_eps, config.cascade_limit))
    if need_local_chain:
        frag.add_chain(local_chain(port), _affinity_pick(port, local_eps, config.cascade_limit))

    frag.elements[(CLUSTER_IPS, (port.cluster_ip,))] = None
    cluster_key = (port.cluster_ip, proto, port.port)
    if port.internal_policy_local and local_eps:
        frag.elements[(SERVICE_IPS, cluster_key)] = Verdict("goto", local_chain(port))
    elif port.internal_policy_local and cluster_eps:
        frag.elements[(NO_ENDPOINT_SERVICES, cluster_key)] = Verdict("drop")
    elif cluster_eps:
        frag.elements[(SERVICE_IPS, cluster_key)] = Verdict("goto", service_chain(port))
    else:
        frag.elements[(NO_ENDPOINT_SERVICES, cluster_key)] = reject

    if not port.has_external:
        return
    external_keys = [(ip, proto, port.port) for ip in port.external_ips + port.load_balancer_ips]
    if not cluster_eps:
        for key in external_keys:
            frag.elements[(NO_ENDPOINT_SERVICES, key)] = reject
        if port.node_port:
            frag.elements[(NO_ENDPOINT_NODEPORTS, (proto, port.node_port))] = reject
        return
    ext = external_chain(port)
    if port.external_policy_local:
        rules = [
            (IPMatch("saddr", config.cluster_cidr), Verdict("goto", service_chain(port))),
            (FibLocal("saddr"), MarkOr(mark)),
            (FibLocal("saddr"), Verdict("goto", service_chain(port))),
            (Verdict("goto", local_chain(port)),) if local_eps else (Verdict("drop"),),
        ]
    else:
        rules = [(MarkOr(mark),), (Verdict("goto", service_chain(port)),)]
    frag.add_chain(ext, rules)
    for key in external_keys:
        frag.elements[(SERVICE_IPS, key)] = Verdict("goto", ext)
    if port.node_port:
        frag.elements[(SERVICE_NODEPORTS, (proto, port.node_port))] = Verdict("goto", ext)
