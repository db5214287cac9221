"""PodWorkers' state machine (syncing -> terminating -> terminated) against a fake syncer."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from nodeagent.kubelet.podworkers import PodState, PodWorkers, SyncResult


def pod(uid: str = "u1", version: int = 0, deleted: bool = False) -> dict:
    meta = {"name": f"p-{uid}", "namespace": "default", "uid": uid, "generation": version}
    if deleted:
        meta["deletionTimestamp"] = "2030-01-01T00:00:00Z"
    return {"metadata": meta, "spec": {"containers": [{"name": "c", "image": "busybox:1.35"}]}}


class FakeSyncer:
    """Records every call; each kind of call can be made to block until released."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.entered: dict[str, asyncio.Event] = {}
        self.result: object = None
        self.fail: dict[str, int] = {}
        self.forgotten: list[tuple[str, bool]] = []
        self.cancelled_syncs = 0

    def block(self, kind: str) -> None:
        self.gates[kind] = asyncio.Event()
        self.entered[kind] = asyncio.Event()

    def release(self, kind: str) -> None:
        self.gates.pop(kind).set()

    async def _enter(self, kind: str) -> None:
        if kind in self.entered:
            self.entered[kind].set()
        gate = self.gates.get(kind)
        if gate is not None:
            await gate.wait()
        if self.fail.get(kind):
            self.fail[kind] -= 1
            raise RuntimeError(f"{kind} failed")

    async def sync_pod(self, p: dict):
        self.calls.append(("sync", p["metadata"]["uid"], p["metadata"]["generation"]))
        try:
            await self._enter("sync")
        except asyncio.CancelledError:
            self.cancelled_syncs += 1
            raise
        return self.result

    async def finish_pod(self, uid: str, p: dict) -> None:
        self.calls.append(("finish", uid, p["metadata"]["generation"]))
        await self._enter("finish")

    async def terminate_pod(self, uid: str, p: dict | None) -> None:
        self.calls.append(("terminate", uid, p["metadata"]["generation"] if p else None))
        await self._enter("terminate")

    def forget_pod(self, uid: str, *, readded: bool) -> None:
        self.forgotten.append((uid, readded))

    def kinds(self) -> list[str]:
        return [c[0] for c in self.calls]


