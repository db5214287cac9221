"""The test control plane behaves like kube-apiserver where the agent depends on it."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml

from nodeagent.kube import ApiConnectionError, ApiError, KubeClient, PatchType, load_kubeconfig
from nodeagent.kube import resources as R
from tests.controlplane import ControlPlane, Options
from tests.controlplane.pki import make_csr
from tests.controlplane.schema import validate_object
from tests.controlplane.tokens import verify_detached_jws


def pod(name: str, node: str | None = "node-a", ns: str = "default", labels: dict | None = None,
        image: str = "busybox:1.35", **spec) -> dict:
    body: dict = {"apiVersion": "v1", "kind": "Pod",
                  "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
                  "spec": {"containers": [{"name": "c", "image": image}], **spec}}
    if node:
        body["spec"]["nodeName"] = node
    return body


async def next_events(stream, count: int, timeout: float = 5.0) -> list:
    events = []

    async def collect():
        async for ev in stream:
            events.append(ev)
            if len(events) >= count:
                return

    await asyncio.wait_for(collect(), timeout)
    return events


# --- CRUD, errors, defaulting ---------------------------------------------------------

async def test_crud_and_status_errors(controlplane, admin_client):
    created = await admin_client.create(R.CONFIGMAPS, {
        "metadata": {"name": "cfg", "namespace": "default"}, "data": {"a": "1"}})
    meta = created["metadata"]
    assert meta["uid"] and meta["creationTimestamp"].endswith("Z")
    assert int(meta["resourceVersion"]) == controlplane.store.rv
    got = await admin_client.get(R.CONFIGMAPS, "cfg", "default")
    assert got == created

    with pytest.raises(ApiError) as exc:
        await admin_client.create(R.CONFIGMAPS, {"metadata": {"name": "cfg", "namespace": "default"}})
    assert exc.value.is_already_exists and exc.value.status == 409
    assert exc.value.message == 'configmaps "cfg" already exists'

    with pytest.raises(ApiError) as exc:
        await admin_client.get(R.CONFIGMAPS, "missing", "default")
    assert exc.value.is_not_found
    assert exc.value.body == {"kind": "Status", "apiVersion": "v1", "metadata": {},
                              "status": "Failure", "message": 'configmaps "missing" not found',
                              "reason": "NotFound", "code": 404,
                              "details": {"name": "missing", "group": "", "kind": "configmaps"}}

    updated = await admin_client.update(R.CONFIGMAPS, dict(got, data={"a": "2"}))
    assert int(updated["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])
    # A stale resourceVersion is a conflict.
    with pytest.raises(ApiError) as exc:
        await admin_client.update(R.CONFIGMAPS, dict(got, data={"a": "3"}))
    assert exc.value.is_conflict
    assert "the object has been modified" in exc.value.message
    # A no-op update writes nothing.
    same = await admin_client.update(R.CONFIGMAPS, updated)
    assert same["metadata"]["resourceVersion"] == updated["metadata"]["resourceVersion"]

    status = await admin_client.delete(R.CONFIGMAPS, "cfg", "default")
    assert status["kind"] == "Status" and status["status"] == "Success"
    assert controlplane.object("configmaps", "cfg", "default") is None

    with pytest.raises(ApiError) as exc:
        await admin_client.create(R.CONFIGMAPS, {"metadata": {"name": "x", "namespace": "nope"}})
    assert exc.value.is_not_found and exc.value.message == 'namespaces "nope" not found'


async def test_generate_name_and_validation(admin_client):
    made = await admin_client.create(R.PODS, {"metadata": {"generateName": "web-", "namespace": "default"},
                                              "spec": {"containers": [{"name": "c", "image": "i:1"}]}})
    name = made["metadata"]["name"]
    assert name.startswith("web-") and len(name) == len("web-") + 5
    with pytest.raises(ApiError) as exc:
        await admin_client.create(R.PODS, {"metadata": {"name": "Bad_Name", "namespace": "default"},
                                           "spec": {"containers": [{"name": "c"}]}})
    assert exc.value.is_invalid
    causes = {c["field"] for c in exc.value.body["details"]["causes"]}
    assert causes == {"metadata.name", "spec.containers[0].image"}
    with pytest.raises(ApiError) as exc:
        await admin_client.create(R.PODS, {"metadata": {"name": "p", "namespace": "default"},
                                           "spec": {"containers": [{"name": "c", "image": "i",
                                                                    "ports": [{"containerPort": "80"}]}]}})
    assert exc.value.status == 400 and "cannot be handled as a Pod" in exc.value.message


async def test_pod_defaulting(admin_client, controlplane):
    body = pod("d1", image="busybox")
    body["spec"]["containers"].append({"name": "tagged", "image": "busybox:1.35",
                                       "resources": {"limits": {"cpu": "100m", "memory": "64Mi"}},
                                       "ports": [{"containerPort": 80}],
                                       "readinessProbe": {"httpGet": {"port": 80}}})
    created = await admin_client.create(R.PODS, body)
    spec = created["spec"]
    untagged, tagged = spec["containers"]
    assert untagged["imagePullPolicy"] == "Always"
    assert tagged["imagePullPolicy"] == "IfNotPresent"
    assert tagged["resources"]["requests"] == {"cpu": "100m", "memory": "64Mi"}
    assert tagged["ports"] == [{"containerPort": 80, "protocol": "TCP"}]
    assert tagged["readinessProbe"] == {"httpGet": {"port": 80, "scheme": "HTTP", "path": "/"},
                                        "timeoutSeconds": 1, "periodSeconds": 10,
                                        "successThreshold": 1, "failureThreshold": 3}
    assert untagged["terminationMessagePath"] == "/dev/termination-log"
    assert spec["restartPolicy"] == "Always" and spec["terminationGracePeriodSeconds"] == 30
    assert spec["dnsPolicy"] == "ClusterFirst" and spec["schedulerName"] == "default-scheduler"
    assert spec["enableServiceLinks"] is True and spec["priority"] == 0
    assert {t["key"] for t in spec["tolerations"]} == {"node.kubernetes.io/not-ready",
                                                      "node.kubernetes.io/unreachable"}
    assert spec["serviceAccountName"] == "default"
    (volume,) = spec["volumes"]
    assert volume["name"].startswith("kube-api-access-")
    sources = volume["projected"]["sources"]
    assert sources[0] == {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}}
    assert untagged["volumeMounts"] == [{"name": volume["name"], "readOnly": True,
                                         "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}]
    # one container without limits: Burstable; the API computes QoS at creation.
    assert created["status"] == {"phase": "Pending", "qosClass": "Burstable"}
    assert validate_object(created) == []
    # The namespace's kube-root-ca.crt the projected volume refers to exists.
    ca = controlplane.object("configmaps", "kube-root-ca.crt", "default")
    assert ca["data"]["ca.crt"] == controlplane.ca.cert_pem.decode()


async def test_service_defaulting(admin_client):
    svc = await admin_client.create(R.SERVICES, {
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"type": "NodePort", "selector": {"app": "web"}, "ports": [{"port": 80}]},
        "status": {"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}}})
    spec = svc["spec"]
    assert spec["clusterIP"].startswith("10.96.") and spec["clusterIPs"] == [spec["clusterIP"]]
    assert spec["ports"][0]["targetPort"] == 80 and spec["ports"][0]["protocol"] == "TCP"
    assert 30000 <= spec["ports"][0]["nodePort"] <= 32767
    assert spec["sessionAffinity"] == "None" and spec["externalTrafficPolicy"] == "Cluster"
    assert svc["status"] == {"loadBalancer": {}}  # status is not set on create


# --- status subresource and patches -----------------------------------------------------

async def test_status_subresource_semantics(admin_client):
    created = await admin_client.create(R.PODS, pod("s1"))
    # Main-resource writes ignore status (like the real API for pods and nodes).
    changed = dict(created, status={"phase": "Running"})
    changed["metadata"] = dict(created["metadata"], labels={"x": "y"})
    after = await admin_client.update(R.PODS, changed)
    assert after["status"]["phase"] == "Pending" and after["metadata"]["labels"] == {"x": "y"}
    # /status writes ignore spec.
    status_write = dict(after, status={"phase": "Running", "podIP": "10.1.0.5"})
    status_write["spec"] = dict(after["spec"], activeDeadlineSeconds=5)
    after2 = await admin_client.update(R.PODS, status_write, subresource="status")
    assert after2["status"]["phase"] == "Running" and after2["status"]["podIP"] == "10.1.0.5"
    assert "activeDeadlineSeconds" not in after2["spec"]
    # Strategic merge patch on /status: conditions merge by type, containerStatuses is
    # atomic in the official schema (replaced as a whole).
    await admin_client.patch(R.PODS, "s1", {"status": {
        "conditions": [{"type": "Ready", "status": "False"}, {"type": "Initialized", "status": "True"}],
        "containerStatuses": [{"name": "c", "ready": False, "restartCount": 0, "image": "i",
                               "imageID": "", "state": {"waiting": {"reason": "ContainerCreating"}}}]}},
        "default", subresource="status")
    patched = await admin_client.patch(R.PODS, "s1", {"status": {
        "$setElementOrder/conditions": [{"type": "Initialized"}, {"type": "Ready"}],
        "conditions": [{"type": "Ready", "status": "True"}],
        "containerStatuses": [{"name": "c", "ready": True, "restartCount": 0, "image": "i",
                               "imageID": "", "state": {"running": {"startedAt": "2024-01-01T00:00:00Z"}}}]}},
        "default", subresource="status")
    st = patched["status"]
    assert st["conditions"] == [{"type": "Initialized", "status": "True"}, {"type": "Ready", "status": "True"}]
    assert st["containerStatuses"][0]["state"] == {"running": {"startedAt": "2024-01-01T00:00:00Z"}}
    # A terminal phase cannot go back.
    await admin_client.patch(R.PODS, "s1", {"status": {"phase": "Succeeded"}}, "default",
                             subresource="status", patch_type=PatchType.MERGE)
    with pytest.raises(ApiError) as exc:
        await admin_client.patch(R.PODS, "s1", {"status": {"phase": "Running"}}, "default",
                                 subresource="status", patch_type=PatchType.MERGE)
    assert exc.value.is_invalid and "non-terminal" in exc.value.message
    # Pod spec is immutable apart from the allowed fields.
    with pytest.raises(ApiError) as exc:
        await admin_client.patch(R.PODS, "s1", {"spec": {"restartPolicy": "Never"}}, "default")
    assert exc.value.is_invalid and "pod updates may not change fields" in exc.value.message
    ok = await admin_client.patch(R.PODS, "s1", {"spec": {"containers": [{"name": "c", "image": "busybox:1.36"}]}},
                                  "default")
    assert ok["spec"]["containers"][0]["image"] == "busybox:1.36"


async def test_patch_types_and_preconditions(admin_client):
    await admin_client.create(R.CONFIGMAPS, {"metadata": {"name": "p", "namespace": "default",
                                                          "finalizers": ["a/x"]},
                                             "data": {"k1": "v1", "k2": "v2"}})
    merged = await admin_client.patch(R.CONFIGMAPS, "p", {"data": {"k1": None, "k3": "v3"}}, "default",
                                      patch_type=PatchType.MERGE)
    assert merged["data"] == {"k2": "v2", "k3": "v3"}
    jp = await admin_client.patch(R.CONFIGMAPS, "p", [
        {"op": "test", "path": "/data/k2", "value": "v2"},
        {"op": "replace", "path": "/data/k2", "value": "w"},
        {"op": "add", "path": "/metadata/labels", "value": {"l": "1"}}], "default", patch_type=PatchType.JSON)
    assert jp["data"]["k2"] == "w" and jp["metadata"]["labels"] == {"l": "1"}
    with pytest.raises(ApiError) as exc:
        await admin_client.patch(R.CONFIGMAPS, "p", [{"op": "test", "path": "/data/k2", "value": "zzz"}],
                                 "default", patch_type=PatchType.JSON)
    assert exc.value.status in (400, 422)
    # Strategic merge: finalizers merge as a set; $deleteFromPrimitiveList removes.
    smp = await admin_client.patch(R.CONFIGMAPS, "p", {"metadata": {"finalizers": ["b/y"]}}, "default")
    assert smp["metadata"]["finalizers"] == ["a/x", "b/y"]
    smp = await admin_client.patch(R.CONFIGMAPS, "p", {"metadata": {
        "$deleteFromPrimitiveList/finalizers": ["a/x"]}}, "default")
    assert smp["metadata"]["finalizers"] == ["b/y"]
    # ownerReferences merge by uid; $patch: delete removes one.
    refs = [{"apiVersion": "v1", "kind": "Node", "name": "n1", "uid": "u1"},
            {"apiVersion": "v1", "kind": "Node", "name": "n2", "uid": "u2"}]
    await admin_client.patch(R.CONFIGMAPS, "p", {"metadata": {"ownerReferences": refs}}, "default")
    smp = await admin_client.patch(R.CONFIGMAPS, "p", {"metadata": {"ownerReferences": [
        {"uid": "u1", "$patch": "delete"}]}}, "default")
    assert [r["uid"] for r in smp["metadata"]["ownerReferences"]] == ["u2"]
    # A patch carrying a stale resourceVersion is a conflict.
    with pytest.raises(ApiError) as exc:
        await admin_client.patch(R.CONFIGMAPS, "p", {"metadata": {"resourceVersion": "2"}, "data": {"z": "1"}},
                                 "default", patch_type=PatchType.MERGE)
    assert exc.value.is_conflict
    with pytest.raises(ApiError) as exc:
        await admin_client.request("PATCH", "/api/v1/namespaces/default/configmaps/p",
                                   body={"data": {"z": "1"}}, content_type="application/json")
    assert exc.value.status == 415
    with pytest.raises(ValueError):
        await admin_client.patch(R.CONFIGMAPS, "p", {}, "default", patch_type="application/json")


async def test_node_status_patch_merges_conditions(admin_client):
    node = {"metadata": {"name": "n1", "labels": {"kubernetes.io/hostname": "n1"}},
            "status": {"conditions": [{"type": "Ready", "status": "False", "reason": "KubeletNotReady"}],
                       "addresses": [{"type": "InternalIP", "address": "10.0.0.5"}]}}
    created = await admin_client.create(R.NODES, node)
    assert created["status"]["conditions"][0]["status"] == "False"  # nodes keep status on create
    patched = await admin_client.patch(R.NODES, "n1", {"status": {
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"},
                       {"type": "MemoryPressure", "status": "False"}],
        "addresses": [{"type": "Hostname", "address": "n1"}]}}, subresource="status")
    conds = {c["type"]: c["status"] for c in patched["status"]["conditions"]}
    assert conds == {"Ready": "True", "MemoryPressure": "False"}
    assert [a["type"] for a in patched["status"]["addresses"]] == ["InternalIP", "Hostname"]
    # Main-resource patch cannot touch status.
    again = await admin_client.patch(R.NODES, "n1", {"status": {"conditions": []},
                                                    "spec": {"unschedulable": True}})
    assert len(again["status"]["conditions"]) == 2 and again["spec"]["unschedulable"] is True


# --- selectors ------------------------------------------------------------------------

async def test_label_and_field_selectors(admin_client):
    await admin_client.create(R.PODS, pod("a", labels={"app": "web", "tier": "fe"}))
    await admin_client.create(R.PODS, pod("b", labels={"app": "db"}, node="node-b"))
    await admin_client.create(R.PODS, pod("c", labels={"app": "web"}, node=None))
    await admin_client.patch(R.PODS, "b", {"status": {"phase": "Running"}}, "default",
                             subresource="status", patch_type=PatchType.MERGE)

    async def names(**kw) -> list[str]:
        result = await admin_client.list(R.PODS, "default", **kw)
        return sorted(i["metadata"]["name"] for i in result["items"])

    assert await names(label_selector="app=web") == ["a", "c"]
    assert await names(label_selector="app==web,tier=fe") == ["a"]
    assert await names(label_selector="app!=web") == ["b"]
    assert await names(label_selector="app in (db, web)") == ["a", "b", "c"]
    assert await names(label_selector="app notin (web)") == ["b"]
    assert await names(label_selector="tier") == ["a"]
    assert await names(label_selector="!tier") == ["b", "c"]
    assert await names(label_selector={"app": "db"}) == ["b"]
    assert await names(field_selector="spec.nodeName=node-a") == ["a"]
    assert await names(field_selector="spec.nodeName=") == ["c"]
    assert await names(field_selector="status.phase!=Running,metadata.name!=a") == ["c"]
    assert await names(field_selector="metadata.namespace=default,status.phase=Running") == ["b"]
    with pytest.raises(ApiError) as exc:
        await names(field_selector="spec.containers=x")
    assert exc.value.status == 400 and "field label not supported" in exc.value.message
    with pytest.raises(ApiError) as exc:
        await names(label_selector="app in (")
    assert exc.value.status == 400
    # Across namespaces.
    everywhere = await admin_client.list(R.PODS, field_selector="spec.nodeName=node-b")
    assert [i["metadata"]["name"] for i in everywhere["items"]] == ["b"]
    assert everywhere["items"][0]["kind"] == "Pod"  # filled in by the client


async def test_list_pagination(admin_client, controlplane):
    for i in range(7):
        await admin_client.create(R.CONFIGMAPS, {"metadata": {"name": f"cm{i}", "namespace": "default"}})
    page = await admin_client.list(R.CONFIGMAPS, "default", limit=3)
    assert len(page["items"]) == 3 and page["metadata"]["continue"]
    everything = await admin_client.list_all(R.CONFIGMAPS, "default", page_size=3)
    assert sorted(i["metadata"]["name"] for i in everything["items"]) == \
        sorted([f"cm{i}" for i in range(7)] + ["kube-root-ca.crt"])
    await admin_client.create(R.CONFIGMAPS, {"metadata": {"name": "later", "namespace": "default"}})
    controlplane.compact()
    with pytest.raises(ApiError) as exc:
        await admin_client.list(R.CONFIGMAPS, "default", limit=3,
                                continue_token=page["metadata"]["continue"])
    assert exc.value.is_gone


# --- watch ----------------------------------------------------------------------------

async def test_watch_replay_selectors_and_410(controlplane, admin_client):
    first = await admin_client.create(R.PODS, pod("w1", labels={"app": "a"}))
    rv0 = first["metadata"]["resourceVersion"]
    await admin_client.patch(R.PODS, "w1", {"metadata": {"labels": {"app": "b"}}}, "default")
    await admin_client.create(R.PODS, pod("w2", labels={"app": "a"}))
    await admin_client.delete(R.PODS, "w2", "default", grace_period_seconds=0)
    # Replay from rv0 with a selector: w1 leaves the selection (DELETED), w2 comes and goes.
    async with admin_client.watch(R.PODS, "default", resource_version=rv0, label_selector="app=a",
                                  allow_bookmarks=False) as stream:
        events = await next_events(stream, 3)
    assert [(e.type, e.object["metadata"]["name"]) for e in events] == \
        [("DELETED", "w1"), ("ADDED", "w2"), ("DELETED", "w2")]
    rvs = [int(e.resource_version) for e in events]
    assert rvs == sorted(rvs) and rvs[0] > int(rv0)
    assert events[0].object["kind"] == "Pod"

    # Live events after the replay, in order.
    async with admin_client.watch(R.PODS, "default", resource_version=str(controlplane.store.rv)) as stream:
        await admin_client.create(R.PODS, pod("w3"))
        await admin_client.patch(R.PODS, "w3", {"metadata": {"labels": {"x": "1"}}}, "default")
        events = await next_events(stream, 2)
    assert [e.type for e in events] == ["ADDED", "MODIFIED"]

    # After compaction an old resourceVersion is answered like the watch cache does:
    # HTTP 200, then an ERROR event carrying a 410 Expired Status.
    controlplane.compact()
    with pytest.raises(ApiError) as exc:
        async with admin_client.watch(R.PODS, "default", resource_version=rv0) as stream:
            await next_events(stream, 1)
    assert exc.value.is_gone and exc.value.reason == "Expired"
    assert exc.value.message.startswith("too old resource version")
    # The current version still works.
    async with admin_client.watch(R.PODS, "default", resource_version=str(controlplane.store.rv),
                                  timeout_seconds=1) as stream:
        assert await next_events(stream, 0, timeout=3) == []


async def test_watch_bookmarks_and_timeout(make_controlplane):
    cp = await make_controlplane(bookmark_interval=0.2)
    async with KubeClient(load_kubeconfig(cp.admin_kubeconfig)) as client:
        async with client.watch(R.PODS, resource_version=str(cp.store.rv), timeout_seconds=1) as stream:
            # Writes to other resources advance the global resourceVersion.
            await client.create(R.CONFIGMAPS, {"metadata": {"name": "x", "namespace": "default"}})
            events = []
            started = asyncio.get_running_loop().time()
            async for ev in stream:
                events.append(ev)
            elapsed = asyncio.get_running_loop().time() - started
        assert events and all(e.type == "BOOKMARK" for e in events)
        assert events[-1].object == {"kind": "Pod", "apiVersion": "v1",
                                     "metadata": {"resourceVersion": str(cp.store.rv)}}
        assert 0.8 <= elapsed < 3.0  # timeoutSeconds=1 ended the stream
        # Without allowWatchBookmarks there are none.
        async with client.watch(R.PODS, resource_version=str(cp.store.rv), timeout_seconds=1,
                                allow_bookmarks=False) as stream:
            assert [e async for e in stream] == []


async def test_watch_history_window(make_controlplane):
    cp = await make_controlplane(history_limit=5)
    async with KubeClient(load_kubeconfig(cp.admin_kubeconfig)) as client:
        start = str(cp.store.rv)
        for i in range(8):
            await client.create(R.CONFIGMAPS, {"metadata": {"name": f"h{i}", "namespace": "default"}})
        with pytest.raises(ApiError) as exc:
            async with client.watch(R.CONFIGMAPS, "default", resource_version=start) as stream:
                await next_events(stream, 1)
        assert exc.value.is_gone
        recent = str(cp.store.rv - 3)
        async with client.watch(R.CONFIGMAPS, "default", resource_version=recent) as stream:
            events = await next_events(stream, 3)
        assert [e.object["metadata"]["name"] for e in events] == ["h5", "h6", "h7"]


# --- deletion ---------------------------------------------------------------------------

async def test_graceful_pod_deletion(admin_client, controlplane):
    created = await admin_client.create(R.PODS, pod("g1", terminationGracePeriodSeconds=20))
    uid = created["metadata"]["uid"]
    pending = await admin_client.delete(R.PODS, "g1", "default")
    assert pending["metadata"]["deletionGracePeriodSeconds"] == 20
    assert pending["metadata"]["deletionTimestamp"]
    # Only a shorter grace period changes anything.
    again = await admin_client.delete(R.PODS, "g1", "default", grace_period_seconds=60)
    assert again["metadata"]["deletionGracePeriodSeconds"] == 20
    shorter = await admin_client.delete(R.PODS, "g1", "default", grace_period_seconds=5)
    assert shorter["metadata"]["deletionGracePeriodSeconds"] == 5
    # Status can still be written while terminating.
    await admin_client.patch(R.PODS, "g1", {"status": {"phase": "Succeeded"}}, "default",
                             subresource="status", patch_type=PatchType.MERGE)
    with pytest.raises(ApiError) as exc:
        await admin_client.delete(R.PODS, "g1", "default", grace_period_seconds=0,
                                  preconditions={"uid": "not-the-uid"})
    assert exc.value.is_conflict and "Precondition failed: UID in precondition" in exc.value.message
    final = await admin_client.delete(R.PODS, "g1", "default", grace_period_seconds=0,
                                      preconditions={"uid": uid})
    assert final["kind"] == "Pod" and final["metadata"]["uid"] == uid
    assert controlplane.object("pods", "g1", "default") is None

    # Unscheduled and terminal pods go at once.
    await admin_client.create(R.PODS, pod("g2", node=None))
    await admin_client.delete(R.PODS, "g2", "default")
    assert controlplane.object("pods", "g2", "default") is None


async def test_finalizers_hold_deletion(admin_client, controlplane):
    await admin_client.create(R.PODS, pod("f1", node=None) | {
        "metadata": {"name": "f1", "namespace": "default", "finalizers": ["test/hold"]}})
    held = await admin_client.delete(R.PODS, "f1", "default")
    assert held["metadata"]["deletionTimestamp"] and held["metadata"]["deletionGracePeriodSeconds"] == 0
    assert controlplane.object("pods", "f1", "default") is not None
    await admin_client.patch(R.PODS, "f1", {"metadata": {"finalizers": None}}, "default",
                             patch_type=PatchType.MERGE)
    assert controlplane.object("pods", "f1", "default") is None

    # A bound pod with a finalizer: removing it during the grace period is not enough.
    await admin_client.create(R.PODS, {**pod("f2"), "metadata": {"name": "f2", "namespace": "default",
                                                                 "finalizers": ["test/hold"]}})
    await admin_client.delete(R.PODS, "f2", "default", grace_period_seconds=30)
    await admin_client.patch(R.PODS, "f2", {"metadata": {"finalizers": None}}, "default",
                             patch_type=PatchType.MERGE)
    assert controlplane.object("pods", "f2", "default") is not None
    await admin_client.delete(R.PODS, "f2", "default", grace_period_seconds=0)
    assert controlplane.object("pods", "f2", "default") is None


async def test_namespace_deletion_empties_it(admin_client, controlplane):
    await admin_client.create(R.NAMESPACES, {"metadata": {"name": "tmp"}})
    await admin_client.create(R.CONFIGMAPS, {"metadata": {"name": "c", "namespace": "tmp"}})
    ns = await admin_client.delete(R.NAMESPACES, "tmp")
    assert ns["status"]["phase"] == "Terminating"
    with pytest.raises(ApiError) as exc:
        await admin_client.create(R.CONFIGMAPS, {"metadata": {"name": "d", "namespace": "tmp"}})
    assert exc.value.is_forbidden
    await controlplane.wait_for(lambda: controlplane.object("namespaces", "tmp") is None, 5,
                                what="namespace tmp to disappear")
    assert controlplane.objects("configmaps", "tmp") == []


# --- authentication and authorization ------------------------------------------------------

async def test_node_identity_authorization(controlplane):
    kubeconfig = controlplane.make_kubeconfig("system:node:node-a", ["system:nodes"])
    async with KubeClient(load_kubeconfig(kubeconfig)) as node:
        pods = await node.list(R.PODS, field_selector="spec.nodeName=node-a")
        assert pods["items"] == []
        lease = await node.create(R.LEASES, {"metadata": {"name": "node-a", "namespace": "kube-node-lease"},
                                             "spec": {"holderIdentity": "node-a", "leaseDurationSeconds": 40}})
        assert lease["spec"]["holderIdentity"] == "node-a"
        with pytest.raises(ApiError) as exc:
            await node.delete(R.NAMESPACES, "default")
        assert exc.value.is_forbidden
        assert exc.value.message == ('namespaces "default" is forbidden: User "system:node:node-a" '
                                     'cannot delete resource "namespaces" in API group "" at the cluster scope')


async def test_anonymous_and_bad_token(controlplane):
    anon = controlplane.make_kubeconfig()
    async with KubeClient(load_kubeconfig(anon)) as client:
        info = await client.get(R.CONFIGMAPS, "cluster-info", "kube-public")
        assert "kubeconfig" in info["data"]
        with pytest.raises(ApiError) as exc:
            await client.list(R.PODS)
        assert exc.value.is_forbidden and 'User "system:anonymous"' in exc.value.message
        version = await client.request("GET", "/version")
        assert version["gitVersion"].startswith("v1.32")
    bad = controlplane.make_kubeconfig(token="not-a-token")
    async with KubeClient(load_kubeconfig(bad)) as client:
        with pytest.raises(ApiError) as exc:
            await client.list(R.PODS)
        assert exc.value.is_unauthorized


async def test_bootstrap_token_discovery_and_tls_bootstrap(controlplane):
    token = controlplane.create_bootstrap_token()
    token_id, token_secret = token.split(".")
    info = controlplane.object("configmaps", "cluster-info", "kube-public")
    kubeconfig_text = info["data"]["kubeconfig"]
    jws = info["data"][f"jws-kubeconfig-{token_id}"]
    assert verify_detached_jws(jws, kubeconfig_text, token_id, token_secret)
    assert not verify_detached_jws(jws, kubeconfig_text, token_id, "x" * 16)
    discovered = yaml.safe_load(kubeconfig_text)["clusters"][0]["cluster"]
    assert discovered["server"] == controlplane.url
    assert base64.b64decode(discovered["certificate-authority-data"]) == controlplane.ca.cert_pem
    assert controlplane.ca.spki_sha256().startswith("sha256:") and len(controlplane.ca.spki_sha256()) == 71

    async with KubeClient(load_kubeconfig(controlplane.make_kubeconfig(token=token))) as boot:
        key_pem, csr_pem = make_csr("system:node:node-b", ["system:nodes"])
        csr = await boot.create(R.CERTIFICATESIGNINGREQUESTS, {
            "metadata": {"name": "node-csr-b"},
            "spec": {"request": base64.b64encode(csr_pem).decode(),
                     "signerName": "kubernetes.io/kube-apiserver-client-kubelet",
                     "usages": ["digital signature", "client auth"]}})
        assert csr["spec"]["username"] == f"system:bootstrap:{token_id}"
        assert "system:bootstrappers" in csr["spec"]["groups"]
        with pytest.raises(ApiError) as exc:
            await boot.list(R.PODS)
        assert exc.value.is_forbidden
        controlplane.approve_csr("node-csr-b")
        issued = await controlplane.wait_for(
            lambda: (controlplane.object("certificatesigningrequests", "node-csr-b", group="certificates.k8s.io")
                     or {}).get("status", {}).get("certificate"), 5, what="the CSR to be signed")
        from_api = await boot.get(R.CERTIFICATESIGNINGREQUESTS, "node-csr-b")
        assert from_api["status"]["certificate"] == issued
    cert_path = Path(controlplane.state_dir) / "node-b.crt"
    key_path = Path(controlplane.state_dir) / "node-b.key"
    cert_path.write_bytes(base64.b64decode(issued))
    key_path.write_bytes(key_pem)
    kubeconfig = controlplane.make_kubeconfig(cert=(cert_path, key_path), user="node-b")
    async with KubeClient(load_kubeconfig(kubeconfig)) as node:
        review = await node.create(R.SUBJECTACCESSREVIEWS, {"spec": {
            "user": "system:node:node-b", "groups": ["system:nodes"],
            "resourceAttributes": {"verb": "patch", "resource": "nodes", "subresource": "status"}}})
        assert review["status"]["allowed"] is True
        created = await node.create(R.NODES, {"metadata": {"name": "node-b"}})
        assert created["metadata"]["name"] == "node-b"


async def test_csr_auto_approve_and_rejection(make_controlplane):
    cp = await make_controlplane(options=Options(auto_approve_csrs=True))
    async with KubeClient(load_kubeconfig(cp.admin_kubeconfig)) as client:
        _, good = make_csr("system:node:n1", ["system:nodes"])
        _, bad = make_csr("someone", ["admins"])
        for name, pem in (("good", good), ("bad", bad)):
            await client.create(R.CERTIFICATESIGNINGREQUESTS, {"metadata": {"name": name}, "spec": {
                "request": base64.b64encode(pem).decode(),
                "signerName": "kubernetes.io/kube-apiserver-client-kubelet",
                "usages": ["digital signature", "client auth"]}})

        def status(name):
            return (cp.object("certificatesigningrequests", name, group="certificates.k8s.io")
                    or {}).get("status", {})

        await cp.wait_for(lambda: status("good").get("certificate"), 5, what="good CSR signed")
        await cp.wait_for(lambda: any(c["type"] == "Failed" for c in status("bad").get("conditions", [])),
                          5, what="bad CSR failed")
        assert "certificate" not in status("bad")


async def test_token_request_and_review(admin_client):
    created = await admin_client.create(R.PODS, pod("tp"))
    token = await admin_client.create(R.SERVICEACCOUNTS, {
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"audiences": ["api"], "expirationSeconds": 600,
                 "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "tp",
                                    "uid": created["metadata"]["uid"]}}},
        "default", name="default", subresource="token")
    jwt = token["status"]["token"]
    claims = json.loads(base64.urlsafe_b64decode(jwt.split(".")[1] + "=="))
    assert claims["sub"] == "system:serviceaccount:default:default" and claims["aud"] == ["api"]
    assert claims["kubernetes.io"]["pod"] == {"name": "tp", "uid": created["metadata"]["uid"]}
    assert claims["exp"] - claims["iat"] == 600
    review = await admin_client.create(R.TOKENREVIEWS, {"spec": {"token": jwt}})
    assert review["status"]["authenticated"] is True
    assert review["status"]["user"]["username"] == "system:serviceaccount:default:default"
    with pytest.raises(ApiError) as exc:
        await admin_client.create(R.SERVICEACCOUNTS, {"spec": {"expirationSeconds": 60}}, "default",
                                  name="default", subresource="token")
    assert exc.value.is_invalid
    # Deleting the bound pod invalidates the token.
    await admin_client.delete(R.PODS, "tp", "default", grace_period_seconds=0)
    review = await admin_client.create(R.TOKENREVIEWS, {"spec": {"token": jwt}})
    assert review["status"]["authenticated"] is False


# --- events ----------------------------------------------------------------------------

async def test_events_share_storage_across_versions(admin_client):
    await admin_client.create(R.EVENTS_V1, {
        "metadata": {"name": "p.1", "namespace": "default"},
        "eventTime": "2024-01-01T00:00:00.000000Z", "reportingController": "nodeagent",
        "reportingInstance": "node-a", "action": "Pulling", "reason": "Pulling", "type": "Normal",
        "note": "Pulling image busybox", "regarding": {"kind": "Pod", "name": "p", "namespace": "default",
                                                       "uid": "u-1", "apiVersion": "v1"}})
    core = await admin_client.list(R.EVENTS, "default",
                                   field_selector="involvedObject.name=p,involvedObject.uid=u-1")
    (event,) = core["items"]
    assert event["message"] == "Pulling image busybox" and event["reportingComponent"] == "nodeagent"
    assert event["involvedObject"]["kind"] == "Pod"
    v1 = await admin_client.list(R.EVENTS_V1, "default", field_selector="regarding.name=p")
    assert v1["items"][0]["note"] == "Pulling image busybox"
    with pytest.raises(ApiError) as exc:  # events.k8s.io requires reportingController etc.
        await admin_client.create(R.EVENTS_V1, {"metadata": {"name": "bad", "namespace": "default"},
                                                "reason": "X", "regarding": {"kind": "Pod", "name": "p",
                                                                             "namespace": "default"}})
    assert exc.value.is_invalid
    with pytest.raises(ApiError) as exc:  # a core event's involvedObject must be in its namespace
        await admin_client.create(R.EVENTS, {"metadata": {"name": "e2", "namespace": "default"},
                                             "involvedObject": {"kind": "Pod", "name": "p", "namespace": "other"},
                                             "reason": "X", "message": "m", "type": "Normal"})
    assert exc.value.is_invalid


# --- schema validation and write recording ---------------------------------------------------

def test_validate_object_uses_official_schema():
    good = pod("ok")
    assert validate_object(good) == []
    bad = pod("bad")
    bad["spec"]["containers"][0]["imagePullPolicy"] = 3
    bad["spec"]["containers"][0]["bogus"] = True
    bad["status"] = {"conditions": [{"type": "Ready"}]}
    problems = validate_object(bad)
    assert any(p.startswith("spec.containers[0].imagePullPolicy: 3 is not of type 'string'")
               for p in problems)
    assert 'spec.containers[0].bogus: unknown field "spec.containers[0].bogus"' in problems
    assert "status.conditions[0].status: Required value" in problems
    assert validate_object({"apiVersion": "v9", "kind": "Nope"})[0].startswith("<root>: no schema")


async def test_field_validation_strict_and_warn(controlplane):
    kubeconfig = load_kubeconfig(controlplane.admin_kubeconfig)
    async with KubeClient(kubeconfig) as client:
        with pytest.raises(ApiError) as exc:
            await client.create(R.CONFIGMAPS, {"metadata": {"name": "s", "namespace": "default"}, "extra": 1},
                                field_validation="Strict")
        assert exc.value.status == 400 and 'strict decoding error: unknown field "extra"' in exc.value.message
    ssl_ctx = kubeconfig.ssl_context()
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{controlplane.url}/api/v1/namespaces/default/configmaps",
                                json={"metadata": {"name": "w"}, "extra": 1}, ssl=ssl_ctx) as resp:
            assert resp.status == 201
            assert resp.headers.getall("Warning") == ['299 - "unknown field \\"extra\\""']
            body = await resp.json()
    assert "extra" not in controlplane.object("configmaps", "w", "default")
    del body


async def test_records_writes_of_non_admin_clients(make_controlplane):
    cp = await make_controlplane(options=Options(record_writes=True))
    async with KubeClient(load_kubeconfig(cp.admin_kubeconfig)) as admin:
        await admin.create(R.PODS, pod("r1", node="node-r"))
    kubeconfig = cp.make_kubeconfig("system:node:node-r", ["system:nodes"])
    async with KubeClient(load_kubeconfig(kubeconfig)) as node:
        await node.create(R.NODES, {"metadata": {"name": "node-r"}, "status": {
            "conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": "2024-01-01T00:00:00Z",
                            "lastTransitionTime": "2024-01-01T00:00:00Z", "reason": "KubeletReady",
                            "message": "ok"}]}})
        await node.patch(R.PODS, "r1", {"status": {"phase": "Running", "podIP": "10.0.0.9",
                                                   "podIPs": [{"ip": "10.0.0.9"}]}},
                         "default", subresource="status")
    writes = cp.recorded_writes
    assert [(w.user, w.verb, w.resource) for w in writes] == [
        ("system:node:node-r", "create", "nodes"), ("system:node:node-r", "patch", "pods/status")]
    for write in writes:
        assert validate_object(write.object) == [], write
    assert cp.schema_problems_in_recorded_writes() == []
    assert writes[1].request == {"status": {"phase": "Running", "podIP": "10.0.0.9",
                                            "podIPs": [{"ip": "10.0.0.9"}]}}


# --- infrastructure: outage, faults, pod CIDRs, discovery, standalone process -------------

async def test_outage_keeps_state_and_port(controlplane, admin_client):
    await admin_client.create(R.CONFIGMAPS, {"metadata": {"name": "keep", "namespace": "default"}})
    port, rv = controlplane.port, controlplane.store.rv
    await controlplane.stop_serving()
    with pytest.raises(ApiConnectionError) as exc:
        await KubeClient(load_kubeconfig(controlplane.admin_kubeconfig), max_retries=0).get(
            R.CONFIGMAPS, "keep", "default")
    assert "cannot connect" in str(exc.value)
    controlplane.api.create(controlplane_rt("configmaps"), "default", {"metadata": {"name": "while-down"}})
    await controlplane.start_serving()
    assert controlplane.port == port
    got = await admin_client.get(R.CONFIGMAPS, "keep", "default")
    assert int(got["metadata"]["resourceVersion"]) <= rv
    assert (await admin_client.get(R.CONFIGMAPS, "while-down", "default"))["metadata"]["name"] == "while-down"


def controlplane_rt(plural: str):
    from tests.controlplane.resources import RESOURCES
    return next(r for r in RESOURCES if r.plural == plural and r.group == "")


async def test_pod_cidr_allocation(make_controlplane):
    cp = await make_controlplane(options=Options(pod_cidr="10.244.0.0/16"))
    async with KubeClient(load_kubeconfig(cp.admin_kubeconfig)) as client:
        await client.create(R.NODES, {"metadata": {"name": "n1"}})
        await client.create(R.NODES, {"metadata": {"name": "n2"}})
        await cp.wait_for(lambda: all((cp.object("nodes", n) or {}).get("spec", {}).get("podCIDR")
                                      for n in ("n1", "n2")), 5, what="pod CIDRs")
        assert cp.object("nodes", "n1")["spec"]["podCIDRs"] == ["10.244.0.0/24"]
        assert cp.object("nodes", "n2")["spec"]["podCIDR"] == "10.244.1.0/24"


async def test_discovery_documents(admin_client):
    api = await admin_client.request("GET", "/api")
    assert api["versions"] == ["v1"]
    groups = await admin_client.request("GET", "/apis")
    names = [g["name"] for g in groups["groups"]]
    assert {"coordination.k8s.io", "events.k8s.io", "discovery.k8s.io", "certificates.k8s.io"} <= set(names)
    core = await admin_client.request("GET", "/api/v1")
    by_name = {r["name"]: r for r in core["resources"]}
    assert by_name["pods"]["namespaced"] and by_name["pods"]["shortNames"] == ["po"]
    assert by_name["pods/status"]["verbs"] == ["get", "patch", "update"]
    assert by_name["serviceaccounts/token"]["kind"] == "TokenRequest"
    assert not by_name["nodes"]["namespaced"]
    openapi_root = await admin_client.request("GET", "/openapi/v3")
    url = openapi_root["paths"]["api/v1"]["serverRelativeURL"]
    doc = await admin_client.request("GET", url.split("?")[0])
    patch_op = doc["paths"]["/api/v1/namespaces/{namespace}/pods/{name}"]["patch"]
    assert "fieldValidation" in [p["name"] for p in patch_op["parameters"]]
    assert "application/strategic-merge-patch+json" in patch_op["requestBody"]["content"]
    containers = doc["components"]["schemas"]["io.k8s.api.core.v1.PodSpec"]["properties"]["containers"]
    assert containers["x-kubernetes-patch-merge-key"] == "name"


async def test_server_side_table(controlplane):
    kubeconfig = load_kubeconfig(controlplane.admin_kubeconfig)
    async with KubeClient(kubeconfig) as client:
        await client.create(R.PODS, pod("t1"))
        await client.patch(R.PODS, "t1", {"status": {"phase": "Running", "podIP": "10.1.2.3",
                                                      "containerStatuses": [{
                                                          "name": "c", "ready": True, "restartCount": 2,
                                                          "image": "busybox:1.35", "imageID": "",
                                                          "state": {"running": {"startedAt": "2024-01-01T00:00:00Z"}}}]}},
                           "default", subresource="status")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{controlplane.url}/api/v1/namespaces/default/pods",
                               headers={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"},
                               ssl=kubeconfig.ssl_context()) as resp:
            table = await resp.json()
    assert table["kind"] == "Table"
    assert [c["name"] for c in table["columnDefinitions"] if c["priority"] == 0] == \
        ["Name", "Ready", "Status", "Restarts", "Age"]
    (row,) = table["rows"]
    assert row["cells"][:4] == ["t1", "1/1", "Running", "2"]
    assert row["cells"][5:7] == ["10.1.2.3", "node-a"]
    assert row["object"]["kind"] == "PartialObjectMetadata"


async def test_standalone_process_prints_kubeconfig(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.controlplane", "--port", "0", "--state-dir", str(tmp_path / "cp"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        path = Path(line.decode().strip())
        assert path == tmp_path / "cp" / "admin.kubeconfig" and path.exists()
        async with KubeClient(load_kubeconfig(path)) as client:
            namespaces = await client.list(R.NAMESPACES)
        assert {n["metadata"]["name"] for n in namespaces["items"]} == {
            "default", "kube-system", "kube-public", "kube-node-lease"}
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0


# --- real kubectl against the control plane ------------------------------------------------

POD_YAML = """\
apiVersion: v1
kind: Pod
metadata:
  name: web
  labels: {app: web}
