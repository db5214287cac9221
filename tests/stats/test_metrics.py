"""The agent's own metrics: each hook point reports what happened under kubelet's
names, and a broken observer or scrape source never breaks the component."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nodeagent.kubelet.events import WARNING, RecentEvents
from nodeagent.kubelet.pleg import PLEG
from nodeagent.kubelet.podworkers import PodWorkers
from nodeagent.metrics import AgentMetrics, gauge
from nodeagent.server.page import StatusPage
from runtime.docker import _observed
from runtime.types import (ContainerState, ContainerStatus, NotFound, PodRef, SandboxState,
                           SandboxStatus)


def families(m: AgentMetrics, registry=None) -> dict:
    text = generate_latest(registry or m.registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict, name: str, suffix: str = "", **labels) -> float:
    fam = fams[name]
    for s in fam.samples:
        if s.name == name + suffix and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise AssertionError(f"no sample {name}{suffix} {labels}")


async def test_runtime_observer_counts_calls_errors_and_never_breaks_calls():
    m = AgentMetrics()

    class Fake:
        observer = m.runtime_operation

        @_observed("start_container")
        async def start(self, fail: bool) -> str:
            if fail:
                raise NotFound("gone")
            return "ok"

    fake = Fake()
    assert await fake.start(False) == "ok"
    with pytest.raises(NotFound):
        await fake.start(True)
    f = families(m)
    assert value(f, "kubelet_runtime_operations", "_total", operation_type="start_container") == 2
    assert value(f, "kubelet_runtime_operations_errors", "_total", operation_type="start_container") == 1
    assert value(f, "kubelet_runtime_operations_duration_seconds", "_count", operation_type="start_container") == 2

    def broken(*args):
        raise RuntimeError("observer bug")

    fake.observer = broken
    assert await fake.start(False) == "ok"


class _Runtime:
    async def list_pod_sandboxes(self):
        pod = PodRef("p", "ns", "u1")
        return [SandboxStatus("s1", pod, 0, SandboxState.READY, 0.0)]

    async def list_containers(self):
        pod = PodRef("p", "ns", "u1")
        return [ContainerStatus("c1", pod, "a", 0, ContainerState.RUNNING, "i", "d", 0.0),
                ContainerStatus("c2", pod, "b", 0, ContainerState.EXITED, "i", "d", 0.0, exit_code=1)]


async def test_pleg_relist_duration_and_counts():
    m = AgentMetrics()
    pleg = PLEG(_Runtime(), on_pod_event=lambda uid: None, on_relist=lambda uids: None)
    pleg.observer = m.pleg_relist
    await pleg.relist()
    assert pleg.container_counts() == (1, {"running": 1, "exited": 1})
    assert value(families(m), "kubelet_pleg_relist_duration_seconds", "_count") == 1


async def test_pod_worker_durations_by_operation():
    m = AgentMetrics()

    class Syncer:
        async def sync_pod(self, pod):
            return None

        async def terminate_pod(self, uid, pod):
            return None

    workers = PodWorkers(Syncer())
    workers.observer = m.pod_worker
    task = asyncio.create_task(workers.run())
    pod = {"metadata": {"uid": "u1", "name": "p"}}
    workers.update(pod)
    await asyncio.sleep(0.1)
    workers.remove("u1", pod)
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    f = families(m)
    assert value(f, "kubelet_pod_worker_duration_seconds", "_count", operation_type="sync") == 1
    assert value(f, "kubelet_pod_worker_duration_seconds", "_count", operation_type="kill") == 1


def test_pod_start_duration_once_per_pod_and_probe_hook():
    m = AgentMetrics()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 3))
    m.pod_status("u1", {"phase": "Pending", "startTime": started})
    m.pod_status("u1", {"phase": "Running", "startTime": started})
    m.pod_status("u1", {"phase": "Running", "startTime": started})
    f = families(m)
    assert value(f, "kubelet_pod_start_duration_seconds", "_count") == 1
    assert 2.0 <= value(f, "kubelet_pod_start_duration_seconds", "_sum") <= 10.0
    m.probe_result("Readiness", "successful", "app", "web", "default")
    p = families(m, m.probe_registry)
    assert value(p, "prober_probe", "_total", probe_type="Readiness", result="successful", pod="web") == 1


def test_api_proxy_hooks_and_failing_scrape_source():
    m = AgentMetrics()
    m.api_request("PATCH", "pods/status", "200", 0.01)
    m.watch_event("pods", "MODIFIED")
    m.proxy_sync(0.2, True, None)
    m.proxy_sync(0.1, False, None)
    m.proxy_sync(0.1, False, OSError("netlink"))

    def broken():
        raise RuntimeError("source bug")

    def fine():
        g = gauge("kubelet_running_pods", "n")
        g.add_metric([], 3)
        return [g]

    m.add_source(broken)
    m.add_source(fine)
    f = families(m)
    assert value(f, "rest_client_requests", "_total", code="200", method="PATCH", resource="pods/status") == 1
    assert value(f, "nodeagent_watch_events", "_total", resource="pods", type="MODIFIED") == 1
    assert value(f, "kubeproxy_sync_proxy_rules_duration_seconds", "_count") == 2
    assert value(f, "kubeproxy_sync_full_proxy_rules_duration_seconds", "_count") == 1
    assert value(f, "kubeproxy_sync_proxy_rules_nftables_sync_failures", "_total") == 1
    assert value(f, "kubelet_running_pods") == 3


def test_recent_warnings_reach_the_page_escaped():
    seen = []

    class Inner:
        def event(self, pod, type_, reason, message, *, field_path=None):
            seen.append(reason)

    events = RecentEvents(Inner(), keep=2)
    pod = {"metadata": {"name": "web", "namespace": "shop"}}
    events.event(pod, "Normal", "Pulled", "ok")
    for i in range(3):
        events.event(pod, WARNING, "BackOff", f"<b>restart {i}</b>")
    assert seen == ["Pulled", "BackOff", "BackOff", "BackOff"]
    assert [w["message"] for w in events.warnings] == ["<b>restart 1</b>", "<b>restart 2</b>"]
    page = StatusPage(node_name="n1", version="0", mode="cluster", pods=lambda: [], sampler=None,
                      checks={"ping": lambda: (False, "down")}, warnings=lambda: list(events.warnings))
    html = page.render(refresh=7)
    assert '<meta http-equiv="refresh" content="7">' in html
    assert "&lt;b&gt;restart 2&lt;/b&gt;" in html and "<b>restart" not in html
    assert "shop/web" in html and "failing" in html and "cluster mode" in html
