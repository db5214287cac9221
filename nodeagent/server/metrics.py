"""HTTP handlers for metrics and stats: ``/metrics`` (the agent's own, kubelet names),
``/metrics/cadvisor`` (cAdvisor names and labels), ``/metrics/resource`` (what
metrics-server reads), ``/metrics/probes`` and ``/stats/summary`` (stats/v1alpha1).

``StatsHandlers.routes()`` gives plain aiohttp route definitions, so the read-only
status server and the HTTPS node API mount the same handlers. Everything served from
the stats sampler comes from its latest snapshot (no file is read in a request), and
the text for one snapshot is rendered once and reused until the next sample.

``limits_middleware`` bounds what any client can hold: a fixed number of requests in
progress (beyond it: 503 at once rather than a queue), and a deadline on producing
and writing each answer, so a client that stops reading cannot pin a handler.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import time
from typing import Any, Callable, Iterable

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from nodeagent.metrics import AgentMetrics
from nodeagent.stats.sampler import ContainerStats, Snapshot, StatsSampler
from nodeagent.stats.summary import build_summary

log = structlog.get_logger(__name__)

# kubelet's and cAdvisor's endpoints have no *_created series; neither do we.
disable_created_metrics()

_TEXT = CONTENT_TYPE_LATEST.split(";")[0]


def parse_bool(request: web.Request, name: str, default: bool = False) -> bool:
    """A boolean query parameter; anything but true/false/1/0 is a 400."""
    raw = request.query.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in ("true", "1", ""):
        return True
    if value in ("false", "0"):
        return False
    raise web.HTTPBadRequest(text=f"query parameter {name}: expected true or false, got {raw!r}\n")


# Long-lived streams (log follow, exec, attach, port-forward) bound themselves; the
# per-request deadline and the in-flight slots are for answers that end.
STREAM_PREFIXES = ("/containerLogs", "/exec", "/attach", "/portForward", "/run")


def limits_middleware(max_in_flight: int = 32, timeout: float = 10.0,
                      stream_prefixes: tuple[str, ...] = STREAM_PREFIXES):
    slots = asyncio.Semaphore(max_in_flight)

    @web.middleware
    async def limits(request: web.Request, handler):
        if request.path.startswith(stream_prefixes):
            return await handler(request)
        if slots.locked():
            return web.Response(status=503, text="too many requests in progress\n",
                                headers={"Retry-After": "1"})
        async with slots:
            writing = False
            try:
                async with asyncio.timeout(timeout):
                    response = await handler(request)
                    if isinstance(response, web.Response) and not response.prepared:
                        # Written here, under the deadline: a client that does not read
                        # its answer loses the connection instead of holding the slot.
                        writing = True
                        await response.prepare(request)
                        await response.write_eof()
                    return response
            except TimeoutError:
                log.warning("status request timed out", path=request.path, writing=writing)
                if writing:
                    if request.transport is not None:
                        request.transport.close()
                    raise
                return web.Response(status=503, text="request timed out\n")

    return limits


# --- collectors ----------------------------------------------------------------------------

def _labels(c: ContainerStats) -> list[str]:
    # cAdvisor's label set: container, id (the cgroup), image, name (Docker's), namespace, pod
    return [c.name, "/" + (c.cgroup_path or f"docker/{c.id}"), c.image,
            c.docker_name, c.pod.namespace, c.pod.name]


_CADVISOR_LABELS = ["container", "id", "image", "name", "namespace", "pod"]


class CadvisorCollector(Collector):
    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def collect(self):
        snap = self.snap
        L = _CADVISOR_LABELS

        def fam(kind, name, doc, extra=()):
            return (CounterMetricFamily if kind == "c" else GaugeMetricFamily)(name, doc, labels=L + list(extra))

        f = {
            "cpu": fam("c", "container_cpu_usage_seconds_total", "Cumulative cpu time consumed in seconds.", ["cpu"]),
            "user": fam("c", "container_cpu_user_seconds_total", "Cumulative user cpu time consumed in seconds."),
            "system": fam("c", "container_cpu_system_seconds_total", "Cumulative system cpu time consumed in seconds."),
            "usage": fam("g", "container_memory_usage_bytes", "Current memory usage in bytes, including all memory regardless of when it was accessed."),
            "ws": fam("g", "container_memory_working_set_bytes", "Current working set in bytes."),
            "rss": fam("g", "container_memory_rss", "Size of RSS in bytes."),
            "cache": fam("g", "container_memory_cache", "Number of bytes of page cache memory."),
            "fail": fam("c", "container_memory_failures_total", "Cumulative count of memory allocation failures.", ["failure_type", "scope"]),
            "oom": fam("c", "container_oom_events_total", "Count of out of memory events observed for the container."),
            "limit": fam("g", "container_spec_memory_limit_bytes", "Memory limit for the container."),
            "procs": fam("g", "container_processes", "Number of processes running inside the container."),
            "rb": fam("c", "container_fs_reads_bytes_total", "Cumulative count of bytes read."),
            "wb": fam("c", "container_fs_writes_bytes_total", "Cumulative count of bytes written."),
            "ro": fam("c", "container_fs_reads_total", "Cumulative count of reads completed."),
            "wo": fam("c", "container_fs_writes_total", "Cumulative count of writes completed."),
            "fs": fam("g", "container_fs_usage_bytes", "Number of bytes that are consumed by the container on this filesystem."),
            "rx": fam("c", "container_network_receive_bytes_total", "Cumulative count of bytes received.", ["interface"]),
            "tx": fam("c", "container_network_transmit_bytes_total", "Cumulative count of bytes transmitted.", ["interface"]),
            "rxe": fam("c", "container_network_receive_errors_total", "Cumulative count of errors encountered while receiving.", ["interface"]),
            "txe": fam("c", "container_network_transmit_errors_total", "Cumulative count of errors encountered while transmitting.", ["interface"]),
            "start": fam("g", "container_start_time_seconds", "Start time of the container since unix epoch in seconds."),
            "seen": fam("g", "container_last_seen", "Last time a container was seen by the exporter."),
        }
        for pod in snap.pods.values():
            for c in pod._all():
                lv = _labels(c)
                g = c.cgroup
                if g.cpu_usage_ns is not None:
                    f["cpu"].add_metric(lv + ["total"], g.cpu_usage_ns / 1e9)
                if g.cpu_user_ns is not None:
                    f["user"].add_metric(lv, g.cpu_user_ns / 1e9)
                if g.cpu_system_ns is not None:
                    f["system"].add_metric(lv, g.cpu_system_ns / 1e9)
                for key, value in (("usage", g.memory_usage), ("ws", g.memory_working_set),
                                   ("rss", g.memory_rss), ("cache", g.memory_cache), ("oom", g.oom_events),
                                   ("procs", g.pids), ("rb", g.io_read_bytes), ("wb", g.io_write_bytes),
                                   ("ro", g.io_read_ops), ("wo", g.io_write_ops)):
                    if value is not None:
                        f[key].add_metric(lv, value)
                if g.page_faults is not None:
                    f["fail"].add_metric(lv + ["pgfault", "container"], g.page_faults)
                if g.major_page_faults is not None:
                    f["fail"].add_metric(lv + ["pgmajfault", "container"], g.major_page_faults)
                if g.memory_limit is not None or g.memory_unlimited:
                    f["limit"].add_metric(lv, g.memory_limit or 0)  # cAdvisor: 0 = unlimited
                if c.rootfs is not None:
                    f["fs"].add_metric(lv, c.rootfs.used_bytes)
                if c.start_time is not None:
                    f["start"].add_metric(lv, c.start_time)
                f["seen"].add_metric(lv, snap.time)
                if c.is_sandbox:
                    # The pod's network namespace is the pause container's (as in cAdvisor).
                    for name, n in sorted(pod.network.items()):
                        f["rx"].add_metric(lv + [name], n.rx_bytes)
                        f["tx"].add_metric(lv + [name], n.tx_bytes)
                        f["rxe"].add_metric(lv + [name], n.rx_errors)
                        f["txe"].add_metric(lv + [name], n.tx_errors)
        yield from f.values()
        if snap.node is not None:
            yield GaugeMetricFamily("machine_cpu_cores", "Number of logical CPU cores.", value=os.cpu_count() or 0)
            yield GaugeMetricFamily("machine_memory_bytes", "Amount of memory installed on the machine.",
                                    value=snap.node.memory_total)
        yield GaugeMetricFamily("container_scrape_error",
                                "1 if there was an error while getting container metrics, 0 otherwise",
                                value=1 if snap.errors else 0)


class ResourceCollector(Collector):
    """kubelet's /metrics/resource (what metrics-server reads)."""

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def collect(self):
        snap = self.snap
        cl = ["container", "namespace", "pod"]
        pl = ["namespace", "pod"]
        node_cpu = CounterMetricFamily("node_cpu_usage_seconds_total", "Cumulative cpu time consumed by the node in core-seconds")
        node_mem = GaugeMetricFamily("node_memory_working_set_bytes", "Current working set of the node in bytes")
        if snap.node is not None:
            node_cpu.add_metric([], snap.node.cpu_usage_ns / 1e9)
            node_mem.add_metric([], snap.node.memory_working_set)
        c_cpu = CounterMetricFamily("container_cpu_usage_seconds_total", "Cumulative cpu time consumed by the container in core-seconds", labels=cl)
        c_mem = GaugeMetricFamily("container_memory_working_set_bytes", "Current working set of the container in bytes", labels=cl)
        c_start = GaugeMetricFamily("container_start_time_seconds", "Start time of the container since unix epoch in seconds", labels=cl)
        p_cpu = CounterMetricFamily("pod_cpu_usage_seconds_total", "Cumulative cpu time consumed by the pod in core-seconds", labels=pl)
        p_mem = GaugeMetricFamily("pod_memory_working_set_bytes", "Current working set of the pod in bytes", labels=pl)
        for pod in snap.pods.values():
            pv = [pod.ref.namespace, pod.ref.name]
            cpu = pod.total("cpu_usage_ns")
            mem = pod.total("memory_working_set")
            if cpu is not None:
                p_cpu.add_metric(pv, cpu / 1e9)
            if mem is not None:
                p_mem.add_metric(pv, mem)
            for c in pod.containers:
                cv = [c.name] + pv
                if c.cgroup.cpu_usage_ns is not None:
                    c_cpu.add_metric(cv, c.cgroup.cpu_usage_ns / 1e9)
                if c.cgroup.memory_working_set is not None:
                    c_mem.add_metric(cv, c.cgroup.memory_working_set)
                if c.start_time is not None:
                    c_start.add_metric(cv, c.start_time)
        yield from (node_cpu, node_mem, c_cpu, c_mem, c_start, p_cpu, p_mem)
        yield GaugeMetricFamily("scrape_error", "1 if there was an error while getting container metrics, 0 otherwise",
                                value=1 if snap.errors else 0)