spec:
  nodeName: node-a
  containers:
  - name: main
    image: busybox:1.35
    command: ["sleep", "3600"]
"""


async def _fake_kubelet(controlplane: ControlPlane, node: str, stop: asyncio.Event) -> None:
    """Plays the node's part: marks pods Running and finishes graceful deletions with a
    grace-0 DELETE carrying the UID precondition."""
    kubeconfig = controlplane.make_kubeconfig(f"system:node:{node}", ["system:nodes"])
    async with KubeClient(load_kubeconfig(kubeconfig)) as client:
        listed = await client.list(R.PODS, field_selector=f"spec.nodeName={node}")
        rv = listed["metadata"]["resourceVersion"]
        async with client.watch(R.PODS, resource_version=rv, field_selector=f"spec.nodeName={node}") as stream:
            async for event in stream:
                if stop.is_set():
                    return
                pod_obj = event.object
                meta = pod_obj["metadata"]
                if event.type == "DELETED":
                    continue
                if meta.get("deletionTimestamp"):
                    await client.delete(R.PODS, meta["name"], meta["namespace"], grace_period_seconds=0,
                                        preconditions={"uid": meta["uid"]})
                elif pod_obj.get("status", {}).get("phase") == "Pending":
                    await client.patch(R.PODS, meta["name"], {"status": {
                        "phase": "Running", "podIP": "10.244.0.7", "podIPs": [{"ip": "10.244.0.7"}],
                        "hostIP": "192.0.2.10",
                        "conditions": [{"type": "Ready", "status": "True"}],
                        "containerStatuses": [{"name": "main", "ready": True, "restartCount": 0,
                                               "image": "busybox:1.35", "imageID": "", "started": True,
                                               "state": {"running": {"startedAt": "2024-01-01T00:00:00Z"}}}]}},
                        meta["namespace"], subresource="status")


async def test_kubectl_apply_get_describe_delete(controlplane, kubectl, tmp_path):
    manifest = tmp_path / "pod.yaml"
    manifest.write_text(POD_YAML)
    stop = asyncio.Event()
    kubelet = asyncio.create_task(_fake_kubelet(controlplane, "node-a", stop))
    try:
        res = await kubectl("apply", "-f", str(manifest))
        assert res.stdout.strip() == "pod/web created"
        await controlplane.wait_for(lambda: (controlplane.object("pods", "web", "default") or {})
                                    .get("status", {}).get("phase") == "Running", 10, what="web Running")
        res = await kubectl("get", "pods")
        header, row = res.stdout.splitlines()
        assert header.split() == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
        assert row.split()[:4] == ["web", "1/1", "Running", "0"]
        res = await kubectl("get", "pods", "-o", "wide")
        header, row = res.stdout.splitlines()
        assert header.split()[5:7] == ["IP", "NODE"]
        assert row.split()[5:7] == ["10.244.0.7", "node-a"]
        res = await kubectl("get", "pod", "web", "-o", "json")
        obj = res.json()
        assert obj["status"]["podIP"] == "10.244.0.7" and obj["spec"]["containers"][0]["imagePullPolicy"] == "IfNotPresent"
        assert (await kubectl("apply", "-f", str(manifest))).stdout.strip() == "pod/web unchanged"
        manifest.write_text(POD_YAML.replace("{app: web}", "{app: web, tier: fe}"))
        assert (await kubectl("apply", "-f", str(manifest))).stdout.strip() == "pod/web configured"
        assert controlplane.object("pods", "web", "default")["metadata"]["labels"] == {"app": "web", "tier": "fe"}
        bad = await kubectl("apply", "-f", "-", input=POD_YAML.replace("command:", "comand:"), check=False)
        assert bad.returncode != 0 and 'unknown field "spec.containers[0].comand"' in bad.stderr

        controlplane.api.create(controlplane_rt("events"), "default", {
            "metadata": {"name": "web.1"}, "involvedObject": {
                "kind": "Pod", "name": "web", "namespace": "default", "apiVersion": "v1",
                "uid": obj["metadata"]["uid"], "fieldPath": "spec.containers{main}"},
            "reason": "Started", "message": "Started container main", "type": "Normal",
            "source": {"component": "kubelet", "host": "node-a"}, "count": 1,
            "firstTimestamp": obj["metadata"]["creationTimestamp"],
            "lastTimestamp": obj["metadata"]["creationTimestamp"]})
        res = await kubectl("describe", "pod", "web")
        text = res.stdout
        assert "Node:             node-a/192.0.2.10" in text
        assert "Status:           Running" in text and "IP:               10.244.0.7" in text
        assert "tier=fe" in text and "QoS Class:                   BestEffort" in text
        assert any(line.split()[:2] == ["Normal", "Started"] and "Started container main" in line
                   for line in text.splitlines())

        res = await kubectl("delete", "pod", "web", timeout=30)
        # kubectl >= 1.34 names the namespace
        assert res.stdout.strip() in ('pod "web" deleted', 'pod "web" deleted from default namespace')
        assert controlplane.object("pods", "web", "default") is None
        res = await kubectl("get", "pods")
        assert res.stdout == "" and "No resources found in default namespace." in res.stderr
    finally:
        stop.set()
        kubelet.cancel()
        await asyncio.gather(kubelet, return_exceptions=True)


async def test_kubectl_nodes_leases_configmaps_secrets(controlplane, kubectl):
    node_kubeconfig = controlplane.make_kubeconfig("system:node:node-a", ["system:nodes"])
    async with KubeClient(load_kubeconfig(node_kubeconfig)) as node:
        await node.create(R.NODES, {
            "metadata": {"name": "node-a", "labels": {"kubernetes.io/hostname": "node-a",
                                                      "node-role.kubernetes.io/worker": ""}},
            "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                       "message": "kubelet is posting ready status",
                                       "lastHeartbeatTime": "2024-01-01T00:00:00Z",
                                       "lastTransitionTime": "2024-01-01T00:00:00Z"}],
                       "addresses": [{"type": "InternalIP", "address": "192.0.2.10"},
                                     {"type": "Hostname", "address": "node-a"}],
                       "capacity": {"cpu": "2", "memory": "4Gi", "pods": "110"},
                       "allocatable": {"cpu": "2", "memory": "4Gi", "pods": "110"},
                       "nodeInfo": {"kubeletVersion": "v1.32.0-nodeagent", "osImage": "Debian GNU/Linux 12",
                                    "kernelVersion": "6.1.0", "containerRuntimeVersion": "docker://20.10.24",
                                    "architecture": "amd64", "operatingSystem": "linux", "machineID": "m",
                                    "systemUUID": "s", "bootID": "b", "kubeProxyVersion": ""}}})
        await node.create(R.LEASES, {"metadata": {"name": "node-a", "namespace": "kube-node-lease"},
                                     "spec": {"holderIdentity": "node-a", "leaseDurationSeconds": 40,
                                              "renewTime": "2024-01-01T00:00:00.000000Z"}})
    res = await kubectl("get", "nodes")
    header, row = res.stdout.splitlines()
    assert header.split() == ["NAME", "STATUS", "ROLES", "AGE", "VERSION"]
    assert row.split()[:3] == ["node-a", "Ready", "worker"] and row.split()[4] == "v1.32.0-nodeagent"
    res = await kubectl("get", "nodes", "-o", "wide")
    assert "192.0.2.10" in res.stdout and "docker://20.10.24" in res.stdout
    res = await kubectl("get", "lease", "-n", "kube-node-lease")
    assert res.stdout.splitlines()[1].split()[:2] == ["node-a", "node-a"]
    res = await kubectl("describe", "node", "node-a")
    assert "HolderIdentity:  node-a" in res.stdout and "InternalIP:  192.0.2.10" in res.stdout
    assert any(line.split()[:2] == ["Ready", "True"] and "KubeletReady" in line
               for line in res.stdout.splitlines())
    assert "Container Runtime Version:  docker://20.10.24" in res.stdout

    assert (await kubectl("create", "configmap", "cfg", "--from-literal=a=b")).stdout.strip() == "configmap/cfg created"
    assert (await kubectl("create", "secret", "generic", "sec", "--from-literal=p=q")).stdout.strip() == "secret/sec created"
    assert controlplane.object("configmaps", "cfg", "default")["data"] == {"a": "b"}
    secret = controlplane.object("secrets", "sec", "default")
    assert secret["type"] == "Opaque" and base64.b64decode(secret["data"]["p"]) == b"q"
    res = await kubectl("get", "cm,secret")
    assert "configmap/cfg" in res.stdout and "secret/sec" in res.stdout
    res = await kubectl("delete", "configmap", "cfg")
    assert res.stdout.strip() in ('configmap "cfg" deleted', 'configmap "cfg" deleted from default namespace')
    res = await kubectl("get", "configmap", "cfg", check=False)
    assert res.returncode == 1 and 'configmaps "cfg" not found' in res.stderr


async def test_kubectl_logs_and_node_proxy_reach_the_kubelet(controlplane, kubectl):
    """pods/log and nodes/proxy go to the node's kubelet endpoint with the apiserver's
    kubelet client certificate, like the real API server."""
    from aiohttp import web

    seen: list[tuple[str, str, str]] = []

    async def logs(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peercert") or {}
        cn = dict(x[0] for x in peer.get("subject", ()))["commonName"]
        seen.append((request.path, request.query_string, cn))
        return web.Response(text="line one\nline two\n")

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    import ssl as ssl_mod
    key_pem, cert_pem = controlplane.ca.issue("system:node:node-a", ["system:nodes"], client=False,
                                              server=True, ip_addresses=["127.0.0.1"])
    cert_file, key_file = controlplane.state_dir / "kubelet.crt", controlplane.state_dir / "kubelet.key"
    cert_file.write_bytes(cert_pem)
    key_file.write_bytes(key_pem)
    ctx = ssl_mod.SSLContext(ssl_mod.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_file, key_file)
    ctx.load_verify_locations(cadata=controlplane.ca.cert_pem.decode())
    ctx.verify_mode = ssl_mod.CERT_REQUIRED
    app = web.Application()
    app.router.add_get("/containerLogs/{ns}/{pod}/{container}", logs)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        api = controlplane.api
        api.create(controlplane_rt("nodes"), None, {"metadata": {"name": "node-a"}, "status": {
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": port}}}})
        api.create(controlplane_rt("pods"), "default", pod("web"))
        res = await kubectl("logs", "web", "--tail=5")
        assert res.stdout == "line one\nline two\n"
        assert seen == [("/containerLogs/default/web/c", "tailLines=5", "kube-apiserver-kubelet-client")]
        res = await kubectl("get", "--raw", "/api/v1/nodes/node-a/proxy/healthz")
        assert res.stdout == "ok"
        # Node addresses outside the allowed networks are never contacted.
        api.patch(controlplane_rt("nodes"), None, "node-a", "application/merge-patch+json",
                  json.dumps({"status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.99"}]}}),
                  subresource="status")
        res = await kubectl("logs", "web", check=False)
        assert res.returncode != 0 and "refusing to proxy to node address 192.0.2.99" in res.stderr
    finally:
        await runner.cleanup()


async def test_kubectl_auth_commands(controlplane, kubectl):
    assert (await kubectl("auth", "can-i", "delete", "nodes")).stdout.strip() == "yes"
    res = await kubectl("auth", "whoami", "-o", "json")
    assert res.json()["status"]["userInfo"]["username"] == "kubernetes-admin"
    node_kubeconfig = controlplane.make_kubeconfig("system:node:n1", ["system:nodes"])
    res = await kubectl("--kubeconfig", str(node_kubeconfig), "auth", "can-i", "delete", "namespaces",
                        check=False)
    assert res.stdout.strip() == "no"


def _pb_field(number: int, payload: bytes | int) -> bytes:
    def varint(value: int) -> bytes:
        out = bytearray()
        while True:
            byte = value & 0x7F
            value >>= 7
            out.append(byte | (0x80 if value else 0))
            if not value:
                return bytes(out)

    if isinstance(payload, int):
        return varint(number << 3) + varint(payload)
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def test_protobuf_bodies_decode_with_kubectl_layouts():
    from tests.controlplane.protobuf import decode_k8s

    meta = _pb_field(1, b"cfg") + _pb_field(3, b"default") + _pb_field(7, 0) \
        + _pb_field(11, _pb_field(1, b"app") + _pb_field(2, b"web"))
    configmap = _pb_field(1, meta) + _pb_field(2, _pb_field(1, b"k") + _pb_field(2, b"v")) \
        + _pb_field(3, _pb_field(1, b"bin") + _pb_field(2, b"\x00\x01"))
    envelope = _pb_field(1, _pb_field(1, b"v1") + _pb_field(2, b"ConfigMap")) + _pb_field(2, configmap)
    assert decode_k8s(b"k8s\x00" + envelope) == {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "cfg", "namespace": "default", "labels": {"app": "web"}},
        "data": {"k": "v"}, "binaryData": {"bin": "AAE="}}
    with pytest.raises(ValueError):
        decode_k8s(b"not protobuf")
