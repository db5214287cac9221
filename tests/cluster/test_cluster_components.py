"""Cluster-mode parts on their own (no Docker): admission rules, the status manager and
the node manager against the test control plane, mirror pod shape, the CLI's kubeconfig
check."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import subprocess
import sys
import time

import pytest

from nodeagent.cluster.admission import NodeView, admit, matches_node, pod_requests
from nodeagent.cluster.mirror import MIRROR_ANNOTATION, mirror_pod_for
from nodeagent.cluster.node import KUBELET_VERSION, NodeManager
from nodeagent.cluster.statusmanager import StatusManager, build_status_patch
from nodeagent.kube import KubeClient, load_kubeconfig
from tests.cluster.test_cluster_support import PODS_RT, cp_recording, schema_problems  # noqa: F401
from tests.controlplane import resources as cp_resources
from tests.controlplane.schema import validate_object
from tests.e2e.conftest import REPO

LEASES_RT = cp_resources.find("coordination.k8s.io", "v1", "leases")
NODES_RT = cp_resources.find("", "v1", "nodes")


# --- admission (pure) -----------------------------------------------------------------

def _pod(requests=None, init=(), selector=None, affinity=None, overhead=None):
    spec = {"containers": [{"name": "a", "resources": {"requests": requests or {}}}],
            "initContainers": list(init)}
    if selector:
        spec["nodeSelector"] = selector
    if affinity:
        spec["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": affinity}}}
    if overhead:
        spec["overhead"] = overhead
    return {"metadata": {"name": "p", "uid": "u"}, "spec": spec}


NODE = NodeView(name="n1", labels={"zone": "a", "gpus": "2", "kubernetes.io/hostname": "n1"},
                allocatable={"cpu": 2000, "memory": 4 * 2**30, "ephemeral-storage": 10**10}, max_pods=3)


def test_pod_requests_count_init_peaks_and_sidecars():
    sidecar = {"name": "s", "restartPolicy": "Always", "resources": {"requests": {"cpu": "100m"}}}
    big_init = {"name": "i", "resources": {"requests": {"cpu": "1500m", "memory": "1Gi"}}}
    pod = _pod({"cpu": "250m", "memory": "64Mi"}, init=[sidecar, big_init], overhead={"cpu": "10m"})
    # init peak = 1500m + the sidecar started before it (100m) > apps 250m + sidecar 100m
    assert pod_requests(pod) == {"cpu": 1610, "memory": 2**30}
    # limits imply requests (the API server's defaulting), fractions round up
    assert pod_requests({"spec": {"containers": [{"resources": {"limits": {"cpu": "0.0001"}}}]}}) == {"cpu": 1}


def test_admission_resources_pods_and_affinity():
    running = [_pod({"cpu": "1500m", "memory": "1Gi"})]
    assert admit(_pod({"cpu": "500m"}), NODE, running) is None
    reason, message = admit(_pod({"cpu": "501m"}), NODE, running)
    assert reason == "OutOfcpu"
    assert message == "Pod was rejected: Node didn't have enough resource: cpu, requested: 501, used: 1500, capacity: 2000"
    reason, message = admit(_pod({"memory": "4Gi"}), NODE, running)
    assert reason == "OutOfmemory" and "requested: 4294967296, used: 1073741824, capacity: 4294967296" in message
    # The pod count comes first, like kubelet's resource fit.
    reason, message = admit(_pod({"cpu": "5"}), NODE, running * 3)
    assert (reason, message) == ("OutOfpods", "Pod was rejected: Node didn't have enough resource: pods, "
                                 "requested: 1, used: 3, capacity: 3")
    # A pod without requests always fits the resources.
    assert admit(_pod(), NODE, running * 2) is None
    assert admit(_pod(selector={"zone": "b"}), NODE, [])[0] == "NodeAffinity"


@pytest.mark.parametrize("terms, ok", [
    ([{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]}]}], True),
    ([{"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["a"]}]}], False),
    ([{"matchExpressions": [{"key": "absent", "operator": "NotIn", "values": ["a"]}]}], True),
    ([{"matchExpressions": [{"key": "zone", "operator": "Exists"}]}], True),
    ([{"matchExpressions": [{"key": "zone", "operator": "DoesNotExist"}]}], False),
    ([{"matchExpressions": [{"key": "gpus", "operator": "Gt", "values": ["1"]}]}], True),
    ([{"matchExpressions": [{"key": "gpus", "operator": "Lt", "values": ["2"]}]}], False),
    ([{"matchExpressions": [{"key": "zone", "operator": "Gt", "values": ["1"]}]}], False),  # not a number
    ([{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]}], True),
    ([{"matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": ["n1"]}]}], False),
    # terms are ORed, requirements in a term ANDed; an empty term matches nothing
    ([{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["b"]}]},
      {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}], True),
    ([{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]},
                            {"key": "gpus", "operator": "In", "values": ["3"]}]}], False),
    ([{}], False),
])
def test_required_node_affinity(terms, ok):
    assert matches_node(_pod(affinity=terms), NODE) is ok


# --- mirror pods ----------------------------------------------------------------------

def test_mirror_pod_shape_passes_the_schema():
    static = {"apiVersion": "v1", "kind": "Pod",
              "metadata": {"name": "web-n1", "namespace": "default", "uid": "abc123",
                           "creationTimestamp": "2024-01-01T00:00:00Z",
                           "annotations": {"kubernetes.io/config.hash": "abc123",
                                           "kubernetes.io/config.source": "file"}},
              "spec": {"containers": [{"name": "c", "image": "busybox:1.35"}]},
              "status": {"phase": "Running"}}
    mirror = mirror_pod_for(static, "n1", "node-uid")
    assert mirror["metadata"]["annotations"][MIRROR_ANNOTATION] == "abc123"
    assert "uid" not in mirror["metadata"] and "status" not in mirror
    assert mirror["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Node", "name": "n1", "uid": "node-uid", "controller": True}]
    assert mirror["spec"]["nodeName"] == "n1"
    assert validate_object(mirror) == []


# --- status manager against the control plane -----------------------------------------

def _kubelet_status(phase="Running", ready="True", when="2024-01-01T00:00:00Z",
                    started="2024-01-01T00:00:00Z"):
    conds = [{"type": t, "status": ready if t in ("Ready", "ContainersReady") else "True",
              "lastTransitionTime": when, "lastProbeTime": None}
             for t in ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady", "PodScheduled")]
    return {"phase": phase, "conditions": conds, "hostIP": "192.0.2.2", "hostIPs": [{"ip": "192.0.2.2"}],
            "podIP": "10.247.0.5", "podIPs": [{"ip": "10.247.0.5"}], "startTime": when, "qosClass": "BestEffort",
            "containerStatuses": [{"name": "c", "image": "busybox:1.35", "imageID": "docker://sha256:1",
                                   "containerID": "docker://abc", "ready": ready == "True", "started": True,
                                   "restartCount": 0, "lastState": {},
                                   "state": {"running": {"startedAt": started}}}]}


@pytest.fixture
async def node_client(cp_recording):
    client = KubeClient(load_kubeconfig(cp_recording.make_kubeconfig("system:node:n1", ["system:nodes"])), qps=0)
    yield client
    await client.close()


async def _make_pod(cp, name="p", **status):
    pod = cp.api.create(PODS_RT, "default", {"metadata": {"name": name}, "spec": {
        "nodeName": "n1", "automountServiceAccountToken": False,
        "containers": [{"name": "c", "image": "busybox:1.35"}]}}).obj
    if status:
        pod = cp.api.update(PODS_RT, "default", name, dict(pod, status=dict(pod["status"], **status)),
                            subresource="status").obj
    return pod


async def _settle(manager: StatusManager, timeout=10.0):
    deadline = time.monotonic() + timeout
    await asyncio.sleep(0.05)
    while manager.pending_count():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)


def _status_writes(cp, name):
    return [w for w in cp.recorded_writes if w.resource == "pods/status" and w.name == name]


async def test_status_manager_patches_only_changes_and_keeps_api_fields(cp_recording, node_client):
    cp = cp_recording
    scheduled = {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2023-05-05T05:05:05Z"}
    pod = await _make_pod(cp, conditions=[scheduled])
    uid = pod["metadata"]["uid"]
    manager = StatusManager(node_client, resolve=lambda u: u)
    manager.observe(pod)
    task = asyncio.create_task(manager.run())
    try:
        manager.set_status(uid, _kubelet_status())
        await _settle(manager)
        stored = cp.object("pods", "p", "default")
        assert stored["status"]["phase"] == "Running"
        assert stored["status"]["containerStatuses"][0]["containerID"] == "docker://abc"
        conds = {c["type"]: c for c in stored["status"]["conditions"]}
        assert conds["PodScheduled"] == scheduled  # the API's condition is kept
        assert len(_status_writes(cp, "p")) == 1
        assert _status_writes(cp, "p")[0].request["metadata"] == {"uid": uid}  # uid precondition

        # Same status with new transition times: nothing to send.
        manager.set_status(uid, _kubelet_status(when="2030-01-01T00:00:00Z"))
        await _settle(manager)
        assert len(_status_writes(cp, "p")) == 1 and manager.stats["skipped"] >= 1

        # A real change goes out; unchanged conditions keep the API's transition time.
        manager.set_status(uid, _kubelet_status(ready="False", when="2030-01-01T00:00:00Z"))
        await _settle(manager)
        stored = cp.object("pods", "p", "default")
        conds = {c["type"]: c for c in stored["status"]["conditions"]}
        assert conds["Ready"]["status"] == "False" and conds["Ready"]["lastTransitionTime"] == "2030-01-01T00:00:00Z"
        assert conds["Initialized"]["lastTransitionTime"] == "2024-01-01T00:00:00Z"
        assert stored["status"]["startTime"] == "2024-01-01T00:00:00Z"  # startTime never moves
        assert len(_status_writes(cp, "p")) == 2

        # 409: re-read and retried from the fresh object.
        cp.inject_errors(409, count=1, path_prefix="/api/v1/namespaces/default/pods/p/status")
        manager.set_status(uid, _kubelet_status(phase="Running", ready="True", when="2031-01-01T00:00:00Z"))
        await _settle(manager)
        assert manager.stats["conflicts"] == 1
        assert {c["type"]: c["status"] for c in cp.object("pods", "p", "default")["status"]["conditions"]}["Ready"] == "True"

        # 404: the pod is gone; its status is dropped, not retried.
        cp.api.delete(PODS_RT, "default", "p", {"gracePeriodSeconds": 0})
        errors = manager.stats["errors"]
        manager.set_status(uid, _kubelet_status(phase="Succeeded"))
        await _settle(manager)
        await asyncio.sleep(0.6)
        assert manager.stats["errors"] == errors and manager.pending_count() == 0
    finally:
        task.cancel()
    assert schema_problems(cp) == []


async def test_status_manager_never_blocks_coalesces_and_rate_limits(cp_recording, node_client):
    cp = cp_recording
    pods = [await _make_pod(cp, f"p{i}") for i in range(10)]
    manager = StatusManager(node_client, resolve=lambda u: u, qps=5, burst=1)
    for p in pods:
        manager.observe(p)
    task = asyncio.create_task(manager.run())
    try:
        # The kubelet's hook returns at once, however many statuses it hands over.
        started = time.perf_counter()
        for round_ in range(100):
            for p in pods:
                manager.set_status(p["metadata"]["uid"], _kubelet_status(
                    phase="Running", ready="True" if round_ == 99 else "False"))
        assert time.perf_counter() - started < 0.5
        started = time.monotonic()
        await _settle(manager, 20)
        # 1000 statuses, coalesced to at most two writes per pod, 5 per second.
        writes = [w for w in cp.recorded_writes if w.resource == "pods/status"]
        assert 10 <= len(writes) <= 20
        assert time.monotonic() - started >= (len(writes) - 1) / 5 * 0.8
        for p in pods:  # the newest status won
            conds = {c["type"]: c["status"] for c in cp.object("pods", p["metadata"]["name"], "default")["status"]["conditions"]}
            assert conds["Ready"] == "True"
    finally:
        task.cancel()


async def test_status_manager_final_delete_after_terminal_status(cp_recording, node_client):
    cp = cp_recording
    pod = await _make_pod(cp, "bye")
    uid = pod["metadata"]["uid"]
    deleting = cp.api.delete(PODS_RT, "default", "bye", {"gracePeriodSeconds": 30}).obj
    assert deleting["metadata"]["deletionTimestamp"]
    manager = StatusManager(node_client, resolve=lambda u: u)
    manager.observe(deleting)
    task = asyncio.create_task(manager.run())
    try:
        stopped = _kubelet_status(ready="False")
        stopped["containerStatuses"][0]["state"] = {"terminated": {
            "exitCode": 137, "reason": "Error", "startedAt": "2024-01-01T00:00:00Z",
            "finishedAt": "2024-01-01T00:01:00Z", "containerID": "docker://abc"}}
        manager.set_status(uid, stopped)
        manager.mark_terminated(uid, deleting)
        await _settle(manager)
        assert cp.object("pods", "bye", "default") is None
        (final,) = _status_writes(cp, "bye")
        assert final.object["status"]["phase"] == "Failed"  # killed, restartPolicy Always
        (delete,) = [w for w in cp.recorded_writes if w.verb == "delete" and w.name == "bye"
                     and w.user == "system:node:n1"]
        assert delete.request["gracePeriodSeconds"] == 0 and delete.request["preconditions"] == {"uid": uid}
    finally:
        task.cancel()
    assert schema_problems(cp) == []


def test_build_status_patch_never_leaves_a_terminal_phase_and_replaces_ips():
    api = {"metadata": {"uid": "u"}, "status": {"phase": "Failed", "reason": "OutOfcpu", "message": "m",
                                                "podIPs": [{"ip": "10.0.0.1"}]}}
    patch = build_status_patch(api, dict(_kubelet_status(), podIPs=[{"ip": "10.0.0.2"}], podIP="10.0.0.2"))
    assert "phase" not in patch["status"] and "reason" not in patch["status"]
    assert patch["status"]["podIPs"] == [{"$patch": "replace"}, {"ip": "10.0.0.2"}]
    # Fields the kubelet no longer reports are removed.
    api = {"metadata": {"uid": "u"}, "status": dict(_kubelet_status(), reason="Evicted", message="x")}
    assert build_status_patch(api, _kubelet_status())["status"] == {"reason": None, "message": None}
    assert build_status_patch({"metadata": {"uid": "u"}, "status": copy.deepcopy(_kubelet_status())},
                              _kubelet_status(when="2099-01-01T00:00:00Z")) is None


# --- node manager against the control plane --------------------------------------------

def _node_manager(client, **kwargs) -> NodeManager:
    async def version() -> str:
        return "docker://20.10.24"
    return NodeManager(client, node_name="n1", host_ip="192.0.2.2", root_dir="/tmp", max_pods=110,
                       labels={"role": "test"}, runtime_version=version, ready=lambda: (True, "ok"),
                       kubelet_port=lambda: 10250, **kwargs)


async def test_node_registration_adoption_status_and_lease(cp_recording, node_client):
    cp = cp_recording
    # An existing Node (from an earlier run, with an admin's label): adopted, labels added.
    cp.api.create(NODES_RT, None, {"metadata": {"name": "n1", "labels": {"admin": "yes"}}})
    manager = _node_manager(node_client)
    node = await manager.register()
    labels = node["metadata"]["labels"]
    assert labels["admin"] == "yes" and labels["role"] == "test" and labels["kubernetes.io/hostname"] == "n1"
    assert node["status"]["nodeInfo"]["kubeletVersion"] == KUBELET_VERSION
    assert node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"] == 10250
    assert manager.view().labels["admin"] == "yes"  # admission sees the API's labels

    # Status is sent only when it changed (or when due).
    assert await manager.sync_status() is False
    manager._ready = lambda: (False, "PLEG is not healthy: test")
    assert await manager.sync_status() is True
    conds = {c["type"]: c for c in cp.object("nodes", "n1")["status"]["conditions"]}
    assert conds["Ready"]["status"] == "False" and conds["Ready"]["reason"] == "KubeletNotReady"
    assert await manager.sync_status() is False

    # Lease: created, renewed; a concurrent writer's conflict is resolved by re-reading.
    lease = await manager.renew_lease()
    assert lease["spec"]["holderIdentity"] == "n1" and lease["spec"]["leaseDurationSeconds"] == 40
    assert lease["metadata"]["ownerReferences"][0]["uid"] == node["metadata"]["uid"]
    current = cp.object("leases", "n1", "kube-node-lease", group="coordination.k8s.io")
    cp.api.update(LEASES_RT, "kube-node-lease", "n1",
                  dict(current, metadata=dict(current["metadata"], labels={"touched": "yes"})))
    renewed = await manager.renew_lease()
    assert renewed["metadata"]["labels"] == {"touched": "yes"}
    assert renewed["spec"]["renewTime"] >= lease["spec"]["renewTime"]
    assert schema_problems(cp) == []


# --- CLI --------------------------------------------------------------------------------

def test_bad_kubeconfig_is_exit_code_2_naming_file_and_field(tmp_path):
    bad = tmp_path / "node.kubeconfig"
    bad.write_text("apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'https://127.0.0.1:1',"
                   " certificate-authority: /nonexistent/ca.crt}}]\nusers: [{name: u, user: {token: t}}]\n"
                   "contexts: [{name: x, context: {cluster: c, user: u}}]\ncurrent-context: x\n")
    out = subprocess.run([sys.executable, "-m", "nodeagent.cli", "run", "--kubeconfig", str(bad),
                          "--root-dir", str(tmp_path / "root")], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2
    assert f"kubeconfig {bad}: clusters[name=c].cluster.certificate-authority: file /nonexistent/ca.crt " \
           "does not exist" in out.stderr
    missing = subprocess.run([sys.executable, "-m", "nodeagent.cli", "run", "--kubeconfig", str(tmp_path / "nope")],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and str(tmp_path / "nope") in missing.stderr


# --- API pod source ---------------------------------------------------------------------

async def test_api_source_routes_events_by_kind_of_change(cp_recording, node_client):
    from nodeagent.cluster.apisource import ApiPodSource

    cp = cp_recording
    seen: list[tuple] = []
    source = ApiPodSource(
        node_client, "n1",
        on_pod=lambda p: seen.append(("pod", p["metadata"]["name"])),
        on_pod_removed=lambda p: seen.append(("removed", p["metadata"]["name"])),
        on_api_copy=lambda p: seen.append(("copy", p["metadata"]["name"])),
        on_mirror=lambda e, p: seen.append(("mirror", e, p["metadata"]["name"])))
    task = asyncio.create_task(source.run())
    try:
        pod = await _make_pod(cp, "mine")
        cp.api.create(PODS_RT, "default", {"metadata": {"name": "theirs"}, "spec": {
            "nodeName": "n2", "containers": [{"name": "c", "image": "busybox:1.35"}]}})
        cp.api.create(PODS_RT, "default", {"metadata": {"name": "st-n1", "annotations": {MIRROR_ANNOTATION: "h"}},
                                           "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "busybox:1.35"}]}})
        await cp.wait_for(lambda: ("mirror", "ADDED", "st-n1") in seen and ("pod", "mine") in seen, what="initial events")
        assert source.synced and not any("theirs" in e for e in seen)

        # A status-only change (e.g. our own status patch) is a copy for the status
        # manager, not a change for the pod's worker...
        seen.clear()
        cp.api.update(PODS_RT, "default", "mine", dict(pod, status=dict(pod["status"], phase="Running")),
                      subresource="status")
        await cp.wait_for(lambda: ("copy", "mine") in seen, what="status copy")
        await asyncio.sleep(0.2)
        assert ("pod", "mine") not in seen
        # ...unless a condition someone else owns changed (a readiness gate).
        current = cp.object("pods", "mine", "default")
        gate = {"type": "example.com/gate", "status": "True"}
        cp.api.update(PODS_RT, "default", "mine", dict(current, status=dict(
            current["status"], conditions=[gate])), subresource="status")
        await cp.wait_for(lambda: ("pod", "mine") in seen, what="readiness gate change")
        # Metadata changes and deletion reach the worker.
        seen.clear()
        cp.api.patch(PODS_RT, "default", "mine", "application/merge-patch+json", {"metadata": {"labels": {"a": "b"}}})
        cp.api.delete(PODS_RT, "default", "mine", {"gracePeriodSeconds": 0})
        await cp.wait_for(lambda: ("removed", "mine") in seen, what="removal")
        assert ("pod", "mine") in seen
    finally:
        task.cancel()


async def test_node_turns_ready_within_a_fast_check_of_becoming_ready(cp_recording, node_client):
    # kubelet's fastStatusUpdateOnce: until Ready has been posted, readiness is looked at
    # every 100 ms, not once per status period (10 s here), and posted at once.
    cp = cp_recording
    ready = [False]
    manager = _node_manager(node_client, status_update_period=10.0)
    manager._ready = lambda: (ready[0], "PLEG is not healthy: no relist yet")
    loop = asyncio.create_task(manager._status_loop())
    try:
        # (registration itself waits up to 2 s for a podCIDR this control plane never gives)
        await asyncio.wait_for(manager.registered.wait(), 10)
        await asyncio.sleep(0.3)
        conds = {c["type"]: c for c in cp.object("nodes", "n1")["status"]["conditions"]}
        assert conds["Ready"]["status"] == "False"
        ready[0] = True
        flipped = time.monotonic()
        while time.monotonic() - flipped < 3.0:
            conds = {c["type"]: c for c in cp.object("nodes", "n1")["status"]["conditions"]}
            if conds["Ready"]["status"] == "True":
                break
            await asyncio.sleep(0.02)
        assert conds["Ready"]["status"] == "True"
        assert time.monotonic() - flipped < 0.5
        # Once Ready is posted, the loop is back to its period: no patch in the next 0.5 s.
        patches = manager.stats["status_patches"]
        await asyncio.sleep(0.5)
        assert manager.stats["status_patches"] == patches
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
