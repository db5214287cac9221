"""Cluster mode, pod lifecycle states across kill -9: a pod finished in the API keeps its
exited containers (until it is deleted) and gets no address; a pod that admission now
rejects has the containers it already had killed. Real agent, Docker, control plane."""

from __future__ import annotations

import asyncio
import random
import subprocess
import time

import pytest

from tests.cluster.test_cluster_support import (NODES_RT, PODS_RT, SLEEP_FOREVER, api_pod,  # noqa: F401
                                                busybox, cluster_agent_factory, cp_recording,
                                                schema_problems)

pytestmark = [pytest.mark.docker, pytest.mark.root]


def _nft_table(agent) -> str:
    table = agent.node_name.removeprefix("e2e-")
    out = subprocess.run(["nft", "list", "table", "ip", f"na{table}"], capture_output=True, text=True, timeout=30)
    return out.stdout


def _ipam_holds(agent, uid: str) -> bool:
    return any(uid in p.read_text() for p in (agent.root_dir / "ipam").rglob("*") if p.is_file())


async def _until(what: str, predicate, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        result = await predicate()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.3)


async def test_finished_pod_kept_and_rejected_pod_killed_across_kill9(cp_recording, cluster_agent_factory):
    cp = cp_recording
    agent = await cluster_agent_factory(cp)
    await agent.wait_node_ready()
    node = agent.node_name
    cp.api.patch(NODES_RT, None, node, "application/merge-patch+json",
                 {"metadata": {"labels": {"tier": "a"}}})
    host_port = random.randint(32100, 32700)
    cp.api.create(PODS_RT, "default", api_pod("sel", node, [busybox(
        "app", SLEEP_FOREVER, ports=[{"containerPort": 8080, "hostPort": host_port}])],
        nodeSelector={"tier": "a"}))
    cp.api.create(PODS_RT, "default", api_pod("done", node, [busybox("app", "echo bye; exit 3")],
                                              restartPolicy="Never"))
    cp.api.create(PODS_RT, "default", api_pod("never", node, [
        {"name": "app", "image": "nodeagent.invalid/absent:1", "imagePullPolicy": "Never"}]))
    sel = await agent.wait_api_running_ready("sel")
    done = await agent.wait_api_phase("done", "Failed")
    sel_uid, done_uid = sel["metadata"]["uid"], done["metadata"]["uid"]
    # hostPorts work in cluster mode too: the DNAT to the pod is in the node's table.
    sel_ip = sel["status"]["podIP"]
    try:
        await _until("hostPort DNAT in the kernel", lambda: asyncio.to_thread(lambda: (
            f"hostport-tcp/*/{host_port}" in (t := _nft_table(agent)) and f"dnat to {sel_ip}:8080" in t)), 30)
    except AssertionError:
        raise AssertionError(f"no DNAT of hostPort {host_port} to {sel_ip}:8080 in:\n{_nft_table(agent)}") from None
    assert done["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3
    # kubelet's image events: a present image is "already present"; a missing one under
    # policy Never is ErrImageNeverPull alone (nothing was pulled, nothing "Failed").
    def reasons(pod_name: str) -> list[tuple[str, str]]:
        return [(e["reason"], e.get("message", "")) for e in cp.objects("events", "default")
                if e["involvedObject"]["name"] == pod_name]

    await _until("Pulled event", lambda: asyncio.to_thread(lambda: ("Pulled", 'Container image "busybox:1.35" already present on machine') in reasons("sel")))
    never = await _until("ErrImageNeverPull waiting", lambda: asyncio.to_thread(lambda: (
        (p := agent.api_pod("never")) and (p.get("status") or {}).get("containerStatuses")
        and p["status"]["containerStatuses"][0]["state"].get("waiting", {}).get("reason") == "ErrImageNeverPull" and p)))
    assert "nodeagent.invalid/absent:1" in never["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
    await _until("ErrImageNeverPull event", lambda: asyncio.to_thread(lambda: any(r == "ErrImageNeverPull" for r, _ in reasons("never"))))
    assert not {"Pulling", "Failed", "Pulled"} & {r for r, _ in reasons("never")}
    assert [e["type"] for e in cp.objects("events", "default")
            if e["involvedObject"]["name"] == "never" and e["reason"] == "ErrImageNeverPull"] == ["Warning"]

    # Finished: the address is released at once, the exited container stays.
    await _until("finished pod's address released", lambda: asyncio.to_thread(
        lambda: not _ipam_holds(agent, done_uid)), 15)
    (exited,) = [c for c in await agent.docker_containers(done_uid)
                 if c["Config"]["Labels"]["io.kubernetes.container.name"] == "app"]

    agent.kill9()
    # While the agent is down: the node is relabelled, and the running pod's status
    # is as if the agent had died before reporting it (so it is admitted again).
    cp.api.patch(NODES_RT, None, node, "application/merge-patch+json",
                 {"metadata": {"labels": {"tier": "b"}}})
    current = agent.api_pod("sel")
    cp.api.update(PODS_RT, "default", "sel",
                  dict(current, status={"phase": "Pending", "conditions": current["status"]["conditions"]}),
                  subresource="status")
    await agent.astart()

    # Rejected now (NodeAffinity): the containers it had are stopped.
    rejected = await agent.wait_api_phase("sel", "Failed", 40)
    assert rejected["status"]["reason"] == "NodeAffinity"
    await _until("rejected pod's containers stopped",
                 lambda: _none(agent.docker_containers(sel_uid, running_only=True)), 30)
    await _until("rejected pod's address released", lambda: asyncio.to_thread(
        lambda: not _ipam_holds(agent, sel_uid)), 15)
    await _until("its hostPort gone", lambda: asyncio.to_thread(
        lambda: f"hostport-tcp/*/{host_port}" not in _nft_table(agent)), 30)

    # The finished pod: nothing restarted, nothing removed after relists and housekeeping.
    await asyncio.sleep(5)
    kept = [c for c in await agent.docker_containers(done_uid)
            if c["Config"]["Labels"]["io.kubernetes.container.name"] == "app"]
    assert [c["Id"] for c in kept] == [exited["Id"]]
    assert kept[0]["State"]["ExitCode"] == 3 and not kept[0]["State"]["Running"]
    assert agent.api_pod("done")["status"]["phase"] == "Failed"
    assert not _ipam_holds(agent, done_uid)

    # Deleting the pod is what finally removes its containers.
    cp.api.delete(PODS_RT, "default", "done", {"gracePeriodSeconds": 0})
    await _until("deleted pod's containers removed", lambda: _none(agent.docker_containers(done_uid)), 30)
    assert schema_problems(cp) == []


async def _none(coro) -> bool:
    return not await coro
