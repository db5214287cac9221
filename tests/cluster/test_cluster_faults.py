"""Cluster mode under faults: the API unreachable at start and for a minute, watches
dropped and expired (410) with pods added and deleted meanwhile. Real agent process,
real Docker, the test control plane."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
import urllib.request

import pytest

from tests.cluster.test_cluster_support import (PODS_RT, SLEEP_FOREVER, api_pod, busybox,  # noqa: F401
                                                cluster_agent_factory, cp_recording, is_running,
                                                kubectl_apply, rkubectl, schema_problems)
from tests.controlplane import Options

pytestmark = [pytest.mark.docker, pytest.mark.root]


def _parse_time(text: str) -> float:
    from datetime import datetime
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def _app_container(agent, pod_name: str) -> dict:
    uid = agent.api_pod(pod_name)["metadata"]["uid"]
    (app,) = [c for c in await agent.docker_containers(uid)
              if c["Config"]["Labels"]["io.kubernetes.container.name"] == "app"]
    return app


async def _gone_from_docker(agent, uid: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while await agent.docker_containers(uid):
        assert time.monotonic() < deadline, f"containers of pod {uid} are still in Docker"
        await asyncio.sleep(0.3)


def _agent_pods(agent) -> list[dict]:
    with urllib.request.urlopen(agent.url + "/pods", timeout=5) as resp:
        return json.load(resp)["items"]


async def test_api_outage_of_60s(cp_recording, rkubectl, cluster_agent_factory):
    cp, kubectl = cp_recording, rkubectl
    agent = await cluster_agent_factory(cp)
    await agent.wait_node_ready()
    node = agent.node_name
    for name in ("steady", "doomed"):
        cp.api.create(PODS_RT, "default", api_pod(name, node, [busybox("app", SLEEP_FOREVER)], grace=2))
    await agent.wait_api_running_ready("steady")
    await agent.wait_api_running_ready("doomed")
    steady = await _app_container(agent, "steady")

    outage = asyncio.create_task(cp.outage(60))
    await asyncio.sleep(2)
    # While the API is unreachable (to the agent and to kubectl), the cluster changes
    # behind it: a new pod is bound to the node and another is deleted.
    cp.api.create(PODS_RT, "default", api_pod("during", node, [busybox("app", SLEEP_FOREVER)]))
    cp.api.delete(PODS_RT, "default", "doomed")
    assert (await kubectl("get", "pods", check=False, timeout=30)).returncode != 0
    for _ in range(5):
        await asyncio.sleep(8)
        # The running pod keeps running, untouched; the agent is alive and serving.
        assert agent.proc.poll() is None
        assert is_running((await _app_container(agent, "steady")))
        local = {p["metadata"]["name"]: p["status"]["phase"] for p in await asyncio.to_thread(_agent_pods, agent)}
        assert local["steady"] == "Running"
    await outage
    back = time.time()

    # Catching up: the new pod runs, the deleted pod is stopped and deleted, the lease
    # renews, statuses reach the API.
    await agent.wait_api_running_ready("during", 40)
    await agent.wait("doomed deleted from the API", lambda: agent.api_pod("doomed") is None, 40)
    await agent.wait("lease renewed after the outage",
                     lambda: _parse_time(agent.lease()["spec"]["renewTime"]) >= back - 1, 30)
    after = await _app_container(agent, "steady")
    assert after["Id"] == steady["Id"] and is_running(after)
    status = agent.api_pod("steady")["status"]
    assert status["phase"] == "Running" and status["containerStatuses"][0]["restartCount"] == 0

    # And the API path works as before.
    await kubectl_apply(kubectl, api_pod("after", node, [busybox("app", SLEEP_FOREVER)]))
    await agent.wait_api_running_ready("after")
    await agent.wait_node_ready()
    assert schema_problems(cp) == []


async def test_dropped_watches_and_410_relist_lose_nothing(cp_recording, cluster_agent_factory):
    cp = cp_recording
    agent = await cluster_agent_factory(cp)
    await agent.wait_node_ready()
    node = agent.node_name
    for name in ("keep", "gone"):
        cp.api.create(PODS_RT, "default", api_pod(name, node, [busybox("app", SLEEP_FOREVER)], grace=2))
    await agent.wait_api_running_ready("keep")
    gone = await agent.wait_api_running_ready("gone")
    keep = await _app_container(agent, "keep")

    # The agent's watch breaks; meanwhile a pod is added, another force-deleted, and the
    # history compacted: resuming the watch answers 410 Expired, the agent relists, and
    # the relist's synthetic DELETED stops the vanished pod.
    await cp.stop_serving()
    cp.api.create(PODS_RT, "default", api_pod("fresh", node, [busybox("app", SLEEP_FOREVER)], grace=2))
    cp.api.delete(PODS_RT, "default", "gone", {"gracePeriodSeconds": 0})
    cp.compact()
    await cp.start_serving()
    await agent.wait_api_running_ready("fresh", 40)
    await _gone_from_docker(agent, gone["metadata"]["uid"])
    assert any(r.get("event") == "reflector.resource_version_expired" and r.get("reflector") == "pods"
               for r in agent.log_records())
    after = await _app_container(agent, "keep")
    assert after["Id"] == keep["Id"] and is_running(after)

    # Server-side watch drops with changes right behind them: nothing is missed.
    fresh_uid = agent.api_pod("fresh")["metadata"]["uid"]
    for i in range(3):
        cp.drop_watches()
        cp.api.create(PODS_RT, "default", api_pod(f"burst{i}", node, [busybox("app", SLEEP_FOREVER)], grace=2))
    cp.drop_watches()
    cp.api.delete(PODS_RT, "default", "fresh", {"gracePeriodSeconds": 0})
    for i in range(3):
        await agent.wait_api_running_ready(f"burst{i}", 40)
    await _gone_from_docker(agent, fresh_uid)
    assert schema_problems(cp) == []


async def test_api_unreachable_at_start(cp_recording, cluster_agent_factory):
    cp = cp_recording
    await cp.stop_serving()
    agent = await cluster_agent_factory(cp, start=False, manifests=True,
                                        extra_config={"node-registration-wait": 2.0})
    agent.write("early.yaml", {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "early"},
                               "spec": {"terminationGracePeriodSeconds": 2,
                                        "containers": [busybox("app", SLEEP_FOREVER)]}})
    cp.api.create(PODS_RT, "default", api_pod("queued", agent.node_name, [busybox("app", SLEEP_FOREVER)]))
    await agent.astart()

    # Without the API the node still runs its static pods.
    def early_running():
        pods = {p["metadata"]["name"]: p for p in _agent_pods(agent)}
        return (pods.get(f"early-{agent.node_name}") or {}).get("status", {}).get("phase") == "Running"
    await agent.wait("static pod running without the API", lambda: asyncio.to_thread(early_running), 40)
    assert agent.node_object() is None

    await cp.start_serving()
    await agent.wait_node_ready(40)
    await agent.wait_api_running_ready("queued", 40)
    mirror = await agent.wait_api_running_ready(f"early-{agent.node_name}", 40)
    assert mirror["metadata"]["annotations"]["kubernetes.io/config.mirror"]
    assert schema_problems(cp) == []


async def test_pod_network_uses_the_nodes_pod_cidr(make_controlplane, cluster_agent_factory):
    # The control plane's node IPAM hands out /24s of 10.248.0.0/16 (a range only this
    # test uses), in spec.podCIDR: the pod network must come up with it.
    cp = await make_controlplane(options=Options(pod_cidr="10.248.0.0/16", record_writes=True))
    agent = await cluster_agent_factory(cp)
    node = await agent.wait_node_ready()
    pod_cidr = node["spec"]["podCIDR"]
    assert ipaddress.ip_network(pod_cidr).subnet_of(ipaddress.ip_network("10.248.0.0/16"))
    assert pod_cidr != agent.pod_cidr
    cp.api.create(PODS_RT, "default", api_pod("inrange", agent.node_name, [busybox("app", SLEEP_FOREVER)]))
    pod = await agent.wait_api_running_ready("inrange")
    assert ipaddress.ip_address(pod["status"]["podIP"]) in ipaddress.ip_network(pod_cidr)
    assert schema_problems(cp) == []


async def test_agent_restart_adopts_everything(cp_recording, cluster_agent_factory):
    cp = cp_recording
    agent = await cluster_agent_factory(cp, manifests=True)
    await agent.wait_node_ready()
    node = agent.node_name
    agent.write("st.yaml", {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "st"},
                            "spec": {"terminationGracePeriodSeconds": 2, "containers": [busybox("app", SLEEP_FOREVER)]}})
    cp.api.create(PODS_RT, "default", api_pod("api1", node, [busybox("app", SLEEP_FOREVER)]))
    cp.api.create(PODS_RT, "default", api_pod("rej", node, [busybox("app", SLEEP_FOREVER)],
                                              nodeSelector={"no": "such-label"}))
    api1 = await agent.wait_api_running_ready("api1")
    mirror = await agent.wait_api_running_ready(f"st-{node}")
    await agent.wait_api_phase("rej", "Failed")
    app = await _app_container(agent, "api1")
    node_uid = agent.node_object()["metadata"]["uid"]

    agent.kill9()
    cp.api.create(PODS_RT, "default", api_pod("while-down", node, [busybox("app", SLEEP_FOREVER)]))
    writes_before = len([w for w in cp.recorded_writes if w.resource == "pods/status" and w.name == "api1"])
    await agent.astart()
    await agent.wait_api_running_ready("while-down")
    await asyncio.sleep(3)

    # Same containers, same status (no write needed), same mirror, same Node; the
    # rejected pod stays rejected and never gets a container.
    after = await _app_container(agent, "api1")
    assert after["Id"] == app["Id"] and is_running(after)
    now = agent.api_pod("api1")
    assert now["status"]["startTime"] == api1["status"]["startTime"]
    assert now["status"]["conditions"] == api1["status"]["conditions"]
    assert len([w for w in cp.recorded_writes if w.resource == "pods/status" and w.name == "api1"]) == writes_before
    assert agent.api_pod(f"st-{node}")["metadata"]["uid"] == mirror["metadata"]["uid"]
    assert agent.node_object()["metadata"]["uid"] == node_uid
    rej = agent.api_pod("rej")
    assert rej["status"]["phase"] == "Failed" and rej["status"]["reason"] == "NodeAffinity"
    assert await agent.docker_containers(rej["metadata"]["uid"]) == []
    assert schema_problems(cp) == []
