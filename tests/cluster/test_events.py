"""ApiEventRecorder against the test control plane: kubelet's Event shape, deduplication
by PATCH, aggregation of similar events, the spam filter, and never blocking."""

from __future__ import annotations

import asyncio
import time

import pytest

from nodeagent.cluster.events import AGGREGATE_PREFIX, ApiEventRecorder
from nodeagent.kubelet.events import NORMAL, WARNING, EventSink
from nodeagent.kube import KubeClient, load_kubeconfig
from nodeagent.kube import resources as R
from tests.cluster.conftest import Kubectl, find_kubectl
from tests.controlplane import Options

NODE = "node-ev"


@pytest.fixture
async def cp(make_controlplane):
    cp = await make_controlplane(options=Options(record_writes=True, service_account_admission=False))
    yield cp
    # Every Event the node created or patched passes the official v1.32 schema.
    assert cp.schema_problems_in_recorded_writes() == []


@pytest.fixture
async def node_client(cp):
    client = KubeClient(load_kubeconfig(cp.make_kubeconfig(f"system:node:{NODE}", ["system:nodes"])),
                        qps=0, max_retries=0)
    yield client
    await client.close()


@pytest.fixture
async def admin(cp):
    client = KubeClient(load_kubeconfig(cp.admin_kubeconfig), qps=0)
    yield client
    await client.close()


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def recorder(node_client, clock):
    rec = ApiEventRecorder(node_client, node_name=NODE, host_ip="192.0.2.2", clock=clock, retry_interval=0.1)
    task = asyncio.create_task(rec.run())
    yield rec
    task.cancel()
    await asyncio.wait([task])


async def make_pod(admin, name="web", namespace="default") -> dict:
    return await admin.create(R.PODS, {"metadata": {"name": name, "namespace": namespace},
                                       "spec": {"nodeName": NODE, "containers": [{"name": "app", "image": "busybox:1.35"}]}},
                              namespace)


def events(cp, namespace="default") -> list[dict]:
    return sorted(cp.objects("events", namespace), key=lambda e: e["metadata"]["name"])


async def settle(recorder: ApiEventRecorder) -> None:
    await asyncio.wait_for(recorder.wait_idle(), 10)


def event_writes(cp, verb: str) -> list:
    return [w for w in cp.recorded_writes if w.resource == "events" and w.verb == verb]


async def test_pod_and_node_events_have_kubelets_shape(cp, admin, recorder, clock, tmp_path):
    sink: EventSink = recorder  # the kubelet core's interface  # noqa: F841
    pod = await make_pod(admin)
    recorder.event(pod, NORMAL, "Pulled", 'Container image "busybox:1.35" already present on machine',
                   field_path="spec.containers{app}")
    recorder.node_event(NORMAL, "Starting", "Starting kubelet.")
    await settle(recorder)
    pod_event, node_event = sorted(events(cp), key=lambda e: e["involvedObject"]["kind"] != "Pod")
    meta = pod["metadata"]
    assert pod_event["metadata"]["name"].startswith("web.")
    int(pod_event["metadata"]["name"].split(".", 1)[1], 16)  # <name>.<unix nanoseconds in hex>
    assert pod_event["involvedObject"] == {
        "kind": "Pod", "namespace": "default", "name": "web", "uid": meta["uid"], "apiVersion": "v1",
        "resourceVersion": meta["resourceVersion"], "fieldPath": "spec.containers{app}"}
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(clock.now))
    assert {k: pod_event[k] for k in ("reason", "type", "count", "source", "reportingComponent",
                                      "reportingInstance", "firstTimestamp", "lastTimestamp")} == {
        "reason": "Pulled", "type": "Normal", "count": 1, "source": {"component": "kubelet", "host": NODE},
        "reportingComponent": "kubelet", "reportingInstance": NODE,
        "firstTimestamp": stamp, "lastTimestamp": stamp}
    assert node_event["metadata"]["namespace"] == "default"
    assert node_event["involvedObject"] == {"kind": "Node", "name": NODE, "uid": NODE}
    assert (node_event["reason"], node_event["message"]) == ("Starting", "Starting kubelet.")
    assert [w.user for w in event_writes(cp, "create")] == [f"system:node:{NODE}"] * 2

    (tmp_path / "kubectl-home").mkdir()
    kubectl = Kubectl(find_kubectl(), cp.admin_kubeconfig, tmp_path / "kubectl-home")
    described = await kubectl("describe", "pod", "web")
    assert "Pulled" in described.stdout and "kubelet" in described.stdout
    assert 'Container image "busybox:1.35" already present on machine' in described.stdout


