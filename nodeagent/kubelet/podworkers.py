"""One serialized worker per pod (kubelet's pod workers).

A worker owns everything that changes its pod in the runtime, so no two syncs of one
pod ever overlap, while pods proceed independently: a hung runtime call (bounded by
its own deadline) delays only the pod whose worker made it.

Updates coalesce: a worker always syncs the newest desired pod, however many updates
arrived while it was busy.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Protocol

import structlog

log = structlog.get_logger(__name__)

# A failing sync is retried on this schedule (doubling), independent of container
# back-off, so a runtime outage does not turn into a busy loop.
SYNC_ERROR_BACKOFF = (1.0, 30.0)


class PodSyncer(Protocol):
    async def sync_pod(self, pod: dict) -> float | None:
        """Drive the runtime toward the pod's spec; return seconds until the next
        sync is needed without any event (e.g. when a back-off ends), or None."""

    async def terminate_pod(self, uid: str, pod: dict | None) -> None:
        """Stop and remove everything of the pod, within its grace period."""


@dataclass
class _Worker:
    uid: str
    pod: dict | None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    removed: bool = False
    # Set when the pod came back (same uid) while it was being torn down.
    readd: dict | None = None
    task: asyncio.Task | None = None
    last_sync: float = 0.0
    last_error: str | None = None


class PodWorkers:
    def __init__(
        self,
        syncer: PodSyncer,
        *,
        on_sync_duration: Callable[[str, float], None] | None = None,
    ) -> None:
        self._syncer = syncer
        self._workers: dict[str, _Worker] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._on_sync_duration = on_sync_duration
        self._started = asyncio.Event()
        # Optional: called with ("sync" | "kill", seconds) after each worker pass (metrics).
        self.observer: Callable[[str, float], None] | None = None

    async def run(self) -> None:
        """Own the worker tasks; cancelling this cancels them all."""
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            self._started.set()
            for worker in self._workers.values():
                if worker.task is None:
                    worker.task = tg.create_task(self._loop(worker), name=f"pod-{worker.uid}")
            await asyncio.Event().wait()

    def update(self, pod: dict) -> None:
        uid = pod["metadata"]["uid"]
        worker = self._workers.get(uid)
        if worker is None:
            worker = _Worker(uid=uid, pod=pod)
            self._workers[uid] = worker
            if self._tg is not None:
                worker.task = self._tg.create_task(self._loop(worker), name=f"pod-{uid}")
        elif worker.removed:
            worker.readd = pod
        else:
            worker.pod = pod
        worker.wake.set()

    def remove(self, uid: str, pod: dict | None = None) -> None:
        """Terminate the pod; ``pod`` is its last known spec (for grace periods)."""
        worker = self._workers.get(uid)
        if worker is None:
            worker = _Worker(uid=uid, pod=pod)
            self._workers[uid] = worker
            if self._tg is not None:
                worker.task = self._tg.create_task(self._loop(worker), name=f"pod-{uid}")
        worker.removed = True
        worker.readd = None
        worker.wake.set()

    def kick(self, uid: str) -> None:
        worker = self._workers.get(uid)
        if worker is not None:
            worker.wake.set()

    def kick_all(self) -> None:
        for worker in self._workers.values():
            worker.wake.set()

    def known(self) -> set[str]:
        return set(self._workers)

    def errors(self) -> dict[str, str]:
        return {uid: w.last_error for uid, w in self._workers.items() if w.last_error}

    async def _loop(self, worker: _Worker) -> None:
        requeue: float | None = None
        error_delay = SYNC_ERROR_BACKOFF[0]
        while True:
            if requeue is None:
                await worker.wake.wait()
            else:
                try:
                    async with asyncio.timeout(requeue):
                        await worker.wake.wait()
                except TimeoutError:
                    pass
            worker.wake.clear()
            started = time.monotonic()
            operation = "kill" if worker.removed else "sync"
            try:
                if worker.removed:
                    await self._syncer.terminate_pod(worker.uid, worker.pod)
                    if worker.readd is not None:
                        worker.pod, worker.readd, worker.removed = worker.readd, None, False
                        requeue = 0.0
                        continue
                    del self._workers[worker.uid]
                    return
                assert worker.pod is not None
                requeue = await self._syncer.sync_pod(worker.pod)
                worker.last_error = None
                error_delay = SYNC_ERROR_BACKOFF[0]
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # one pod's failure must never end the others
                worker.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("pod sync failed; will retry", pod_uid=worker.uid,
                            error=worker.last_error, retry_in=error_delay)
                requeue = error_delay
                error_delay = min(error_delay * 2, SYNC_ERROR_BACKOFF[1])
            finally:
                worker.last_sync = time.monotonic()
                if self._on_sync_duration is not None:
                    self._on_sync_duration(worker.uid, worker.last_sync - started)
                if self.observer is not None:
                    self.observer(operation, worker.last_sync - started)
