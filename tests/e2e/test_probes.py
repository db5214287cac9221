"""Probes and lifecycle hooks through the real agent, real containers, real kernel.

Network safety: probes go from the node to pod IPs on the agent's own bridge (the
pod CIDR is guarded by an unreachable route, see conftest), and the gRPC health
server runs inside a pod's own network namespace.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

import pytest

from tests.e2e.conftest import REPO, busybox, docker, exec_in, pod_manifest

pytestmark = [pytest.mark.docker, pytest.mark.root]


def _proxy(agent) -> str:
    with urllib.request.urlopen(agent.url + "/proxy", timeout=5) as resp:
        return resp.read().decode()


def _endpoint(agent, ip: str) -> str | None:
    """The proxy's note on endpoint ``ip`` (e.g. "local, ready"), None when absent."""
    for line in _proxy(agent).splitlines():
        if f" {ip}:" in line:
            return line.split(f"{ip}:", 1)[1].split("(", 1)[1].split(")", 1)[0]
    return None


def _ready_endpoint(agent, ip: str) -> bool:
    note = _endpoint(agent, ip)
    return note is not None and "not ready" not in note


def _cs(pod: dict, name: str | None = None) -> dict:
    for c in pod["status"].get("containerStatuses") or []:
        if name is None or c["name"] == name:
            return c
    raise KeyError(f"no container status yet in {pod['metadata']['name']}")


def _conditions(pod: dict) -> dict[str, str]:
    return {c["type"]: c["status"] for c in pod["status"].get("conditions", [])}


def _events(agent, reason: str) -> list[dict]:
    return [r for r in agent.log_records() if r.get("event") == "pod event" and r.get("reason") == reason]


def test_readiness_liveness_startup_and_bad_probes(agent):
    # Readiness over httpGet on a named port: ready only while /ready.html exists.
    web = pod_manifest("web", [busybox(
        "httpd", "mkdir -p /www && echo hi > /www/index.html && exec httpd -f -p 8080 -h /www",
        ports=[{"name": "http", "containerPort": 8080}],
        readinessProbe={"httpGet": {"path": "/ready.html", "port": "http",
                                    "httpHeaders": [{"name": "X-Probe", "value": "yes"}]},
                        "periodSeconds": 1, "failureThreshold": 1})])
    web["metadata"]["labels"] = {"app": "web"}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
               "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}}
    # Liveness over exec: healthy for ~3 s, then the probe fails and the container
    # is restarted (restartCount counts it).
    live = pod_manifest("live", [busybox(
        "app", "touch /tmp/healthy; sleep 3; rm /tmp/healthy; while true; do sleep 1; done",
        livenessProbe={"exec": {"command": ["cat", "/tmp/healthy"]}, "periodSeconds": 1,
                       "failureThreshold": 2, "terminationGracePeriodSeconds": 1})])
    # Startup gates readiness: not started (nor ready) until /tmp/started appears.
    startup = pod_manifest("startup", [busybox(
        "app", "sleep 4; touch /tmp/started; mkdir -p /www; exec httpd -f -p 8080 -h /www",
        startupProbe={"exec": {"command": ["test", "-f", "/tmp/started"]}, "periodSeconds": 1,
                      "failureThreshold": 30},
        readinessProbe={"tcpSocket": {"port": 8080}, "periodSeconds": 1})])
    # A probe at a port nobody listens on: never ready, the pod keeps running.
    closed = pod_manifest("closed", [busybox(
        "app", "while true; do sleep 1; done",
        readinessProbe={"tcpSocket": {"port": 9999}, "periodSeconds": 1})])
    agent.write("probes.yaml", web, service, live, startup, closed)

    # --- startup gating --------------------------------------------------------
    def running_unstarted():
        p = agent.pod("startup")
        cs = _cs(p)
        return "running" in cs["state"] and p
    p = agent.wait_for("startup pod running", running_unstarted, timeout=90)
    cs = _cs(p)
    assert cs["started"] is False and cs["ready"] is False
    started = agent.wait_for("startup probe passes",
                             lambda: (p := agent.pod("startup")) and _cs(p)["started"] and p, timeout=90)
    agent.wait_for("startup pod ready after start", lambda: _cs(agent.pod("startup"))["ready"], timeout=45)
    assert _cs(started)["restartCount"] == 0

    # --- readiness flips Ready and the Service's endpoints both ways ----------------
    p = agent.wait_phase("web", "Running")
    ip = p["status"]["podIP"]
    assert _conditions(p)["Ready"] == "False" and _cs(p)["ready"] is False
    agent.wait_for("unready endpoint listed", lambda: _endpoint(agent, ip), timeout=30)
    assert not _ready_endpoint(agent, ip)
    cid = agent.container_of("web", "httpd")["Id"]
    assert exec_in(cid, "touch", "/www/ready.html").returncode == 0
    agent.wait_for("web ready", lambda: _conditions(agent.pod("web"))["Ready"] == "True", timeout=45)
    p = agent.pod("web")
    assert _conditions(p)["ContainersReady"] == "True" and _cs(p)["ready"] is True
    agent.wait_for("endpoint ready", lambda: _ready_endpoint(agent, ip), timeout=30)
    assert exec_in(cid, "rm", "/www/ready.html").returncode == 0
    agent.wait_for("web unready", lambda: _conditions(agent.pod("web"))["Ready"] == "False", timeout=45)
    agent.wait_for("endpoint not ready", lambda: not _ready_endpoint(agent, ip), timeout=30)
    assert _cs(agent.pod("web"))["restartCount"] == 0  # readiness never restarts

    # --- liveness restarts through the restart policy ------------------------------
    p = agent.wait_for("liveness restart", lambda: (p := agent.pod("live")) and
                       _cs(p)["restartCount"] >= 1 and "running" in _cs(p)["state"] and p, timeout=90)
    assert _cs(p)["lastState"]["terminated"]["exitCode"] in (137, 143)
    records = agent.log_records()
    unhealthy = [i for i, r in enumerate(records) if r.get("reason") == "Unhealthy"
                 and "live-" in r.get("pod", "") and r["message"].startswith("Liveness probe failed")]
    killing = [i for i, r in enumerate(records) if r.get("event") == "killing container"
               and "live-" in r.get("pod", "") and r.get("reason") == "LivenessProbe"]
    assert unhealthy and killing and unhealthy[0] < killing[0], (unhealthy, killing)

    # --- the closed port --------------------------------------------------------
    p = agent.pod("closed")
    assert p["status"]["phase"] == "Running" and _cs(p)["ready"] is False
    refused = [r for r in _events(agent, "Unhealthy") if "closed-" in r["pod"]]
    assert refused and "connection refused" in refused[0]["message"], refused[:1]

    # --- agent restart: results are rebuilt by probing again; nothing restarts ------
    before = agent.container_of("startup", "app")["Id"]
    agent.kill9()
    agent.start()
    p = agent.wait_for("startup pod started and ready again", lambda: (p := agent.pod("startup")) and
                       _cs(p)["started"] and _cs(p)["ready"] and p, timeout=90)
    assert _cs(p)["restartCount"] == 0 and agent.container_of("startup", "app")["Id"] == before


