"""One serialized worker per pod, with kubelet's pod lifecycle states.

A worker owns everything that changes its pod in the runtime, so no two operations on
one pod ever overlap, while pods proceed independently: a hung runtime call (bounded by
its own deadline) delays only the pod whose worker made it.

Each worker is in one of kubelet's ``podWorkers`` states:

* ``SYNCING``: the pod should run; every wake-up runs ``sync_pod`` with the newest
  desired pod (updates coalesce, however many arrived while a sync was busy).
* ``TERMINATING``: the pod must stop. Either it *finished* (every container is terminal
  and the restart policy keeps it so, it was rejected, it carries a deletionTimestamp,
  or it was already terminal when first seen): ``finish_pod`` stops what still runs,
  stops the sandbox and releases its network, but keeps the exited containers (exit
  codes, logs) for as long as the pod exists. Or it was *removed* (no source wants it
  any more): ``terminate_pod`` stops and deletes everything. A sync running when the
  deletion or removal arrives is cancelled (like kubelet cancelling the sync context):
  the termination takes over.
* ``TERMINATED``: a finished pod's worker stays, idle, until the pod is removed: it is
  still known (the relist and housekeeping leave its containers and volumes alone) but
  is never started again. A removed pod's worker goes away once its termination
  completes.

A pod re-added with the same uid while it is being removed is honoured only after the
termination completes (kubelet: "terminating but has been requested to restart with
same UID"): the runtime is clean by then, and the pod starts over in ``SYNCING``.

Pods registered while a housekeeping pass runs (``gc_fence``) start syncing only once
it is over, so garbage collection working from a snapshot of known pods can never take
the veth or volume directory of a pod that appeared after the snapshot.
"""

from __future__ import annotations

import asyncio
import enum
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Protocol

import structlog

from nodeagent.backoff import Delay

log = structlog.get_logger(__name__)

# A failing sync or termination is retried on this schedule (doubling), independent of
# container back-off, so a runtime outage does not turn into a busy loop.
SYNC_ERROR_BACKOFF = (1.0, 30.0)


class PodState(enum.Enum):
    SYNCING = "syncing"
    TERMINATING = "terminating"
    TERMINATED = "terminated"


@dataclass(frozen=True)
class SyncResult:
    """What ``sync_pod`` may return instead of a bare requeue delay."""

    requeue_after: float | None = None
    # The pod must not run again (all containers terminal and staying so, rejected,
    # or deleted): the worker moves on to TERMINATING.
    finished: bool = False


class PodSyncer(Protocol):
    async def sync_pod(self, pod: dict) -> "SyncResult | float | None":
        """Drive the runtime toward the pod's spec; return seconds until the next
        sync is needed without any event (e.g. when a back-off ends), or None, or a
        SyncResult saying the pod has finished."""

    async def finish_pod(self, uid: str, pod: dict) -> None:
        """The pod must not run again: stop what runs (within the grace period), stop
        the sandbox and release its network; keep the exited containers."""

    async def terminate_pod(self, uid: str, pod: dict | None) -> None:
        """The pod is gone: stop and remove everything of it, within its grace period."""

    def forget_pod(self, uid: str, *, readded: bool) -> None:
        """The removal is complete: drop per-pod memory. ``readded``: the same uid was
        added again meanwhile, so its desired state (already recorded) must stay."""


@dataclass
class _Worker:
    uid: str
    pod: dict | None
    state: PodState = PodState.SYNCING
    # TERMINATING because no source wants the pod any more (rather than finished).
    removal: bool = False
    # The pod came back (same uid) while it was being removed.
    readd: dict | None = None
    # A newer pod than the one the last finish_pod ran with (TERMINATED only).
    changed: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None
    # The sync_pod in flight, cancelled when a removal arrives.
    sync_op: asyncio.Task | None = None
    last_sync: float = 0.0
    last_error: str | None = None


def _deleted(pod: dict | None) -> bool:
    return bool(pod and (pod.get("metadata") or {}).get("deletionTimestamp"))


