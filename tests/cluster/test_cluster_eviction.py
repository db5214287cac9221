"""Node-pressure eviction end to end, with the threshold set around the machine's
current state instead of exhausting it: `memory.available<100%` is always met. Pods
admitted before the pressure are evicted one per round in kubelet's order (the pod
using the most memory above its request first), end Failed/Evicted with kubelet's
message and a DisruptionTarget condition, keep their stopped containers; the static
(mirror) pod is never evicted; the Node reports MemoryPressure; a new BestEffort pod is
refused at admission."""

from __future__ import annotations

import time

import pytest
import yaml

from tests.cluster.test_cluster_support import (SLEEP_FOREVER, api_pod, busybox,  # noqa: F401
                                                cluster_agent_factory, cp_recording,
                                                kubectl_apply, rkubectl, schema_problems)
from tests.e2e.conftest import pod_manifest

pytestmark = [pytest.mark.docker, pytest.mark.root]

# Holds ~24 MiB in a shell variable, touched, then sleeps (busybox keeps the shell alive
# only while a loop runs after the assignment).
HOG = ("x=$(head -c 25165824 /dev/zero | tr '\\0' 'a'); "
       "while true; do sleep 1; done")


def _phase_reason(agent, name):
    status = (agent.api_pod(name) or {}).get("status") or {}
    return status.get("phase"), status.get("reason")


async def test_memory_pressure_evicts_in_kubelets_order(cp_recording, rkubectl, cluster_agent_factory):
    cp, kubectl = cp_recording, rkubectl
    agent = await cluster_agent_factory(cp, manifests=True, extra_config={
        "eviction-monitoring-interval": 1.0, "eviction-pressure-transition-period": 5.0})
    await agent.wait_node_ready()
    agent.write("static.yaml", pod_manifest("static", [busybox("app", SLEEP_FOREVER)]))
    await kubectl_apply(kubectl, api_pod("hog", agent.node_name, [busybox("app", HOG)], grace=30))
    await kubectl_apply(kubectl, api_pod("small", agent.node_name, [busybox("app", SLEEP_FOREVER)], grace=30))
    await kubectl_apply(kubectl, api_pod("within", agent.node_name, [busybox(
        "app", SLEEP_FOREVER, resources={"requests": {"memory": "64Mi"}, "limits": {"memory": "64Mi"}})], grace=30))
    for name in ("hog", "small", "within"):
        await agent.wait_api_running_ready(name, 60)
    await agent.wait("mirror pod", lambda: agent.api_pod(f"static-{agent.node_name}"), 30)
    await agent.wait("the hog's memory", lambda: _hog_ready(agent), 30)

    # Restart the node with a threshold that is met at once: the running pods are
    # adopted (admitted earlier), then evicted.
    agent.stop()
    config = yaml.safe_load(agent.config_path.read_text())
    config["eviction-hard"] = "memory.available<100%"
    agent.config_path.write_text(yaml.safe_dump(config))
    await agent.astart()

    evicted_at: dict[str, float] = {}

    def progress():
        for name in ("hog", "small", "within"):
            if name not in evicted_at and _phase_reason(agent, name) == ("Failed", "Evicted"):
                evicted_at[name] = time.monotonic()
        return len(evicted_at) == 3
    await agent.wait("three evictions", progress, 60)
    # BestEffort pods over their (zero) request first, the bigger user first; the pod
    # within its request last.
    assert sorted(evicted_at, key=evicted_at.get) == ["hog", "small", "within"]

    hog = agent.api_pod("hog")
    status = hog["status"]
    assert status["message"].startswith("The node was low on resource: memory. Threshold quantity: 100%, available: ")
    assert "Container app was using" in status["message"] and "has larger consumption of memory" in status["message"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["DisruptionTarget"]["reason"] == "TerminationByKubelet"
    (cs,) = status["containerStatuses"]
    assert "terminated" in cs["state"]
    containers = await agent.docker_containers(hog["metadata"]["uid"])
    app = [c for c in containers if c["Config"]["Labels"].get("io.kubernetes.container.name") == "app"]
    assert app and not app[0]["State"]["Running"]  # stopped, kept for its logs

    # The static pod is critical: never evicted.
    mirror = agent.api_pod(f"static-{agent.node_name}")
    assert mirror["status"]["phase"] == "Running"

    node_conditions = {c["type"]: c for c in agent.node_object()["status"]["conditions"]}
    await agent.wait("MemoryPressure on the Node", lambda: {
        c["type"]: c["status"] for c in agent.node_object()["status"]["conditions"]}["MemoryPressure"] == "True", 20)
    node_conditions = {c["type"]: c for c in agent.node_object()["status"]["conditions"]}
    assert node_conditions["MemoryPressure"]["reason"] == "KubeletHasInsufficientMemory"

    # Under MemoryPressure a new BestEffort pod is refused at admission.
    await kubectl_apply(kubectl, api_pod("late", agent.node_name, [busybox("app", SLEEP_FOREVER)]))
    late = await agent.wait_api_phase("late", "Failed", 30)
    assert late["status"]["reason"] == "Evicted"
    assert late["status"]["message"] == "The node had condition: [MemoryPressure]. "

    reasons = {e["reason"] for e in cp.objects("events", "default")}
    assert {"Evicted", "EvictionThresholdMet"} <= reasons
    assert schema_problems(cp) == []


def _hog_ready(agent) -> bool:
    import subprocess
    out = subprocess.run(["docker", "ps", "-q", "--filter", f"label=io.nodeagent.node={agent.node_name}",
                          "--filter", "label=io.kubernetes.container.name=app"],
                         capture_output=True, text=True).stdout.split()
    stats = subprocess.run(["docker", "stats", "--no-stream", "--format", "{{.Name}} {{.MemUsage}}", *out],
                           capture_output=True, text=True).stdout
    return any("_hog_" in line and "MiB" in line.split()[1] and float(line.split()[1][:-3]) > 20
               for line in stats.splitlines())