def test_lifecycle_hooks_order(agent, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    volumes = [{"name": "shared", "hostPath": {"path": str(shared), "type": "Directory"}}]
    mounts = [{"name": "shared", "mountPath": "/shared"}]
    # postStart takes 2 s and writes a marker; preStop appends before the trap does.
    hooked = pod_manifest("hooked", [busybox(
        "app",
        "trap 'echo term >> /shared/log; exit 0' TERM; while true; do sleep 0.2; done",
        volumeMounts=mounts,
        lifecycle={
            "postStart": {"exec": {"command": ["sh", "-c", "sleep 2; echo post > /shared/poststart"]}},
            "preStop": {"exec": {"command": ["sh", "-c", "echo prestop >> /shared/log"]}},
        })], volumes=volumes, terminationGracePeriodSeconds=10)
    # A postStart command that does not exist: the container is killed and restarted.
    broken = pod_manifest("broken", [busybox(
        "app", "while true; do sleep 1; done",
        lifecycle={"postStart": {"exec": {"command": ["/no/such/hook"]}}})],
        terminationGracePeriodSeconds=2)
    # A liveness kill runs preStop before the stop signal too; a failing preStop is an
    # event and the stop goes on.
    livehook = pod_manifest("livehook", [busybox(
        "app",
        "trap 'echo term >> /shared/live.log; exit 0' TERM; while true; do sleep 0.2; done",
        volumeMounts=mounts,
        livenessProbe={"exec": {"command": ["test", "-f", "/nonexistent"]}, "periodSeconds": 1,
                       "failureThreshold": 1},
        lifecycle={"preStop": {"exec": {"command": ["sh", "-c", "echo prestop >> /shared/live.log"]}}})],
        volumes=volumes, terminationGracePeriodSeconds=10)
    badstop = pod_manifest("badstop", [busybox(
        "app", "trap 'exit 0' TERM; while true; do sleep 0.2; done",
        lifecycle={"preStop": {"exec": {"command": ["/no/such/prestop"]}}})])
    orphan = pod_manifest("orphan", [busybox(
        "app", "trap 'echo term >> /shared/orphan.log; exit 0' TERM; while true; do sleep 0.2; done",
        volumeMounts=mounts,
        lifecycle={"preStop": {"exec": {"command": ["sh", "-c", "echo prestop >> /shared/orphan.log"]}}})],
        volumes=volumes, terminationGracePeriodSeconds=10)
    agent.write("hooked.yaml", hooked)
    agent.write("orphan.yaml", orphan)
    agent.write("broken.yaml", broken)
    agent.write("livehook.yaml", livehook)
    agent.write("badstop.yaml", badstop)

    # Never seen started without the postStart marker.
    seen_started = False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        p = agent.pod("hooked")
        cs = (p or {}).get("status", {}).get("containerStatuses") or [{}]
        if cs[0].get("started"):
            assert (shared / "poststart").read_text().strip() == "post"
            seen_started = True
            break
        time.sleep(0.1)
    assert seen_started

    p = agent.wait_for("failed postStart restarts the container",
                       lambda: (p := agent.pod("broken")) and _cs(p)["restartCount"] >= 1 and p, timeout=90)
    failed = [r for r in _events(agent, "FailedPostStartHook") if "broken-" in r["pod"]]
    assert failed and "/no/such/hook" in failed[0]["message"]

    agent.wait_for("liveness kill", lambda: _cs(agent.pod("livehook"))["restartCount"] >= 1, timeout=90)
    assert (shared / "live.log").read_text().split()[:2] == ["prestop", "term"]

    agent.wait_phase("badstop", "Running")
    agent.remove("hooked.yaml")
    agent.remove("badstop.yaml")
    agent.wait_for("hooked pod gone", lambda: agent.pod("hooked") is None, timeout=90)
    assert (shared / "log").read_text().split() == ["prestop", "term"]
    agent.wait_for("badstop pod gone", lambda: agent.pod("badstop") is None, timeout=90)
    failed = [r for r in _events(agent, "FailedPreStopHook") if "badstop-" in r["pod"]]
    assert failed and "/no/such/prestop" in failed[0]["message"]

    # A pod whose manifest vanished while the agent was down still gets its preStop
    # hook (kept in the container's labels, as kubelet does).
    agent.wait_phase("orphan", "Running")
    agent.kill9()
    agent.remove("orphan.yaml")
    agent.start()
    agent.wait_for("orphaned pod torn down", lambda: not docker(
        "ps", "-q", "--filter", f"label=io.kubernetes.pod.name=orphan-{agent.node_name}").split(), timeout=90)
    assert (shared / "orphan.log").read_text().split() == ["prestop", "term"]


GRPC_SERVER = r"""
import asyncio, sys
import grpc

state = {"status": 1}

async def check(request, context):
    return b"\x08" + bytes([state["status"]])

async def main():
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(check)}),))
    server.add_insecure_port("0.0.0.0:" + sys.argv[1])
    await server.start()
    print("serving", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        state["status"] = int(line)
    await server.stop(0)

asyncio.run(main())
"""


def test_grpc_probe_against_server_in_pod_netns(agent, tmp_path):
    pod = pod_manifest("grpc", [busybox(
        "app", "while true; do sleep 1; done",
        readinessProbe={"grpc": {"port": 50051}, "periodSeconds": 1, "failureThreshold": 1})])
    agent.write("grpc.yaml", pod)
    agent.wait_phase("grpc", "Running")
    sandbox = next(c for c in agent.containers()
                   if c["Config"]["Labels"].get("io.kubernetes.pod.name") == f"grpc-{agent.node_name}"
                   and c["Config"]["Labels"].get("io.kubernetes.docker.type") == "podsandbox")
    pid = sandbox["State"]["Pid"]
    script = tmp_path / "health.py"
    script.write_text(GRPC_SERVER)
    server = subprocess.Popen(["nsenter", f"--net=/proc/{pid}/ns/net", sys.executable, str(script), "50051"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert server.stdout.readline().strip() == "serving"
        agent.wait_for("grpc SERVING -> ready", lambda: _cs(agent.pod("grpc"))["ready"], timeout=45)
        server.stdin.write("2\n")  # NOT_SERVING
        server.stdin.flush()
        agent.wait_for("NOT_SERVING -> unready", lambda: not _cs(agent.pod("grpc"))["ready"], timeout=45)
        msgs = [r["message"] for r in _events(agent, "Unhealthy") if "grpc-" in r["pod"]]
        assert any("NOT_SERVING" in m for m in msgs), msgs[:3]
    finally:
        server.kill()
        server.wait(5)
