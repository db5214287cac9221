"""Probes in cluster mode: readiness reaches the pod's Ready condition in the API
(what EndpointSlice controllers read), a failed liveness probe restarts the container,
and the Unhealthy and Killing events reach the API; every object the agent wrote
passes the official schemas."""

from __future__ import annotations

import asyncio
import subprocess

import pytest

from tests.cluster.test_cluster_support import (api_pod, busybox,  # noqa: F401
                                                cluster_agent_factory, cp_recording,
                                                kubectl_apply, rkubectl, schema_problems)

pytestmark = [pytest.mark.docker, pytest.mark.root]


def _ready(pod: dict | None) -> str | None:
    for c in ((pod or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == "Ready":
            return c["status"]
    return None


async def test_readiness_and_liveness_in_the_api(cp_recording, rkubectl, cluster_agent_factory):
    cp, kubectl = cp_recording, rkubectl
    agent = await cluster_agent_factory(cp)
    await agent.wait_node_ready()
    ready_probe = {"exec": {"command": ["test", "-f", "/tmp/ready"]}, "periodSeconds": 1, "failureThreshold": 1}
    live_probe = {"exec": {"command": ["test", "-f", "/tmp/alive"]}, "periodSeconds": 1, "failureThreshold": 2,
                  "terminationGracePeriodSeconds": 1}
    await kubectl_apply(kubectl, api_pod("probed", agent.node_name, [busybox(
        "app", "touch /tmp/alive; while true; do sleep 1; done",
        readinessProbe=ready_probe, livenessProbe=live_probe)]))
    pod = await agent.wait_api_phase("probed", "Running")
    await agent.wait("unready while the probe fails", lambda: _ready(agent.api_pod("probed")) == "False", 60)
    (app,) = [c for c in await agent.docker_containers(pod["metadata"]["uid"], running_only=True)
              if c["Config"]["Labels"]["io.kubernetes.container.name"] == "app"]

    def docker_exec(*cmd: str) -> None:
        subprocess.run(["docker", "exec", app["Id"], *cmd], check=True, capture_output=True, timeout=30)

    await asyncio.to_thread(docker_exec, "touch", "/tmp/ready")
    await agent.wait("Ready in the API", lambda: _ready(agent.api_pod("probed")) == "True", 60)
    cs = agent.api_pod("probed")["status"]["containerStatuses"][0]
    assert cs["ready"] is True and cs["started"] is True

    await asyncio.to_thread(docker_exec, "rm", "/tmp/alive")
    restarted = await agent.wait("liveness restart", lambda: (p := agent.api_pod("probed")) and
                                 p["status"]["containerStatuses"][0]["restartCount"] >= 1 and p, 60)
    # The new instance has no /tmp/ready: unready again until its probe passes.
    assert restarted["status"]["containerStatuses"][0]["ready"] is False

    def reasons() -> list[str]:
        return [e["reason"] for e in sorted(cp.objects("events", "default"),
                                            key=lambda e: e.get("firstTimestamp") or "")
                if e["involvedObject"].get("name") == "probed"]
    await agent.wait("Unhealthy and Killing events", lambda: {"Unhealthy", "Killing"} <= set(reasons()), 60)
    events = [e for e in cp.objects("events", "default") if e["involvedObject"].get("name") == "probed"]
    killing = [e for e in events if e["reason"] == "Killing"]
    assert any("failed liveness probe, will be restarted" in e["message"] for e in killing), killing
    unhealthy = [e for e in events if e["reason"] == "Unhealthy"]
    assert any(e["message"].startswith("Liveness probe failed") for e in unhealthy)
    assert all(e["involvedObject"].get("fieldPath") == "spec.containers{app}" for e in unhealthy)
    assert schema_problems(cp) == []