@contextlib.asynccontextmanager
async def running(workers: PodWorkers):
    task = asyncio.create_task(workers.run())
    await asyncio.sleep(0)
    try:
        yield workers
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def settle(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def until(predicate, timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.001)


async def test_new_pod_syncs_and_stays_syncing():
    s = FakeSyncer()
    async with running(PodWorkers(s)) as w:
        w.update(pod())
        await until(lambda: s.calls)
        await settle()
        assert s.calls == [("sync", "u1", 0)]
        assert w.state("u1") is PodState.SYNCING
        w.kick("u1")
        await until(lambda: len(s.calls) == 2)
        assert w.state("u1") is PodState.SYNCING


async def test_updates_coalesce_to_the_newest_pod():
    s = FakeSyncer()
    s.block("sync")
    async with running(PodWorkers(s)) as w:
        w.update(pod(version=0))
        await s.entered["sync"].wait()
        for v in range(1, 6):
            w.update(pod(version=v))
            w.kick("u1")
        s.release("sync")
        await until(lambda: len(s.calls) >= 2)
        await settle()
        # One more sync, with the newest version only.
        assert s.calls == [("sync", "u1", 0), ("sync", "u1", 5)]


async def test_requeue_after_resyncs_without_an_event():
    s = FakeSyncer()
    s.result = 0.05
    async with running(PodWorkers(s)) as w:
        w.update(pod())
        await until(lambda: len(s.calls) >= 3)
        assert set(s.kinds()) == {"sync"}


async def test_finished_pod_goes_terminating_then_terminated_and_is_kept():
    s = FakeSyncer()
    s.result = SyncResult(finished=True)
    async with running(PodWorkers(s)) as w:
        w.update(pod())
        await until(lambda: w.state("u1") is PodState.TERMINATED)
        assert s.calls == [("sync", "u1", 0), ("finish", "u1", 0)]
        # Still known (its containers stay), never synced or started again.
        assert w.known() == {"u1"}
        w.kick("u1")
        w.kick_all()
        w.update(pod(version=0))  # the same pod again: nothing to do
        await settle()
        assert s.kinds() == ["sync", "finish"]
        # A changed pod (e.g. a deletionTimestamp) re-runs only the finish step.
        w.update(pod(version=1, deleted=True))
        await until(lambda: len(s.calls) == 3)
        assert s.calls[-1] == ("finish", "u1", 1)
        assert w.state("u1") is PodState.TERMINATED
        assert s.forgotten == []


async def test_pod_terminal_when_first_seen_is_never_synced():
    s = FakeSyncer()
    async with running(PodWorkers(s)) as w:
        w.update(pod(), finished=True)
        assert w.state("u1") is PodState.TERMINATING
        await until(lambda: w.state("u1") is PodState.TERMINATED)
        assert s.kinds() == ["finish"]


async def test_deleted_pod_terminates_without_a_sync():
    s = FakeSyncer()
    s.block("sync")
    async with running(PodWorkers(s)) as w:
        w.update(pod())
        await s.entered["sync"].wait()
        w.update(pod(version=1, deleted=True))
        assert w.state("u1") is PodState.TERMINATING
        await until(lambda: w.state("u1") is PodState.TERMINATED)
        assert s.cancelled_syncs == 1  # the sync in flight gave way
        assert s.calls == [("sync", "u1", 0), ("finish", "u1", 1)]


async def test_removal_terminates_forgets_and_drops_the_worker():
    s = FakeSyncer()
    async with running(PodWorkers(s)) as w:
        w.update(pod())
        await until(lambda: s.calls)
        w.remove("u1", pod(version=1))
        await until(lambda: "u1" not in w.known())
        assert s.calls == [("sync", "u1", 0), ("terminate", "u1", 1)]
        assert s.forgotten == [("u1", False)]
        assert w.state("u1") is None


async def test_removal_of_a_terminated_pod_removes_it():
    s = FakeSyncer()
    s.result = SyncResult(finished=True)
    async with running(PodWorkers(s)) as w:
        w.update(pod())
        await until(lambda: w.state("u1") is PodState.TERMINATED)
        w.remove("u1")
        await until(lambda: "u1" not in w.known())
        assert s.kinds() == ["sync", "finish", "terminate"]
        assert s.calls[-1] == ("terminate", "u1", 0)  # the last known spec is used


async def test_removal_cancels_a_sync_in_flight():
    s = FakeSyncer()
    s.block("sync")
    async with running(PodWorkers(s)) as w:
        w.update(pod())
        await s.entered["sync"].wait()
        w.remove("u1")
        await until(lambda: "u1" not in w.known())
        assert s.cancelled_syncs == 1
        assert s.kinds() == ["sync", "terminate"]


async def test_readd_while_terminating_runs_only_after_termination_completes():
    s = FakeSyncer()
    s.block("terminate")
    async with running(PodWorkers(s)) as w:
        w.update(pod(version=0))
        await until(lambda: s.calls)
        w.remove("u1")
        await s.entered["terminate"].wait()
        w.update(pod(version=7))  # same uid comes back (an edit reverted)
        w.kick("u1")
        await settle()
        assert s.kinds() == ["sync", "terminate"]  # nothing runs while terminating
        assert w.state("u1") is PodState.TERMINATING
        s.release("terminate")
        await until(lambda: len(s.calls) == 3)
        assert s.calls[-1] == ("sync", "u1", 7)
        # The removal completed with readded=True: the kubelet keeps the new record.
        assert s.forgotten == [("u1", True)]
        assert w.state("u1") is PodState.SYNCING
        assert w.known() == {"u1"}


async def test_remove_after_readd_cancels_the_readd():
    s = FakeSyncer()
    s.block("terminate")
    async with running(PodWorkers(s)) as w:
        w.update(pod())
        await until(lambda: s.calls)
        w.remove("u1")
        await s.entered["terminate"].wait()
        w.update(pod(version=1))
        w.remove("u1")
        s.release("terminate")
        await until(lambda: "u1" not in w.known())
        await settle()
        assert s.kinds() == ["sync", "terminate"]
        assert s.forgotten == [("u1", False)]


async def test_kicks_during_terminate_do_not_repeat_it():
    s = FakeSyncer()
    s.block("terminate")
    async with running(PodWorkers(s)) as w:
        w.update(pod())
        await until(lambda: s.calls)
        w.remove("u1")
        await s.entered["terminate"].wait()
        for _ in range(10):
            w.kick("u1")
            w.kick_all()
        s.release("terminate")
        await until(lambda: "u1" not in w.known())
        await settle()
        assert s.kinds() == ["sync", "terminate"]
        w.kick("u1")  # after the worker is gone: a no-op
        await settle()
        assert s.kinds() == ["sync", "terminate"]


async def test_failed_steps_retry_with_backoff_and_report_errors():
    s = FakeSyncer()
    s.fail["sync"] = 2
    async with running(PodWorkers(s, error_backoff=(0.01, 0.02))) as w:
        w.update(pod())
        await until(lambda: len(s.calls) == 1)
        await until(lambda: "u1" in w.errors())
        assert "sync failed" in w.errors()["u1"]
        await until(lambda: len(s.calls) == 3)
        await settle()
        assert w.errors() == {}
        # A failing termination is retried too; the worker stays until it succeeds.
        s.fail["terminate"] = 1
        w.remove("u1")
        await until(lambda: "u1" not in w.known())
        assert s.kinds()[-2:] == ["terminate", "terminate"]


async def test_one_pod_blocking_does_not_hold_back_another():
    s = FakeSyncer()
    s.block("terminate")
    async with running(PodWorkers(s)) as w:
        w.update(pod("a"))
        await until(lambda: s.calls)
        w.remove("a")
        await s.entered["terminate"].wait()
        w.update(pod("b"))
        await until(lambda: ("sync", "b", 0) in s.calls)
        s.release("terminate")


async def test_gc_fence_holds_back_pods_added_during_a_pass():
    s = FakeSyncer()
    async with running(PodWorkers(s)) as w:
        w.update(pod("old"))
        await until(lambda: s.calls)
        async with w.gc_fence() as live:
            assert live == {"old"}
            w.update(pod("new"))
            assert "new" in w.known()  # registered at once ...
            await settle()
            assert ("sync", "new", 0) not in s.calls  # ... but creates nothing yet
            w.kick("old")  # pods in the snapshot keep syncing
            await until(lambda: len(s.calls) == 2)
        await until(lambda: ("sync", "new", 0) in s.calls)


async def test_updates_before_run_start_when_it_runs():
    s = FakeSyncer()
    w = PodWorkers(s)
    w.update(pod("a"))
    w.remove("b")
    async with running(w):
        await until(lambda: len(s.calls) == 2)
    assert sorted(s.kinds()) == ["sync", "terminate"]


@pytest.mark.parametrize("requeue", [None, 0.5])
async def test_plain_float_results_are_requeue_delays(requeue):
    s = FakeSyncer()
    s.result = requeue
    async with running(PodWorkers(s)) as w:
        w.update(pod())
        await until(lambda: s.calls)
        await asyncio.sleep(0.05)
        assert s.kinds() == ["sync"]
        assert w.state("u1") is PodState.SYNCING
