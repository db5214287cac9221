"""hostPort mappings from pods (both modes), and the package layout's import rules."""

from __future__ import annotations

import subprocess
import sys

from netplugin.proxy import HostPortMapping
from nodeagent.kubelet.hostports import HostPortFeed, host_port_mappings


def pod(name: str, ip: str | None, phase: str = "Running", host_network: bool = False) -> dict:
    return {"metadata": {"name": name, "uid": name},
            "spec": {"hostNetwork": host_network, "containers": [{"name": "c", "ports": [
                {"containerPort": 8080, "hostPort": 30080, "protocol": "UDP", "hostIP": "127.0.0.1"},
                {"containerPort": 9090}]}]},
            "status": {"phase": phase, **({"podIP": ip} if ip else {})}}


def test_mappings_only_for_running_pods_with_an_address():
    pods = [pod("a", "10.1.0.5"), pod("b", None), pod("c", "10.1.0.6", phase="Succeeded"),
            pod("d", "10.1.0.7", host_network=True)]
    assert host_port_mappings(pods) == [HostPortMapping("UDP", 30080, "10.1.0.5", 8080, host_ip="127.0.0.1")]


class Sink:
    def __init__(self) -> None:
        self.calls: list[list[HostPortMapping]] = []

    def set_host_ports(self, mappings: list[HostPortMapping]) -> None:
        self.calls.append(mappings)


def test_feed_tells_the_proxy_only_about_changes():
    pods = [pod("a", "10.1.0.5")]
    sink = Sink()
    feed = HostPortFeed(sink, pods=lambda: pods)
    assert feed.recompute() is True  # the first pass always (clears leftovers)
    assert feed.recompute() is False  # unchanged: no proxy sync
    pods[0]["status"]["phase"] = "Succeeded"  # finished: its hostPort goes
    assert feed.recompute() is True
    assert sink.calls == [[HostPortMapping("UDP", 30080, "10.1.0.5", 8080, host_ip="127.0.0.1")], []]


def test_cluster_mode_does_not_import_the_agent():
    code = ("import sys, nodeagent.cluster.mode; "
            "sys.exit(1 if 'nodeagent.agent' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
