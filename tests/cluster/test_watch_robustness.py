"""Watches survive what the network sends: unreadable events, huge objects and wrong
types are logged, the reflector relists and keeps going; nothing raises out of it.

Against a small fake API server on loopback (plain HTTP), because the test control
plane, like the real API server, never sends such events.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from nodeagent.kube import KubeClient, Reflector
from nodeagent.kube import client as kube_client
from nodeagent.kube import resources as R
from nodeagent.kube.client import Backoff, WatchEventUnreadable
from nodeagent.kube.kubeconfig import KubeConfig


def cm(name: str, rv: int, **data: str) -> dict:
    return {"metadata": {"name": name, "namespace": "default", "resourceVersion": str(rv), "uid": f"u-{name}"},
            "data": data}


def line(event_type: str, obj: object) -> bytes:
    return json.dumps({"type": event_type, "object": obj}).encode() + b"\n"


class FakeApi:
    """Lists return ``state``; each watch streams the next script, then hangs up."""

    def __init__(self) -> None:
        self.state: dict[str, dict] = {}
        self.rv = 1
        self.scripts: list[list[bytes]] = []
        self.lists = 0
        self.watches = 0
        self.relist_state: tuple[dict[str, dict], int] | None = None  # what lists after the first see

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.query.get("watch") not in ("1", "true"):
            self.lists += 1
            if self.lists > 1 and self.relist_state is not None:
                self.state, self.rv = self.relist_state
            return web.json_response({"kind": "ConfigMapList", "apiVersion": "v1",
                                      "metadata": {"resourceVersion": str(self.rv)},
                                      "items": list(self.state.values())})
        self.watches += 1
        response = web.StreamResponse()
        await response.prepare(request)
        script = self.scripts.pop(0) if self.scripts else []
        for piece in script:
            await response.write(piece)
        if not script:
            await asyncio.sleep(0.2)
        return response


@pytest.fixture
async def fake_api():
    api = FakeApi()
    app = web.Application()
    app.router.add_get("/api/v1/namespaces/default/configmaps", api.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    client = KubeClient(KubeConfig(server=f"http://127.0.0.1:{port}"))
    try:
        yield api, client
    finally:
        await client.close()
        await runner.cleanup()


async def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_reflector_relists_after_unreadable_events_and_keeps_running(fake_api, monkeypatch):
    api, client = fake_api
    monkeypatch.setattr(kube_client, "MAX_WATCH_EVENT_BYTES", 4096)
    api.state = {"a": cm("a", 1)}
    api.rv = 1
    huge = line("MODIFIED", cm("a", 3, blob="x" * 10_000))
    api.scripts = [
        # A good event, then garbage: the good one is applied, then a relist.
        [line("ADDED", cm("b", 2)), b"{not json at all\n"],
        # Half of a huge line per write: dropped as it arrives, never held whole.
        [huge[:5000], huge[5000:], line("ADDED", cm("c", 4))],
        [b"[1, 2, 3]\n"],
        [line("ADDED", {"metadata": ["x"]})],
        [line("ADDED", "a string")],
        [line("ERROR", {"kind": "Status", "code": "not a number", "message": 7})],
        [line("ADDED", {"metadata": {"name": ["x"]}})],
        [b'{"type": "ADDED", "object": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"],
    ]
    seen: list[tuple[str, str]] = []
    reflector = Reflector(client, R.CONFIGMAPS, lambda t, o, old: seen.append((t, o["metadata"]["name"])),
                          namespace="default", backoff=Backoff(initial=0.01, maximum=0.05))

    # Whatever a relist finds is the server's current state.
    api.relist_state = ({"a": cm("a", 5, v="after"), "b": cm("b", 2)}, 5)
    task = asyncio.create_task(reflector.run())
    try:
        await wait_for(lambda: not api.scripts and api.watches >= 9)
        assert not task.done(), task
        assert reflector.stats.unreadable_events >= 6
        assert api.lists >= 7  # a relist after each unreadable event
        assert reflector.store[("default", "a")]["data"] == {"v": "after"}
        assert set(reflector.store) == {("default", "a"), ("default", "b")}  # c: never listed, dropped
        assert ("ADDED", "b") in seen
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_watch_stream_raises_unreadable_after_delivering_earlier_events(fake_api):
    api, client = fake_api
    api.scripts = [[line("ADDED", cm("b", 2)), b"\xff\xfe garbage\n", line("ADDED", cm("c", 3))]]
    got = []
    async with client.watch(R.CONFIGMAPS, "default", resource_version="1") as stream:
        with pytest.raises(WatchEventUnreadable):
            async for event in stream:
                got.append(event.object["metadata"]["name"])
    assert got == ["b"]
