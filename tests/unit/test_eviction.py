"""Eviction: threshold syntax, kubelet's ranking per resource, and the manager's
rounds (conditions with the transition period, reclaim before evicting, one pod per
round, static pods never, kubelet's message)."""

from __future__ import annotations

import pytest

from nodeagent.eviction import EvictionManager, parse_thresholds
from nodeagent.eviction.ranking import (EPHEMERAL_STORAGE, MEMORY, PIDS, ContainerUsage, PodUsageStats,
                                        eviction_message, rank)
from nodeagent.eviction.signals import Observation, observe
from nodeagent.eviction.thresholds import DEFAULT_EVICTION_HARD

Mi = 1 << 20


def test_parse_thresholds():
    ts = {t.signal: t for t in parse_thresholds(DEFAULT_EVICTION_HARD)}
    assert ts["memory.available"].quantity == 100 * Mi
    assert ts["nodefs.available"].percentage == pytest.approx(0.10)
    assert ts["imagefs.available"].percentage == pytest.approx(0.15)
    assert ts["memory.available"].met(99 * Mi, 1000 * Mi) and not ts["memory.available"].met(100 * Mi, 1000 * Mi)
    assert ts["nodefs.available"].met(9, 100) and not ts["nodefs.available"].met(10, 100)
    assert ts["memory.available"].describe() == "100Mi" and ts["nodefs.available"].describe() == "10%"
    assert parse_thresholds("") == []


@pytest.mark.parametrize("text, message", [
    ("memory.available", "SIGNAL<QUANTITY"),
    ("memory.used<1Gi", "unknown signal"),
    ("memory.available<lots", "memory.available<lots"),
    ("nodefs.available<150%", "percentage"),
    ("memory.available<1Gi,memory.available<2Gi", "twice"),
])
def test_bad_thresholds_name_the_item(text, message):
    with pytest.raises(ValueError, match=message):
        parse_thresholds(text)


def test_observe_reads_every_signal(tmp_path):
    obs = observe(str(tmp_path), None)
    assert set(obs) == {"memory.available", "pid.available", "nodefs.available", "nodefs.inodesFree",
                        "imagefs.available", "imagefs.inodesFree"}
    assert all(0 <= o.available <= o.capacity for o in obs.values())


def pod(name, *, priority=0, requests=None, static=False, phase="Running", containers=("app",)):
    meta = {"name": name, "namespace": "default", "uid": f"uid-{name}", "annotations": {}}
    if static:
        meta["annotations"]["kubernetes.io/config.source"] = "file"
    return {"metadata": meta, "status": {"phase": phase},
            "spec": {"priority": priority, "containers": [
                {"name": c, "resources": {"requests": requests or {}}} for c in containers]}}


def usage(**per_pod):
    return {f"uid-{name}": PodUsageStats(containers={"app": ContainerUsage(memory=m * Mi, disk=m * Mi, processes=m)})
            for name, m in per_pod.items()}


def test_memory_ranking_over_requests_then_priority_then_usage():
    pods = [pod("guaranteed", requests={"memory": "500Mi"}), pod("besteffort-small"),
            pod("besteffort-big"), pod("important", priority=1000), pod("static", static=True),
            pod("critical", priority=2_000_000_000)]
    stats = usage(guaranteed=100, **{"besteffort-small": 10, "besteffort-big": 50, "important": 300,
                                     "static": 900, "critical": 900})
    names = [p["metadata"]["name"] for p in rank(pods, stats, MEMORY)]
    # Over their request (0) first, lower priority first, then most usage above request;
    # the pod within its request last; static and system-critical pods never.
    assert names == ["besteffort-big", "besteffort-small", "important", "guaranteed"]


def test_pid_ranking_priority_then_processes():
    pods = [pod("a"), pod("b"), pod("c", priority=-5)]
    names = [p["metadata"]["name"] for p in rank(pods, usage(a=3, b=30, c=1), PIDS)]
    assert names == ["c", "b", "a"]


def test_message_names_resource_threshold_and_containers():
    p = pod("web", requests={"ephemeral-storage": "10Mi"}, containers=("app", "idle"))
    stats = PodUsageStats(containers={"app": ContainerUsage(disk=50 * Mi), "idle": ContainerUsage(disk=0)})
    message = eviction_message(p, stats, EPHEMERAL_STORAGE, "10%", "1024Ki")
    assert message == ("The node was low on resource: ephemeral-storage. Threshold quantity: 10%, "
                       "available: 1024Ki. Container app was using 50Mi, request is 10Mi, has larger "
                       "consumption of ephemeral-storage.")


