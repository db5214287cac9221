"""Container lifecycle on real Docker: states, exit codes, OOM, stop, idempotent create."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from pathlib import Path

import pytest

from runtime import labels as L
from nodeagent.stats.cgroups import CgroupGone, CgroupReader


def read_container_stats(container_id: str, **kwargs):
    return CgroupReader().read(container_id, **kwargs)
from runtime.docker import StartContainerError, container_name
from runtime.types import (
    ContainerConfig,
    ContainerState,
    CreateContainerError,
    NotFound,
    Resources,
    RuntimeError_,
)
from tests.runtime.util import (
    BUSYBOX,
    container_pid,
    eventually,
    run_container,
    run_sandbox,
    wait_exited,
    wait_signal_disposition,
)

pytestmark = pytest.mark.docker

MiB = 1024 * 1024


async def test_exit_codes_and_times(runtime):
    sandbox = await run_sandbox(runtime)
    failing = await run_container(runtime, sandbox, "failing", "sleep 0.3; exit 3")
    succeeding = await run_container(runtime, sandbox, "ok", "exit 0")

    status = await wait_exited(runtime, failing)
    assert (status.state, status.exit_code, status.oom_killed, status.error) == (
        ContainerState.EXITED, 3, False, "")
    assert status.created_at <= status.started_at < status.finished_at
    assert 0.25 <= status.finished_at - status.started_at < 5
    assert abs(status.finished_at - time.time()) < 60
    assert status.image == BUSYBOX
    assert status.image_id.startswith("docker://sha256:")  # imported: no RepoDigests
    assert (await wait_exited(runtime, succeeding)).exit_code == 0

    listed = {c.id: c for c in await runtime.list_containers(sandbox.pod.uid)}
    assert listed[failing] == status


async def test_created_but_never_started(runtime):
    sandbox = await run_sandbox(runtime)
    container_id = await runtime.create_container(
        sandbox, ContainerConfig(name="idle", image=BUSYBOX, attempt=0, cmd=["true"]))
    status = await runtime.container_status(container_id)
    assert (status.state, status.started_at, status.finished_at, status.exit_code) == (
        ContainerState.CREATED, None, None, None)
    [listed] = await runtime.list_containers(sandbox.pod.uid)
    assert listed.state == ContainerState.CREATED


async def test_a_command_that_cannot_run_leaves_the_error_on_the_container(runtime):
    sandbox = await run_sandbox(runtime)
    container_id = await runtime.create_container(
        sandbox, ContainerConfig(name="bad", image=BUSYBOX, attempt=0, entrypoint=["/no/such/binary"]))
    with pytest.raises(StartContainerError) as raised:
        await runtime.start_container(container_id)
    assert isinstance(raised.value, RuntimeError_)
    assert not isinstance(raised.value, CreateContainerError)
    assert "/no/such/binary" in str(raised.value)

    [status] = await runtime.list_containers(sandbox.pod.uid)
    assert status.state == ContainerState.EXITED
    assert status.exit_code not in (None, 0)
    assert "no such file or directory" in status.error
    assert status.started_at == status.finished_at == status.created_at


async def test_engine_refusals_on_create(runtime):
    sandbox = await run_sandbox(runtime)
    with pytest.raises(CreateContainerError, match="absent"):
        await runtime.create_container(sandbox, ContainerConfig(
            name="noimage", image="nodeagent-test/absent:1", attempt=0))
    with pytest.raises(CreateContainerError, match="[Mm]emory"):
        await runtime.create_container(sandbox, ContainerConfig(
            name="tiny", image=BUSYBOX, attempt=0, resources=Resources(memory_limit=4096)))
    with pytest.raises(CreateContainerError, match="kind"):
        await runtime.create_container(sandbox, ContainerConfig(
            name="odd", image=BUSYBOX, attempt=0, kind="ephemeral"))


@pytest.mark.root  # reads other processes' /proc entries / cgroupfs
async def test_config_reaches_the_container(runtime):
    sandbox = await run_sandbox(runtime, hostname="cfg-pod", dns_servers=["10.96.0.10"],
                                dns_searches=["default.svc.cluster.local"])
    config = ContainerConfig(
        name="cfg", image=BUSYBOX, attempt=0,
        entrypoint=["sh", "-c"],
        cmd=['echo "$GREETING $(hostname) $(id -g)" > /work/tmp; mv /work/tmp /work/out; sleep 60'],
        env={"GREETING": "hello world", "B": "2"}, working_dir="/work",
        stop_signal="SIGUSR1", run_as_user=0, run_as_group=1234, tty=True, stdin=True,
        resources=Resources(cpu_shares=512, cpu_quota=50000, cpu_period=100000,
                            memory_limit=64 * MiB, oom_score_adj=500),
        labels={"io.kubernetes.pod.terminationGracePeriod": "12"},
    )
    container_id = await runtime.create_container(sandbox, config)
    raw = await runtime.engine.call("inspect", "GET", f"containers/{container_id}/json")
    cfg, host = raw["Config"], raw["HostConfig"]
    assert (cfg["Entrypoint"], cfg["Cmd"]) == (config.entrypoint, config.cmd)
    assert {"GREETING=hello world", "B=2"} <= set(cfg["Env"])
    assert (cfg["WorkingDir"], cfg["StopSignal"], cfg["User"]) == ("/work", "SIGUSR1", "0:1234")
    assert (cfg["Tty"], cfg["OpenStdin"]) == (True, True)
    assert cfg["Labels"]["io.kubernetes.pod.terminationGracePeriod"] == "12"
    assert (host["CpuShares"], host["CpuQuota"], host["CpuPeriod"]) == (512, 50000, 100000)
    assert (host["Memory"], host["MemorySwap"], host["OomScoreAdj"]) == (64 * MiB, 64 * MiB, 500)
    assert host["PidMode"] == ""  # the sandbox does not share its PID namespace
    await runtime.start_container(container_id)
    pid = await container_pid(runtime, container_id)
    out = await eventually(lambda: asyncio.to_thread(_read, f"/proc/{pid}/root/work/out"),
                           lambda text: text is not None, what="output file")
    assert out == "hello world cfg-pod 1234\n"
    resolv = await asyncio.to_thread(_read, f"/proc/{pid}/root/etc/resolv.conf")
    assert "nameserver 10.96.0.10" in resolv and "search default.svc.cluster.local" in resolv


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


async def test_image_defaults_when_entrypoint_and_cmd_are_unset(runtime):
    sandbox = await run_sandbox(runtime)
    # busybox:1.35 has neither ENTRYPOINT nor CMD; the pause image has ENTRYPOINT /pause.
    container_id = await runtime.create_container(
        sandbox, ContainerConfig(name="dflt", image="nodeagent/pause:1", attempt=0,
                                 entrypoint=[], cmd=None))
    raw = await runtime.engine.call("inspect", "GET", f"containers/{container_id}/json")
    assert raw["Config"]["Entrypoint"] == ["/pause"]


async def test_oom_killed(runtime):
    sandbox = await run_sandbox(runtime)
    hungry = await run_container(
        runtime, sandbox, "hungry",
        "exec awk 'BEGIN{s=\"xxxxxxxx\"; while(1) s=s s}'",
        resources=Resources(memory_limit=16 * MiB),
    )
    status = await wait_exited(runtime, hungry, timeout=30)
    assert (status.oom_killed, status.exit_code) == (True, 137)


async def test_stop_with_grace(runtime, node_name, make_runtime):
    # call_timeout 1 s, stops of 2 s: a stop's deadline is its grace plus a margin.
    short = make_runtime(node_name, call_timeout=1.0)
    sandbox = await run_sandbox(runtime)
    polite = await run_container(runtime, sandbox, "polite",
                                 'trap "exit 0" TERM; while true; do sleep 0.1; done')
    stubborn = await run_container(runtime, sandbox, "stubborn",
                                   'trap "" TERM; while true; do sleep 0.1; done')
    own_signal = await run_container(runtime, sandbox, "usr1",
                                     'trap "exit 5" USR1; while true; do sleep 0.1; done',
                                     stop_signal="SIGUSR1")
    await wait_signal_disposition(runtime, polite, signal.SIGTERM)
    await wait_signal_disposition(runtime, stubborn, signal.SIGTERM, ignored=True)
    await wait_signal_disposition(runtime, own_signal, signal.SIGUSR1)

    async def timed(coro) -> float:
        started = time.monotonic()
        await coro
        return time.monotonic() - started

    async def list_while_stopping() -> float:
        await asyncio.sleep(0.5)  # the stubborn stop is waiting on Docker now
        return await timed(short.list_containers())

    results = await asyncio.gather(
        timed(short.stop_container(polite, 10)),
        timed(short.stop_container(stubborn, 2)),
        timed(short.stop_container(own_signal, 10)),
        list_while_stopping(),
    )
    polite_s, stubborn_s, own_s, list_s = results
    assert polite_s < 1.5 and own_s < 1.5
    assert 2.0 <= stubborn_s < 3.5
    assert list_s < 0.9, "a list waited behind a pending stop"
    codes = {cid: (await runtime.container_status(cid)).exit_code
             for cid in (polite, stubborn, own_signal)}
    assert codes == {polite: 0, stubborn: 137, own_signal: 5}

    # Idempotent on stopped containers; NotFound for missing ones.
    assert await timed(short.stop_container(stubborn, 10)) < 0.5
    with pytest.raises(NotFound):
        await short.stop_container("0" * 64, 1)


async def test_create_replaces_a_stale_container_of_the_same_name(runtime, make_runtime):
    sandbox = await run_sandbox(runtime)
    config = ContainerConfig(name="app", image=BUSYBOX, attempt=0, cmd=["sleep", "60"])
    # As if the agent died between create and start, then retried the same attempt.
    stale = await runtime.create_container(sandbox, config)
    fresh = await runtime.create_container(sandbox, config)
    assert fresh != stale
    with pytest.raises(NotFound):
        await runtime.container_status(stale)
    await runtime.start_container(fresh)
    with pytest.raises(CreateContainerError, match="running"):
        await runtime.create_container(sandbox, config)
    [only] = await runtime.list_containers(sandbox.pod.uid)
    assert (only.id, only.state) == (fresh, ContainerState.RUNNING)

    # A same-named container that another node created is never touched.
    other = make_runtime()
    name = container_name(sandbox.pod, "intruder", 0)
    foreign = await other.engine.call(
        "create", "POST", "containers/create", params={"name": name},
        body={"Image": BUSYBOX, "Cmd": ["true"], "Labels": {L.NODE: other.node_name}})
    with pytest.raises(CreateContainerError, match="did not create"):
        await runtime.create_container(sandbox, ContainerConfig(
            name="intruder", image=BUSYBOX, attempt=0, cmd=["true"]))
    raw = await other.engine.call("inspect", "GET", f"containers/{foreign['Id']}/json")
    assert raw["Name"] == f"/{name}"


async def test_run_pod_sandbox_retry_replaces_an_exited_same_attempt(runtime):
    sandbox = await run_sandbox(runtime)
    await runtime.engine.call("kill", "POST", f"containers/{sandbox.id}/kill")
    again = await run_sandbox(runtime, sandbox.pod)
    assert again.id != sandbox.id and again.attempt == 0
    assert [s.id for s in await runtime.list_pod_sandboxes(sandbox.pod.uid)] == [again.id]
    with pytest.raises(CreateContainerError, match="running"):
        await run_sandbox(runtime, sandbox.pod)


async def test_relist_inspects_only_changed_containers(runtime):
    sandbox = await run_sandbox(runtime)
    ids = [await run_container(runtime, sandbox, f"c{i}", "exec sleep 60") for i in range(4)]
    await runtime.list_containers()
    await runtime.list_pod_sandboxes()
    before = runtime.inspect_calls
    for _ in range(3):
        assert len(await runtime.list_containers()) == 4
        assert len(await runtime.list_pod_sandboxes()) == 1
    assert runtime.inspect_calls == before, "steady-state relists must not inspect"

    # Kill one behind the runtime's back: only that one is inspected again.
    await runtime.engine.call("kill", "POST", f"containers/{ids[0]}/kill")
    await runtime.engine.call("wait", "POST", f"containers/{ids[0]}/wait",
                              params={"condition": "not-running"})
    statuses = {c.id: c for c in await runtime.list_containers()}
    assert runtime.inspect_calls == before + 1
    assert (statuses[ids[0]].state, statuses[ids[0]].exit_code) == (ContainerState.EXITED, 137)
    await runtime.list_containers()
    assert runtime.inspect_calls == before + 1


@pytest.mark.root  # reads other processes' /proc entries / cgroupfs
async def test_cgroup_stats(runtime):
    sandbox = await run_sandbox(runtime)
    container_id = await run_container(
        runtime, sandbox, "busy",
        "i=0; while [ $i -lt 30000 ]; do i=$((i+1)); done; exec sleep 60",
        resources=Resources(memory_limit=64 * MiB),
    )
    stats = await eventually(
        lambda: asyncio.to_thread(read_container_stats, container_id),
        lambda s: s.cpu_usage_ns > 20_000_000, what="cpu usage of the busy loop")
    assert stats.memory_limit == 64 * MiB
    assert 0 < stats.memory_usage <= 64 * MiB
    assert 0 <= stats.memory_working_set <= stats.memory_usage
    assert stats.memory_rss > 0
    pid = await container_pid(runtime, container_id)
    by_pid = await asyncio.to_thread(read_container_stats, container_id, pid=pid)
    assert by_pid.memory_limit == 64 * MiB
    sandbox_stats = await asyncio.to_thread(read_container_stats, sandbox.id)
    assert sandbox_stats.memory_limit is None
    with pytest.raises(CgroupGone):
        await asyncio.to_thread(read_container_stats, "f" * 64)


@pytest.mark.root  # reads other processes' /proc entries / cgroupfs
async def test_cgroup_parent_applies_to_the_pod(runtime):
    parent = f"/nodeagent-rtest-{uuid.uuid4().hex[:8]}"
    sandbox = await run_sandbox(runtime, cgroup_parent=parent)
    container_id = await run_container(runtime, sandbox, "inpod", "exec sleep 60",
                                       resources=Resources(memory_limit=32 * MiB))
    try:
        for cid in (sandbox.id, container_id):
            raw = await runtime.engine.call("inspect", "GET", f"containers/{cid}/json")
            assert raw["HostConfig"]["CgroupParent"] == parent
        stats = await asyncio.to_thread(read_container_stats, container_id, cgroup_parent=parent)
        assert stats.memory_limit == 32 * MiB
    finally:
        await runtime.remove_pod_sandbox(sandbox.id)
        # Docker leaves the (now empty) parent groups behind; they are ours to remove.
        root = Path("/sys/fs/cgroup")
        for base in [root, *root.iterdir()]:
            group = base / parent.lstrip("/")
            if group.is_dir():
                group.rmdir()