def _render(collector: Collector) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry)


# --- handlers ----------------------------------------------------------------------------------

class StatsHandlers:
    def __init__(
        self,
        *,
        sampler: StatsSampler | None,
        metrics: AgentMetrics | None,
        node_name: str,
        node_start: float,
    ) -> None:
        self.sampler = sampler
        self.metrics = metrics
        self.node_name = node_name
        self.node_start = node_start
        # what -> (snapshot, future of its rendered bytes); only the newest snapshot.
        # Rendered once per snapshot on one worker thread, as soon as it is published
        # (for what was scraped lately), so a scrape is answered from memory instead
        # of formatting 300 containers while the client waits.
        self._cache: dict[str, tuple[Snapshot, asyncio.Future]] = {}
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="stats-render")
        self._wanted: dict[str, float] = {}  # what -> when it was last asked for
        if sampler is not None:
            sampler.on_snapshot(self._prerender)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/metrics", self.metrics_handler),
            web.get("/metrics/cadvisor", self.cadvisor),
            web.get("/metrics/resource", self.resource),
            web.get("/metrics/probes", self.probes),
            web.get("/stats/summary", self.summary),
            web.get("/stats/summary/", self.summary),
        ]

    def snapshot(self) -> Snapshot | None:
        return self.sampler.latest if self.sampler is not None else None

    _RENDERERS: dict[str, Callable[["StatsHandlers", Snapshot], bytes]] = {
        "cadvisor": lambda self, s: _render(CadvisorCollector(s)),
        "resource": lambda self, s: _render(ResourceCollector(s)),
        "summary:False": lambda self, s: self._summary_bytes(s, False),
        "summary:True": lambda self, s: self._summary_bytes(s, True),
    }

    def _prerender(self, snap: Snapshot) -> None:
        # Only what someone scrapes: an unscraped node pays nothing for rendering.
        horizon = time.monotonic() - max(30.0, 3 * (self.sampler.interval if self.sampler else 10.0))
        for what, last in list(self._wanted.items()):
            if last >= horizon:
                self._future(what, snap)

    def _future(self, what: str, snap: Snapshot) -> asyncio.Future:
        cached = self._cache.get(what)
        if cached is not None and cached[0] is snap:
            return cached[1]
        render = self._RENDERERS[what]
        future = asyncio.get_running_loop().run_in_executor(self._executor, render, self, snap)
        future.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "unretrieved"
        self._cache[what] = (snap, future)
        return future

    async def _cached(self, what: str) -> bytes | None:
        self._wanted[what] = time.monotonic()
        snap = self.snapshot()
        if snap is None:
            return None
        return await asyncio.shield(self._future(what, snap))

    @staticmethod
    def _text(body: bytes) -> web.Response:
        return web.Response(body=body, content_type=_TEXT, charset="utf-8",
                            headers={"Cache-Control": "no-store"})

    async def metrics_handler(self, request: web.Request) -> web.Response:
        if self.metrics is None:
            raise web.HTTPNotFound(text="metrics are not enabled\n")
        return self._text(generate_latest(self.metrics.registry))

    async def probes(self, request: web.Request) -> web.Response:
        if self.metrics is None:
            raise web.HTTPNotFound(text="metrics are not enabled\n")
        return self._text(generate_latest(self.metrics.probe_registry))

    async def cadvisor(self, request: web.Request) -> web.Response:
        body = await self._cached("cadvisor")
        return self._text(body if body is not None else _render(_NotYet("container_scrape_error")))

    async def resource(self, request: web.Request) -> web.Response:
        body = await self._cached("resource")
        return self._text(body if body is not None else _render(_NotYet("scrape_error")))

    async def summary(self, request: web.Request) -> web.Response:
        only = parse_bool(request, "only_cpu_and_memory")
        body = await self._cached(f"summary:{only}")
        if body is None:
            body = self._summary_bytes(None, only)
        return web.Response(body=body, content_type="application/json")

    def _summary_bytes(self, snap: Snapshot | None, only_cpu_and_memory: bool) -> bytes:
        summary = build_summary(snap, node_name=self.node_name, node_start=self.node_start)
        if only_cpu_and_memory:
            summary = _only_cpu_and_memory(summary)
        return json.dumps(summary).encode()


class _NotYet(Collector):
    """Before the first sample: only the error signal."""

    def __init__(self, name: str) -> None:
        self.name = name

    def collect(self):
        yield GaugeMetricFamily(self.name, "1 if there was an error while getting container metrics, 0 otherwise",
                                value=1)


def _only_cpu_and_memory(summary: dict[str, Any]) -> dict[str, Any]:
    """Like kubelet's ?only_cpu_and_memory=true: names, times, cpu and memory only."""
    keep_node = {"nodeName", "startTime", "cpu", "memory"}
    keep_pod = {"podRef", "startTime", "containers", "cpu", "memory"}
    keep_container = {"name", "startTime", "cpu", "memory"}
    node = {k: v for k, v in summary["node"].items() if k in keep_node}
    pods = []
    for pod in summary["pods"]:
        p = {k: v for k, v in pod.items() if k in keep_pod}
        p["containers"] = [{k: v for k, v in c.items() if k in keep_container}
                           for c in pod.get("containers", [])]
        pods.append(p)
    return {"node": node, "pods": pods}


def scrape_sources(metrics: AgentMetrics, families: Iterable[Callable[[], Iterable[Any]]]) -> None:
    for source in families:
        metrics.add_source(source)
