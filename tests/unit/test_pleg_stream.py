"""The PLEG's event stream never ends the agent: whatever breaks it (a runtime error, an
unexpected exception), it is reopened, and an unreadable event triggers a relist."""

from __future__ import annotations

import asyncio

from nodeagent.kubelet.pleg import PLEG
from runtime.types import RESYNC_ACTION, RuntimeEvent, RuntimeUnavailable


class FlakyRuntime:
    """events() fails in a different way on each of the first calls, then works."""

    def __init__(self) -> None:
        self.opened = 0
        self.lists = 0

    async def events(self, since=None):
        self.opened += 1
        if self.opened == 1:
            yield RuntimeEvent(pod_uid="a", container_id="c1", action="start")
            raise ValueError("Line is too long")  # what aiohttp's readline raised before
        if self.opened == 2:
            raise RuntimeUnavailable("docker went away")
        yield RuntimeEvent(pod_uid="", container_id="", action=RESYNC_ACTION)
        yield RuntimeEvent(pod_uid="b", container_id="c2", action="die")
        await asyncio.Event().wait()  # stays open

    async def list_pod_sandboxes(self, pod_uid=None):
        self.lists += 1
        return []

    async def list_containers(self, pod_uid=None):
        return []


async def test_event_stream_failures_are_recovered():
    runtime = FlakyRuntime()
    kicked: list[str] = []
    pleg = PLEG(runtime, on_pod_event=kicked.append, on_relist=lambda uids: None, relist_period=60)
    task = asyncio.create_task(pleg.run())
    try:
        async with asyncio.timeout(10):
            while "b" not in kicked:
                await asyncio.sleep(0.05)
        assert not task.done()
        assert runtime.opened == 3 and kicked[0] == "a"
        # The first relist at start, then one per stream break and one for the resync marker.
        async with asyncio.timeout(5):
            while runtime.lists < 3:
                await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