class PodWorkers:
    def __init__(
        self,
        syncer: PodSyncer,
        *,
        on_sync_duration: Callable[[str, float], None] | None = None,
        error_backoff: tuple[float, float] = SYNC_ERROR_BACKOFF,
    ) -> None:
        self._syncer = syncer
        self._workers: dict[str, _Worker] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._on_sync_duration = on_sync_duration
        self._error_backoff = error_backoff
        # Set while no housekeeping pass runs; new workers wait for it.
        self._gc_idle = asyncio.Event()
        self._gc_idle.set()
        self._started = asyncio.Event()
        # Optional: called with ("sync" | "kill", seconds) after each worker pass (metrics).
        self.observer: Callable[[str, float], None] | None = None

    async def run(self) -> None:
        """Own the worker tasks; cancelling this cancels them all."""
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            for worker in self._workers.values():
                self._start(worker)
            try:
                await asyncio.Event().wait()
            finally:
                self._tg = None

    # --- inputs ----------------------------------------------------------------------

    def update(self, pod: dict, *, finished: bool = False) -> None:
        """The pod should exist on this node. ``finished``: it already ran to completion
        (e.g. terminal in the API when first seen): never start it, only make sure
        nothing of it runs and keep what is left."""
        uid = pod["metadata"]["uid"]
        worker = self._workers.get(uid)
        if worker is None:
            worker = _Worker(uid=uid, pod=pod)
            if finished or _deleted(pod):
                worker.state = PodState.TERMINATING
            self._workers[uid] = worker
            self._start(worker)
        elif worker.removal:
            worker.readd = pod  # honoured once the removal completes
            return
        elif worker.state == PodState.TERMINATED:
            # Sources re-deliver unchanged pods; only a change (a deletionTimestamp...)
            # is worth re-running the finish step for.
            if pod == worker.pod:
                return
            worker.pod = pod
            worker.changed = True
        else:
            worker.pod = pod
            if (finished or _deleted(pod)) and worker.state == PodState.SYNCING:
                worker.state = PodState.TERMINATING
                if worker.sync_op is not None:
                    worker.sync_op.cancel()  # e.g. a long image pull: stop it now
        worker.wake.set()

    def remove(self, uid: str, pod: dict | None = None) -> None:
        """Terminate and forget the pod; ``pod`` is its last known spec (for grace
        periods); None when only the runtime knows it."""
        worker = self._workers.get(uid)
        if worker is None:
            worker = _Worker(uid=uid, pod=pod)
            self._workers[uid] = worker
            self._start(worker)
        elif pod is not None:
            worker.pod = pod
        worker.state = PodState.TERMINATING
        worker.removal = True
        worker.readd = None
        if worker.sync_op is not None:
            worker.sync_op.cancel()  # the termination supersedes whatever it was doing
        worker.wake.set()

    def kick(self, uid: str) -> None:
        """Something about the pod changed in the runtime: sync it again."""
        worker = self._workers.get(uid)
        if worker is not None and worker.state != PodState.TERMINATED:
            worker.wake.set()

    def kick_all(self) -> None:
        for uid in list(self._workers):
            self.kick(uid)

    # --- queries -----------------------------------------------------------------------

    def known(self) -> set[str]:
        """Every pod uid with a worker, whatever its state."""
        return set(self._workers)

    def state(self, uid: str) -> PodState | None:
        worker = self._workers.get(uid)
        return worker.state if worker is not None else None

    def states(self) -> dict[str, PodState]:
        return {uid: w.state for uid, w in self._workers.items()}

    def errors(self) -> dict[str, str]:
        return {uid: w.last_error for uid, w in self._workers.items() if w.last_error}

    @asynccontextmanager
    async def gc_fence(self) -> AsyncIterator[set[str]]:
        """Hold back the first sync of pods added during a housekeeping pass; yields
        the known uids at the start of the pass."""
        self._gc_idle.clear()
        try:
            yield self.known()
        finally:
            self._gc_idle.set()

    # --- the worker ----------------------------------------------------------------------

    def _start(self, worker: _Worker) -> None:
        if self._tg is not None and worker.task is None:
            worker.task = self._tg.create_task(self._loop(worker), name=f"pod-{worker.uid}")

    async def _loop(self, worker: _Worker) -> None:
        # Registered before this first wait, so a running GC pass knows nothing of a
        # pod whose resources do not exist yet.
        await self._gc_idle.wait()
        requeue: float | None = 0.0 if worker.wake.is_set() else None
        errors = Delay(*self._error_backoff)
        while True:
            if requeue is None:
                await worker.wake.wait()
            elif requeue > 0:
                try:
                    async with asyncio.timeout(requeue):
                        await worker.wake.wait()
                except TimeoutError:
                    pass
            worker.wake.clear()
            started = time.monotonic()
            operation = "kill" if worker.removal else "sync"
            try:
                requeue = await self._step(worker)
                if worker.uid not in self._workers:
                    return
                worker.last_error = None
                errors.reset()
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                requeue = 0.0  # only the sync was cancelled (removal): go on at once
            except Exception as exc:  # one pod's failure must never end the others
                worker.last_error = f"{type(exc).__name__}: {exc}"
                requeue = errors.next()
                log.warning("pod worker step failed; will retry", pod_uid=worker.uid,
                            state=worker.state.value, error=worker.last_error, retry_in=requeue)
            finally:
                worker.last_sync = time.monotonic()
                if self._on_sync_duration is not None:
                    self._on_sync_duration(worker.uid, worker.last_sync - started)
                if self.observer is not None:
                    self.observer(operation, worker.last_sync - started)

    async def _step(self, worker: _Worker) -> float | None:
        """One step of the state machine; returns the requeue delay."""
        if worker.state == PodState.SYNCING:
            assert worker.pod is not None
            worker.sync_op = asyncio.ensure_future(self._syncer.sync_pod(worker.pod))
            try:
                result = await worker.sync_op
            finally:
                worker.sync_op = None
            if isinstance(result, SyncResult):
                if result.finished and worker.state == PodState.SYNCING:
                    worker.state = PodState.TERMINATING
                    return 0.0
                return result.requeue_after
            return result
        if worker.state == PodState.TERMINATING and worker.removal:
            await self._syncer.terminate_pod(worker.uid, worker.pod)
            readd = worker.readd
            self._syncer.forget_pod(worker.uid, readded=readd is not None)
            if readd is None:
                del self._workers[worker.uid]
                log.debug("pod worker done", pod_uid=worker.uid)
                return None
            log.info("pod re-added while terminating; starting it again", pod_uid=worker.uid)
            worker.pod, worker.readd, worker.removal = readd, None, False
            worker.state = PodState.TERMINATING if _deleted(readd) else PodState.SYNCING
            return 0.0
        if worker.state == PodState.TERMINATING or worker.changed:
            assert worker.pod is not None
            worker.changed = False
            pod = worker.pod
            await self._syncer.finish_pod(worker.uid, pod)
            if worker.state == PodState.TERMINATING and not worker.removal:
                worker.state = PodState.TERMINATED
            if worker.pod is not pod and not worker.removal:
                worker.changed = True  # updated while finishing: run it once more
                return 0.0
            return None
        return None  # TERMINATED and nothing new
