"""`/portForward/{ns}/{pod}`: kubelet's portforward.k8s.io protocol over SPDY/3.1.

The client opens, per forwarded connection, an error stream and a data stream with
headers `streamType`, `port` and `requestID`. The node connects to 127.0.0.1:port
inside the pod's network namespace (a socket created in that namespace by a thread
that entered it with setns), copies bytes both ways with half-close, and reports a
failure (e.g. a closed port) on that pair's error stream: other ports and later
connections go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import socket
import threading

import structlog
from aiohttp import WSMsgType, web

from nodeagent.server import upgrade
from nodeagent.server.nodeapi import NodeApiServer, NotFound, Target, idle_watchdog
from nodeagent.server.spdy import SpdyStream

log = structlog.get_logger(__name__)

PROTOCOL = "portforward.k8s.io"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    # os.setns only exists from Python 3.12.
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def socket_in_netns(netns_path: str) -> socket.socket:
    """A TCP socket created inside another network namespace. Runs in its own short
    thread: setns changes only the calling thread, which then goes back (or dies)."""
    result: list = []

    def work() -> None:
        own = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
        try:
            target = os.open(netns_path, os.O_RDONLY)
            try:
                _setns(target)
                try:
                    result.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                finally:
                    _setns(own)
            finally:
                os.close(target)
        except OSError as exc:
            result.append(exc)
        finally:
            os.close(own)

    thread = threading.Thread(target=work, name="netns-socket", daemon=True)
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


async def connect_in_pod(netns_path: str, port: int, timeout: float = 10.0):
    sock = await asyncio.to_thread(socket_in_netns, netns_path)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), timeout)
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock, limit=256 * 1024)


async def forward(target: Target, port: int, data: SpdyStream, error: SpdyStream) -> None:
    name = target.pod["metadata"]["name"]
    try:
        assert target.netns_path is not None
        reader, writer = await connect_in_pod(target.netns_path, port)
    except Exception as exc:  # noqa: BLE001 - any failure is reported on the error stream
        reason = (exc.strerror if isinstance(exc, OSError) and exc.strerror
                  else "connection timed out" if isinstance(exc, asyncio.TimeoutError) else str(exc))
        message = (f"error forwarding port {port} to pod {name}, uid {target.uid}: "
                   f"failed to connect to localhost:{port} inside namespace of pod {name}: {reason}")
        log.info("port-forward connect failed", pod=name, port=port, error=reason)
        with contextlib.suppress(ConnectionError):
            await error.write(message.encode())
        error.close()
        data.close()
        return

    async def to_pod() -> None:
        try:
            while chunk := await data.read():
                writer.write(chunk)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except ConnectionError:
            pass

    async def from_pod() -> None:
        try:
            while chunk := await reader.read(64 * 1024):
                await data.write(chunk)
        except ConnectionError:
            pass
        finally:
            data.close()

    try:
        await asyncio.gather(to_pod(), from_pod())
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        error.close()


def make_handler(server: NodeApiServer):
    async def handler(request: web.Request) -> web.StreamResponse:
        try:
            target = await server.resolve(request, container=False)
        except NotFound as exc:
            return web.Response(status=404, text=str(exc))
        if upgrade.wants_websocket(request):
            return await _serve_websocket(server, request, target)
        if not upgrade.wants_spdy(request):
            return web.Response(status=400, text="Upgrade request required")
        protocol = upgrade.negotiate(request, [PROTOCOL])
        if isinstance(protocol, web.Response):
            return protocol
        if not server.streams.try_acquire():
            return web.Response(status=429, text="too many concurrent streams on this node")
        try:
            return await _serve(server, request, target, protocol)
        finally:
            server.streams.release()

    return handler


async def _serve(server: NodeApiServer, request: web.Request, target: Target, protocol: str) -> web.StreamResponse:
    pending: dict[str, dict[str, SpdyStream]] = {}
    tasks: set[asyncio.Task] = set()

    def on_stream(stream: SpdyStream) -> None:
        stream.reply()
        kind = stream.headers.get("streamtype", "")
        port_text = stream.headers.get("port", "")
        request_id = stream.headers.get("requestid") or str(stream.id if kind == "error" else stream.id - 2)
        if kind not in ("data", "error") or not port_text.isdigit() or not 0 < int(port_text) < 65536 \
                or len(pending) > 1024:
            stream.send_reset()
            return
        pair = pending.setdefault(request_id, {})
        if kind in pair:
            stream.send_reset()
            return
        pair[kind] = stream
        if len(pair) == 2:
            del pending[request_id]
            task = asyncio.create_task(forward(target, int(port_text), pair["data"], pair["error"]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    session = await upgrade.upgrade_to_spdy(request, protocol, on_stream)
    watchdog = asyncio.create_task(idle_watchdog(lambda: session.last_activity, server.idle_timeout,
                                                 session.feed_eof, session.closed))
    try:
        await session.closed.wait()
    finally:
        watchdog.cancel()
        for task in list(tasks):
            task.cancel()
        for task in list(tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    return await upgrade.close_spdy(request, session)



WS_PROTOCOLS = ["v4.channel.k8s.io", "channel.k8s.io"]


async def _serve_websocket(server: NodeApiServer, request: web.Request, target: Target) -> web.StreamResponse:
    """kubelet's WebSocket port-forward: ports from the `port` query; for port i,
    channel 2i carries data both ways and 2i+1 errors; each channel starts with the
    port number (2 bytes, little-endian). One connection per port per WebSocket."""
    raw = request.query.getall("port", [])
    if not raw or len(raw) > 64 or not all(p.isdigit() and 0 < int(p) < 65536 for p in raw):
        return web.Response(status=400, text='query parameter "port" is required: one or more ports 1-65535')
    ports = [int(p) for p in raw]
    ws = web.WebSocketResponse(protocols=WS_PROTOCOLS, max_msg_size=4 * 1024 * 1024)
    if not ws.can_prepare(request).ok:
        return web.Response(status=400, text="WebSocket upgrade failed")
    if not server.streams.try_acquire():
        return web.Response(status=429, text="too many concurrent streams on this node")
    writers: dict[int, asyncio.StreamWriter] = {}
    tasks: list[asyncio.Task] = []
    name = target.pod["metadata"]["name"]
    try:
        await ws.prepare(request)
        for i, port in enumerate(ports):
            prefix = port.to_bytes(2, "little")
            await ws.send_bytes(bytes([2 * i]) + prefix)
            await ws.send_bytes(bytes([2 * i + 1]) + prefix)
        for i, port in enumerate(ports):
            try:
                assert target.netns_path is not None
                reader, writer = await connect_in_pod(target.netns_path, port)
            except Exception as exc:  # noqa: BLE001 - reported on the port's error channel
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or "timeout"
                await ws.send_bytes(bytes([2 * i + 1]) + (
                    f"error forwarding port {port} to pod {name}, uid {target.uid}: "
                    f"failed to connect to localhost:{port} inside namespace of pod {name}: {reason}").encode())
                continue
            writers[i] = writer

            async def from_pod(i: int = i, reader: asyncio.StreamReader = reader) -> None:
                with contextlib.suppress(ConnectionError):
                    while chunk := await reader.read(64 * 1024):
                        await ws.send_bytes(bytes([2 * i]) + chunk)
            tasks.append(asyncio.create_task(from_pod()))
        async for msg in ws:
            if msg.type != WSMsgType.BINARY or not msg.data:
                continue
            channel, payload = msg.data[0], msg.data[1:]
            writer = writers.get(channel // 2) if channel % 2 == 0 else None
            if writer is not None and payload:
                writer.write(payload)
                await writer.drain()
        return ws
    except ConnectionError:
        return ws
    finally:
        for task in tasks:
            task.cancel()
        for writer in writers.values():
            writer.close()
        await ws.close()
        server.streams.release()
