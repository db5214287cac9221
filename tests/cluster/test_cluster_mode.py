"""Cluster mode end to end: the real agent process as a Kubernetes node of the test
control plane, driven with real kubectl, running pods on real Docker.

Every test ends by validating each object the agent wrote against the official
Kubernetes v1.32 schema (the control plane records them)."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import platform
import subprocess
import time
from pathlib import Path

import pytest

from nodeagent.cluster.node import KUBELET_VERSION
from tests.cluster.test_cluster_support import (IGNORE_TERM, SLEEP_FOREVER, api_pod, busybox,  # noqa: F401
                                                cluster_agent_factory, cp_recording,
                                                kubectl_apply, rkubectl, schema_problems)

pytestmark = [pytest.mark.docker, pytest.mark.root]


def _row(table: str, name: str) -> list[str]:
    for line in table.splitlines():
        cells = line.split()
        if cells and cells[0] == name:
            return cells
    raise AssertionError(f"no row {name!r} in:\n{table}")


def _conditions(obj: dict) -> dict[str, dict]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}


def _parse_time(text: str) -> float:
    from datetime import datetime
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def test_kubectl_apply_runs_pod_and_delete_honours_grace(cp_recording, rkubectl, cluster_agent_factory):
    cp, kubectl = cp_recording, rkubectl
    agent = await cluster_agent_factory(cp)
    await agent.wait_node_ready()

    await kubectl_apply(kubectl, api_pod("web", agent.node_name, [busybox("app", SLEEP_FOREVER)], grace=30))
    await kubectl_apply(kubectl, api_pod("stubborn", agent.node_name, [busybox("app", IGNORE_TERM)], grace=3))
    web = await agent.wait_api_running_ready("web")
    stubborn = await agent.wait_api_running_ready("stubborn")

    # kubectl shows it Running, with the pod IP from this node's range and the node.
    wide = (await kubectl("get", "pods", "-o", "wide")).stdout
    row = _row(wide, "web")
    ip = web["status"]["podIP"]
    assert row[1:3] == ["1/1", "Running"] and ip in row and agent.node_name in row
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(agent.pod_cidr)

    # The status has everything kubelet reports.
    status = web["status"]
    assert set(_conditions(web)) == {"PodScheduled", "PodReadyToStartContainers", "Initialized",
                                      "ContainersReady", "Ready"}
    assert all(c["status"] == "True" for c in _conditions(web).values())
    assert status["podIPs"] == [{"ip": ip}] and status["hostIP"] and status["hostIPs"]
    assert status["startTime"] and status["qosClass"] == "BestEffort"
    (cs,) = status["containerStatuses"]
    assert cs["ready"] and cs["started"] and cs["restartCount"] == 0 and "running" in cs["state"]
    containers = await agent.docker_containers(web["metadata"]["uid"], running_only=True)
    assert cs["containerID"] == f"docker://{next(c['Id'] for c in containers if c['Config']['Labels'].get('io.kubernetes.container.name') == 'app')}"

    # A settled pod costs no more status writes: statuses only go out when they change.
    patches_before = sum(1 for w in cp.recorded_writes if w.resource == "pods/status")
    await asyncio.sleep(3)
    assert sum(1 for w in cp.recorded_writes if w.resource == "pods/status") == patches_before

    # Graceful deletion: a container that ignores SIGTERM is killed when its 3 s grace
    # period runs out, not before; then the node deletes the pod (grace 0, uid
    # precondition) and removes everything from Docker.
    uid = stubborn["metadata"]["uid"]
    started = time.monotonic()
    await kubectl("delete", "pod", "stubborn", "--wait=true", timeout=60)
    elapsed = time.monotonic() - started
    assert 2.5 <= elapsed < 12, elapsed
    assert agent.api_pod("stubborn") is None
    deadline = time.monotonic() + 15
    while await agent.docker_containers(uid):
        assert time.monotonic() < deadline, "containers of the deleted pod are still in Docker"
        await asyncio.sleep(0.3)
    final = [w for w in cp.recorded_writes if w.resource == "pods/status" and w.name == "stubborn"][-1]
    assert final.object["status"]["phase"] == "Failed"  # killed by SIGKILL after the grace period
    (delete,) = [w for w in cp.recorded_writes if w.verb == "delete" and w.name == "stubborn"]
    assert delete.user == f"system:node:{agent.node_name}"
    assert delete.request["gracePeriodSeconds"] == 0 and delete.request["preconditions"] == {"uid": uid}

    # A container that stops on SIGTERM does not wait out its 30 s grace period.
    started = time.monotonic()
    await kubectl("delete", "pod", "web", "--wait=true", timeout=60)
    assert time.monotonic() - started < 10
    final = [w for w in cp.recorded_writes if w.resource == "pods/status" and w.name == "web"][-1]
    assert final.object["status"]["phase"] == "Succeeded"  # exited 0 on SIGTERM

    assert schema_problems(cp) == []


async def test_node_registration_status_and_lease(cp_recording, rkubectl, cluster_agent_factory):
    cp, kubectl = cp_recording, rkubectl
    agent = await cluster_agent_factory(cp, extra_config={"node-labels": "tier=edge,disk=ssd"})
    node = await agent.wait_node_ready()

    row = _row((await kubectl("get", "nodes")).stdout, agent.node_name)
    assert row[1] == "Ready" and row[-1] == KUBELET_VERSION

    node = (await kubectl("get", "node", agent.node_name, "-o", "json")).json()
    labels = node["metadata"]["labels"]
    assert labels["kubernetes.io/hostname"] == agent.node_name
    assert labels["kubernetes.io/os"] == "linux" and labels["kubernetes.io/arch"] in ("amd64", "arm64")
    assert labels["tier"] == "edge" and labels["disk"] == "ssd"
    status = node["status"]
    addresses = {a["type"]: a["address"] for a in status["addresses"]}
    ipaddress.ip_address(addresses["InternalIP"])
    assert addresses["Hostname"] == agent.node_name
    assert status["capacity"]["cpu"] == str(os.cpu_count())
    assert status["capacity"]["pods"] == status["allocatable"]["pods"] == "110"
    cap_mem = int(status["capacity"]["memory"].removesuffix("Ki"))
    alloc_mem = int(status["allocatable"]["memory"].removesuffix("Ki"))
    # Minus the hard eviction threshold for memory.available: the test agents run with
    # 1Mi (tests/e2e/conftest.py; kubelet's default 100Mi is checked in the unit tests).
    assert cap_mem - alloc_mem == 1024
    assert status["capacity"]["ephemeral-storage"].endswith("Ki")
    info = status["nodeInfo"]
    assert info["containerRuntimeVersion"].startswith("docker://20.")
    assert info["kubeletVersion"] == KUBELET_VERSION and info["operatingSystem"] == "linux"
    assert info["kernelVersion"] == platform.release()
    assert info["machineID"] == Path("/etc/machine-id").read_text().strip()
    assert info["bootID"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    pretty = next(line.split("=", 1)[1].strip('"') for line in Path("/etc/os-release").read_text().splitlines()
                  if line.startswith("PRETTY_NAME="))
    assert info["osImage"] == pretty
    assert status["daemonEndpoints"]["kubeletEndpoint"]["Port"] == agent.api_port
    conds = _conditions(node)
    assert conds["Ready"]["reason"] == "KubeletReady"
    assert {k: conds[k]["status"] for k in ("MemoryPressure", "DiskPressure", "PIDPressure")} == \
        {"MemoryPressure": "False", "DiskPressure": "False", "PIDPressure": "False"}
    assert conds["MemoryPressure"]["reason"] == "KubeletHasSufficientMemory"

    # The Lease: held by the node, 40 s, owned by the Node, renewed (every 2 s here).
    lease = agent.lease()
    assert lease["spec"]["holderIdentity"] == agent.node_name
    assert lease["spec"]["leaseDurationSeconds"] == 40
    assert lease["metadata"]["ownerReferences"][0]["uid"] == node["metadata"]["uid"]
    first = _parse_time(lease["spec"]["renewTime"])
    await agent.wait("lease renewal", lambda: _parse_time(agent.lease()["spec"]["renewTime"]) >= first + 1.5, 10)

    described = (await kubectl("describe", "node", agent.node_name)).stdout
    assert "KubeletReady" in described and f"HolderIdentity:  {agent.node_name}" in described

    # A deleted Node is registered again, and its Lease follows the new owner.
    await kubectl("delete", "node", agent.node_name)
    old_uid = node["metadata"]["uid"]
    new = await agent.wait("node re-registered",
                           lambda: (n := agent.node_object()) and n["metadata"]["uid"] != old_uid and n, 20)
    await agent.wait("lease owned by the new Node",
                     lambda: agent.lease()["metadata"]["ownerReferences"][0]["uid"] == new["metadata"]["uid"], 15)
    await agent.wait_node_ready()

    assert schema_problems(cp) == []


async def test_admission_rejections(cp_recording, rkubectl, cluster_agent_factory):
    cp, kubectl = cp_recording, rkubectl
    agent = await cluster_agent_factory(cp, extra_config={"max-pods": 4})
    await agent.wait_node_ready()
    node = agent.node_name

    def pod(name, **spec):
        return api_pod(name, node, [busybox("app", SLEEP_FOREVER, **spec.pop("container", {}))], **spec)

    # Fits, and matches: nodeSelector and required node affinity on the node's labels.
    await kubectl_apply(kubectl, pod("plain", container={"resources": {"requests": {"cpu": "100m", "memory": "16Mi"}}}))
    await kubectl_apply(kubectl, pod("selected", nodeSelector={"kubernetes.io/hostname": node}))
    await kubectl_apply(kubectl, pod("affine", affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [
            {"matchExpressions": [{"key": "no-such-label", "operator": "Exists"}]},  # ORed terms
            {"matchExpressions": [{"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]}],
             "matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]},
        ]}}}))
    for name in ("plain", "selected", "affine"):
        await agent.wait_api_running_ready(name)

    # Rejected: each with kubelet's reason and message, phase Failed, no container.
    cases = {
        "hungry-cpu": (pod("hungry-cpu", container={"resources": {"requests": {"cpu": "1000"}}}),
                       "OutOfcpu", f"Pod was rejected: Node didn't have enough resource: cpu, requested: 1000000, used: 100, capacity: {os.cpu_count() * 1000}"),
        "hungry-mem": (pod("hungry-mem", container={"resources": {"requests": {"memory": "1000Ti"}}}),
                       "OutOfmemory", "Pod was rejected: Node didn't have enough resource: memory, requested: 1099511627776000, used: 16777216, capacity: "),
        "wrong-selector": (pod("wrong-selector", nodeSelector={"disktype": "ssd"}),
                           "NodeAffinity", "Pod was rejected: Predicate NodeAffinity failed: node(s) didn't match Pod's node affinity/selector"),
        "wrong-affinity": (pod("wrong-affinity", affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "NotIn", "values": [node]}]}]}}}),
                           "NodeAffinity", "Pod was rejected: Predicate NodeAffinity failed"),
    }
    for name, (obj, _reason, _message) in cases.items():
        await kubectl_apply(kubectl, obj)
    for name, (_obj, reason, message) in cases.items():
        rejected = await agent.wait_api_phase(name, "Failed", 30)
        assert rejected["status"]["reason"] == reason
        assert rejected["status"]["message"].startswith(message), rejected["status"]["message"]

    # Max pods (4): a fourth active pod fits, a fifth is OutOfpods.
    await kubectl_apply(kubectl, pod("fourth"))
    await agent.wait_api_running_ready("fourth")
    await kubectl_apply(kubectl, pod("fifth"))
    fifth = await agent.wait_api_phase("fifth", "Failed", 30)
    assert fifth["status"]["reason"] == "OutOfpods"
    assert fifth["status"]["message"] == "Pod was rejected: Node didn't have enough resource: pods, requested: 1, used: 4, capacity: 4"

    # kubectl shows the reason as the pod's STATUS, and no container was ever created.
    table = (await kubectl("get", "pods")).stdout
    for name, reason in [("hungry-cpu", "OutOfcpu"), ("hungry-mem", "OutOfmemory"),
                         ("wrong-selector", "NodeAffinity"), ("fifth", "OutOfpods")]:
        assert _row(table, name)[2] == reason
        assert await agent.docker_containers(agent.api_pod(name)["metadata"]["uid"]) == []
    # The decision is made once: the rejected pods stay Failed, the admitted ones run.
    await asyncio.sleep(2)
    assert agent.api_pod("fifth")["status"]["phase"] == "Failed"
    assert agent.api_pod("plain")["status"]["phase"] == "Running"

    assert schema_problems(cp) == []


async def test_static_pod_gets_a_mirror_pod(cp_recording, rkubectl, cluster_agent_factory):
    cp, kubectl = cp_recording, rkubectl
    agent = await cluster_agent_factory(cp, manifests=True)
    await agent.wait_node_ready()
    node_uid = agent.node_object()["metadata"]["uid"]
    name = f"stat-{agent.node_name}"

    manifest = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "stat", "labels": {"tier": "static"}},
                "spec": {"terminationGracePeriodSeconds": 2, "containers": [busybox("app", SLEEP_FOREVER)]}}
    agent.write("stat.yaml", manifest)
    mirror = await agent.wait_api_running_ready(name)
    annotations = mirror["metadata"]["annotations"]
    assert annotations["kubernetes.io/config.mirror"] == annotations["kubernetes.io/config.hash"]
    assert annotations["kubernetes.io/config.source"] == "file"
    assert mirror["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Node", "name": agent.node_name, "uid": node_uid, "controller": True}]
    static_uid = annotations["kubernetes.io/config.hash"]
    assert mirror["metadata"]["uid"] != static_uid
    assert ipaddress.ip_address(mirror["status"]["podIP"]) in ipaddress.ip_network(agent.pod_cidr)
    row = _row((await kubectl("get", "pods", "-o", "wide")).stdout, name)
    assert row[1:3] == ["1/1", "Running"]
    (app,) = [c for c in await agent.docker_containers(static_uid, running_only=True)
              if c["Config"]["Labels"]["io.kubernetes.container.name"] == "app"]

    # Deleting the mirror pod does not touch the static pod; the mirror comes back.
    await kubectl("delete", "pod", name, "--wait=false")
    recreated = await agent.wait("mirror pod recreated",
                                 lambda: (p := agent.api_pod(name)) and p["metadata"]["uid"] != mirror["metadata"]["uid"]
                                 and not p["metadata"].get("deletionTimestamp") and p, 20)
    await agent.wait_api_running_ready(name)
    running = await agent.docker_containers(static_uid, running_only=True)
    assert app["Id"] in [c["Id"] for c in running]

    # Editing the manifest makes a new static pod, and a new mirror with the new hash.
    manifest["spec"]["containers"][0]["env"] = [{"name": "V", "value": "2"}]
    agent.write("stat.yaml", manifest)
    edited = await agent.wait(
        "mirror pod of the edited manifest",
        lambda: (p := agent.api_pod(name)) and p["metadata"]["annotations"]["kubernetes.io/config.mirror"] != static_uid and p, 30)
    assert edited["metadata"]["uid"] != recreated["metadata"]["uid"]
    await agent.wait_api_running_ready(name)

    # Removing the manifest removes the mirror pod.
    agent.remove("stat.yaml")
    await agent.wait("mirror pod removed", lambda: agent.api_pod(name) is None, 30)

    assert schema_problems(cp) == []


async def test_references_and_events_are_wired(cp_recording, rkubectl, cluster_agent_factory):
    """The cluster-mode env/volume sources and the event recorder are in place: a pod
    with the default service-account volume and a configMap env var runs, and kubelet's
    events appear in `kubectl describe`."""
    cp, kubectl = cp_recording, rkubectl
    agent = await cluster_agent_factory(cp)
    await agent.wait_node_ready()
    await kubectl("create", "configmap", "settings", "--from-literal=greeting=hello")
    pod = api_pod("withrefs", agent.node_name, [busybox(
        "app", SLEEP_FOREVER, env=[{"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "greeting"}}}])])
    del pod["spec"]["automountServiceAccountToken"]  # admission adds kube-api-access-*
    await kubectl_apply(kubectl, pod)
    running = await agent.wait_api_running_ready("withrefs")
    assert any(v["name"].startswith("kube-api-access-") for v in running["spec"]["volumes"])
    (app,) = [c for c in await agent.docker_containers(running["metadata"]["uid"], running_only=True)
              if c["Config"]["Labels"]["io.kubernetes.container.name"] == "app"]
    assert "GREETING=hello" in app["Config"]["Env"]
    out = await asyncio.to_thread(subprocess.run, ["docker", "exec", app["Id"], "cat",
                                  "/var/run/secrets/kubernetes.io/serviceaccount/namespace"],
                                  capture_output=True, text=True, timeout=30)
    assert out.stdout == "default"
    described = await agent.wait("events in kubectl describe", lambda: asyncio.ensure_future(
        kubectl("describe", "pod", "withrefs")), 20)
    await agent.wait("Started event", lambda: "Started container app" in
                     "\n".join(e.get("message", "") for e in cp.objects("events", "default")), 20)
    assert "withrefs" in described.stdout
    node_events = {e["reason"] for e in cp.objects("events", "default")
                   if e["involvedObject"].get("kind") == "Node"}
    assert {"Starting", "NodeReady"} <= node_events
    assert schema_problems(cp) == []


async def test_configmap_and_secret_updates_reach_mounted_volumes(cp_recording, rkubectl, cluster_agent_factory):
    """configMap/secret volumes and secret env; an update to the configMap and the secret
    reaches the files of the running pod (atomic ..data swap), env stays as started."""
    cp, kubectl = cp_recording, rkubectl
    agent = await cluster_agent_factory(cp)
    await agent.wait_node_ready()
    await kubectl("create", "configmap", "files", "--from-literal=greeting=v1")
    await kubectl("create", "secret", "generic", "creds", "--from-literal=password=s1")
    pod = api_pod("vols", agent.node_name, [busybox(
        "app", SLEEP_FOREVER,
        env=[{"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}}],
        volumeMounts=[{"name": "cfg", "mountPath": "/cfg"}, {"name": "sec", "mountPath": "/sec"}])])
    pod["spec"]["volumes"] = [{"name": "cfg", "configMap": {"name": "files"}},
                              {"name": "sec", "secret": {"secretName": "creds", "defaultMode": 0o400}}]
    await kubectl_apply(kubectl, pod)
    running = await agent.wait_api_running_ready("vols")
    (app,) = [c for c in await agent.docker_containers(running["metadata"]["uid"], running_only=True)
              if c["Config"]["Labels"]["io.kubernetes.container.name"] == "app"]

    def read(path: str) -> str:
        return subprocess.run(["docker", "exec", app["Id"], "cat", path],
                              capture_output=True, text=True, timeout=30).stdout

    assert read("/cfg/greeting") == "v1" and read("/sec/password") == "s1"
    assert "PASSWORD=s1" in app["Config"]["Env"]
    await kubectl("patch", "configmap", "files", "--type=merge", "-p", '{"data":{"greeting":"v2"}}')
    await kubectl("patch", "secret", "creds", "--type=merge", "-p", '{"stringData":{"password":"s2"}}')
    await agent.wait("configMap update in the volume",
                     lambda: asyncio.to_thread(lambda: read("/cfg/greeting") == "v2"), 60)
    await agent.wait("secret update in the volume",
                     lambda: asyncio.to_thread(lambda: read("/sec/password") == "s2"), 60)
    # The swap is kubelet's AtomicWriter layout: files are links into ..data.
    listing = subprocess.run(["docker", "exec", app["Id"], "ls", "-la", "/cfg"],
                             capture_output=True, text=True, timeout=30).stdout
    assert "..data ->" in listing and "greeting -> ..data/greeting" in listing
    assert schema_problems(cp) == []