async def test_identical_events_increment_count_by_patch(cp, admin, recorder, clock, node_client):
    pod = await make_pod(admin)
    first_stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(clock.now))
    for _ in range(3):
        recorder.event(pod, WARNING, "BackOff", "Back-off restarting failed container app",
                       field_path="spec.containers{app}")
        await settle(recorder)
        clock.now += 7
    [ev] = events(cp)
    assert ev["count"] == 3
    assert ev["firstTimestamp"] == first_stamp
    assert ev["lastTimestamp"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(clock.now - 7))
    assert node_client.request_counts[("create", "events")] == 1
    assert node_client.request_counts[("patch", "events")] == 2
    patches = [w.request for w in event_writes(cp, "patch")]
    assert [p["count"] for p in patches] == [2, 3]
    assert set(patches[0]) == {"count", "lastTimestamp", "message"}
    assert recorder.stats.created == 1 and recorder.stats.patched == 2

    # A different fieldPath is a different event.
    recorder.event(pod, WARNING, "BackOff", "Back-off restarting failed container app",
                   field_path="spec.initContainers{init}")
    await settle(recorder)
    assert len(events(cp)) == 2

    # The Event vanished (TTL) before the next repeat: it is created again.
    await admin.delete(R.EVENTS, ev["metadata"]["name"], "default")
    recorder.event(pod, WARNING, "BackOff", "Back-off restarting failed container app",
                   field_path="spec.containers{app}")
    await settle(recorder)
    again = [e for e in events(cp) if e["involvedObject"].get("fieldPath") == "spec.containers{app}"]
    assert len(again) == 1 and again[0]["count"] == 4


async def test_similar_events_are_combined(cp, admin, recorder, node_client):
    pod = await make_pod(admin)
    for i in range(13):
        recorder.event(pod, WARNING, "Failed", f"Error: failure number {i}")
    await settle(recorder)
    stored = events(cp)
    singles = [e for e in stored if not e["message"].startswith(AGGREGATE_PREFIX)]
    combined = [e for e in stored if e["message"].startswith(AGGREGATE_PREFIX)]
    # The first 9 distinct messages stand alone; from the 10th on, one combined Event counts them.
    assert sorted(e["message"] for e in singles) == sorted(f"Error: failure number {i}" for i in range(9))
    assert len(combined) == 1
    assert combined[0]["count"] == 4
    assert combined[0]["message"] == AGGREGATE_PREFIX + "Error: failure number 12"
    assert node_client.request_counts[("create", "events")] == 10
    assert node_client.request_counts[("patch", "events")] == 3
    assert recorder.stats.aggregated == 4

    # Another reason on the same pod is a group of its own.
    recorder.event(pod, NORMAL, "Killing", "Stopping container app")
    await settle(recorder)
    assert any(e["reason"] == "Killing" and e["count"] == 1 for e in events(cp))


