"""`/exec` and `/attach`: kubelet's remote command protocol over Docker's exec/attach.

Transports: SPDY/3.1 (what a v1.32 API server sends; streams typed by the
`streamType` header: error, stdin, stdout, stderr, resize) with protocols
v4.channel.k8s.io down to channel.k8s.io, and WebSocket (v5/v4/... channel.k8s.io:
one channel byte per message; 0 stdin, 1 stdout, 2 stderr, 3 error, 4 resize, 255
close in v5). In v4+ the error stream carries a metav1.Status: Success, or Failure
with reason NonZeroExitCode and the exit code as a cause, which kubectl turns into its
own exit code. A client that goes away ends the exec (its process is killed) or
detaches the attach, and releases everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

import aiodocker
import structlog
from aiohttp import WSMsgType, web

from nodeagent.server import upgrade
from nodeagent.server.nodeapi import NodeApiServer, NotFound, Target, idle_watchdog
from nodeagent.server.spdy import SpdyStream

log = structlog.get_logger(__name__)

SPDY_PROTOCOLS = ["v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io"]
WS_PROTOCOLS = ["v5.channel.k8s.io", "v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io",
                "channel.k8s.io", "v4.base64.channel.k8s.io", "base64.channel.k8s.io"]
STREAM_CREATION_TIMEOUT = 30.0


@dataclass
class Options:
    stdin: bool = False
    stdout: bool = False
    stderr: bool = False
    tty: bool = False
    command: list[str] = field(default_factory=list)


def _flag(query, *names: str) -> bool:
    return any(query.get(n, "").lower() in ("1", "true") for n in names)


def parse_options(request: web.Request, kind: str) -> Options | str:
    """kubelet reads input/output/error/tty (the API server's names); the client-side
    names stdin/stdout/stderr are accepted too. Returns the 400 message on bad input."""
    q = request.query
    opts = Options(stdin=_flag(q, "input", "stdin"), stdout=_flag(q, "output", "stdout"),
                   stderr=_flag(q, "error", "stderr"), tty=_flag(q, "tty"),
                   command=list(q.getall("command", [])))
    if opts.tty and opts.stderr:
        opts.stderr = False  # one terminal: stderr is merged into stdout
    if not (opts.stdin or opts.stdout or opts.stderr):
        return "you must specify at least 1 of stdin, stdout, stderr"
    if kind == "exec" and not opts.command:
        return "you must specify at least 1 command"
    if sum(len(c) for c in opts.command) > 256 * 1024:
        return "command too long"
    return opts


def exit_status(code: int, command: list[str]) -> dict:
    if code == 0:
        return {"metadata": {}, "status": "Success"}
    return {"metadata": {}, "status": "Failure",
            "message": f"command terminated with non-zero exit code: error executing command "
                       f"{json.dumps(command)}, exit code {code}",
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]}}


def error_status(message: str) -> dict:
    return {"metadata": {}, "status": "Failure", "message": message, "reason": "InternalError",
            "code": 500}


class Channels:
    """What one exec/attach sees of its client, whatever the transport."""

    async def read_stdin(self) -> bytes:  # b"" at EOF
        raise NotImplementedError

    async def write(self, fd: int, data: bytes) -> None:
        raise NotImplementedError

    def resizes(self) -> AsyncIterator[tuple[int, int]]:
        raise NotImplementedError

    async def finish(self, status: dict, legacy_text: str) -> None:
        raise NotImplementedError


async def _resize_objects(read: Callable[[], Awaitable[bytes]]) -> AsyncIterator[tuple[int, int]]:
    """A stream of concatenated {"Width":..,"Height":..} objects."""
    decoder = json.JSONDecoder()
    buf = ""
    while True:
        chunk = await read()
        if not chunk:
            return
        buf += chunk.decode(errors="replace")
        if len(buf) > 65536:
            return
        while buf.strip():
            buf = buf.lstrip()
            try:
                obj, end = decoder.raw_decode(buf)
            except ValueError:
                break
            buf = buf[end:]
            if isinstance(obj, dict):
                try:
                    w, h = int(obj.get("Width", 0)), int(obj.get("Height", 0))
                except (TypeError, ValueError):
                    continue
                if 0 < w < 65536 and 0 < h < 65536:
                    yield w, h


class SpdyChannels(Channels):
    def __init__(self, streams: dict[str, SpdyStream], protocol: str) -> None:
        self.streams = streams
        self.protocol = protocol

    async def read_stdin(self) -> bytes:
        stream = self.streams.get("stdin")
        return await stream.read() if stream else b""

    async def write(self, fd: int, data: bytes) -> None:
        stream = self.streams.get("stdout" if fd == 1 else "stderr") or self.streams.get("stdout")
        if stream is not None:
            await stream.write(data)

    async def resizes(self) -> AsyncIterator[tuple[int, int]]:
        stream = self.streams.get("resize")
        if stream is None:
            return
        async for size in _resize_objects(stream.read):
            yield size

    async def finish(self, status: dict, legacy_text: str) -> None:
        for name in ("stdout", "stderr"):
            if name in self.streams:
                self.streams[name].close()
        error = self.streams.get("error")
        if error is not None:
            if self.protocol == "v4.channel.k8s.io":
                await error.write(json.dumps(status).encode())
            elif legacy_text:
                await error.write(legacy_text.encode())
            error.close()


class WebSocketChannels(Channels):
    def __init__(self, ws: web.WebSocketResponse, protocol: str) -> None:
        self.ws = ws
        self.protocol = protocol
        self.base64 = "base64" in protocol
        self.stdin: asyncio.Queue[bytes] = asyncio.Queue(maxsize=64)
        self.resize_q: asyncio.Queue[bytes] = asyncio.Queue(maxsize=64)
        self.closed = asyncio.Event()
        self.last_activity = time.monotonic()

    async def pump(self) -> None:
        """Reads the client's messages into the stdin and resize queues."""
        import base64 as b64  # noqa: PLC0415

        try:
            async for msg in self.ws:
                self.last_activity = time.monotonic()
                if msg.type == WSMsgType.BINARY and not self.base64:
                    data = msg.data
                    if not data:
                        continue
                    channel, payload = data[0], data[1:]
                elif msg.type == WSMsgType.TEXT and self.base64:
                    if not msg.data:
                        continue
                    try:
                        channel, payload = int(msg.data[0]), b64.b64decode(msg.data[1:])
                    except ValueError:
                        continue
                else:
                    continue
                if channel == 0 and payload:
                    await self.stdin.put(payload)
                elif channel == 4:
                    await self.resize_q.put(payload)
                elif channel == 255 and payload[:1] == b"\x00":
                    await self.stdin.put(b"")  # v5: the client closed stdin
        finally:
            self.closed.set()
            for q in (self.stdin, self.resize_q):
                with contextlib.suppress(asyncio.QueueFull):
                    q.put_nowait(b"")

    async def read_stdin(self) -> bytes:
        return await self.stdin.get()

    async def _send(self, channel: int, data: bytes) -> None:
        self.last_activity = time.monotonic()
        if self.base64:
            import base64 as b64  # noqa: PLC0415

            await self.ws.send_str(str(channel) + b64.b64encode(data).decode())
        else:
            await self.ws.send_bytes(bytes([channel]) + data)

    async def write(self, fd: int, data: bytes) -> None:
        await self._send(fd, data)

    async def resizes(self) -> AsyncIterator[tuple[int, int]]:
        async for size in _resize_objects(self.resize_q.get):
            yield size

    async def finish(self, status: dict, legacy_text: str) -> None:
        if self.protocol.startswith(("v4.", "v5.")):
            await self._send(3, json.dumps(status).encode())
        elif legacy_text:
            await self._send(3, legacy_text.encode())
        await self.ws.close()


def _oci_exit_code(first_output: bytes, code: int) -> int:
    """Docker reports an exec whose program cannot start with exit code 126 and the
    runtime's message on stdout; a shell would say 127 for a missing program."""
    if code == 126 and (b"executable file not found" in first_output
                        or b"no such file or directory" in first_output):
        return 127
    return code


async def run_exec(docker: aiodocker.Docker, target: Target, opts: Options, channels: Channels,
                   client_gone: asyncio.Event) -> None:
    container = docker.containers.container(target.container_id)
    try:
        execution = await container.exec(opts.command, stdout=opts.stdout or opts.tty,
                                         stderr=opts.stderr, stdin=opts.stdin, tty=opts.tty)
    except aiodocker.DockerError as exc:
        message = f"error executing command in container: {exc.message}"
        await channels.finish(error_status(message), message)
        return
    finished = False
    try:
        async with execution.start(detach=False) as stream:
            code_override = await _pump(stream, channels, opts, client_gone,
                                        resize=lambda w, h: execution.resize(w=w, h=h), exec_mode=True)
            info = await execution.inspect()
            finished = not info.get("Running")
            if client_gone.is_set() and info.get("Running") and info.get("Pid"):
                _kill(int(info["Pid"]))
                finished = True
                return
        code = int(info.get("ExitCode") or 0)
        if code_override is not None:
            code = code_override(code)
        legacy = "" if code == 0 else f"command terminated with non-zero exit code: exit code {code}"
        await channels.finish(exit_status(code, opts.command), legacy)
    finally:
        if not finished:
            with contextlib.suppress(Exception):
                info = await execution.inspect()
                if info.get("Running") and info.get("Pid"):
                    _kill(int(info["Pid"]))


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)
        log.info("killed the exec process of a client that went away", pid=pid)


