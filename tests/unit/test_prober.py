"""The probe workers' state machine and timing, with scripted check outcomes.

Probe durations run 50x faster (``time_scale``): a periodSeconds of 1 is 20 ms, so
the thresholds, delays and gating are exercised in real time without a fake clock.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import pytest

from nodeagent.backoff import Backoff
from nodeagent.kubelet.podactions import compute_pod_actions
from nodeagent.kubelet.podstatus import generate_pod_status
from nodeagent.prober import ProbeManager, ProbeType, Result
from nodeagent.prober.handlers import Outcome
from runtime.types import ContainerState, ContainerStatus, PodRef, SandboxState, SandboxStatus

SCALE = 0.02
UID = "uid-p"


def pod(container: dict, uid: str = UID, policy: str = "Always") -> dict:
    base = {"name": "app", "image": "busybox:1.35"}
    base.update(container)
    return {"metadata": {"name": "p", "namespace": "default", "uid": uid},
            "spec": {"containers": [base], "restartPolicy": policy}}


def status(cid: str | None, *, running=True, started=True, started_at: float | None = None,
           ip="10.0.0.5", phase="Running") -> dict:
    state = {"running": {"startedAt": time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_at or time.time() - 100))}} if running else \
        {"terminated": {"exitCode": 1}}
    cs = {"name": "app", "state": state, "started": started}
    if cid:
        cs["containerID"] = cid
    return {"phase": phase, "podIP": ip, "containerStatuses": [cs]}


class Script:
    """Outcomes per probe type, consumed in order (the last one repeats)."""

    def __init__(self, manager: ProbeManager) -> None:
        self.outcomes: dict[str, list[Result]] = defaultdict(lambda: [Result.SUCCESS])
        self.calls: list[tuple[str, str, float]] = []
        self.delay = 0.0
        manager.run_check = self.run_check  # type: ignore[method-assign]

    async def run_check(self, probe, target, timeout) -> Outcome:
        kind = probe["_kind"]
        self.calls.append((kind, target.container_id, time.monotonic()))
        if self.delay:
            await asyncio.sleep(self.delay)
        queue = self.outcomes[kind]
        result = queue.pop(0) if len(queue) > 1 else queue[0]
        return Outcome(result, f"{kind} said {result.value}")

    def count(self, kind: str) -> int:
        return sum(1 for c in self.calls if c[0] == kind)


def probe(kind: str, **timing) -> dict:
    return {"exec": {"command": ["true"]}, "_kind": kind, "periodSeconds": 1, **timing}


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def event(self, pod, type_, reason, message, *, field_path=None) -> None:
        self.seen.append((reason, message))


@pytest.fixture
async def manager():
    changes: list[str] = []
    events = Events()
    m = ProbeManager(runtime=None, events=events, on_change=changes.append, time_scale=SCALE)  # type: ignore[arg-type]
    m.changes = changes  # type: ignore[attr-defined]
    m.seen_events = events  # type: ignore[attr-defined]
    task = asyncio.create_task(m.run())
    await asyncio.sleep(0)
    yield m
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def running(cid: str, name: str = "app") -> ContainerStatus:
    return ContainerStatus(id=cid.removeprefix("docker://"), pod=PodRef("p", "default", UID), name=name,
                           attempt=0, state=ContainerState.RUNNING, image="busybox:1.35", image_id="",
                           created_at=100.0, started_at=100.0)


async def until(predicate, timeout=3.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


async def test_readiness_starts_unready_and_follows_thresholds(manager):
    script = Script(manager)
    script.outcomes["r"] = [Result.FAILURE, Result.SUCCESS, Result.SUCCESS] + [Result.FAILURE]
    p = pod({"readinessProbe": probe("r", successThreshold=2, failureThreshold=3)})
    manager.add_pod(p)
    c = running("docker://c1")
    assert manager.container_results(UID, [c]) == ({}, {"app": False})
    manager.on_status(UID, p, status("docker://c1"))
    # Success only after two successes in a row.
    await until(lambda: manager.container_results(UID, [c])[1]["app"])
    assert script.count("r") >= 3
    assert UID in manager.changes
    # Failure only after three failures in a row.
    at_ready = script.count("r")
    await until(lambda: not manager.container_results(UID, [c])[1]["app"])
    assert script.count("r") - at_ready >= 3
    # Each failed check is an Unhealthy event.
    assert ("Unhealthy", "Readiness probe failed: r said failure") in manager.seen_events.seen
    # Readiness never asks for a kill.
    assert manager.kills(UID) == {}


async def test_liveness_failure_requests_one_kill_and_holds_until_new_instance(manager):
    script = Script(manager)
    script.outcomes["l"] = [Result.FAILURE]
    p = pod({"livenessProbe": probe("l", failureThreshold=2, terminationGracePeriodSeconds=7)})
    manager.add_pod(p)
    manager.on_status(UID, p, status("docker://c1"))
    await until(lambda: manager.kills(UID))
    kill = manager.kills(UID)["c1"]
    assert kill.probe_type == ProbeType.LIVENESS and kill.grace == 7
    # On hold: no more checks against the condemned instance.
    count = script.count("l")
    assert count == 2
    await asyncio.sleep(5 * SCALE)
    assert script.count("l") == count
    # The restarted instance is probed afresh, starting alive.
    script.outcomes["l"] = [Result.SUCCESS]
    manager.on_status(UID, p, status("docker://c2"))
    await until(lambda: script.count("l") > count)
    assert manager.kills(UID) == {}
    assert manager.results.get(ProbeType.LIVENESS, "docker://c1") is None


async def test_startup_gates_liveness_and_readiness(manager):
    script = Script(manager)
    script.outcomes["s"] = [Result.FAILURE, Result.FAILURE, Result.SUCCESS]
    p = pod({"startupProbe": probe("s", failureThreshold=10), "livenessProbe": probe("l"),
             "readinessProbe": probe("r")})
    manager.add_pod(p)
    c = running("docker://c1")
    manager.on_status(UID, p, status("docker://c1", started=False))
    await until(lambda: manager.container_results(UID, [c])[0].get("app"))
    assert script.count("l") == 0 and script.count("r") == 0
    started_calls = script.count("s")
    # The kubelet publishes started=true; the startup probe stops, the others run,
    # readiness at once rather than at its next tick.
    manager.on_status(UID, p, status("docker://c1", started=True))
    await until(lambda: manager.container_results(UID, [c])[1].get("app"))
    await until(lambda: script.count("l") > 0)
    await asyncio.sleep(4 * SCALE)
    assert script.count("s") == started_calls


async def test_startup_failure_requests_a_kill(manager):
    script = Script(manager)
    script.outcomes["s"] = [Result.FAILURE]
    p = pod({"startupProbe": probe("s", failureThreshold=3)})
    manager.add_pod(p)
    manager.on_status(UID, p, status("docker://c1", started=False))
    await until(lambda: manager.kills(UID))
    assert manager.kills(UID)["c1"].probe_type == ProbeType.STARTUP
    assert script.count("s") == 3


async def test_initial_delay_counts_from_container_start(manager):
    script = Script(manager)
    p = pod({"readinessProbe": probe("r", initialDelaySeconds=100)})  # 2 s scaled
    manager.add_pod(p)
    manager.on_status(UID, p, status("docker://c1", started_at=time.time()))
    await asyncio.sleep(20 * SCALE)
    assert script.count("r") == 0
    manager.on_status(UID, p, status("docker://c1", started_at=time.time() - 100))
    await until(lambda: script.count("r") > 0)


async def test_terminating_pod_is_never_killed_by_liveness(manager):
    script = Script(manager)
    script.outcomes["l"] = [Result.FAILURE]
    p = pod({"livenessProbe": probe("l", failureThreshold=1)})
    p["metadata"]["deletionTimestamp"] = "2030-01-01T00:00:00Z"
    manager.add_pod(p)
    manager.on_status(UID, p, status("docker://c1"))
    await asyncio.sleep(10 * SCALE)
    assert script.count("l") == 0 and manager.kills(UID) == {}


async def test_finished_pod_and_removed_pod_stop_their_workers(manager):
    Script(manager)
    p = pod({"readinessProbe": probe("r")}, policy="Never")
    manager.add_pod(p)
    manager.on_status(UID, p, status("docker://c1", running=False, phase="Failed"))
    await until(lambda: all(w.task.done() for w in manager.workers(UID)))
    other = pod({"readinessProbe": probe("r")}, uid="uid-q")
    manager.add_pod(other)
    assert manager.workers("uid-q")
    manager.remove_pod("uid-q")
    assert manager.workers("uid-q") == []


async def test_slow_checks_do_not_delay_other_workers(manager):
    """100 pods, each check takes 5 periods: every worker still ticks on time."""
    script = Script(manager)
    script.delay = 5 * SCALE
    for i in range(100):
        p = pod({"readinessProbe": probe("r")}, uid=f"u{i}")
        manager.add_pod(p)
        manager.on_status(f"u{i}", p, status(f"docker://c{i}"))
    await asyncio.sleep(25 * SCALE)
    per_container = defaultdict(int)
    for _kind, cid, _t in script.calls:
        per_container[cid] += 1
    assert len(per_container) == 100
    assert min(per_container.values()) >= 2
    samples = manager.take_lateness()
    assert samples and sorted(samples)[len(samples) // 2] < 0.05


async def test_results_follow_the_newest_running_instance(manager):
    Script(manager)
    p = pod({"readinessProbe": probe("r")})
    manager.add_pod(p)
    manager.on_status(UID, p, status("docker://c1"))
    c1 = running("docker://c1")
    await until(lambda: manager.container_results(UID, [c1])[1]["app"])
    c2 = running("docker://c2")
    c2.created_at = 200.0
    # A newer instance has no result yet: not ready, whatever c1 said.
    assert manager.container_results(UID, [c1, c2])[1] == {"app": False}


# --- the kubelet side of the contract ------------------------------------------------


def test_compute_pod_actions_kills_a_failed_liveness_instance():
    p = pod({})
    p["spec"]["terminationGracePeriodSeconds"] = 30
    sb = SandboxStatus(id="sb0", pod=PodRef("p", "default", UID), attempt=0, state=SandboxState.READY,
                       created_at=50.0)
    c = running("docker://c1")
    c.sandbox_id = "sb0"
    actions = compute_pod_actions(p, [sb], [c], Backoff(), 1000.0, probe_kills={"c1": ("liveness", 5)})
    assert len(actions.to_kill) == 1
    kill = actions.to_kill[0]
    assert (kill.container_id, kill.reason, kill.grace) == ("c1", "LivenessProbe", 5)
    assert kill.message == "Container app failed liveness probe, will be restarted"
    # The restart comes with the exit, through restart policy and back-off.
    assert actions.to_start == [] and not actions.kill_pod

    never = pod({}, policy="Never")
    actions = compute_pod_actions(never, [sb], [c], Backoff(), 1000.0, probe_kills={"c1": ("startup", None)})
    assert actions.to_kill[0].message == "Container app failed startup probe"


def test_status_started_and_ready_follow_probe_results():
    p = pod({"startupProbe": probe("s"), "readinessProbe": probe("r")})
    sb = SandboxStatus(id="sb0", pod=PodRef("p", "default", UID), attempt=0, state=SandboxState.READY,
                       created_at=50.0)
    c = running("docker://c1")

    def gen(startup, readiness):
        return generate_pod_status(p, [sb], [c], waiting={}, pod_ips=["10.0.0.5"], host_ips=["192.0.2.9"],
                                   previous=None, now=1000.0, start_time=None,
                                   readiness=readiness, startup=startup)

    s = gen({"app": False}, {"app": True})
    assert s["containerStatuses"][0]["started"] is False and s["containerStatuses"][0]["ready"] is False
    s = gen({"app": True}, {"app": False})
    assert s["containerStatuses"][0]["started"] is True and s["containerStatuses"][0]["ready"] is False
    conds = {c["type"]: c for c in s["conditions"]}
    assert conds["Ready"]["status"] == "False" and conds["ContainersReady"]["reason"] == "ContainersNotReady"
    s = gen({"app": True}, {"app": True})
    conds = {c["type"]: c["status"] for c in s["conditions"]}
    assert conds["Ready"] == "True" and conds["ContainersReady"] == "True"


def test_sidecar_startup_probe_gates_the_next_init_container():
    p = {"metadata": {"name": "p", "namespace": "default", "uid": UID},
         "spec": {"restartPolicy": "Always",
                  "initContainers": [{"name": "side", "image": "busybox:1.35", "restartPolicy": "Always",
                                      "startupProbe": probe("s")},
                                     {"name": "setup", "image": "busybox:1.35"}],
                  "containers": [{"name": "app", "image": "busybox:1.35"}]}}
    sb = SandboxStatus(id="sb0", pod=PodRef("p", "default", UID), attempt=0, state=SandboxState.READY,
                       created_at=50.0)
    side = running("docker://s1", name="side")
    side.sandbox_id, side.kind = "sb0", "sidecar"
    waiting = compute_pod_actions(p, [sb], [side], Backoff(), 1000.0, started={"side": False})
    assert waiting.to_start == []
    go = compute_pod_actions(p, [sb], [side], Backoff(), 1000.0, started={"side": True})
    assert [s.name for s in go.to_start] == ["setup"]
    # A failed liveness probe of a sidecar kills it too.
    killed = compute_pod_actions(p, [sb], [side], Backoff(), 1000.0, started={"side": True},
                                 probe_kills={"s1": ("liveness", None)})
    assert [(k.container_id, k.reason) for k in killed.to_kill] == [("s1", "LivenessProbe")]
