"""Desired ruleset computation (pure; no root needed)."""

from __future__ import annotations

from fractions import Fraction

from netplugin.proxy.model import Endpoint, HostPortMapping, parse_service
from netplugin.proxy.ruleset import (
    CLUSTER_IPS,
    ENDPOINTS,
    LOCAL_SLOTS,
    NODEPORT_ENDPOINTS,
    HAIRPIN,
    HOSTPORT_IPS,
    HOSTPORTS,
    NO_ENDPOINT_NODEPORTS,
    NO_ENDPOINT_SERVICES,
    SERVICE_IPS,
    SERVICE_NODEPORTS,
    ProxyConfig,
    global_fragment,
    normalize_host_port,
    service_fragment,
)
from netplugin.proxy.stmts import DNAT, IPInSet, NumgenPick, NumgenVmap, Verdict, rule_text

from .helpers import service

CONFIG = ProxyConfig(table="t", node_name="node-a", cluster_cidr="10.244.0.0/16", service_cidr="10.96.0.0/12")


def frag_for(svc: dict, eps: list[Endpoint], port_name: str = "http", proto: str = "tcp", config=CONFIG):
    return service_fragment(config, parse_service(svc).ports, {(port_name, proto): eps})


def texts(frag, chain: str) -> list[str]:
    return [rule_text(rule) for rule in frag.chains[chain].rules]


def eps(*ips: str, node: str = "node-b", **kw) -> list[Endpoint]:
    return [Endpoint(ip, 8080, node_name=node, **kw) for ip in ips]


def slots(frag, set_name: str, frontend: tuple) -> dict[int, tuple]:
    return {key[1][len(frontend)]: value for key, value in frag.elements.items()
            if key[0] == set_name and key[1][:len(frontend)] == frontend}


def test_cluster_ip_dispatches_to_a_shared_pick_chain_with_endpoint_slots() -> None:
    frag = frag_for(service("web", "10.96.0.10"), eps("10.244.1.2", "10.244.1.3", "10.244.2.4"))
    assert frag.chains == {}  # a plain service is nothing but map elements
    key = ("10.96.0.10", "tcp", 80)
    assert frag.elements[(SERVICE_IPS, key)] == Verdict("goto", "pick-3")
    assert slots(frag, ENDPOINTS, key) == {0: ("10.244.1.2", 8080), 1: ("10.244.1.3", 8080), 2: ("10.244.2.4", 8080)}
    assert [rule_text(r) for r in frag.shared_chains["pick-3"].rules] == [
        "dnat ip to ip daddr . meta l4proto . th dport . numgen random mod 3 map @endpoints",
        "dnat ip to meta l4proto . th dport . numgen random mod 3 map @nodeport-endpoints",
    ]
    assert (CLUSTER_IPS, ("10.96.0.10",)) in frag.elements
    assert {k[1] for k in frag.elements if k[0] == HAIRPIN} == {
        ("10.244.1.2", "10.244.1.2"), ("10.244.1.3", "10.244.1.3"), ("10.244.2.4", "10.244.2.4")}


def test_service_without_endpoints_is_rejected_not_dispatched() -> None:
    frag = frag_for(service("web", "10.96.0.10", type="NodePort",
                            ports=[{"name": "http", "port": 80, "nodePort": 30080}]), [])
    assert frag.chains == {} and frag.shared_chains == {}
    assert frag.elements[(NO_ENDPOINT_SERVICES, ("10.96.0.10", "tcp", 80))] == Verdict("goto", "reject-chain")
    assert frag.elements[(NO_ENDPOINT_NODEPORTS, ("tcp", 30080))] == Verdict("goto", "reject-chain")
    assert not any(k[0] in (SERVICE_IPS, SERVICE_NODEPORTS, ENDPOINTS) for k in frag.elements)


def test_nodeport_and_external_ips_with_cluster_policy_are_masqueraded() -> None:
    svc = service("web", "10.96.0.10", type="NodePort", externalIPs=["192.0.2.9"],
                  ports=[{"name": "http", "port": 80, "nodePort": 30080}])
    frag = frag_for(svc, eps("10.244.1.2", "10.244.1.3"))
    assert frag.elements[(SERVICE_NODEPORTS, ("tcp", 30080))] == Verdict("goto", "pick-masquerade-2")
    assert frag.elements[(SERVICE_IPS, ("192.0.2.9", "tcp", 80))] == Verdict("goto", "pick-masquerade-2")
    assert [rule_text(r) for r in frag.shared_chains["pick-masquerade-2"].rules] == [
        "meta mark set meta mark | 0x00004000", "goto pick-2"]
    assert "pick-2" in frag.shared_chains
    assert slots(frag, NODEPORT_ENDPOINTS, ("tcp", 30080)) == {0: ("10.244.1.2", 8080), 1: ("10.244.1.3", 8080)}
    assert slots(frag, ENDPOINTS, ("192.0.2.9", "tcp", 80)) == {0: ("10.244.1.2", 8080), 1: ("10.244.1.3", 8080)}


