"""The sampling loop and the HTTP handlers over a fake runtime and recorded cgroup
trees: rates, pod totals (pause included), the Summary shape, cAdvisor/resource text,
faults (vanished container, unreadable files, unknown layout, a hung read), and what
the server does with bad requests and slow clients."""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from nodeagent.metrics import AgentMetrics
from nodeagent.server.metrics import StatsHandlers
from nodeagent.server.page import StatusPage, sparkline
from nodeagent.server.status import StatusServer
from nodeagent.stats.sampler import StatsSampler
from runtime.types import ContainerState, ContainerStatus, PodRef, RuntimeUnavailable, SandboxState, SandboxStatus

FIXTURES = Path(__file__).parent / "fixtures"
POD = PodRef("web", "shop", "uid-1")
SANDBOX_ID = "5a" * 32
APP_ID = "ab" * 32
MiB = 1 << 20


def _group(root: Path, cid: str, usage_usec: int, current: int, inactive: int = 0) -> Path:
    group = root / "docker" / cid
    group.mkdir(parents=True, exist_ok=True)
    (group / "cpu.stat").write_text(f"usage_usec {usage_usec}\nuser_usec {usage_usec}\nsystem_usec 0\n")
    (group / "memory.current").write_text(f"{current}\n")
    (group / "memory.stat").write_text(f"anon {current - inactive}\nfile {inactive}\ninactive_file {inactive}\n"
                                       "pgfault 10\npgmajfault 1\n")
    (group / "memory.max").write_text("max\n")
    (group / "memory.events").write_text("oom_kill 0\n")
    (group / "pids.current").write_text("1\n")
    (group / "io.stat").write_text("")
    return group


class FakeRuntime:
    def __init__(self) -> None:
        self.sandboxes = [SandboxStatus(SANDBOX_ID, POD, 0, SandboxState.READY, time.time() - 60)]
        self.containers = [ContainerStatus(APP_ID, POD, "app", 0, ContainerState.RUNNING, "busybox:1.35",
                                           "docker://sha256:x", time.time() - 50, started_at=time.time() - 50)]
        self.down = False

    async def list_pod_sandboxes(self):
        if self.down:
            raise RuntimeUnavailable("engine gone")
        return list(self.sandboxes)

    async def list_containers(self):
        return list(self.containers)


@pytest.fixture
def v2root(tmp_path):
    root = tmp_path / "cg"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpu memory io pids\n")
    _group(root, SANDBOX_ID, 1000, 1 * MiB)
    _group(root, APP_ID, 1_000_000, 40 * MiB, inactive=8 * MiB)
    return root


def _sampler(rt, root, tmp_path, **kw) -> StatsSampler:
    return StatsSampler(rt, root_dir=tmp_path, cgroup_root=root, interval=1.0, **kw)


async def test_rates_and_pod_totals(v2root, tmp_path):
    sampler = _sampler(FakeRuntime(), v2root, tmp_path)
    first = await sampler.sample()
    assert first is not None and first.errors == []
    pod = first.pods["uid-1"]
    assert pod.sandbox is not None and [c.name for c in pod.containers] == ["app"]
    assert pod.cpu_nano_cores is None  # no rate before the second sample
    assert pod.total("memory_working_set") == 1 * MiB + 32 * MiB  # pause included
    await asyncio.sleep(0.5)
    # 0.25 s of CPU more for the app while ~0.5 s passed: about half a core
    (v2root / "docker" / APP_ID / "cpu.stat").write_text("usage_usec 1250000\n")
    second = await sampler.sample()
    rate = second.pods["uid-1"].containers[0].cpu_nano_cores
    assert rate is not None and 0.2e9 < rate < 0.55e9
    assert second.node is not None and second.node_cpu_nano_cores is not None
    assert len(sampler.history["uid-1"]) == 2 and len(sampler.node_history) == 2


async def test_vanished_container_and_unreadable_file_leave_gaps(v2root, tmp_path):
    rt = FakeRuntime()
    gone = "cd" * 32
    rt.containers.append(ContainerStatus(gone, POD, "gone", 0, ContainerState.RUNNING, "busybox:1.35",
                                         "docker://sha256:x", time.time()))
    (v2root / "docker" / APP_ID / "memory.stat").unlink()
    (v2root / "docker" / APP_ID / "memory.stat").mkdir()
    snap = await _sampler(rt, v2root, tmp_path).sample()
    pod = snap.pods["uid-1"]
    assert [c.name for c in pod.containers] == ["app"]  # the vanished one: no sample
    app = pod.containers[0]
    assert app.cgroup.memory_usage == 40 * MiB and app.cgroup.memory_working_set is None
    assert any("container app" in e and "memory" in e for e in snap.errors)
    assert not any("gone" in e for e in snap.errors)


async def test_unknown_layout_and_runtime_down_still_give_a_snapshot(tmp_path):
    empty = tmp_path / "nothing"
    empty.mkdir()
    rt = FakeRuntime()
    snap = await _sampler(rt, empty, tmp_path).sample()
    assert snap.pods == {} and snap.node is not None
    assert any(e.startswith("cgroups:") for e in snap.errors)
    rt.down = True
    snap = await _sampler(rt, empty, tmp_path).sample()
    assert any("container runtime" in e for e in snap.errors)


