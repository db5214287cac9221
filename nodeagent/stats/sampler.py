"""The one sampling loop: every ``interval`` it lists the node's running sandboxes and
containers, reads their cgroups, network namespaces and (less often) filesystem usage
on a single worker thread, derives rates from the previous sample, and publishes an
immutable ``Snapshot`` that every endpoint reads without touching a file.

Faults never stop the loop: a container that vanished mid-read is simply absent from
this snapshot, an unreadable file leaves a gap and an entry in ``Snapshot.errors``
(served as ``scrape_error``), a runtime that does not answer costs this round's pod
list, and a read that hangs (a stuck filesystem) is abandoned after a deadline while
later rounds are skipped until the worker thread is free again.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import structlog

from nodeagent.stats.cgroups import CgroupGone, CgroupReader, CgroupSample, UnknownLayout
from nodeagent.stats.host import DirUsage, NetSample, NodeSample, dir_usage, file_usage, read_net_dev, read_node
from runtime.types import ContainerState, PodRef, RuntimeError_, SandboxState

log = structlog.get_logger(__name__)

EMPTY_DIR_PLUGIN = "kubernetes.io~empty-dir"
# Samples kept per pod and for the node, for the sparklines (10 min at 10 s).
HISTORY = 60
_INSPECT_CONCURRENCY = 8


@dataclass
class ContainerStats:
    id: str
    name: str  # Kubernetes container name ("POD" for the sandbox)
    pod: PodRef
    image: str
    docker_name: str
    start_time: float | None
    cgroup: CgroupSample
    cpu_nano_cores: float | None = None
    rootfs: DirUsage | None = None
    logs: DirUsage | None = None
    cgroup_path: str = ""  # relative to the cgroup root, e.g. docker/<id>

    @property
    def is_sandbox(self) -> bool:
        return self.name == "POD"


@dataclass
class PodStats:
    ref: PodRef
    start_time: float | None
    sandbox: ContainerStats | None
    containers: list[ContainerStats] = field(default_factory=list)
    network: dict[str, NetSample] = field(default_factory=dict)
    volumes: dict[str, DirUsage] = field(default_factory=dict)

    def _all(self) -> list[ContainerStats]:
        return ([self.sandbox] if self.sandbox else []) + self.containers

    def total(self, attr: str) -> int | None:
        """Sum over the pod's containers, the pause included (its pod cgroup would)."""
        values = [getattr(c.cgroup, attr) for c in self._all()]
        known = [v for v in values if v is not None]
        return sum(known) if known else None

    @property
    def cpu_nano_cores(self) -> float | None:
        rates = [c.cpu_nano_cores for c in self._all() if c.cpu_nano_cores is not None]
        return sum(rates) if rates else None


@dataclass
class Snapshot:
    time: float  # wall clock of the reading
    node: NodeSample | None
    node_cpu_nano_cores: float | None
    pods: dict[str, PodStats]
    errors: list[str]
    cgroup_version: str
    duration: float = 0.0  # seconds the round took

    @property
    def containers(self) -> list[ContainerStats]:
        return [c for p in self.pods.values() for c in p._all()]


@dataclass
class _Info:
    """What the sampler needs from an inspect, fixed for the container's life."""

    pid: int | None
    cgroup_parent: str | None
    upper_dir: str | None
    log_path: str | None
    docker_name: str
    image: str = ""


@dataclass
class _Target:
    id: str
    name: str
    pod: PodRef
    image: str
    start_time: float | None
    info: _Info | None