async def run_attach(docker: aiodocker.Docker, target: Target, opts: Options, channels: Channels,
                     client_gone: asyncio.Event) -> None:
    container = docker.containers.container(target.container_id)
    info = await container.show()
    if opts.stdin and not (info.get("Config") or {}).get("OpenStdin"):
        message = "stdin is not open for this container (set stdin: true in the pod spec)"
        await channels.finish(error_status(message), message)
        return
    async with container.attach(stdout=opts.stdout, stderr=opts.stderr, stdin=opts.stdin) as stream:
        await _pump(stream, channels, opts, client_gone,
                    resize=lambda w, h: container.resize(w=w, h=h), exec_mode=False)
    await channels.finish({"metadata": {}, "status": "Success"}, "")


async def _pump(stream, channels: Channels, opts: Options, client_gone: asyncio.Event, *,
                resize, exec_mode: bool):
    """Copies between the Docker stream and the client until the output ends or the
    client goes away. Returns an exit-code adjustment for a program that could not start."""
    first = bytearray()
    first_seen = False

    async def output() -> None:
        nonlocal first_seen
        while True:
            msg = await stream.read_out()
            if msg is None:
                return
            data = msg.data
            if exec_mode and not first_seen:
                first_seen = True
                first.extend(data[:512])
                if data.startswith(b"OCI runtime exec failed"):
                    # The runtime's own complaint belongs on stderr, as kubectl shows it.
                    await channels.write(2 if opts.stderr else 1, data)
                    continue
            await channels.write(2 if msg.stream == 2 else 1, data)

    async def stdin() -> None:
        while True:
            data = await channels.read_stdin()
            if not data:
                # Half-close Docker's hijacked connection: the program sees EOF.
                transport = stream._resp.connection.transport if stream._resp and stream._resp.connection else None
                if transport is not None and transport.can_write_eof():
                    transport.write_eof()
                return
            await stream.write_in(data)

    async def resizes() -> None:
        async for w, h in channels.resizes():
            with contextlib.suppress(aiodocker.DockerError):
                await resize(w, h)

    out = asyncio.create_task(output())
    helpers = [asyncio.create_task(resizes())]
    if opts.stdin:
        helpers.append(asyncio.create_task(stdin()))
    gone = asyncio.create_task(client_gone.wait())
    try:
        await asyncio.wait({out, gone}, return_when=asyncio.FIRST_COMPLETED)
        if out.done():
            out.result()
    except (ConnectionError, RuntimeError) as exc:
        log.debug("stream ended", error=str(exc))
        client_gone.set()
    finally:
        for task in [out, gone, *helpers]:
            task.cancel()
        for task in [out, gone, *helpers]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    if first.startswith(b"OCI runtime exec failed"):
        head = bytes(first)
        return lambda code: _oci_exit_code(head, code)
    return None