async def test_runtime_outage_keeps_the_last_known_containers(v2root, tmp_path):
    rt = FakeRuntime()
    sampler = _sampler(rt, v2root, tmp_path)
    await sampler.sample()
    rt.down = True
    snap = await sampler.sample()
    assert any("container runtime" in e for e in snap.errors)
    assert [c.name for c in snap.pods["uid-1"].containers] == ["app"]


async def test_a_hung_read_is_abandoned_and_later_rounds_skip(v2root, tmp_path, monkeypatch):
    sampler = _sampler(FakeRuntime(), v2root, tmp_path, read_timeout=0.3)
    original = sampler._read_all

    def slow(*args):
        time.sleep(1.2)
        return original(*args)

    monkeypatch.setattr(sampler, "_read_all", slow)
    started = time.monotonic()
    snap = await sampler.sample()
    assert time.monotonic() - started < 1.0
    assert any("longer than" in e for e in snap.errors)
    assert await sampler.sample() is None and sampler.skipped_rounds == 1
    await asyncio.sleep(1.2)
    monkeypatch.setattr(sampler, "_read_all", original)
    assert (await sampler.sample()) is not None


async def test_sampler_loop_keeps_going(v2root, tmp_path):
    sampler = StatsSampler(FakeRuntime(), root_dir=tmp_path, cgroup_root=v2root, interval=0.05)
    task = asyncio.create_task(sampler.run())
    await asyncio.sleep(0.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sampler.rounds >= 3


async def test_fs_usage_of_layers_logs_and_empty_dirs(v2root, tmp_path):
    rt = FakeRuntime()
    upper = tmp_path / "upper"
    (upper / "tmp").mkdir(parents=True)
    (upper / "tmp" / "blob").write_bytes(b"x" * 300_000)
    log = tmp_path / "app-json.log"
    log.write_bytes(b"y" * 50_000)
    vol = tmp_path / "pods" / "uid-1" / "volumes" / "kubernetes.io~empty-dir" / "scratch"
    vol.mkdir(parents=True)
    (vol / "data").write_bytes(b"z" * 1_000_000)

    class Engine:
        async def call(self, what, method, path, **kw):
            cid = path.split("/")[1]
            return {"State": {"Pid": 0}, "HostConfig": {}, "Name": f"/k8s_{cid[:4]}",
                    "GraphDriver": {"Data": {"UpperDir": str(upper)}},
                    "LogPath": str(log) if cid == APP_ID else "", "Config": {"Image": "nodeagent/pause:1"}}

    rt.engine = Engine()
    snap = await _sampler(rt, v2root, tmp_path).sample()
    pod = snap.pods["uid-1"]
    app = pod.containers[0]
    assert app.rootfs is not None and app.rootfs.used_bytes >= 300_000
    assert app.logs is not None and app.logs.used_bytes >= 50_000
    assert pod.volumes["scratch"].used_bytes >= 1_000_000
    assert pod.sandbox.image == "nodeagent/pause:1" and app.docker_name == f"k8s_{APP_ID[:4]}"


# --- HTTP --------------------------------------------------------------------------------

async def _client(sampler, metrics=None, **server_kw) -> TestClient:
    server = StatusServer("127.0.0.1", 0, pods=lambda: [], checks={"ping": lambda: (True, "ok")}, **server_kw)
    handlers = StatsHandlers(sampler=sampler, metrics=metrics or AgentMetrics(), node_name="n1",
                             node_start=time.time() - 100)
    page = StatusPage(node_name="n1", version="0", mode="standalone", pods=lambda: [], sampler=sampler,
                      checks={"ping": lambda: (True, "ok")})
    server.mount(handlers.routes() + page.routes())
    client = TestClient(TestServer(server.app))
    await client.start_server()
    return client


async def test_summary_cadvisor_and_resource_from_a_snapshot(v2root, tmp_path):
    sampler = _sampler(FakeRuntime(), v2root, tmp_path)
    client = await _client(sampler)
    try:
        # before any sample: well-formed, empty, and flagged
        body = await (await client.get("/stats/summary")).json()
        assert body["node"]["nodeName"] == "n1" and body["pods"] == []
        text = await (await client.get("/metrics/resource")).text()
        assert "scrape_error 1.0" in text
        await sampler.sample()
        await asyncio.sleep(0.2)
        await sampler.sample()
        body = await (await client.get("/stats/summary")).json()
        pod = body["pods"][0]
        assert pod["podRef"] == {"name": "web", "namespace": "shop", "uid": "uid-1"}
        assert pod["memory"]["workingSetBytes"] == 33 * MiB
        assert pod["containers"][0]["memory"]["workingSetBytes"] == 32 * MiB
        assert pod["containers"][0]["cpu"]["usageCoreNanoSeconds"] == 1_000_000_000
        assert "usageNanoCores" in pod["containers"][0]["cpu"]
        only = await (await client.get("/stats/summary?only_cpu_and_memory=true")).json()
        assert set(only["pods"][0]) == {"podRef", "startTime", "containers", "cpu", "memory"}
        families = {f.name: f for f in text_string_to_metric_families(
            await (await client.get("/metrics/cadvisor")).text())}
        ws = [s for s in families["container_memory_working_set_bytes"].samples if s.labels["container"] == "app"]
        assert ws[0].value == 32 * MiB
        assert ws[0].labels == {"container": "app", "id": f"/docker/{APP_ID}", "image": "busybox:1.35",
                                "name": "", "namespace": "shop", "pod": "web"}
        resource = {f.name: f for f in text_string_to_metric_families(
            await (await client.get("/metrics/resource")).text())}
        assert resource["scrape_error"].samples[0].value == 0
        assert resource["pod_memory_working_set_bytes"].samples[0].value == 33 * MiB
        assert resource["container_cpu_usage_seconds"].samples[0].value == 1.0
    finally:
        await client.close()


async def test_bad_requests(v2root, tmp_path):
    client = await _client(_sampler(FakeRuntime(), v2root, tmp_path))
    try:
        assert (await client.get("/no/such/path")).status == 404
        assert (await client.get("/stats/summary?only_cpu_and_memory=perhaps")).status == 400
        assert (await client.get("/?refresh=soon")).status == 400
        assert (await client.get("/?refresh=-5")).status == 400
        assert (await client.get("/?refresh=5")).status == 200
        assert (await client.get("/readyz")).status == 200
    finally:
        await client.close()


async def test_slow_clients_cannot_hold_the_server(v2root, tmp_path):
    """Clients that send half a request, or ask for a large answer and never read it,
    do not delay other clients."""
    sampler = _sampler(FakeRuntime(), v2root, tmp_path)
    await sampler.sample()
    server = StatusServer("127.0.0.1", 0, pods=lambda: [], checks={})
    server.mount(StatsHandlers(sampler=sampler, metrics=AgentMetrics(), node_name="n1",
                               node_start=0).routes())
    await server.start()
    port = server.bound_port
    idle: list[socket.socket] = []
    try:
        for i in range(40):
            s = socket.create_connection(("127.0.0.1", port))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            s.send(b"GET /metrics/cadvisor HTTP/1.1\r\nHost: x\r\n" + (b"\r\n" if i % 2 else b""))
            idle.append(s)
        loop = asyncio.get_running_loop()

        def fetch() -> tuple[int, float]:
            import urllib.request

            started = time.monotonic()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats/summary", timeout=5) as r:
                return r.status, time.monotonic() - started

        status, took = await loop.run_in_executor(None, fetch)
        assert status == 200 and took < 2.0
    finally:
        for s in idle:
            s.close()
        await server.stop()


async def test_in_flight_limit_answers_503(v2root, tmp_path):
    server = StatusServer("127.0.0.1", 0, pods=lambda: [], checks={})
    gate = asyncio.Event()

    async def slow(request):
        await gate.wait()
        return web.Response(text="done")

    server.app.router.add_get("/slow", slow)
    client = TestClient(TestServer(server.app))
    await client.start_server()
    try:
        pending = [asyncio.create_task(client.get("/slow")) for _ in range(32)]
        await asyncio.sleep(0.3)
        assert (await client.get("/slow")).status == 503
        gate.set()
        statuses = [(await p).status for p in pending]
        assert statuses == [200] * 32
    finally:
        await client.close()


def test_sparkline_svg():
    svg = sparkline([0.0, 1.0, None, 0.5], width=30, height=10, label="cpu")
    assert svg.startswith("<svg") and "<polyline" in svg and 'aria-label="cpu"' in svg
    assert "polyline" not in sparkline([1.0])


async def test_deadline_applies_to_answers_not_to_streams():
    from nodeagent.server.metrics import limits_middleware

    app = web.Application(middlewares=[limits_middleware(timeout=0.2)])

    async def slow(request):
        await asyncio.sleep(0.6)
        return web.Response(text="late")

    app.router.add_get("/slow", slow)
    app.router.add_get("/containerLogs/ns/pod/c", slow)
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        assert (await client.get("/slow")).status == 503
        r = await client.get("/containerLogs/ns/pod/c")
        assert r.status == 200 and await r.text() == "late"
    finally:
        await client.close()


async def test_a_fresh_pleg_listing_replaces_the_samplers_own(v2root, tmp_path):
    rt = FakeRuntime()
    calls = []
    original = rt.list_containers

    async def counting():
        calls.append(1)
        return await original()

    rt.list_containers = counting
    sampler = _sampler(rt, v2root, tmp_path)
    listing = (time.monotonic(), await rt.list_pod_sandboxes(), await original())
    sampler.listing = lambda: listing
    snap = await sampler.sample()
    assert calls == [] and [c.name for c in snap.pods["uid-1"].containers] == ["app"]
    listing = (time.monotonic() - 5.0, listing[1], listing[2])  # older than one interval
    await sampler.sample()
    assert calls == [1]