class FakeUsage:
    def __init__(self, stats):
        self.stats = stats
        self.asked: list[str] = []

    async def usage(self, pods, resource):
        self.asked.append(resource)
        return self.stats


class Clock:
    now = 100.0

    def __call__(self):
        return self.now


def manager(observations, pods, stats, *, thresholds="memory.available<100Mi,nodefs.available<10%",
            reclaim=None):
    evicted: list[tuple[str, str]] = []
    events: list[tuple[str, str, str]] = []
    clock = Clock()
    m = EvictionManager(parse_thresholds(thresholds), observe=lambda: dict(observations),
                        pods=lambda: pods, usage=FakeUsage(stats),
                        evict=lambda p, msg: evicted.append((p["metadata"]["name"], msg)),
                        reclaim=reclaim, node_event=lambda *e: events.append(e),
                        period=1, transition_period=300, clock=clock)
    return m, evicted, events, clock


async def test_memory_pressure_evicts_one_pod_per_round_and_sets_the_condition():
    obs = {"memory.available": Observation(50 * Mi, 1000 * Mi), "nodefs.available": Observation(50, 100)}
    pods = [pod("a"), pod("b"), pod("s", static=True), pod("done", phase="Succeeded")]
    m, evicted, events, clock = manager(obs, pods, usage(a=10, b=20, s=500, done=900))
    assert await m.synchronize() == "uid-b"
    assert [e[0] for e in evicted] == ["b"]
    assert evicted[0][1].startswith("The node was low on resource: memory. Threshold quantity: 100Mi, "
                                    "available: 51200Ki. Container app was using 20Mi")
    assert ("Warning", "EvictionThresholdMet", "Attempting to reclaim memory") in events
    conds = {c["type"]: c for c in m.conditions()}
    assert conds["MemoryPressure"]["status"] == "True"
    assert conds["MemoryPressure"]["reason"] == "KubeletHasInsufficientMemory"
    assert conds["DiskPressure"]["status"] == "False" and conds["PIDPressure"]["status"] == "False"
    assert any("memory.available available 51200Ki < 100Mi" in line for line in m.describe())
    # Pressure gone: the condition stays for the transition period, then clears.
    obs["memory.available"] = Observation(900 * Mi, 1000 * Mi)
    assert await m.synchronize() is None
    assert {c["type"]: c["status"] for c in m.conditions()}["MemoryPressure"] == "True"
    clock.now += 301
    assert {c["type"]: c["status"] for c in m.conditions()}["MemoryPressure"] == "False"


async def test_disk_pressure_reclaims_first_and_only_then_evicts():
    obs = {"memory.available": Observation(900 * Mi, 1000 * Mi), "nodefs.available": Observation(5, 100)}
    calls = []

    async def reclaim_enough():
        calls.append("reclaim")
        obs["nodefs.available"] = Observation(50, 100)

    m, evicted, _, _ = manager(obs, [pod("a")], usage(a=10), reclaim=reclaim_enough)
    assert await m.synchronize() is None
    assert calls == ["reclaim"] and evicted == []
    assert {c["type"]: c["status"] for c in m.conditions()}["DiskPressure"] == "True"

    obs["nodefs.available"] = Observation(5, 100)

    async def reclaim_nothing():
        calls.append("reclaim")

    m, evicted, _, _ = manager(obs, [pod("a")], usage(a=10), reclaim=reclaim_nothing)
    assert await m.synchronize() == "uid-a"
    assert "ephemeral-storage" in evicted[0][1]


async def test_only_critical_pods_left_means_no_eviction():
    obs = {"memory.available": Observation(1, 1000 * Mi)}
    m, evicted, _, _ = manager(obs, [pod("s", static=True)], usage(s=10))
    assert await m.synchronize() is None and evicted == []


def test_admission_under_pressure():
    from nodeagent.eviction.admission import admit_under_pressure

    besteffort = pod("be")
    burstable = pod("bu", requests={"memory": "10Mi"})
    tolerant = pod("tol")
    tolerant["spec"]["tolerations"] = [{"key": "node.kubernetes.io/memory-pressure", "operator": "Exists",
                                        "effect": "NoSchedule"}]
    assert admit_under_pressure(besteffort, set()) is None
    assert admit_under_pressure(besteffort, {"MemoryPressure"}) == (
        "Evicted", "The node had condition: [MemoryPressure]. ")
    assert admit_under_pressure(burstable, {"MemoryPressure"}) is None
    assert admit_under_pressure(tolerant, {"MemoryPressure"}) is None
    assert admit_under_pressure(burstable, {"DiskPressure"})[0] == "Evicted"
    assert admit_under_pressure(pod("s", static=True), {"DiskPressure", "PIDPressure"}) is None
