"""Cost of resource-usage collection and of serving it, against asking Docker's stats API.

    .venv/bin/python bench/metrics.py [--pods 110] [--rounds 20] [--requests 100]

Sets up --pods pods of pause + 2 busybox containers through the runtime shim (labels
exactly as the agent makes them, no pod network), then in one run, rounds interleaved:

1. collector cost: one sampling round of nodeagent's StatsSampler (list + cgroup,
   network-namespace reads; filesystem walk every round here, worst case) — process
   CPU and dockerd CPU per round, expressed as % of one core at a 10 s interval;
   baseline: the same numbers (CPU + memory of every container) from Docker's stats
   API (`GET /containers/<id>/stats?stream=false&one-shot=true` for each, 32 at once);
2. latency of /metrics, /metrics/cadvisor, /metrics/resource and /stats/summary
   served by the real status server, each request the first after a new sample (the
   rendered text is cached per sample, so this is the uncached cost), p50/p99; the
   baseline is the wall time of one full Docker stats sweep.

Everything created carries a per-run node label and is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nodeagent.metrics import AgentMetrics  # noqa: E402
from nodeagent.server.metrics import StatsHandlers  # noqa: E402
from nodeagent.server.status import StatusServer  # noqa: E402
from nodeagent.stats.sampler import StatsSampler  # noqa: E402
from runtime.docker import DockerRuntime  # noqa: E402
from runtime.types import ContainerConfig, PodRef, SandboxConfig  # noqa: E402

PAUSE = "nodeagent/pause:1"
IMAGE = "busybox:1.35"


def dockerd() -> psutil.Process | None:
    try:
        return psutil.Process(int(Path("/var/run/docker.pid").read_text()))
    except (OSError, ValueError, psutil.Error):
        return None


def cpu_of(p: psutil.Process | None) -> float:
    if p is None:
        return 0.0
    t = p.cpu_times()
    return t.user + t.system


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


async def setup(runtime: DockerRuntime, pods: int) -> None:
    slots = asyncio.Semaphore(8)

    async def one(i: int) -> None:
        async with slots:
            ref = PodRef(f"bench-{i}", "bench", secrets.token_hex(16))
            sid = await runtime.run_pod_sandbox(SandboxConfig(pod=ref, attempt=0, hostname=f"b{i}"), PAUSE)
            [sandbox] = [s for s in await runtime.list_pod_sandboxes(ref.uid) if s.id == sid]
            for name in ("a", "b"):
                cid = await runtime.create_container(sandbox, ContainerConfig(
                    name=name, image=IMAGE, attempt=0, cmd=["sh", "-c", "while true; do sleep 3600; done"]))
                await runtime.start_container(cid)

    await asyncio.gather(*(one(i) for i in range(pods)))


async def teardown(runtime: DockerRuntime) -> None:
    slots = asyncio.Semaphore(8)

    async def one(sid: str) -> None:
        async with slots:
            try:
                await runtime.stop_pod_sandbox(sid, timeout=0)
                await runtime.remove_pod_sandbox(sid)
            except Exception as exc:
                print("cleanup:", exc, file=sys.stderr)

    await asyncio.gather(*(one(s.id) for s in await runtime.list_pod_sandboxes()))


async def docker_sweep(session: aiohttp.ClientSession, ids: list[str]) -> dict[str, tuple[int, int]]:
    slots = asyncio.Semaphore(32)
    out: dict[str, tuple[int, int]] = {}

    async def one(cid: str) -> None:
        async with slots:
            async with session.get(f"http://docker/containers/{cid}/stats",
                                   params={"stream": "false", "one-shot": "true"}) as r:
                st = await r.json()
        mem = st.get("memory_stats") or {}
        inactive = (mem.get("stats") or {}).get("total_inactive_file", 0)
        out[cid] = (st["cpu_stats"]["cpu_usage"]["total_usage"], mem.get("usage", 0) - inactive)

    await asyncio.gather(*(one(c) for c in ids))
    return out


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pods", type=int, default=110)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--requests", type=int, default=100)
    args = ap.parse_args()
    node = f"bench-metrics-{secrets.token_hex(3)}"
    runtime = DockerRuntime(node, call_timeout=120)
    tmp = tempfile.mkdtemp(prefix="nodeagent-bench-metrics-")
    me = psutil.Process()
    engine = dockerd()
    try:
        t0 = time.monotonic()
        await setup(runtime, args.pods)
        print(f"set up {args.pods} pods x 2 containers (+pause) in {time.monotonic() - t0:.1f}s")
        # Two samplers over the same containers: `collector` alone (its cost is the
        # collection cost), `served` behind the HTTP handlers (their rendering cost is
        # measured separately).
        collector = StatsSampler(runtime, root_dir=tmp, interval=10.0, fs_interval=0.0)
        sampler = StatsSampler(runtime, root_dir=tmp, interval=10.0, fs_interval=0.0)
        first = await collector.sample()  # inspects every container once (then cached)
        await sampler.sample()
        assert first is not None
        print(f"first round: {len(first.containers)} containers, errors={len(first.errors)}")
        server = StatusServer("127.0.0.1", 0, pods=lambda: [], checks={})
        handlers = StatsHandlers(sampler=sampler, metrics=AgentMetrics(), node_name=node, node_start=0)
        server.mount(handlers.routes())
        await server.start()
        base = f"http://127.0.0.1:{server.bound_port}"
        ids = [c.id for c in first.containers]
        conn = aiohttp.UnixConnector("/var/run/docker.sock", limit=0)
        ours_cpu, ours_engine, ours_wall = [], [], []
        theirs_cpu, theirs_engine, theirs_wall = [], [], []
        latency: dict[str, list[float]] = {p: [] for p in
                                           ("/metrics", "/metrics/cadvisor", "/metrics/resource", "/stats/summary")}
        warm: dict[str, list[float]] = {p: [] for p in latency}
        render_cpu: list[float] = []
        async with aiohttp.ClientSession(connector=conn) as dsession, aiohttp.ClientSession() as http:
            for i in range(args.rounds):
                # ours
                c0, e0, w0 = sum(me.cpu_times()[:2]), cpu_of(engine), time.monotonic()
                snap = await collector.sample()
                ours_wall.append(time.monotonic() - w0)
                ours_cpu.append(sum(me.cpu_times()[:2]) - c0)
                ours_engine.append(cpu_of(engine) - e0)
                assert snap is not None and len(snap.containers) == len(ids), len(snap.containers)
                # theirs
                c0, e0, w0 = sum(me.cpu_times()[:2]), cpu_of(engine), time.monotonic()
                got = await docker_sweep(dsession, ids)
                theirs_wall.append(time.monotonic() - w0)
                theirs_cpu.append(sum(me.cpu_times()[:2]) - c0)
                theirs_engine.append(cpu_of(engine) - e0)
                assert len(got) == len(ids)
                # latency: each path asked right after a new sample ("cold": the
                # request waits for the rendering under way), then again once the
                # rendering is done ("warm": what a scrape normally meets)
                per_round = max(1, args.requests // args.rounds)
                for _ in range(per_round):
                    r0 = sum(me.cpu_times()[:2])
                    await sampler.sample()
                    for path in latency:
                        for kind in ("cold", "warm"):
                            if kind == "warm":
                                while any(not f.done() for _s, f in handlers._cache.values()):
                                    await asyncio.sleep(0.01)
                            s0 = time.perf_counter()
                            async with http.get(base + path) as r:
                                await r.read()
                                assert r.status == 200, (path, r.status)
                            (latency if kind == "cold" else warm)[path].append(time.perf_counter() - s0)
                    render_cpu.append(sum(me.cpu_times()[:2]) - r0)
                sizes = {p: None for p in latency}
            for path in latency:
                async with http.get(base + path) as r:
                    sizes[path] = len(await r.read())
        await server.stop()

        def line(name, values, scale=1.0, unit="s"):
            return f"{name}: median {statistics.median(values) * scale:.4f}{unit}"

        print(f"\nmachine: {platform.node()} {os.cpu_count()} cpus, load {os.getloadavg()}")
        print(f"containers sampled per round: {len(ids)}")
        med = statistics.median
        print("collector (per round)   ours: wall %.3fs, agent CPU %.4fs, dockerd CPU %.4fs"
              % (med(ours_wall), med(ours_cpu), med(ours_engine)))
        print("docker stats (per sweep)     wall %.3fs, client CPU %.4fs, dockerd CPU %.4fs"
              % (med(theirs_wall), med(theirs_cpu), med(theirs_engine)))
        ours_pct = (med(ours_cpu) + med(ours_engine)) / 10.0 * 100
        theirs_pct = (med(theirs_cpu) + med(theirs_engine)) / 10.0 * 100
        print(f"at a 10 s interval: ours {med(ours_cpu) / 10 * 100:.2f}% of a core in the agent "
              f"(+{med(ours_engine) / 10 * 100:.2f}% dockerd) = {ours_pct:.2f}%; docker stats "
              f"{theirs_pct:.2f}% (ratio {ours_pct / theirs_pct:.3f})")
        for path, values in latency.items():
            w = warm[path]
            print(f"{path:20s} n={len(values)} cold p50 {pct(values, 0.5) * 1000:.1f} ms p99 "
                  f"{pct(values, 0.99) * 1000:.1f} ms | warm p50 {pct(w, 0.5) * 1000:.1f} ms p99 "
                  f"{pct(w, 0.99) * 1000:.1f} ms  ({sizes[path]} bytes)")
        print(f"sample + render of all four + 8 requests, agent CPU per snapshot: median "
              f"{med(render_cpu):.3f}s = {med(render_cpu) / 10 * 100:.1f}% of a core at a 10 s interval")
        print(f"docker stats sweep wall p50 {pct(theirs_wall, 0.5) * 1000:.0f} ms p99 {pct(theirs_wall, 0.99) * 1000:.0f} ms")
    finally:
        await teardown(runtime)
        await runtime.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
