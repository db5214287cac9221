"""PLEG against a fake runtime (runtime.types.RuntimeService): event kicks, relist
fingerprints, relist failures and a lost event stream."""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

from nodeagent.kubelet.pleg import PLEG
from runtime.types import (
    ContainerState,
    ContainerStatus,
    PodRef,
    RuntimeEvent,
    RuntimeService,
    RuntimeUnavailable,
    SandboxState,
    SandboxStatus,
)


def ref(uid: str) -> PodRef:
    return PodRef(name=f"p-{uid}", namespace="default", uid=uid)


class FakeRuntime:
    """Only what PLEG uses is real; the rest of RuntimeService raises."""

    def __init__(self) -> None:
        self.sandboxes: list[SandboxStatus] = []
        self.containers: list[ContainerStatus] = []
        self.down: str | None = None
        self.list_calls = 0
        self.streams = 0
        self.queue: asyncio.Queue[RuntimeEvent | Exception] = asyncio.Queue()

    async def version(self) -> str:
        return "fake"

    async def list_pod_sandboxes(self, pod_uid: str | None = None) -> list[SandboxStatus]:
        self.list_calls += 1
        if self.down:
            raise RuntimeUnavailable(self.down)
        return [s for s in self.sandboxes if pod_uid in (None, s.pod.uid)]

    async def list_containers(self, pod_uid: str | None = None) -> list[ContainerStatus]:
        if self.down:
            raise RuntimeUnavailable(self.down)
        return [c for c in self.containers if pod_uid in (None, c.pod.uid)]

    async def events(self) -> AsyncIterator[RuntimeEvent]:
        self.streams += 1
        while True:
            item = await self.queue.get()
            if isinstance(item, Exception):
                raise item
            yield item

    def __getattr__(self, name: str):
        raise AssertionError(f"PLEG must not call runtime.{name}")

    # helpers
    def add_pod(self, uid: str, *, state=ContainerState.RUNNING, exit_code=None) -> ContainerStatus:
        self.sandboxes.append(SandboxStatus(id=f"sb-{uid}", pod=ref(uid), attempt=0,
                                            state=SandboxState.READY, created_at=1.0))
        c = ContainerStatus(id=f"c-{uid}", pod=ref(uid), name="app", attempt=0, state=state,
                            image="busybox:1.35", image_id="", created_at=2.0, exit_code=exit_code)
        self.containers.append(c)
        return c


def make(runtime: FakeRuntime, **kw) -> tuple[PLEG, list[str], list[set[str]]]:
    events: list[str] = []
    relists: list[set[str]] = []
    rt: RuntimeService = runtime  # type-checks the fake against the protocol's shape
    pleg = PLEG(rt, on_pod_event=events.append, on_relist=relists.append, **kw)
    return pleg, events, relists


async def until(predicate, timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def running(pleg: PLEG):
    task = asyncio.create_task(pleg.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_first_relist_kicks_every_pod_and_reports_runtime_uids():
    rt = FakeRuntime()
    rt.add_pod("a")
    rt.add_pod("b")
    pleg, events, relists = make(rt)
    assert pleg.healthy()[0] is False  # not contacted yet
    await pleg.relist()
    assert sorted(events) == ["a", "b"]
    assert relists == [{"a", "b"}]
    assert pleg.healthy() == (True, "ok")


async def test_relist_kicks_only_pods_whose_fingerprint_changed():
    rt = FakeRuntime()
    rt.add_pod("a")
    c = rt.add_pod("b")
    pleg, events, relists = make(rt)
    await pleg.relist()
    events.clear()
    await pleg.relist()
    assert events == []  # nothing changed
    c.state, c.exit_code = ContainerState.EXITED, 3
    await pleg.relist()
    assert events == ["b"]
    events.clear()
    c.exit_code = 4  # same id and state, other exit code: still a change
    await pleg.relist()
    assert events == ["b"]
    events.clear()
    rt.sandboxes = [s for s in rt.sandboxes if s.pod.uid != "a"]
    rt.containers = [x for x in rt.containers if x.pod.uid != "a"]
    await pleg.relist()
    assert events == ["a"]  # gone from the runtime: its worker is kicked too
    assert relists[-1] == {"b"}


async def test_relist_failure_marks_unhealthy_then_recovery_kicks_everything():
    rt = FakeRuntime()
    rt.add_pod("a")
    pleg, events, relists = make(rt, relist_period=0.05)
    async with running(pleg):
        await until(lambda: relists)
        events.clear()
        rt.down = "docker is down"
        pleg.request_relist()
        await until(lambda: pleg.runtime_error == "docker is down")
        ok, why = pleg.healthy()
        assert not ok and "docker is down" in why
        n = len(relists)
        rt.down = None
        # Retried within the relist period, without any request.
        await until(lambda: len(relists) > n)
        assert pleg.healthy() == (True, "ok")
        # After an outage every pod is re-examined, changed or not.
        assert "a" in events


async def test_events_kick_their_pod_only():
    rt = FakeRuntime()
    pleg, events, _ = make(rt, relist_period=60)
    async with running(pleg):
        await until(lambda: rt.streams == 1)
        await until(lambda: pleg.last_relist is not None)
        rt.queue.put_nowait(RuntimeEvent(pod_uid="x", container_id="c1", action="die"))
        rt.queue.put_nowait(RuntimeEvent(pod_uid="", container_id="c2", action="start"))
        rt.queue.put_nowait(RuntimeEvent(pod_uid="y", container_id="c3", action="start"))
        await until(lambda: events == ["x", "y"])


async def test_lost_event_stream_reconnects_and_relists():
    rt = FakeRuntime()
    rt.add_pod("a")
    pleg, events, relists = make(rt, relist_period=60)
    async with running(pleg):
        await until(lambda: rt.streams == 1 and relists)
        first = len(relists)
        # Something changed while the stream is broken: only a relist can find it.
        rt.containers[0].state = ContainerState.EXITED
        events.clear()
        rt.queue.put_nowait(RuntimeUnavailable("event stream closed"))
        await until(lambda: len(relists) > first)  # relist requested at once
        assert events == ["a"]
        await until(lambda: rt.streams == 2, timeout=5.0)  # and the stream reopened
        rt.queue.put_nowait(RuntimeEvent(pod_uid="b", container_id="c", action="start"))
        await until(lambda: "b" in events)


async def test_stale_relist_makes_pleg_unhealthy():
    rt = FakeRuntime()
    pleg, _, _ = make(rt, relist_period=1.0)
    await pleg.relist()
    assert pleg.healthy()[0]
    pleg.last_relist -= 31.0  # more than max(3 periods, 30 s) ago
    ok, why = pleg.healthy()
    assert not ok and "last seen active" in why


async def test_recent_listing_is_the_last_relist_while_young_enough():
    # Housekeeping's GC decides on it instead of listing the runtime itself.
    rt = FakeRuntime()
    rt.add_pod("a")
    pleg, _events, _relists = make(rt)
    assert pleg.recent_listing(10.0) is None  # no relist yet
    await pleg.relist()
    sandboxes, containers = pleg.recent_listing(10.0)
    assert [s.pod.uid for s in sandboxes] == ["a"] and [c.pod.uid for c in containers] == ["a"]
    await asyncio.sleep(0.05)
    assert pleg.recent_listing(0.01) is None  # older than asked for
