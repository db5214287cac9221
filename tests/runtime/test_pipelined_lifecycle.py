"""The runtime facts the pipelined pod start and the short teardown rest on, checked
against the real engine, and the Docker 20.10 network-exit guard (moby/moby#46661):
on an affected engine no two sandbox exits on one network ever overlap, and nothing
else waits for the guard."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time

import pytest

from runtime.docker import StartContainerError, has_network_exit_deadlock
from runtime.types import ContainerConfig, ContainerState, SandboxConfig, SandboxState

from .util import BUSYBOX, PAUSE, new_pod, run_container, run_sandbox, wait_exited


@pytest.mark.parametrize("version, affected", [
    ("20.10.24+dfsg1", True),   # Debian bookworm's docker.io
    ("20.10.26", True),
    ("20.10.27", False),        # moby/moby#46693
    ("23.0.0", False),
    ("24.0.7", False),
    ("27.3.1", False),
    ("19.03.15", True),
    ("not a version", True),    # unknown: guarded
    ("", True),
])
def test_which_engines_have_the_network_exit_deadlock(version, affected):
    assert has_network_exit_deadlock(version) is affected


def count_lists(runtime, monkeypatch) -> list:
    """Every ``docker ps`` the runtime makes from now on (its filters)."""
    calls: list = []
    real = runtime.engine.list_containers

    async def counted(what, filters):
        calls.append(filters)
        return await real(what, filters)

    monkeypatch.setattr(runtime.engine, "list_containers", counted)
    return calls


async def test_a_container_is_created_in_a_sandbox_that_is_not_running_yet(runtime):
    """What the pipelined start relies on: Docker resolves ``container:<id>``
    namespaces at start, so the app container is created while the pause starts;
    starting it before the pause runs fails."""
    pod = new_pod()
    sandbox_id = await runtime.create_pod_sandbox(SandboxConfig(pod=pod, attempt=0, hostname="web"), PAUSE)
    created = await runtime.sandbox_status(sandbox_id)
    assert created.state == SandboxState.NOTREADY
    app = await runtime.create_container(created, ContainerConfig(
        name="app", image=BUSYBOX, attempt=0, cmd=["sh", "-c", "readlink /proc/self/ns/net; sleep 30"]))
    with pytest.raises(StartContainerError):
        await runtime.start_container(app)

    await runtime.start_container(sandbox_id)
    running = await runtime.sandbox_status(sandbox_id)
    assert running.state == SandboxState.READY and running.netns_path
    # The failed early start left the container startable.
    await runtime.start_container(app)
    [status] = [c for c in await runtime.list_containers(pod.uid) if c.id == app]
    assert status.state == ContainerState.RUNNING
    # What the process inside sees: the pause's network namespace.
    expected = os.readlink(running.netns_path)
    for _ in range(50):
        logs = subprocess.run(["docker", "logs", app], capture_output=True, text=True, timeout=30).stdout
        if logs.strip():
            break
        await asyncio.sleep(0.1)
    assert logs.strip() == expected


async def test_list_pod_answers_sandboxes_and_containers_from_one_docker_ps(runtime, monkeypatch):
    sandbox = await run_sandbox(runtime)
    app = await run_container(runtime, sandbox, "app", "sleep 30")
    calls = count_lists(runtime, monkeypatch)
    sandboxes, containers = await runtime.list_pod(sandbox.pod.uid)
    assert [s.id for s in sandboxes] == [sandbox.id]
    assert [c.id for c in containers] == [app]
    assert len(calls) == 1


async def test_removing_a_sandbox_takes_one_list_and_its_containers_with_it(runtime, monkeypatch):
    sandbox = await run_sandbox(runtime)
    app = await run_container(runtime, sandbox, "app", "trap 'exit 0' TERM; while true; do sleep 1 & wait; done")
    await runtime.stop_container(app, 10)
    lists = count_lists(runtime, monkeypatch)
    await runtime.remove_pod_sandbox(sandbox.id)
    assert len(lists) == 1
    monkeypatch.undo()
    assert await runtime.list_pod(sandbox.pod.uid) == ([], [])


async def test_sandbox_exits_never_overlap_on_an_affected_engine(runtime, monkeypatch):
    """The guard that keeps the libnetwork deadlock from coming back: twelve pods
    torn down at once; every stop of a running pause (the moment it leaves Docker's
    "none" network) is timed, and no two of them overlap. The app containers' stops
    and all removals are not serialized."""
    version = (await runtime.engine.version()).get("Version", "")
    if not has_network_exit_deadlock(version):
        pytest.skip(f"Docker {version} has the libnetwork fix: no guard to check")
    sandboxes = [await run_sandbox(runtime) for _ in range(12)]
    apps = [await run_container(runtime, s, "app", "trap 'exit 0' TERM; while true; do sleep 1 & wait; done")
            for s in sandboxes]
    pause_ids = {s.id for s in sandboxes}
    intervals: dict[str, list[tuple[float, float]]] = {"pause": [], "app": []}
    real_stop = runtime.engine.stop_container

    async def timed_stop(what, container_id, grace):
        started = time.monotonic()
        try:
            return await real_stop(what, container_id, grace)
        finally:
            kind = "pause" if container_id in pause_ids else "app"
            intervals[kind].append((started, time.monotonic()))

    monkeypatch.setattr(runtime.engine, "stop_container", timed_stop)
    await asyncio.gather(*(runtime.stop_container(a, 10) for a in apps))
    await asyncio.gather(*(runtime.remove_pod_sandbox(s.id) for s in sandboxes))

    pauses = sorted(intervals["pause"])
    assert len(pauses) == 12
    for (_, end), (next_start, _) in zip(pauses, pauses[1:]):
        assert next_start >= end, "two sandboxes left the network at the same time"
    apps_sorted = sorted(intervals["app"])
    assert any(next_start < end for (_, end), (next_start, _) in zip(apps_sorted, apps_sorted[1:])), \
        "app container stops were serialized too"
    # Docker answers, and everything is gone.
    listed = await asyncio.wait_for(runtime.list_pod_sandboxes(), 10)
    assert not [s for s in listed if s.id in pause_ids]


async def test_a_stopped_sandbox_is_removed_without_waiting_for_the_guard(runtime):
    """Only a running pause leaves a network: removing a stopped one, and the app
    containers of any sandbox, never take the network-exit lock."""
    sandbox = await run_sandbox(runtime)
    app = await run_container(runtime, sandbox, "app", "sleep 30")
    await runtime.stop_pod_sandbox(sandbox.id, timeout=0)
    assert (await wait_exited(runtime, app)).state == ContainerState.EXITED
    other = await run_sandbox(runtime)
    member = await run_container(runtime, other, "app", "sleep 30")
    lock = runtime._network_exits.setdefault("none", asyncio.Lock())
    async with lock:  # as if another sandbox were leaving right now
        await asyncio.wait_for(runtime.remove_pod_sandbox(sandbox.id), 10)
        await asyncio.wait_for(runtime.remove_container(member), 10)
    assert await runtime.list_pod(sandbox.pod.uid) == ([], [])
    await runtime.remove_pod_sandbox(other.id)
