"""Deadlines, unreachable engines, concurrency of calls, and the event stream."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from runtime.docker import DockerRuntime
from runtime.types import RuntimeEvent, RuntimeTimeout, RuntimeUnavailable
from tests.runtime.util import run_container, run_sandbox, wait_exited

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def fake_engine() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    """Start unix-socket servers speaking whatever a test wants; yields their URLs."""
    directory = tempfile.mkdtemp(prefix="rt-fake-")  # short: unix socket paths are limited
    servers: list[asyncio.Server] = []
    tasks: set[asyncio.Task] = set()

    async def start(handler: Handler) -> str:
        path = os.path.join(directory, f"engine{len(servers)}.sock")

        async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            tasks.add(asyncio.current_task())
            try:
                await handler(reader, writer)
            finally:
                writer.close()

        servers.append(await asyncio.start_unix_server(tracked, path))
        return f"unix://{path}"

    yield start
    for server in servers:
        server.close()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    shutil.rmtree(directory, ignore_errors=True)


async def _read_request(reader: asyncio.StreamReader) -> str:
    head = await reader.readuntil(b"\r\n\r\n")
    return head.split(b" ", 2)[1].decode()


def _json_response(body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)


async def test_hung_engine_times_out_while_another_keeps_working(fake_engine, make_runtime):
    connections = 0

    async def never_answer(reader, writer) -> None:
        nonlocal connections
        connections += 1
        await reader.read()  # until the client gives up and closes

    url = await fake_engine(never_answer)
    hung = make_runtime(docker_url=url, call_timeout=0.5)
    healthy = make_runtime(call_timeout=10.0)

    async def expect_timeout(call: Awaitable) -> float:
        started = time.monotonic()
        with pytest.raises(RuntimeTimeout):
            await call
        return time.monotonic() - started

    hung_results, healthy_version = await asyncio.gather(
        asyncio.gather(expect_timeout(hung.version()), expect_timeout(hung.list_containers()),
                       expect_timeout(hung.stop_container("a" * 64, 0))),
        healthy.version(),
    )
    assert all(0.4 <= seconds < 2.0 for seconds in hung_results), hung_results
    assert healthy_version.startswith("docker://")
    assert await healthy.list_containers() == []


async def test_concurrent_calls_are_not_queued_by_the_connection_pool(fake_engine, make_runtime):
    """110 pods call the engine at once: every call must get its own connection."""
    open_connections = 0
    peak = 0

    async def never_answer(reader, writer) -> None:
        nonlocal open_connections, peak
        open_connections += 1
        peak = max(peak, open_connections)
        try:
            await reader.read()
        finally:
            open_connections -= 1

    rt = make_runtime(docker_url=await fake_engine(never_answer), call_timeout=1.5)
    assert rt.docker.connector.limit == 0
    started = time.monotonic()
    results = await asyncio.gather(*(rt.list_containers(f"pod-{i}") for i in range(130)),
                                   return_exceptions=True)
    assert all(isinstance(r, RuntimeTimeout) for r in results)
    assert time.monotonic() - started < 3.0
    assert peak >= 130, f"only {peak} requests reached the engine at once"


async def test_unreachable_engine_is_unavailable(make_runtime):
    rt = make_runtime(docker_url="unix:///nonexistent/nodeagent/docker.sock", call_timeout=5.0)
    for call in (rt.version(), rt.list_containers(), rt.list_pod_sandboxes()):
        with pytest.raises(RuntimeUnavailable):
            await call
    with pytest.raises(RuntimeUnavailable):
        async for _ in rt.events():
            pass


@pytest.mark.parametrize("clean_end", [True, False])
async def test_event_stream_break_raises_unavailable(fake_engine, make_runtime, clean_end):
    event = {"Type": "container", "Action": "die",
             "Actor": {"ID": "c" * 64, "Attributes": {"io.kubernetes.pod.uid": "uid-1"}}}

    async def serve(reader, writer) -> None:
        path = await _read_request(reader)
        if "/version" in path:
            writer.write(_json_response({"ApiVersion": "1.41", "Version": "20.10.24"}))
            await writer.drain()
            await _read_request(reader)  # keep-alive: the next request is the events one
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        line = json.dumps(event).encode() + b"\n"
        writer.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
        if clean_end:
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)
        # Returning closes the connection: mid-chunk when not clean_end.

    rt = make_runtime(docker_url=await fake_engine(serve), call_timeout=5.0)
    seen: list[RuntimeEvent] = []
    with pytest.raises(RuntimeUnavailable):
        async for item in rt.events():
            seen.append(item)
    assert seen == [RuntimeEvent(pod_uid="uid-1", container_id="c" * 64, action="die")]


@pytest.mark.docker
async def test_events_report_our_containers_only(runtime, make_runtime):
    since = time.time() - 1
    other = make_runtime()
    foreign_sandbox = await run_sandbox(other)
    foreign = await run_container(other, foreign_sandbox, "noise", "exit 0")
    await wait_exited(other, foreign)

    sandbox = await run_sandbox(runtime)
    ours = await run_container(runtime, sandbox, "short", "sleep 0.2; exit 4")
    await wait_exited(runtime, ours)

    seen: list[RuntimeEvent] = []

    async def collect() -> None:
        async for event in runtime.events(since=since):
            seen.append(event)
            if event.container_id == ours and event.action == "die":
                return

    await asyncio.wait_for(collect(), timeout=15)
    actions = {(e.container_id, e.action) for e in seen}
    assert {(ours, "create"), (ours, "start"), (ours, "die"),
            (sandbox.id, "create"), (sandbox.id, "start")} <= actions
    assert {e.pod_uid for e in seen} == {sandbox.pod.uid}
    assert not {foreign, foreign_sandbox.id} & {e.container_id for e in seen}

    # Live events (no replay): a stop shows up while we listen.
    live: list[RuntimeEvent] = []
    stream = runtime.events()

    async def listen() -> None:
        async for event in stream:
            live.append(event)
            if event.container_id == sandbox.id and event.action == "die":
                return

    listener = asyncio.create_task(listen())
    await asyncio.sleep(0.5)  # the subscription is open once the first read is pending
    await runtime.stop_pod_sandbox(sandbox.id, timeout=5)
    await asyncio.wait_for(listener, timeout=10)
    assert (sandbox.id, "die") in {(e.container_id, e.action) for e in live}
    await stream.aclose()


@pytest.mark.docker
async def test_version(runtime):
    version = await runtime.version()
    engine = await runtime.engine.call("version", "GET", "version")
    assert version == f"docker://{engine['Version']}" and re.match(r"docker://\d+\.\d+", version)


async def test_closed_runtime_is_unavailable():
    rt = DockerRuntime("closed-node")
    await rt.close()
    with pytest.raises(RuntimeUnavailable):
        await rt.version()


async def test_event_stream_survives_long_lines_and_bad_json(fake_engine, make_runtime):
    """A 5 MB event line (a huge annotation) and garbage lines are skipped as they
    arrive, with a resync marker; the events after them still come through."""
    from runtime.engine import MAX_STREAM_LINE
    from runtime.types import RESYNC_ACTION

    def event(uid: str) -> bytes:
        return json.dumps({"Type": "container", "Action": "start",
                           "Actor": {"ID": "c" * 64, "Attributes": {"io.kubernetes.pod.uid": uid}}}).encode()

    huge = json.dumps({"Type": "container", "Action": "start",
                       "Actor": {"ID": "d" * 64, "Attributes": {"x": "a" * (5 * 1024 * 1024)}}}).encode()
    assert len(huge) > MAX_STREAM_LINE
    body = (event("uid-1") + b"\n" + huge + b"\n" + b"{not json\n" + b"[1, 2]\n" + b'{"Actor": "x", "Action": 3}\n'
            + event("uid-2") + b"\n")

    async def serve(reader, writer) -> None:
        path = await _read_request(reader)
        if "/version" in path:
            writer.write(_json_response({"ApiVersion": "1.41", "Version": "20.10.24"}))
            await writer.drain()
            await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        for i in range(0, len(body), 100_000):  # split lines across chunks
            piece = body[i:i + 100_000]
            writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)

    rt = make_runtime(docker_url=await fake_engine(serve), call_timeout=5.0)
    seen: list[RuntimeEvent] = []
    with pytest.raises(RuntimeUnavailable):  # the clean end is still an end, for the PLEG to reopen
        async for item in rt.events():
            seen.append(item)
    resync = RuntimeEvent(pod_uid="", container_id="", action=RESYNC_ACTION)
    assert seen == [RuntimeEvent(pod_uid="uid-1", container_id="c" * 64, action="start"),
                    resync, resync, resync,
                    RuntimeEvent(pod_uid="uid-2", container_id="c" * 64, action="start")]


async def test_iter_json_lines_holds_at_most_the_line_limit():
    """The reader never buffers more than max_line of one line."""
    from runtime.engine import SKIPPED_LINE, iter_json_lines

    class Content:
        def __init__(self, chunks):
            self.chunks = list(chunks)

        async def readany(self):
            return self.chunks.pop(0) if self.chunks else b""

    class Response:
        def __init__(self, chunks):
            self.content = Content(chunks)

    chunks = [b'{"a": 1}\n{"b": ', b"2" * 5000, b"}\n", b'{"c": 3}', b"\n", b'{"d": 4}']
    got = [obj async for obj in iter_json_lines(Response(chunks), "test", max_line=1000)]
    assert got == [{"a": 1}, SKIPPED_LINE, {"c": 3}, {"d": 4}]
