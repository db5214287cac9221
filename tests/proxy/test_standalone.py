"""Standalone-mode Services: allocation, persistence, validation, EndpointSlices."""

from __future__ import annotations

import json

from netplugin.proxy.model import parse_service, slice_endpoints
from netplugin.proxy.standalone import StandaloneServices


def svc(name: str, namespace: str = "default", **spec) -> dict:
    spec.setdefault("ports", [{"name": "http", "port": 80, "targetPort": 8080}])
    spec.setdefault("selector", {"app": name})
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def pod(name: str, ip: str | None, labels: dict, ready: bool = True, namespace: str = "default",
        deleting: bool = False, ports: list | None = None, phase: str = "Running") -> dict:
    meta = {"name": name, "namespace": namespace, "labels": labels, "uid": f"uid-{name}"}
    if deleting:
        meta["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    return {"metadata": meta,
            "spec": {"nodeName": "node-a", "containers": [{"name": "c", "ports": ports or []}]},
            "status": {"phase": phase, "podIP": ip,
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def make(tmp_path, **kw) -> StandaloneServices:
    return StandaloneServices(state_dir=tmp_path, node_name="node-a", service_cidr="10.203.0.0/16", **kw)


def by_name(result) -> dict:
    return {s["metadata"]["name"]: s for s in result.services}


def test_cluster_ips_honoured_inside_the_cidr_allocated_otherwise_and_stable(tmp_path) -> None:
    manifests = [svc("explicit", clusterIP="10.203.7.7"), svc("outside", clusterIP="10.96.0.10"), svc("none")]
    result = make(tmp_path).compute(manifests, [])
    services = by_name(result)
    assert services["explicit"]["spec"]["clusterIP"] == "10.203.7.7"
    allocated = {services[n]["spec"]["clusterIP"] for n in ("outside", "none")}
    assert all(ip.startswith("10.203.") and ip != "10.203.7.7" for ip in allocated) and len(allocated) == 2
    assert result.errors == []
    saved = json.loads((tmp_path / "service-allocations.json").read_text())
    assert saved["clusterIPs"]["default/none"] == services["none"]["spec"]["clusterIP"]
    # a new instance (agent restart), manifests listed in another order: same addresses
    again = by_name(make(tmp_path).compute(list(reversed(manifests)), []))
    assert {n: s["spec"]["clusterIP"] for n, s in again.items()} == \
           {n: s["spec"]["clusterIP"] for n, s in services.items()}


def test_duplicate_explicit_cluster_ip_is_an_error_for_the_second(tmp_path) -> None:
    result = make(tmp_path).compute([svc("a", clusterIP="10.203.0.9"), svc("b", clusterIP="10.203.0.9"),
                                     svc("c", clusterIP="bogus")], [])
    assert list(by_name(result)) == ["a"]
    errors = {e.service: e for e in result.errors}
    assert sorted(errors) == ["default/b", "default/c"]
    assert errors["default/b"].field == errors["default/c"].field == "spec.clusterIP"
    assert "already used by service default/a" in errors["default/b"].message


def test_node_ports_honoured_allocated_and_validated(tmp_path) -> None:
    def ports(node_port: int | None = None) -> list[dict]:
        return [dict({"name": "http", "port": 80}, **({"nodePort": node_port} if node_port else {}))]

    manifests = [
        svc("fixed", type="NodePort", ports=ports(30080)),
        svc("auto", type="NodePort", ports=ports()),
        svc("clash", type="NodePort", ports=ports(30080)),
        svc("range", type="NodePort", ports=ports(80)),
        svc("plain"),
    ]
    result = make(tmp_path).compute(manifests, [])
    services = by_name(result)
    assert sorted(services) == ["auto", "fixed", "plain"]
    assert services["fixed"]["spec"]["ports"][0]["nodePort"] == 30080
    auto_port = services["auto"]["spec"]["ports"][0]["nodePort"]
    assert 30000 <= auto_port <= 32767 and auto_port != 30080
    errors = {e.service: e for e in result.errors}
    assert errors["default/clash"].field == "spec.ports[0].nodePort"
    assert "already used by service default/fixed" in errors["default/clash"].message
    assert "outside the NodePort range 30000-32767" in errors["default/range"].message
    # restart: the allocated NodePort is kept even when other services appear first
    again = by_name(make(tmp_path).compute([svc("aaa", type="NodePort", ports=ports())] + manifests, []))
    assert again["auto"]["spec"]["ports"][0]["nodePort"] == auto_port
    # outputs are valid Services for the proxy
    for service in result.services:
        parse_service(service)
    # the previous holder keeps a contested port even when listed later
    swapped = by_name(make(tmp_path).compute([manifests[2], manifests[0]], []))
    assert list(swapped) == ["fixed"]


def test_invalid_port_skips_only_that_service(tmp_path) -> None:
    result = make(tmp_path).compute([svc("bad", ports=[{"port": 70000}]), svc("udp", ports=[{"port": 53, "protocol": "ICMP"}]),
                                     svc("good")], [])
    assert list(by_name(result)) == ["good"]
    assert sorted((e.service, e.field) for e in result.errors) == [("default/bad", "spec.ports[0].port"),
                                                                  ("default/udp", "spec.ports[0].protocol")]


def test_endpoint_slices_follow_pods(tmp_path) -> None:
    pods = [
        pod("web-1", "10.202.1.2", {"app": "web"}),
        pod("web-2", "10.202.1.3", {"app": "web"}, ready=False),
        pod("web-3", "10.202.1.4", {"app": "web"}, deleting=True),
        pod("web-4", None, {"app": "web"}),  # no address yet
        pod("web-5", "10.202.1.6", {"app": "web"}, phase="Succeeded"),
        pod("other", "10.202.1.9", {"app": "db"}),
        pod("web-ns", "10.202.1.8", {"app": "web"}, namespace="prod"),
    ]
    result = make(tmp_path).compute([svc("web")], pods)
    (sl,) = result.endpoint_slices
    assert sl["metadata"]["labels"]["kubernetes.io/service-name"] == "web"
    assert sl["addressType"] == "IPv4" and sl["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"}]
    eps = {e["addresses"][0]: e["conditions"] for e in sl["endpoints"]}
    assert eps == {
        "10.202.1.2": {"ready": True, "serving": True, "terminating": False},
        "10.202.1.3": {"ready": False, "serving": False, "terminating": False},
        "10.202.1.4": {"ready": False, "serving": True, "terminating": True},
    }
    assert all(e["nodeName"] == "node-a" for e in sl["endpoints"])
    parsed = slice_endpoints(sl)[("http", "tcp")]
    assert [e.ip for e in parsed if e.ready] == ["10.202.1.2"]


def test_named_target_ports_and_publish_not_ready(tmp_path) -> None:
    manifest = svc("web", ports=[{"name": "http", "port": 80, "targetPort": "web"}], publishNotReadyAddresses=True)
    pods = [pod("a", "10.202.1.2", {"app": "web"}, ready=False, ports=[{"name": "web", "containerPort": 8081}]),
            pod("b", "10.202.1.3", {"app": "web"}, ports=[{"name": "web", "containerPort": 9090}]),
            pod("c", "10.202.1.4", {"app": "web"})]  # no such named port: not an endpoint
    slices = make(tmp_path).compute([manifest], pods).endpoint_slices
    assert sorted((s["ports"][0]["port"], [e["addresses"][0] for e in s["endpoints"]]) for s in slices) == [
        (8081, ["10.202.1.2"]), (9090, ["10.202.1.3"])]
    assert slices[0]["endpoints"][0]["conditions"]["ready"] is True  # publishNotReadyAddresses


class RecordingProxy:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []

    def on_service(self, event: str, svc: dict) -> None:
        self.events.append(("service", event, svc["metadata"]["name"]))

    def on_endpoint_slice(self, event: str, slice_: dict) -> None:
        self.events.append(("slice", event, slice_["metadata"]["labels"]["kubernetes.io/service-name"]))


def test_sync_feeds_only_differences(tmp_path) -> None:
    standalone, proxy = make(tmp_path), RecordingProxy()
    pods = [pod("web-1", "10.202.1.2", {"app": "web"})]
    assert standalone.sync(proxy, [svc("web"), svc("bad", ports=[{"port": 0}])], pods)[0].service == "default/bad"
    assert proxy.events == [("service", "ADDED", "web"), ("slice", "ADDED", "web")]
    proxy.events.clear()
    standalone.sync(proxy, [svc("web")], pods)
    assert proxy.events == []
    standalone.sync(proxy, [svc("web")], pods + [pod("web-2", "10.202.1.3", {"app": "web"})])
    assert proxy.events == [("slice", "MODIFIED", "web")]
    proxy.events.clear()
    standalone.sync(proxy, [], pods)
    assert proxy.events == [("slice", "DELETED", "web"), ("service", "DELETED", "web")]
