"""Pod lifecycle event generator: Docker's event stream, with a periodic relist.

Events give low latency; the relist is the safety net for anything the stream missed
(a reconnect, an engine restart) and the source of the node's view of which pods the
runtime holds (for orphan cleanup). Both only *kick* pod workers: the worker reads the
runtime itself, so a lost or duplicated event can never make state wrong.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

import structlog

from nodeagent.backoff import Delay
from runtime.types import RESYNC_ACTION, RuntimeError_, RuntimeService

log = structlog.get_logger(__name__)


class PLEG:
    def __init__(
        self,
        runtime: RuntimeService,
        *,
        on_pod_event: Callable[[str], None],
        on_relist: Callable[[set[str]], None],
        relist_period: float = 10.0,
    ) -> None:
        self._runtime = runtime
        self._on_pod_event = on_pod_event
        self._on_relist = on_relist
        self.relist_period = relist_period
        self._fingerprints: dict[str, frozenset] = {}
        self.last_relist: float | None = None  # monotonic time of the last good relist
        self.runtime_error: str | None = "not yet contacted"
        self._relist_now = asyncio.Event()
        # Optional: called with each successful relist's duration (metrics).
        self.observer: Callable[[float], None] | None = None
        # (monotonic time, sandboxes, containers) of the last good relist, shared with
        # the stats sampler so it needs no listing of its own.
        self.last_listing: tuple[float, list, list] | None = None

    def recent_listing(self, max_age: float) -> tuple[list, list] | None:
        """The last good relist's (sandboxes, containers) when it is at most ``max_age``
        seconds old, for consumers that would otherwise list the runtime themselves."""
        last = self.last_listing
        if last is None or time.monotonic() - last[0] > max_age:
            return None
        return last[1], last[2]

    def healthy(self) -> tuple[bool, str]:
        if self.runtime_error:
            return False, f"container runtime unavailable: {self.runtime_error}"
        if self.last_relist is None:
            return False, "no relist yet"
        age = time.monotonic() - self.last_relist
        limit = max(3 * self.relist_period, 30.0)
        if age > limit:
            return False, f"pleg was last seen active {age:.0f}s ago; threshold is {limit:.0f}s"
        return True, "ok"

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._watch_events(), name="pleg-events")
            tg.create_task(self._relist_loop(), name="pleg-relist")

    def request_relist(self) -> None:
        self._relist_now.set()

    async def _relist_loop(self) -> None:
        # Retry at least every relist period, so recovery shows up on /healthz as soon
        # as the engine is back.
        period = max(self.relist_period, 0.01)
        delay = Delay(min(1.0, period), period)
        while True:
            try:
                await self.relist()
                delay.reset()
                wait = self.relist_period
            except RuntimeError_ as exc:
                if self.runtime_error != str(exc):
                    log.warning("relist failed; container runtime unavailable", error=str(exc))
                self.runtime_error = str(exc) or type(exc).__name__
                wait = delay.next()
            try:
                async with asyncio.timeout(wait):
                    await self._relist_now.wait()
            except TimeoutError:
                pass
            self._relist_now.clear()

    def container_counts(self) -> tuple[int, dict[str, int]]:
        """(pods with a ready sandbox, containers by state) as of the last relist."""
        pods = 0
        states: dict[str, int] = {}
        for prints in self._fingerprints.values():
            if any(len(p) == 2 and p[1] == "ready" for p in prints):
                pods += 1
            for p in prints:
                if len(p) == 3:
                    states[p[1]] = states.get(p[1], 0) + 1
        return pods, states

    async def relist(self) -> None:
        started = time.monotonic()
        sandboxes = await self._runtime.list_pod_sandboxes()
        containers = await self._runtime.list_containers()
        was_down = self.runtime_error is not None
        self.runtime_error = None
        prints: dict[str, set] = {}
        for s in sandboxes:
            prints.setdefault(s.pod.uid, set()).add((s.id, s.state.value))
        for c in containers:
            prints.setdefault(c.pod.uid, set()).add((c.id, c.state.value, c.exit_code))
        current = {uid: frozenset(p) for uid, p in prints.items()}
        for uid in set(current) | set(self._fingerprints):
            if was_down or current.get(uid) != self._fingerprints.get(uid):
                self._on_pod_event(uid)
        self._fingerprints = current
        self.last_relist = time.monotonic()
        self.last_listing = (self.last_relist, sandboxes, containers)
        if self.observer is not None:
            self.observer(self.last_relist - started)
        if was_down:
            log.info("container runtime reachable", pods_in_runtime=len(current))
        self._on_relist(set(current))

    async def _watch_events(self) -> None:
        delay = Delay(1.0, 30.0, jitter=0.5)
        while True:
            try:
                async for event in self._runtime.events():
                    delay.reset()
                    if event.action == RESYNC_ACTION:
                        self.request_relist()
                    elif event.pod_uid:
                        self._on_pod_event(event.pod_uid)
            except RuntimeError_ as exc:
                log.debug("runtime event stream broke; reconnecting", error=str(exc), retry_in=delay)
            except Exception:  # whatever ends the stream, it is reopened: never the agent
                log.exception("runtime event stream failed; reconnecting", retry_in=delay)
            # Whatever happened while the stream was down is found by a relist.
            self.request_relist()
            await asyncio.sleep(delay.next())