async def test_spam_filter_limits_events_per_object(cp, admin, recorder, clock, node_client):
    noisy = await make_pod(admin, "noisy")
    quiet = await make_pod(admin, "quiet")
    for _ in range(40):
        recorder.event(noisy, WARNING, "Unhealthy", "Readiness probe failed: connection refused")
    recorder.event(quiet, NORMAL, "Started", "Started container app")
    await settle(recorder)
    [noisy_event] = [e for e in events(cp) if e["involvedObject"]["name"] == "noisy"]
    assert noisy_event["count"] == 25  # the burst; 15 filtered
    assert recorder.stats.spam_filtered == 15
    assert any(e["involvedObject"]["name"] == "quiet" for e in events(cp))  # its own bucket
    assert node_client.request_counts[("create", "events")] + node_client.request_counts[("patch", "events")] == 26

    clock.now += 300  # one token back every 5 minutes
    for _ in range(3):
        recorder.event(noisy, WARNING, "Unhealthy", "Readiness probe failed: connection refused")
    await settle(recorder)
    [noisy_event] = [e for e in events(cp) if e["involvedObject"]["name"] == "noisy"]
    # Filtered occurrences still count, as client-go's correlator counts them.
    assert noisy_event["count"] == 41
    assert recorder.stats.spam_filtered == 17


async def test_recording_never_blocks_during_an_outage(cp, admin, node_client, clock):
    recorder = ApiEventRecorder(node_client, node_name=NODE, host_ip="192.0.2.2", clock=clock,
                                queue_size=50, retry_interval=0.3)
    task = asyncio.create_task(recorder.run())
    try:
        pods = [{"metadata": {"name": f"p{i}", "namespace": "default", "uid": f"uid-{i}"}} for i in range(500)]
        await cp.stop_serving()
        try:
            started = time.monotonic()
            ticks = 0
            for pod in pods:
                recorder.event(pod, NORMAL, "Scheduled", "queued while the API is down")
                ticks += 1
            elapsed = time.monotonic() - started
            assert ticks == 500 and elapsed < 0.25, f"500 event() calls took {elapsed:.3f}s"
            await asyncio.sleep(0.5)  # the consumer is retrying the first event meanwhile
            assert recorder.stats.retries >= 1
            # The queue took 50 (the consumer had no turn during the burst); the rest were dropped.
            assert recorder.stats.queued == 50 and recorder.stats.dropped == 450
        finally:
            await cp.start_serving()
        await asyncio.wait_for(recorder.wait_idle(), 15)
        stored = events(cp)
        assert len(stored) == 50
        assert {e["involvedObject"]["name"] for e in stored} == {f"p{i}" for i in range(50)}
        assert recorder.stats.created == 50 and recorder.stats.gave_up == 0
    finally:
        task.cancel()
        await asyncio.wait([task])


async def test_rejected_and_unreachable_events_are_dropped(cp, admin, node_client, clock):
    recorder = ApiEventRecorder(node_client, node_name=NODE, host_ip="192.0.2.2", clock=clock,
                                max_tries=3, retry_interval=0.05)
    task = asyncio.create_task(recorder.run())
    try:
        ghost = {"metadata": {"name": "ghost", "namespace": "no-such-namespace", "uid": "u1"}}
        recorder.event(ghost, NORMAL, "Started", "in a namespace that does not exist")
        recorder.event({"metadata": {"name": "x", "namespace": "default"}}, "Fatal", "Bad", "not a type")
        await settle(recorder)
        assert recorder.stats.rejected == 1 and recorder.stats.invalid == 1

        await cp.stop_serving()
        try:
            recorder.node_event(WARNING, "NodeNotReady", "Node is not ready")
            await asyncio.wait_for(recorder.wait_idle(), 10)
            assert recorder.stats.gave_up == 1 and recorder.stats.retries == 2
        finally:
            await cp.start_serving()
        recorder.node_event(NORMAL, "NodeReady", "Node is ready")
        await settle(recorder)
        assert [e["reason"] for e in events(cp)] == ["NodeReady"]
        assert not task.done()  # run() survived every failure
    finally:
        task.cancel()
        await asyncio.wait([task])