# --- transports ---------------------------------------------------------------------------

def make_handler(server: NodeApiServer, kind: str):
    async def handler(request: web.Request) -> web.StreamResponse:
        opts = parse_options(request, kind)
        if isinstance(opts, str):
            return web.Response(status=400, text=opts)
        try:
            target = await server.resolve(request, container=True)
        except NotFound as exc:
            return web.Response(status=404, text=str(exc))
        if upgrade.wants_websocket(request):
            return await _serve_websocket(server, request, kind, target, opts)
        if not upgrade.wants_spdy(request):
            return web.Response(status=400, text="Upgrade request required")
        protocol = upgrade.negotiate(request, SPDY_PROTOCOLS)
        if isinstance(protocol, web.Response):
            return protocol
        if not server.streams.try_acquire():
            return web.Response(status=429, text="too many concurrent streams on this node")
        try:
            return await _serve_spdy(server, request, kind, target, opts, protocol)
        finally:
            server.streams.release()

    return handler


def _expected(opts: Options) -> set[str]:
    names = {"error"}
    if opts.stdin:
        names.add("stdin")
    if opts.stdout:
        names.add("stdout")
    if opts.stderr:
        names.add("stderr")
    if opts.tty:
        names.add("resize")
    return names


async def _serve_spdy(server: NodeApiServer, request: web.Request, kind: str, target: Target,
                      opts: Options, protocol: str) -> web.StreamResponse:
    streams: dict[str, SpdyStream] = {}
    arrived = asyncio.Event()
    expected = _expected(opts)
    if protocol in ("channel.k8s.io", "v2.channel.k8s.io"):
        expected.discard("resize")

    def on_stream(stream: SpdyStream) -> None:
        stream.reply()
        kind_ = stream.headers.get("streamtype", "")
        if kind_ in ("error", "stdin", "stdout", "stderr", "resize") and kind_ not in streams:
            streams[kind_] = stream
            if expected <= set(streams):
                arrived.set()
        else:
            stream.send_reset()

    session = await upgrade.upgrade_to_spdy(request, protocol, on_stream)
    try:
        try:
            await asyncio.wait_for(_first(arrived.wait(), session.closed.wait()), STREAM_CREATION_TIMEOUT)
        except asyncio.TimeoutError:
            log.info("client did not create its streams in time", path=request.path[:200])
            return await upgrade.close_spdy(request, session)
        if session.closed.is_set():
            return await upgrade.close_spdy(request, session)
        channels = SpdyChannels(streams, protocol)
        watchdog = asyncio.create_task(idle_watchdog(lambda: session.last_activity, server.idle_timeout,
                                                     session.feed_eof, session.closed))
        try:
            run = run_exec if kind == "exec" else run_attach
            await run(server.runtime.docker, target, opts, channels, _Closed(session.closed))
        except (ConnectionError, aiodocker.DockerError) as exc:
            log.info(f"{kind} ended with an error", error=str(exc))
        finally:
            watchdog.cancel()
        return await upgrade.close_spdy(request, session, grace=1.0)
    finally:
        session.feed_eof()


