"""The kubelet-facing probe manager (kubelet's prober_manager).

The kubelet tells it which pods exist (``add_pod``/``remove_pod``) and what each
published status says (``on_status``); it answers ``container_results`` (started and
ready per container, for the status) and ``kills`` (instances that failed their
liveness or startup probe, for ``compute_pod_actions``). When a result changes it
calls ``on_change(pod uid)`` so the pod worker re-syncs: a new readiness result thus
reaches the pod's Ready condition and, through it, Service endpoints.

All workers run in the manager's own TaskGroup, independent of pod workers: a slow
check delays only its own worker, never a pod sync or another probe.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable

import structlog

from nodeagent.api.podspec import iter_containers
from nodeagent.kubelet.events import WARNING, EventSink, LogEventSink, container_field_path
from nodeagent.prober.handlers import ExecRuntime, HTTPClient, Outcome, Target, run_probe
from nodeagent.prober.results import ProbeType, Result, ResultsCache
from nodeagent.prober.worker import Observed, ProbeSpec, ProbeWorker
from runtime.types import ContainerState, ContainerStatus

log = structlog.get_logger(__name__)

# How often the probe scheduling lateness of the last window is logged (when probes ran).
TIMING_LOG_PERIOD = 30.0


@dataclass
class KillRequest:
    """An instance the pod worker must stop: it failed its liveness/startup probe."""

    probe_type: ProbeType
    # The probe's terminationGracePeriodSeconds, overriding the pod's when set.
    grace: int | None


def _parse_time(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        import calendar

        return float(calendar.timegm(time.strptime(value, "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        return None


class ProbeManager:
    def __init__(
        self,
        runtime: ExecRuntime,
        *,
        events: EventSink | None = None,
        on_change: Callable[[str], None] | None = None,
        time_scale: float = 1.0,
        wall: Callable[[], float] = time.time,
    ) -> None:
        """``time_scale`` multiplies every probe duration (tests run probes 20x faster
        with 0.05); ``wall`` is the clock container start times are compared with."""
        self.runtime = runtime
        self.events: EventSink = events or LogEventSink()
        self.on_change = on_change
        self.time_scale = time_scale
        self.wall = wall
        self.results = ResultsCache()
        self.http = HTTPClient()
        self._workers: dict[tuple[str, str, ProbeType], ProbeWorker] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._started_at: float | None = None
        self._lateness: deque[float] = deque(maxlen=100_000)
        self.probes_total = 0

    # --- lifecycle -------------------------------------------------------------

    async def run(self) -> None:
        self._started_at = asyncio.get_running_loop().time()
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                for worker in list(self._workers.values()):
                    self._start(worker)
                tg.create_task(self._log_timing(), name="probe-timing")
                await asyncio.Event().wait()
        finally:
            self._tg = None
            await self.http.close()

    def recently_started(self, period: float) -> bool:
        if self._started_at is None:
            return True
        return asyncio.get_running_loop().time() - self._started_at < period

    def _start(self, worker: ProbeWorker) -> None:
        if self._tg is not None and worker.task is None:
            worker.task = self._tg.create_task(
                worker.run(), name=f"probe-{worker.pod_uid}-{worker.container_name}-{worker.probe_type.value}"
            )

    # --- pods ------------------------------------------------------------------

    def add_pod(self, pod: dict) -> None:
        """Create the workers for the pod's probes (app containers and sidecars)."""
        uid = pod["metadata"]["uid"]
        for kind, container in iter_containers(pod):
            if kind == "init" and container.get("restartPolicy") != "Always":
                continue
            for probe_type in ProbeType:
                probe = container.get(probe_type.field)
                key = (uid, container["name"], probe_type)
                if not isinstance(probe, dict) or key in self._workers:
                    continue
                worker = ProbeWorker(
                    manager=self, pod_uid=uid, container_name=container["name"],
                    probe_type=probe_type, spec=ProbeSpec.from_probe(probe),
                    container=container, pod=pod,
                )
                self._workers[key] = worker
                self._start(worker)

    def remove_pod(self, uid: str) -> None:
        for key in [k for k in self._workers if k[0] == uid]:
            worker = self._workers.pop(key)
            worker.stop()
            if worker.container_id:
                self.results.remove(worker.probe_type, worker.container_id)

    def worker_done(self, worker: ProbeWorker) -> None:
        key = (worker.pod_uid, worker.container_name, worker.probe_type)
        if self._workers.get(key) is worker and not worker.stopped:
            # Ended by itself (the pod finished): keep the last results for the status.
            return
        if self._workers.get(key) is worker:
            del self._workers[key]

    def workers(self, uid: str | None = None) -> list[ProbeWorker]:
        return [w for k, w in self._workers.items() if uid is None or k[0] == uid]

    def on_status(self, uid: str, pod: dict, status: dict) -> None:
        """The pod's newly published status: workers learn their container instance."""
        workers = [w for k, w in self._workers.items() if k[0] == uid]
        if not workers:
            return
        by_name = {
            cs.get("name"): cs
            for key in ("initContainerStatuses", "containerStatuses")
            for cs in status.get(key) or ()
        }
        meta = pod.get("metadata") or {}
        common = dict(
            pod_ip=status.get("podIP"),
            deleting=meta.get("deletionTimestamp") is not None,
            terminal_phase=status.get("phase") in ("Succeeded", "Failed"),
            restart_never=(pod.get("spec") or {}).get("restartPolicy") == "Never",
        )
        for worker in workers:
            cs = by_name.get(worker.container_name) or {}
            state = cs.get("state") or {}
            running = state.get("running")
            container_id = cs.get("containerID") or None
            worker.observe(pod, Observed(
                container_id=container_id,
                running=running is not None,
                terminated="terminated" in state,
                started=bool(cs.get("started")),
                started_at=_parse_time((running or {}).get("startedAt")),
                **common,
            ))

    # --- answers for the kubelet -------------------------------------------------

    def container_results(
        self, uid: str, containers: Iterable[ContainerStatus]
    ) -> tuple[dict[str, bool], dict[str, bool]]:
        """(started, ready) by container name, for containers that have the probe.

        Results belong to the newest running instance of each container; a container
        whose probe has not succeeded yet is neither started nor ready."""
        workers = [w for k, w in self._workers.items() if k[0] == uid]
        if not workers:
            return {}, {}
        newest: dict[str, ContainerStatus] = {}
        for c in containers:
            best = newest.get(c.name)
            if best is None or (c.created_at, c.attempt) > (best.created_at, best.attempt):
                newest[c.name] = c
        started: dict[str, bool] = {}
        ready: dict[str, bool] = {}
        for w in workers:
            if w.probe_type == ProbeType.LIVENESS:
                continue
            c = newest.get(w.container_name)
            ok = (
                c is not None and c.state == ContainerState.RUNNING
                and self.results.get(w.probe_type, c.container_id) == Result.SUCCESS
            )
            (started if w.probe_type == ProbeType.STARTUP else ready)[w.container_name] = ok
        return started, ready

    def kills(self, uid: str) -> dict[str, KillRequest]:
        """Runtime container id -> why it must be stopped (failed liveness/startup)."""
        out: dict[str, KillRequest] = {}
        for (pod_uid, _name, probe_type), w in self._workers.items():
            if pod_uid != uid or probe_type == ProbeType.READINESS or not w.container_id:
                continue
            if self.results.get(probe_type, w.container_id) == Result.FAILURE:
                out[w.container_id.removeprefix("docker://")] = KillRequest(probe_type, w.spec.termination_grace)
        return out

    # --- called by workers ---------------------------------------------------------

    async def run_check(self, probe: dict, target: Target, timeout: float) -> Outcome:
        self.probes_total += 1
        return await run_probe(probe, target, timeout, runtime=self.runtime, http=self.http)

    def changed(self, worker: ProbeWorker) -> None:
        log.info("probe result changed", pod_uid=worker.pod_uid, container=worker.container_name,
                 probe=worker.probe_type.value,
                 result=self.results.get(worker.probe_type, worker.container_id or "").value
                 if worker.container_id else None)
        if self.on_change is not None:
            self.on_change(worker.pod_uid)

    def unhealthy(self, worker: ProbeWorker, outcome: Outcome) -> None:
        kind = "sidecar" if any(
            c.get("name") == worker.container_name
            for c in (worker.pod.get("spec") or {}).get("initContainers") or ()
        ) else "app"
        self.events.event(
            worker.pod, WARNING, "Unhealthy",
            f"{worker.probe_type.value} probe failed: {outcome.output.strip()}"[:1024],
            field_path=container_field_path(kind, worker.container_name, worker.pod),
        )

    # --- timing --------------------------------------------------------------------

    def record_lateness(self, seconds: float) -> None:
        self._lateness.append(max(0.0, seconds))

    def take_lateness(self) -> list[float]:
        samples = list(self._lateness)
        self._lateness.clear()
        return samples

    async def _log_timing(self) -> None:
        while True:
            await asyncio.sleep(TIMING_LOG_PERIOD)
            samples = sorted(self.take_lateness())
            if not samples:
                continue
            n = len(samples)
            log.info("probe timing", ticks=n, probes_total=self.probes_total, workers=len(self._workers),
                     late_p50_ms=round(samples[n // 2] * 1000, 2),
                     late_p99_ms=round(samples[min(n - 1, int(n * 0.99))] * 1000, 2),
                     late_max_ms=round(samples[-1] * 1000, 2))