def test_external_policy_local_keeps_source_and_uses_local_endpoints() -> None:
    svc = service("web", "10.96.0.10", type="NodePort", externalTrafficPolicy="Local",
                  ports=[{"name": "http", "port": 80, "nodePort": 30080}])
    frag = frag_for(svc, eps("10.244.1.2", node="node-a") + eps("10.244.2.2", node="node-b"))
    assert texts(frag, "external-default/web/tcp/http") == [
        "ip saddr 10.244.0.0/16 goto pick-2",
        "fib saddr type local meta mark set meta mark | 0x00004000",
        "fib saddr type local goto pick-2",
        "goto pick-local-1",
    ]
    assert frag.elements[(SERVICE_NODEPORTS, ("tcp", 30080))] == Verdict("goto", "external-default/web/tcp/http")
    # the NodePort holds every endpoint at slots 0.. and this node's from 65536 on
    assert slots(frag, NODEPORT_ENDPOINTS, ("tcp", 30080)) == {
        0: ("10.244.1.2", 8080), 1: ("10.244.2.2", 8080), LOCAL_SLOTS: ("10.244.1.2", 8080)}
    assert rule_text(frag.shared_chains["pick-local-1"].rules[0]).endswith(
        "numgen random mod 1 offset 65536 map @endpoints")


def test_external_policy_local_without_local_endpoints_drops_external_traffic() -> None:
    svc = service("web", "10.96.0.10", type="NodePort", externalTrafficPolicy="Local",
                  ports=[{"name": "http", "port": 80, "nodePort": 30080}])
    frag = frag_for(svc, eps("10.244.2.2", node="node-b"))
    assert texts(frag, "external-default/web/tcp/http")[-1] == "drop"
    assert not any(name.startswith("pick-local") for name in frag.shared_chains)


def test_internal_policy_local() -> None:
    svc = service("web", "10.96.0.10", internalTrafficPolicy="Local")
    frag = frag_for(svc, eps("10.244.1.2", node="node-a") + eps("10.244.2.2", node="node-b"))
    key = ("10.96.0.10", "tcp", 80)
    assert frag.elements[(SERVICE_IPS, key)] == Verdict("goto", "pick-1")
    assert slots(frag, ENDPOINTS, key) == {0: ("10.244.1.2", 8080)}
    remote_only = frag_for(svc, eps("10.244.2.2", node="node-b"))
    assert remote_only.elements[(NO_ENDPOINT_SERVICES, key)] == Verdict("drop")


def test_session_affinity_uses_endpoint_chains_and_dynamic_sets() -> None:
    svc = service("web", "10.96.0.10", sessionAffinity="ClientIP",
                  sessionAffinityConfig={"clientIP": {"timeoutSeconds": 90}})
    frag = frag_for(svc, eps("10.244.1.2", "10.244.1.3"))
    chain = "service-default/web/tcp/http"
    ep1 = "endpoint-default/web/tcp/http__10.244.1.2/8080"
    aff1 = "affinity-default/web/tcp/http__10.244.1.2/8080"
    assert frag.elements[(SERVICE_IPS, ("10.96.0.10", "tcp", 80))] == Verdict("goto", chain)
    assert texts(frag, chain)[0] == f"ip saddr @{aff1} goto {ep1}"
    assert texts(frag, chain)[2:] == [f"numgen random mod 2 0 goto {ep1}",
                                      "goto endpoint-default/web/tcp/http__10.244.1.3/8080"]
    assert texts(frag, ep1) == [f"update @{aff1} {{ ip saddr timeout 1m30s }}", "dnat to 10.244.1.2:8080"]
    assert frag.sets[aff1].dynamic and frag.sets[aff1].key == ("ipv4_addr",)