class _Closed(asyncio.Event):
    """An Event mirroring another (the session's closed) that can also be set locally."""

    def __init__(self, source: asyncio.Event) -> None:
        super().__init__()
        self._source = source

    def is_set(self) -> bool:
        return super().is_set() or self._source.is_set()

    async def wait(self) -> bool:
        await _first(super().wait(), self._source.wait())
        return True


async def _first(*coros) -> None:
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()


async def _serve_websocket(server: NodeApiServer, request: web.Request, kind: str, target: Target,
                           opts: Options) -> web.StreamResponse:
    ws = web.WebSocketResponse(protocols=WS_PROTOCOLS, max_msg_size=4 * 1024 * 1024)
    ready = ws.can_prepare(request)
    if not ready.ok or not ready.protocol:
        return web.Response(status=400, text=f"none of the WebSocket subprotocols is supported: {WS_PROTOCOLS}")
    if not server.streams.try_acquire():
        return web.Response(status=429, text="too many concurrent streams on this node")
    try:
        await ws.prepare(request)
        channels = WebSocketChannels(ws, ready.protocol)
        pump = asyncio.create_task(channels.pump())
        watchdog = asyncio.create_task(idle_watchdog(lambda: channels.last_activity, server.idle_timeout,
                                                     ws.close, channels.closed))
        try:
            run = run_exec if kind == "exec" else run_attach
            await run(server.runtime.docker, target, opts, channels, _Closed(channels.closed))
        except (ConnectionError, aiodocker.DockerError) as exc:
            log.info(f"{kind} ended with an error", error=str(exc))
        finally:
            watchdog.cancel()
            await ws.close()
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
        return ws
    finally:
        server.streams.release()
