"""Standalone Services through the real agent: ClusterIP, NodePort and hostPort.

Network safety: the test's service CIDR is first routed into a sink (a veth whose peer
sits in an empty namespace the test creates), clients are a namespace the test creates,
connected to the host by a veth of its own; the only destinations are the pods on the
agent's bridge, the service addresses (routed into the sink), and the host's address on
the client veth.
"""

from __future__ import annotations

import secrets
import subprocess
import sys

import pytest

from tests.e2e.conftest import REPO, busybox, pod_manifest

pytestmark = [pytest.mark.docker, pytest.mark.root]


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: {out.stderr}")
    return out


@pytest.fixture
def net_fixture():
    """A sink for the service CIDR and a client namespace wired to the host."""
    token = secrets.token_hex(3)
    made: dict = {"token": token}
    yield made
    if "route" in made:
        sh("ip", "route", "del", made["route"], check=False)
    for ns in made.get("netns", []):
        sh("ip", "netns", "del", ns, check=False)


def setup_network(made: dict, n: int) -> dict:
    token = made["token"]
    service_cidr = f"10.97.{n}.0/24"
    sink_ns, client_ns = f"sink{token}", f"cli{token}"
    made["netns"] = [sink_ns, client_ns]
    for ns in (sink_ns, client_ns):
        sh("ip", "netns", "add", ns)
    # The sink: anything sent to the service CIDR that the proxy does not DNAT ends here.
    sh("ip", "link", "add", f"snk{token}", "type", "veth", "peer", "name", "eth0", "netns", sink_ns)
    sh("ip", "link", "set", f"snk{token}", "up")
    sh("ip", "route", "add", service_cidr, "dev", f"snk{token}")
    made["route"] = service_cidr
    # The client host: 10.95.n.2 talks to the node at 10.95.n.1 only.
    host_ip, client_ip = f"10.95.{n}.1", f"10.95.{n}.2"
    sh("ip", "link", "add", f"cli{token}", "type", "veth", "peer", "name", "eth0", "netns", client_ns)
    sh("ip", "addr", "add", f"{host_ip}/30", "dev", f"cli{token}")
    sh("ip", "link", "set", f"cli{token}", "up")
    sh("ip", "netns", "exec", client_ns, "ip", "addr", "add", f"{client_ip}/30", "dev", "eth0")
    sh("ip", "netns", "exec", client_ns, "ip", "link", "set", "eth0", "up")
    sh("ip", "netns", "exec", client_ns, "ip", "link", "set", "lo", "up")
    # Replies to the client from pods go back through the node.
    sh("ip", "netns", "exec", client_ns, "ip", "route", "add", "default", "via", host_ip)
    return {"service_cidr": service_cidr, "client_ns": client_ns, "node_ip": host_ip, "client_ip": client_ip}


def fetch(url: str, netns: str | None = None) -> str:
    cmd = ["curl", "-s", "-m", "3", url]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    return out.stdout.strip() if out.returncode == 0 else f"ERROR {out.returncode} {out.stderr.strip()}"


def web_pod(name: str, host_port: int | None = None) -> dict:
    port = {"containerPort": 8080}
    if host_port:
        port["hostPort"] = host_port
    pod = pod_manifest(name, [busybox(
        "httpd", f"mkdir -p /www && echo {name} > /www/index.html && exec httpd -f -p 8080 -h /www",
        ports=[port])])
    pod["metadata"]["labels"] = {"app": "web"}
    return pod


def test_cluster_ip_node_port_and_host_port(agent_factory, net_fixture):
    token = net_fixture["token"]
    a = agent_factory(start=False, extra_config={"proxy-table": f"na{token}"})
    net = setup_network(net_fixture, a.subnet)
    a.config_path.write_text(a.config_path.read_text() + f"service-cidr: {net['service_cidr']}\n")
    cluster_ip = net["service_cidr"].replace("0/24", "10")
    node_port = 30100 + a.subnet
    host_port = 31000 + a.subnet
    a.write("web.yaml", web_pod("web-a", host_port=host_port), web_pod("web-b"), {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
        "spec": {"type": "NodePort", "clusterIP": cluster_ip, "selector": {"app": "web"},
                 "ports": [{"port": 80, "targetPort": 8080, "nodePort": node_port}]}})
    a.start()
    try:
        a.wait_running_ready("web-a")
        a.wait_running_ready("web-b")
        names = {"web-a", "web-b"}  # each pod's httpd answers with its manifest name

        # ClusterIP from the node: both endpoints answer (bounded number of tries).
        seen = set()
        for _ in range(40):
            seen.add(fetch(f"http://{cluster_ip}/"))
            if names <= seen:
                break
        assert names <= seen, seen

        # NodePort from another host, on the node's address.
        seen = set()
        for _ in range(40):
            seen.add(fetch(f"http://{net['node_ip']}:{node_port}/", net["client_ns"]))
            if names <= seen:
                break
        assert names <= seen, seen

        # hostPort goes to web-a only.
        assert fetch(f"http://{net['node_ip']}:{host_port}/", net["client_ns"]) == "web-a"

        # The operator's view names the service and both endpoints.
        show = sh(sys.executable, "-m", "nodeagent.cli", "proxy", "show",
                  "--status-address", f"127.0.0.1:{a.port}").stdout
        assert "default/web" in show and cluster_ip in show and str(node_port) in show
        pod_ips = {p["status"]["podIP"] for p in a.pods()}
        assert all(ip in show for ip in pod_ips), show

        # An endpoint that goes away stops receiving traffic.
        a.write("web.yaml", web_pod("web-a", host_port=host_port), {
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
            "spec": {"type": "NodePort", "clusterIP": cluster_ip, "selector": {"app": "web"},
                     "ports": [{"port": 80, "targetPort": 8080, "nodePort": node_port}]}})
        a.wait_for("web-b gone", lambda: a.pod("web-b") is None, timeout=60)
        answers = {fetch(f"http://{cluster_ip}/") for _ in range(10)}
        assert answers == {"web-a"}, answers
    finally:
        a.stop()
        # `nodeagent cleanup` removes the table (and the bridge).
        sh(sys.executable, "-m", "nodeagent.cli", "cleanup", "--config", str(a.config_path))
        assert sh("nft", "list", "table", "ip", f"na{token}", check=False).returncode != 0
