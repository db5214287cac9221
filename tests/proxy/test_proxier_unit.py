"""ServiceProxy's input side, without the kernel (no root needed)."""

from __future__ import annotations

import pytest

from netplugin.proxy import HostPortMapping, ServiceProxy

from .helpers import service


def make(**kw) -> ServiceProxy:
    kw.setdefault("node_name", "node-a")
    kw.setdefault("node_ips", ["10.202.200.1"])
    kw.setdefault("cluster_cidr", "10.202.0.0/16")
    return ServiceProxy(**kw)


@pytest.mark.parametrize("kwargs, field", [
    ({"cluster_cidr": "10.202.0.0/33"}, "cluster_cidr"),
    ({"service_cidr": "nope"}, "service_cidr"),
    ({"node_ips": ["10.0.0.256"]}, "node_ips"),
    ({"nodeport_range": (32767, 30000)}, "nodeport_range"),
    ({"table": ""}, "table"),
])
def test_bad_configuration_names_the_field(kwargs, field) -> None:
    with pytest.raises(ValueError, match=field):
        make(**kwargs)


def test_invalid_service_is_reported_at_once_and_cleared_when_fixed() -> None:
    proxy = make()
    try:
        proxy.on_service("ADDED", service("web", "10.96.0.10", ports=[{"port": 80, "protocol": "ICMP"}]))
        assert [(e.service, e.field) for e in proxy.errors] == [("default/web", "spec.ports[0].protocol")]
        assert "service default/web: spec.ports[0].protocol: unsupported protocol 'ICMP'" in proxy.describe()
        proxy.on_service("MODIFIED", service("web", "10.96.0.10"))
        assert proxy.errors == []
        proxy.on_service("MODIFIED", service("web", "10.96.0.10", ports=[{"port": 0}]))
        proxy.on_service("DELETED", service("web", "10.96.0.10"))
        assert proxy.errors == []  # a deleted service is no longer an error
    finally:
        proxy.close()


def test_host_port_conflicts_and_bad_mappings_are_skipped() -> None:
    proxy = make()
    try:
        proxy.set_host_ports([HostPortMapping("TCP", 8080, "10.202.1.5", 80),
                              HostPortMapping("TCP", 8080, "10.202.1.6", 80),
                              HostPortMapping("TCP", 8080, "10.202.1.5", 80),  # the same again: fine
                              HostPortMapping("ICMP", 1, "10.202.1.7", 1)])
        shown = proxy.describe()
        assert "hostPort tcp/8080 for 10.202.1.6 conflicts with 10.202.1.5" in shown
        assert "'ICMP' is not TCP, UDP or SCTP" in shown
    finally:
        proxy.close()
