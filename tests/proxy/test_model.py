"""Service / EndpointSlice parsing and validation (no root needed)."""

from __future__ import annotations

import pytest

from netplugin.proxy.model import (
    Endpoint,
    InvalidService,
    merge_endpoints,
    parse_service,
    slice_endpoints,
    usable_endpoints,
)

from .helpers import endpoint, endpoint_slice, service


def test_cluster_ip_service_ports() -> None:
    parsed = parse_service(service("web", "10.96.0.10", [
        {"name": "http", "port": 80},
        {"name": "dns", "port": 53, "protocol": "UDP"},
    ]))
    assert [(p.name.port, p.protocol, p.port, p.cluster_ip) for p in parsed.ports] == [
        ("http", "tcp", 80, "10.96.0.10"), ("dns", "udp", 53, "10.96.0.10")]
    assert parsed.ports[0].node_port is None
    assert parsed.ports[0].chain_id == "default/web/tcp/http"
    assert str(parsed.ports[0].name) == "default/web:http"


def test_nodeport_externalips_lb_policies_and_affinity() -> None:
    svc = service("web", "10.96.0.10", [{"port": 80, "nodePort": 30080}], type="LoadBalancer",
                  externalIPs=["192.0.2.50"], externalTrafficPolicy="Local", internalTrafficPolicy="Local",
                  sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}})
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": "198.51.100.7"}, {"hostname": "lb.example"}]}}
    (port,) = parse_service(svc).ports
    assert port.node_port == 30080
    assert port.external_ips == ("192.0.2.50",)
    assert port.load_balancer_ips == ("198.51.100.7",)
    assert port.external_policy_local and port.internal_policy_local
    assert port.affinity_timeout == 60
    assert port.chain_id == "default/web/tcp/80"  # unnamed port: its number


def test_default_affinity_timeout_and_etp_only_for_external_types() -> None:
    (port,) = parse_service(service("a", "10.96.0.1", sessionAffinity="ClientIP",
                                    externalTrafficPolicy="Local")).ports
    assert port.affinity_timeout == 10800
    assert not port.external_policy_local  # ClusterIP services have no external policy


def test_headless_and_external_name_are_not_proxied() -> None:
    assert parse_service(service("h", "None")).ports == []
    assert parse_service({"metadata": {"name": "x"}, "spec": {"type": "ExternalName",
                                                              "externalName": "example.com"}}).ports == []


@pytest.mark.parametrize("mutate, field, text", [
    (lambda s: s["spec"]["ports"][0].update(port=70000), "spec.ports[0].port", "70000"),
    (lambda s: s["spec"]["ports"][0].update(port="80"), "spec.ports[0].port", "'80'"),
    (lambda s: s["spec"]["ports"][0].update(protocol="ICMP"), "spec.ports[0].protocol", "ICMP"),
    (lambda s: s["spec"].update(clusterIP="10.96.0.300"), "spec.clusterIP", "10.96.0.300"),
    (lambda s: s["spec"].update(externalIPs=["1.2.3"]), "spec.externalIPs[0]", "1.2.3"),
    (lambda s: s["spec"].update(type="NodePort", ports=[{"port": 80, "nodePort": 80}]),
     "spec.ports[0].nodePort", "outside the NodePort range 30000-32767"),
    (lambda s: s["spec"].update(ports=[{"port": 80}, {"port": 80}]), "spec.ports[1].port", "duplicate"),
    (lambda s: s["spec"].update(sessionAffinity="ClientIP",
                                sessionAffinityConfig={"clientIP": {"timeoutSeconds": 0}}),
     "spec.sessionAffinityConfig.clientIP.timeoutSeconds", "0"),
    (lambda s: s["spec"].update(type="Weird"), "spec.type", "Weird"),
])
def test_invalid_services_name_the_field(mutate, field, text) -> None:
    svc = service("bad", "10.96.0.10")
    mutate(svc)
    with pytest.raises(InvalidService) as info:
        parse_service(svc)
    assert info.value.error.service == "default/bad"
    assert info.value.error.field == field
    assert text in info.value.error.message
    assert str(info.value).startswith("service default/bad: " + field)


def test_slice_conditions_follow_the_api_defaults() -> None:
    eps = slice_endpoints(endpoint_slice("web", [
        endpoint("10.0.0.1"),  # ready
        endpoint("10.0.0.2", ready=None),  # nil ready means ready
        endpoint("10.0.0.3", ready=False, serving=True, terminating=True),
        endpoint("10.0.0.4", ready=False),  # not ready, serving defaults to ready -> False
        endpoint("not-an-ip"),
    ]))[("http", "tcp")]
    assert [(e.ip, e.ready, e.serving, e.terminating) for e in eps] == [
        ("10.0.0.1", True, True, False), ("10.0.0.2", True, True, False),
        ("10.0.0.3", False, True, True), ("10.0.0.4", False, False, False)]
    assert all(e.port == 8080 and e.node_name == "node-a" for e in eps)


def test_ipv6_slices_are_ignored() -> None:
    sl = endpoint_slice("web", [endpoint("fd00::1")])
    sl["addressType"] = "IPv6"
    assert slice_endpoints(sl) == {}


def test_terminating_endpoints_only_when_no_ready_one() -> None:
    ready = Endpoint("10.0.0.1", 80)
    terminating = Endpoint("10.0.0.2", 80, ready=False, serving=True, terminating=True)
    gone = Endpoint("10.0.0.3", 80, ready=False, serving=False, terminating=True)
    assert usable_endpoints([ready, terminating, gone]) == [ready]
    assert usable_endpoints([terminating, gone]) == [terminating]
    assert usable_endpoints([gone]) == []


def test_merge_keeps_the_best_state_per_address_and_sorts() -> None:
    a_bad = Endpoint("10.0.0.10", 80, ready=False, serving=False)
    a_ok = Endpoint("10.0.0.10", 80)
    b = Endpoint("10.0.0.9", 80)
    assert merge_endpoints([[a_bad], [a_ok, b]]) == [b, a_ok]