def test_cascade_is_uniform() -> None:
    svc = service("web", "10.96.0.10", sessionAffinity="ClientIP")
    frag = frag_for(svc, eps(*[f"10.244.1.{i}" for i in range(1, 8)]))
    remaining, shares = Fraction(1), []
    for rule in frag.chains["service-default/web/tcp/http"].rules:
        if isinstance(rule[0], IPInSet):
            continue  # affinity hits
        pick = next((s for s in rule if isinstance(s, NumgenPick)), None)
        p = Fraction(1, pick.modulus) if pick else Fraction(1)
        shares.append(remaining * p)
        remaining -= remaining * p
    assert shares == [Fraction(1, 7)] * 7 and remaining == 0


def test_affinity_with_many_endpoints_uses_a_numgen_verdict_map() -> None:
    config = ProxyConfig(table="t", node_name="node-a", cluster_cidr="10.244.0.0/16", cascade_limit=4)
    svc = service("web", "10.96.0.10", sessionAffinity="ClientIP")
    frag = frag_for(svc, eps(*[f"10.244.1.{i}" for i in range(1, 7)]), config=config)
    rule = frag.chains["service-default/web/tcp/http"].rules[-1]
    assert isinstance(rule[0], NumgenVmap) and len(rule[0].targets) == 6
    assert rule_text(rule).startswith("numgen random mod 6 vmap { 0 : goto endpoint-default/web/tcp/http__10.244.1.1/8080")


def test_terminating_endpoints_serve_only_without_ready_ones() -> None:
    ready = eps("10.244.1.2")
    term = eps("10.244.1.3", ready=False, serving=True, terminating=True)
    key = ("10.96.0.10", "tcp", 80)
    assert slots(frag_for(service("web", "10.96.0.10"), ready + term), ENDPOINTS, key) == {0: ("10.244.1.2", 8080)}
    assert slots(frag_for(service("web", "10.96.0.10"), term), ENDPOINTS, key) == {0: ("10.244.1.3", 8080)}


def test_global_fragment_layout() -> None:
    frag = global_fragment(CONFIG)
    hooks = {name: chain.hook for name, chain in frag.chains.items() if chain.hook}
    assert hooks == {
        "nat-prerouting": ("nat", "prerouting", -100), "nat-output": ("nat", "output", -100),
        "nat-postrouting": ("nat", "postrouting", 100), "filter-input": ("filter", "input", -110),
        "filter-forward": ("filter", "forward", -110), "filter-output": ("filter", "output", -110),
        "filter-output-post-dnat": ("filter", "output", -90),
    }
    assert texts(frag, "services") == [
        "ip daddr @cluster-ips ip saddr != 10.244.0.0/16 meta mark set meta mark | 0x00004000",
        "ip daddr . meta l4proto . th dport vmap @service-ips",
        "fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports",
    ]
    assert texts(frag, "nat-postrouting") == [
        "jump masquerading",
        "ip saddr . ip daddr @hairpin-endpoints masquerade fully-random",
        "ip saddr 10.244.0.0/16 ip daddr != 10.244.0.0/16 masquerade fully-random",
    ]
    assert texts(frag, "cluster-ips-check") == ["ip daddr @cluster-ips reject", "ip daddr 10.96.0.0/12 drop"]


def test_host_ports() -> None:
    mappings = [normalize_host_port(HostPortMapping("TCP", 8080, "10.244.1.5", 80)),
                normalize_host_port(HostPortMapping("udp", 5353, "10.244.1.6", 53, host_ip="192.0.2.2"))]
    frag = global_fragment(CONFIG, mappings)
    assert frag.elements[(HOSTPORTS, ("tcp", 8080))] == Verdict("goto", "hostport-tcp/*/8080")
    assert frag.elements[(HOSTPORT_IPS, ("192.0.2.2", "udp", 5353))] == Verdict("goto", "hostport-udp/192.0.2.2/5353")
    assert frag.chains["hostport-tcp/*/8080"].rules == ((DNAT("tcp", "10.244.1.5", 80),),)
    assert (HAIRPIN, ("10.244.1.5", "10.244.1.5")) in frag.elements


def test_invalid_host_ports_are_rejected() -> None:
    import pytest

    for bad in (HostPortMapping("ICMP", 1, "10.0.0.1", 1), HostPortMapping("TCP", 0, "10.0.0.1", 1),
                HostPortMapping("TCP", 80, "10.0.0.300", 1)):
        with pytest.raises(ValueError):
            normalize_host_port(bad)
    assert normalize_host_port(HostPortMapping("TCP", 80, "10.0.0.1", 1, host_ip="0.0.0.0")).host_ip is None
