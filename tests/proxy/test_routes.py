"""Cross-node pod routes (host-gw). Needs root; runs in its own namespace."""

from __future__ import annotations

import pytest

from netplugin.proxy.routes import PodRoutes, node_route

from .topology import Topology, run

pytestmark = pytest.mark.root


def node(name: str, pod_cidr: str | None, internal_ip: str | None) -> dict:
    spec = {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]} if pod_cidr else {}
    addresses = [{"type": "Hostname", "address": name}]
    if internal_ip:
        addresses.append({"type": "InternalIP", "address": internal_ip})
    return {"metadata": {"name": name}, "spec": spec, "status": {"addresses": addresses}}


def test_node_route_parsing() -> None:
    assert node_route(node("b", "10.202.64.0/24", "10.202.250.2")).via == "10.202.250.2"
    assert node_route(node("b", None, "10.202.250.2")) is None
    assert node_route(node("b", "10.202.64.0/24", None)) is None
    with pytest.raises(ValueError, match="node b: spec.podCIDR 'nope'"):
        node_route(node("b", "nope", "10.202.250.2"))


@pytest.fixture
def netns():
    topology = Topology()
    name = topology._add_ns("routes")
    try:
        run("ip", "-n", name, "link", "add", "n0", "type", "veth", "peer", "name", "n1")
        run("ip", "-n", name, "addr", "add", "10.202.250.1/24", "dev", "n0")
        run("ip", "-n", name, "link", "set", "n0", "up")
        run("ip", "-n", name, "link", "set", "n1", "up")
        # somebody else's route, which must never be touched
        run("ip", "-n", name, "route", "add", "10.202.99.0/24", "via", "10.202.250.9", "proto", "static")
        yield name
    finally:
        topology.destroy()


def routes(netns: str) -> list[str]:
    return sorted(run("ip", "-n", netns, "route", "show").stdout.splitlines())


async def test_routes_follow_nodes_and_touch_only_ours(netns) -> None:
    pod_routes = PodRoutes(node_name="node-a", netns=netns)
    for item in (node("node-a", "10.202.63.0/24", "10.202.250.1"),  # ourselves: no route
                 node("node-b", "10.202.64.0/24", "10.202.250.2"),
                 node("node-c", "10.202.65.0/24", "10.202.250.3"),
                 node("node-d", None, "10.202.250.4"),
                 node("node-e", "bad", "10.202.250.5"),
                 node("node-f", "10.202.66.0/24", "10.9.9.9")):  # not reachable from here
        pod_routes.on_node("ADDED", item)
    result = await pod_routes.sync()
    assert sorted(r.pod_cidr for r in result.added) == ["10.202.64.0/24", "10.202.65.0/24"]
    assert any("node-e" in e for e in result.errors) and any("node-f" in e for e in result.errors)
    assert await pod_routes.installed() == {"10.202.64.0/24": "10.202.250.2", "10.202.65.0/24": "10.202.250.3"}
    shown = routes(netns)
    assert "10.202.64.0/24 via 10.202.250.2 dev n0 proto 157 " in shown
    assert "10.202.99.0/24 via 10.202.250.9 dev n0 proto static " in shown

    # a second sync changes nothing
    again = await pod_routes.sync()
    assert again.added == [] and again.removed == []

    pod_routes.on_node("DELETED", node("node-c", None, None))
    pod_routes.on_node("MODIFIED", node("node-b", "10.202.64.0/24", "10.202.250.7"))
    result = await pod_routes.sync()
    assert result.removed == ["10.202.65.0/24"]
    assert await pod_routes.installed() == {"10.202.64.0/24": "10.202.250.7"}

    assert await pod_routes.cleanup() == ["10.202.64.0/24"]
    assert await pod_routes.installed() == {}
    assert "10.202.99.0/24 via 10.202.250.9 dev n0 proto static " in routes(netns)