class StatsSampler:
    def __init__(
        self,
        runtime: Any,
        *,
        root_dir: str | Path,
        interval: float = 10.0,
        fs_interval: float = 60.0,
        cgroup_root: str | Path = "/sys/fs/cgroup",
        read_timeout: float | None = None,
        history: int = HISTORY,
        image_dir: str = "/var/lib/docker",
    ) -> None:
        self.runtime = runtime
        self.root_dir = Path(root_dir)
        self.interval = interval
        self.fs_interval = fs_interval
        self.read_timeout = read_timeout or max(5.0, interval)
        self.image_dir = image_dir
        self._cgroup_root = Path(cgroup_root)
        self._reader: CgroupReader | None = None
        self._layout_error: str | None = None
        self._infos: dict[str, _Info] = {}
        self._fs_cache: dict[str, tuple[float, DirUsage]] = {}
        self._volume_usage: dict[str, dict[str, DirUsage]] = {}  # pod uid -> volume -> usage
        self._prev_cpu: dict[str, tuple[float, int]] = {}
        self._prev_node: tuple[float, int] | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="stats")
        self._busy: asyncio.Future | None = None
        self.latest: Snapshot | None = None
        self.history: dict[str, collections.deque] = {}
        self.node_history: collections.deque = collections.deque(maxlen=history)
        self._history_len = history
        self.rounds = 0
        self.skipped_rounds = 0
        self.cpu_seconds = 0.0  # thread CPU spent reading, for the benchmark
        self.updated = asyncio.Event()
        self._listeners: list[Callable[[Snapshot], None]] = []
        # Optional: the PLEG's last relist (monotonic time, sandboxes, containers); used
        # instead of listing again when it is younger than one interval.
        self.listing: Callable[[], tuple[float, list, list] | None] | None = None
        self._last_targets: tuple[list[_Target], dict[str, Any]] = ([], {})

    def on_snapshot(self, listener: Callable[[Snapshot], None]) -> None:
        self._listeners.append(listener)

    def _cgroups(self) -> CgroupReader | None:
        if self._reader is None and self._layout_error is None:
            try:
                self._reader = CgroupReader(self._cgroup_root)
            except UnknownLayout as exc:
                self._layout_error = str(exc)
        return self._reader

    async def run(self) -> None:
        try:
            while True:
                started = time.monotonic()
                try:
                    await self.sample()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a bug in one round must not end sampling
                    log.warning("stats sampling failed", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))
        finally:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def sample(self) -> Snapshot | None:
        """One round; returns the new snapshot (None when the worker is still busy)."""
        if self._busy is not None and not self._busy.done():
            self.skipped_rounds += 1
            log.warning("stats worker still busy with the previous round; skipping")
            return None
        started = time.monotonic()
        errors: list[str] = []
        targets, sandboxes = await self._targets(errors)
        want_fs = self._fs_due()
        loop = asyncio.get_running_loop()
        self._busy = loop.run_in_executor(self._executor, self._read_all, targets, sandboxes, want_fs)
        try:
            readings = await asyncio.wait_for(asyncio.shield(self._busy), self.read_timeout)
        except TimeoutError:
            errors.append(f"reading cgroups and filesystems took longer than {self.read_timeout:g}s")
            readings = None
        snapshot = self._build(readings, targets, sandboxes, errors)
        snapshot.duration = time.monotonic() - started
        self.latest = snapshot
        self.rounds += 1
        self.updated.set()
        self.updated = asyncio.Event()
        for listener in self._listeners:
            listener(snapshot)
        return snapshot

    # --- on the loop -------------------------------------------------------------------

    async def _targets(self, errors: list[str]) -> tuple[list[_Target], dict[str, Any]]:
        shared = self.listing() if self.listing is not None else None
        if shared is not None and time.monotonic() - shared[0] <= self.interval:
            _at, sandboxes, containers = shared
        else:
            try:
                sandboxes = await self.runtime.list_pod_sandboxes()
                containers = await self.runtime.list_containers()
            except RuntimeError_ as exc:
                # A slow or absent engine does not blank the figures: the containers
                # known from the last listing are read again (gone ones drop out).
                errors.append(f"container runtime: {exc}")
                return self._last_targets

        running_sandboxes = {s.pod.uid: s for s in sandboxes if s.state == SandboxState.READY}
        targets = [
            _Target(s.id, "POD", s.pod, "", s.created_at, None)
            for s in running_sandboxes.values()
        ] + [
            _Target(c.id, c.name, c.pod, c.image, c.started_at, None)
            for c in containers if c.state == ContainerState.RUNNING
        ]
        await self._inspect_new([t.id for t in targets])
        live = {t.id for t in targets}
        for cid in [c for c in self._infos if c not in live]:
            del self._infos[cid]
        for t in targets:
            t.info = self._infos.get(t.id)
            if t.info is not None and not t.image:
                t.image = t.info.image  # the sandbox's (pause) image
        self._last_targets = (targets, running_sandboxes)
        return targets, running_sandboxes

    async def _inspect_new(self, ids: list[str]) -> None:
        engine = getattr(self.runtime, "engine", None)
        new = [cid for cid in ids if cid not in self._infos]
        if engine is None or not new:
            return
        slots = asyncio.Semaphore(_INSPECT_CONCURRENCY)

        async def inspect(cid: str) -> None:
            async with slots:
                try:
                    info = await engine.call(f"inspect container {cid[:12]}", "GET", f"containers/{cid}/json")
                except RuntimeError_:
                    return  # gone, or the engine is slow: tried again next round
            data = (info.get("GraphDriver") or {}).get("Data") or {}
            self._infos[cid] = _Info(
                pid=int((info.get("State") or {}).get("Pid") or 0) or None,
                cgroup_parent=(info.get("HostConfig") or {}).get("CgroupParent") or None,
                upper_dir=data.get("UpperDir"),
                log_path=info.get("LogPath") or None,
                docker_name=(info.get("Name") or "").lstrip("/"),
                image=(info.get("Config") or {}).get("Image") or "",
            )

        async with asyncio.TaskGroup() as tg:
            for cid in new:
                tg.create_task(inspect(cid))

    def _fs_due(self) -> bool:
        last = getattr(self, "_last_fs", None)
        now = time.monotonic()
        if last is None or now - last >= self.fs_interval:
            self._last_fs = now
            return True
        return False

    # --- on the worker thread ------------------------------------------------------------

    def _read_all(self, targets: list[_Target], sandboxes: dict[str, Any], want_fs: bool) -> dict:
        cpu_started = time.thread_time()
        out: dict[str, Any] = {"cgroups": {}, "paths": {}, "net": {}, "fs": {}, "volumes": {}, "errors": []}
        errors = out["errors"]
        try:
            out["node"] = read_node(str(self.root_dir), self.image_dir)
        except Exception as exc:
            out["node"] = None
            errors.append(f"node: {type(exc).__name__}: {exc}")
        out["mono"] = time.monotonic()
        out["wall"] = time.time()
        reader = self._cgroups()
        if reader is None:
            errors.append(f"cgroups: {self._layout_error}")
        else:
            reader.forget({t.id for t in targets})
            for t in targets:
                try:
                    info = t.info
                    out["cgroups"][t.id] = reader.read(
                        t.id, cgroup_parent=info.cgroup_parent if info else None,
                        pid=info.pid if info else None)
                    out["paths"][t.id] = reader.relative_path(t.id)
                except CgroupGone:
                    continue  # exited between the list and the read: no sample, no error
                except Exception as exc:
                    errors.append(f"{_who(t)}: {type(exc).__name__}: {exc}")
        for uid, sandbox in sandboxes.items():
            if sandbox.pid and not sandbox.host_network:
                try:
                    out["net"][uid] = read_net_dev(sandbox.pid)
                except FileNotFoundError:
                    continue  # the pause exited
                except Exception as exc:
                    errors.append(f"pod {sandbox.pod.namespace}/{sandbox.pod.name}: network: {exc}")
        if want_fs:
            self._read_fs(targets, sandboxes)
        for t in targets:
            if t.info is None:
                continue
            out["fs"][t.id] = (self._fs_cache.get("rootfs:" + t.id), self._fs_cache.get("logs:" + t.id))
        for uid in sandboxes:
            out["volumes"][uid] = self._volume_usage.get(uid, {})
        self.cpu_seconds += time.thread_time() - cpu_started
        return out

    def _read_fs(self, targets: list[_Target], sandboxes: dict[str, Any]) -> None:
        fresh: dict[str, tuple[float, DirUsage]] = {}
        volumes: dict[str, dict[str, DirUsage]] = {}
        stamp = time.time()
        for t in targets:
            if t.info is None:
                continue
            if t.info.upper_dir:
                try:
                    fresh["rootfs:" + t.id] = (stamp, dir_usage(t.info.upper_dir))
                except OSError:
                    pass
            if t.info.log_path:
                logs = [t.info.log_path] + [f"{t.info.log_path}.{i}" for i in range(1, 6)]
                fresh["logs:" + t.id] = (stamp, file_usage(logs))
        for uid in sandboxes:
            base = self.root_dir / "pods" / uid / "volumes" / EMPTY_DIR_PLUGIN
            try:
                names = [p for p in base.iterdir() if p.is_dir()]
            except OSError:
                continue
            for path in names:
                try:
                    volumes.setdefault(uid, {})[path.name] = dir_usage(path)
                except OSError:
                    pass
        self._fs_cache = fresh
        self._volume_usage = volumes

    # --- back on the loop ------------------------------------------------------------------

    def _build(self, readings: dict | None, targets: list[_Target], sandboxes: dict[str, Any],
               errors: list[str]) -> Snapshot:
        reader = self._reader
        version = reader.version if reader else "unknown"
        if readings is None:
            prev = self.latest
            return Snapshot(time.time(), prev.node if prev else None, None, {}, errors, version)
        errors.extend(readings["errors"])
        mono, wall = readings["mono"], readings["wall"]
        pods: dict[str, PodStats] = {}
        cpu_now: dict[str, tuple[float, int]] = {}
        for t in targets:
            sample = readings["cgroups"].get(t.id)
            if sample is None:
                continue
            for problem in sample.errors:
                errors.append(f"{_who(t)}: {problem}")
            rate = None
            if sample.cpu_usage_ns is not None:
                cpu_now[t.id] = (mono, sample.cpu_usage_ns)
                prev = self._prev_cpu.get(t.id)
                if prev is not None and mono > prev[0] and sample.cpu_usage_ns >= prev[1]:
                    rate = (sample.cpu_usage_ns - prev[1]) / (mono - prev[0])
            rootfs, logs = readings["fs"].get(t.id, (None, None))
            stats = ContainerStats(
                id=t.id, name=t.name, pod=t.pod, image=t.image,
                docker_name=t.info.docker_name if t.info else "",
                start_time=t.start_time, cgroup=sample, cpu_nano_cores=rate,
                rootfs=rootfs[1] if rootfs else None, logs=logs[1] if logs else None,
                cgroup_path=readings["paths"].get(t.id, ""),
            )
            sandbox = sandboxes.get(t.pod.uid)
            pod = pods.get(t.pod.uid)
            if pod is None:
                pod = pods[t.pod.uid] = PodStats(
                    ref=t.pod, start_time=sandbox.created_at if sandbox else None, sandbox=None,
                    network=readings["net"].get(t.pod.uid, {}),
                    volumes=readings["volumes"].get(t.pod.uid, {}))
            if stats.is_sandbox:
                pod.sandbox = stats
            else:
                pod.containers.append(stats)
        self._prev_cpu = cpu_now
        node = readings["node"]
        node_rate = None
        if node is not None:
            if self._prev_node is not None and mono > self._prev_node[0]:
                node_rate = max(0.0, (node.cpu_usage_ns - self._prev_node[1]) / (mono - self._prev_node[0]))
            self._prev_node = (mono, node.cpu_usage_ns)
        snapshot = Snapshot(wall, node, node_rate, pods, errors, version)
        self._record_history(snapshot)
        return snapshot

    def _record_history(self, snap: Snapshot) -> None:
        if snap.node is not None:
            self.node_history.append((snap.time, snap.node_cpu_nano_cores, snap.node.memory_working_set))
        for uid, pod in snap.pods.items():
            series = self.history.get(uid)
            if series is None:
                series = self.history[uid] = collections.deque(maxlen=self._history_len)
            series.append((snap.time, pod.cpu_nano_cores, pod.total("memory_working_set")))
        for uid in [u for u in self.history if u not in snap.pods]:
            del self.history[uid]


def _who(t: _Target) -> str:
    return f"pod {t.pod.namespace}/{t.pod.name} container {t.name}"
