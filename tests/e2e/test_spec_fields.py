"""Pod spec fields a kubelet honours that the node used to accept and ignore: Service
environment variables (enableServiceLinks), hostPID and hostIPC, and
activeDeadlineSeconds — each observed from inside the container."""

from __future__ import annotations

import ipaddress
import os
import urllib.request

import pytest

from tests.e2e.conftest import busybox, exec_in, pod_manifest

pytestmark = [pytest.mark.docker, pytest.mark.root]

SLEEP_FOREVER = "while true; do sleep 3600; done"


def _env(agent, pod: str) -> dict[str, str]:
    out = exec_in(agent.container_of(pod, "app")["Id"], "env").stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_service_links(agent):
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web-api"},
               "spec": {"selector": {"app": "web"}, "ports": [
                   {"name": "http", "port": 80, "targetPort": 8080},
                   {"name": "metrics", "port": 9100, "protocol": "UDP"}]}}
    agent.write("svc.yaml", service)
    agent.write("linked.yaml", pod_manifest("linked", [busybox("app", SLEEP_FOREVER, env=[
        {"name": "API", "value": "http://$(WEB_API_SERVICE_HOST):$(WEB_API_SERVICE_PORT)"}])]))
    agent.write("unlinked.yaml", pod_manifest("unlinked", [busybox("app", SLEEP_FOREVER)],
                                              enableServiceLinks=False))
    agent.wait_phase("linked", "Running")
    agent.wait_phase("unlinked", "Running")
    env = _env(agent, "linked")
    ip = env["WEB_API_SERVICE_HOST"]
    assert ipaddress.ip_address(ip) in ipaddress.ip_network("10.96.0.0/12")
    def proxied() -> bool:  # the address the proxy serves (synced within a second)
        with urllib.request.urlopen(agent.url + "/proxy", timeout=5) as resp:
            return ip in resp.read().decode()
    agent.wait_for("the service in the proxy", proxied, timeout=15)
    assert env["WEB_API_SERVICE_PORT"] == "80" and env["WEB_API_SERVICE_PORT_METRICS"] == "9100"
    assert env["WEB_API_PORT"] == f"tcp://{ip}:80"
    assert env["WEB_API_PORT_9100_UDP_ADDR"] == ip
    assert env["API"] == f"http://{ip}:80"
    assert "KUBERNETES_SERVICE_HOST" not in env  # no API server on a standalone node
    assert not any(k.startswith("WEB_API_") for k in _env(agent, "unlinked"))


def test_host_pid_and_host_ipc(agent):
    agent.write("host.yaml", pod_manifest("host", [busybox("app", SLEEP_FOREVER)], hostPID=True, hostIPC=True))
    agent.write("own.yaml", pod_manifest("own", [busybox("app", SLEEP_FOREVER)]))
    agent.wait_phase("host", "Running")
    agent.wait_phase("own", "Running")
    host_ns = {kind: os.readlink(f"/proc/self/ns/{kind}") for kind in ("pid", "ipc")}
    for kind in ("pid", "ipc"):
        seen = exec_in(agent.container_of("host", "app")["Id"], "readlink", f"/proc/self/ns/{kind}").stdout.strip()
        assert seen == host_ns[kind], kind
        own = exec_in(agent.container_of("own", "app")["Id"], "readlink", f"/proc/self/ns/{kind}").stdout.strip()
        assert own and own != host_ns[kind], kind
    # With the host's PID namespace the container sees the agent itself.
    ps = exec_in(agent.container_of("host", "app")["Id"], "ps", "-o", "pid").stdout.split()
    assert str(agent.proc.pid) in ps


def test_active_deadline_seconds(agent):
    agent.write("deadline.yaml", pod_manifest("deadline", [busybox("app", SLEEP_FOREVER)],
                                              activeDeadlineSeconds=3, terminationGracePeriodSeconds=1))
    running = agent.wait_phase("deadline", "Running")
    failed = agent.wait_phase("deadline", "Failed", timeout=30)
    assert failed["status"]["reason"] == "DeadlineExceeded"
    assert failed["status"]["message"] == "Pod was active on the node longer than the specified deadline"
    assert failed["metadata"]["uid"] == running["metadata"]["uid"]
    app = agent.container_of("deadline", "app")
    assert not app["State"]["Running"]  # stopped, kept for its logs
    sandboxes = [c for c in agent.containers() if c["Config"]["Labels"].get("io.kubernetes.pod.name")
                 == f"deadline-{agent.node_name}" and c["Config"]["Labels"].get("io.kubernetes.docker.type") == "podsandbox"]
    assert sandboxes and not any(s["State"]["Running"] for s in sandboxes)
