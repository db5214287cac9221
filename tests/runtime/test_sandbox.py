"""Pod sandboxes on real Docker: shared namespaces, labels, the pause process."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import pytest

from runtime import labels as L
from runtime.types import (
    ContainerConfig,
    ContainerState,
    NotFound,
    SandboxState,
)
from tests.runtime.util import (
    BUSYBOX,
    container_pid,
    new_pod,
    run_container,
    run_sandbox,
    wait_exited,
    wait_signal_disposition,
)

pytestmark = pytest.mark.docker


def _fetch_script(token: str, tries: int) -> str:
    return (
        f"for i in $(seq {tries}); do "
        f"wget -q -O - http://127.0.0.1:8080/ 2>/dev/null | grep -qx {token} && exit 0; "
        "sleep 0.05; done; exit 1"
    )


@pytest.mark.root  # reads other processes' /proc entries / cgroupfs
async def test_containers_share_the_sandbox_network(runtime):
    sandbox = await run_sandbox(runtime)
    assert sandbox.state == SandboxState.READY
    assert sandbox.netns_path == f"/proc/{sandbox.pid}/ns/net"
    # Network mode "none": the namespace holds only loopback until a plugin adds more.
    devices = Path(f"/proc/{sandbox.pid}/net/dev").read_text()
    assert [line.split(":")[0].strip() for line in devices.splitlines()[2:]] == ["lo"]

    token = uuid.uuid4().hex
    server = await run_container(
        runtime, sandbox, "server",
        f"mkdir -p /www && echo {token} > /www/index.html && "
        "exec httpd -f -p 127.0.0.1:8080 -h /www",
    )
    client = await run_container(runtime, sandbox, "client", _fetch_script(token, 200))
    status = await wait_exited(runtime, client)
    assert status.exit_code == 0, "the client did not get the server's bytes over 127.0.0.1"

    sandbox_netns = os.stat(sandbox.netns_path).st_ino
    assert os.stat(f"/proc/{await container_pid(runtime, server)}/ns/net").st_ino == sandbox_netns

    # Control: the same client in another pod's sandbox reaches nothing.
    other = await run_sandbox(runtime)
    stranger = await run_container(runtime, other, "client", _fetch_script(token, 10))
    assert (await wait_exited(runtime, stranger)).exit_code == 1


def _look_for(pattern: str, tries: int) -> str:
    return (
        f"for i in $(seq {tries}); do ps | grep -q '{pattern}' && exit 0; sleep 0.05; done; exit 1"
    )


async def test_share_process_namespace(runtime):
    shared = await run_sandbox(runtime, share_process_namespace=True)
    await run_container(runtime, shared, "sleeper", "exec sleep 4321")
    # [s]leep keeps grep from matching its own command line.
    looker = await run_container(
        runtime, shared, "looker",
        "grep -q pause /proc/1/cmdline || exit 2; " + _look_for("[s]leep 4321", 200),
    )
    assert (await wait_exited(runtime, looker)).exit_code == 0

    separate = await run_sandbox(runtime)
    await run_container(runtime, separate, "sleeper", "exec sleep 4322")
    blind = await run_container(runtime, separate, "looker", _look_for("[s]leep 4322", 10))
    assert (await wait_exited(runtime, blind)).exit_code == 1


@pytest.mark.root  # reads other processes' /proc entries / cgroupfs
async def test_host_network_sandbox_uses_the_host_namespace(runtime):
    sandbox = await run_sandbox(runtime, host_network=True, hostname="ignored")
    assert sandbox.host_network is True
    assert sandbox.state == SandboxState.READY
    assert os.stat(sandbox.netns_path).st_ino == os.stat("/proc/self/ns/net").st_ino


async def test_state_is_rebuilt_from_labels_by_a_fresh_instance(runtime, node_name, make_runtime):
    pod = new_pod("api", "team-a")
    pod_labels = {"app": "api", "tier": "backend"}
    annotations = {"kubernetes.io/config.source": "file", "note": "a b=c, \"quoted\""}
    sandbox = await run_sandbox(runtime, pod, attempt=2, labels=pod_labels,
                                annotations=annotations, share_process_namespace=True)
    extra = {"io.kubernetes.pod.terminationGracePeriod": "7",
             "io.kubernetes.container.restartCount": "3"}
    container_id = await runtime.create_container(
        sandbox,
        ContainerConfig(name="main", image=BUSYBOX, attempt=3, cmd=["sleep", "60"],
                        spec_hash="abc123", kind="sidecar", labels=extra),
    )
    await runtime.start_container(container_id)

    fresh = make_runtime(node_name)
    [s] = await fresh.list_pod_sandboxes(pod.uid)
    assert (s.id, s.pod, s.attempt, s.state) == (sandbox.id, pod, 2, SandboxState.READY)
    assert (s.labels, s.annotations, s.host_network) == (pod_labels, annotations, False)
    assert s.netns_path == sandbox.netns_path
    [c] = await fresh.list_containers(pod.uid)
    assert (c.id, c.pod, c.name, c.attempt, c.state) == (
        container_id, pod, "main", 3, ContainerState.RUNNING)
    assert (c.spec_hash, c.kind, c.sandbox_id, c.image) == ("abc123", "sidecar", sandbox.id, BUSYBOX)
    assert extra.items() <= c.labels.items()
    assert c.container_id == f"docker://{container_id}"
    assert container_id in {x.id for x in await fresh.list_containers()}
    assert sandbox.id in {x.id for x in await fresh.list_pod_sandboxes()}

    # What is on the Docker objects themselves.
    raw_sandbox = await runtime.engine.call("inspect", "GET", f"containers/{sandbox.id}/json")
    raw = await runtime.engine.call("inspect", "GET", f"containers/{container_id}/json")
    assert raw_sandbox["Name"] == f"/k8s_POD_api_team-a_{pod.uid}_2"
    assert raw["Name"] == f"/k8s_main_api_team-a_{pod.uid}_3"
    sandbox_labels = raw_sandbox["Config"]["Labels"]
    assert {k: sandbox_labels[k] for k in (L.POD_NAME, L.POD_NAMESPACE, L.POD_UID,
                                           L.CONTAINER_NAME, L.DOCKER_TYPE, L.ATTEMPT,
                                           L.NODE, L.SHARE_PID)} == {
        L.POD_NAME: "api", L.POD_NAMESPACE: "team-a", L.POD_UID: pod.uid,
        L.CONTAINER_NAME: "POD", L.DOCKER_TYPE: "podsandbox", L.ATTEMPT: "2",
        L.NODE: node_name, L.SHARE_PID: "true"}
    container_labels = raw["Config"]["Labels"]
    assert {k: container_labels[k] for k in (L.CONTAINER_NAME, L.DOCKER_TYPE, L.ATTEMPT,
                                             L.SPEC_HASH, L.SANDBOX_ID, L.KIND, L.NODE)} == {
        L.CONTAINER_NAME: "main", L.DOCKER_TYPE: "container", L.ATTEMPT: "3",
        L.SPEC_HASH: "abc123", L.SANDBOX_ID: sandbox.id, L.KIND: "sidecar", L.NODE: node_name}
    host_config = raw["HostConfig"]
    join = f"container:{sandbox.id}"
    assert (host_config["NetworkMode"], host_config["IpcMode"], host_config["PidMode"]) == (
        join, join, join)
    assert (raw_sandbox["HostConfig"]["IpcMode"], raw_sandbox["HostConfig"]["NetworkMode"]) == (
        "shareable", "none")
    assert raw_sandbox["Config"]["Hostname"] == "api"

    # Another node on the same engine sees none of it.
    stranger = make_runtime()
    assert await stranger.list_pod_sandboxes() == []
    assert await stranger.list_containers() == []
    with pytest.raises(NotFound):
        await stranger.container_status(container_id)


async def test_pause_reaps_orphans_and_exits_0_on_sigterm(runtime):
    sandbox = await run_sandbox(runtime, share_process_namespace=True)
    # The orphaned `sleep 1` is reparented to PID 1 (pause); once it exits, only a
    # reaping PID 1 makes /proc/<pid> disappear (a zombie keeps it).
    script = (
        "mkdir -p /tmp; ( sleep 1 & echo $! > /tmp/orphan ); p=$(cat /tmp/orphan); "
        "[ \"$(awk '{print $4}' /proc/$p/stat)\" = 1 ] || exit 11; "
        "sleep 2.5; [ -e /proc/$p ] && exit 12; exit 0"
    )
    reaper_check = await run_container(runtime, sandbox, "check", script)
    assert (await wait_exited(runtime, reaper_check)).exit_code == 0

    started = time.monotonic()
    await runtime.stop_pod_sandbox(sandbox.id, timeout=10)
    assert time.monotonic() - started < 3, "pause did not exit on SIGTERM (it was SIGKILLed?)"
    pause = await runtime.container_status(sandbox.id)
    assert (pause.name, pause.state, pause.exit_code) == ("POD", ContainerState.EXITED, 0)


async def test_stop_and_remove_sandbox_take_its_containers(runtime):
    pod = new_pod()
    sandbox = await run_sandbox(runtime, pod)
    member = await run_container(runtime, sandbox, "app",
                                 'trap "exit 0" TERM; while true; do sleep 0.1; done')
    await wait_signal_disposition(runtime, member, signal.SIGTERM)
    await runtime.stop_pod_sandbox(sandbox.id, timeout=10)
    [s] = await runtime.list_pod_sandboxes(pod.uid)
    assert (s.state, s.netns_path, s.pid) == (SandboxState.NOTREADY, None, None)
    [c] = await runtime.list_containers(pod.uid)
    assert (c.state, c.exit_code) == (ContainerState.EXITED, 0)

    await runtime.remove_pod_sandbox(sandbox.id)
    assert await runtime.list_pod_sandboxes(pod.uid) == []
    assert await runtime.list_containers(pod.uid) == []
    with pytest.raises(NotFound):
        await runtime.remove_pod_sandbox(sandbox.id)

