"""pods/exec, pods/attach and pods/portforward as a v1.32 API server serves them.

The server dials the node's kubelet endpoint (advertised InternalIP and
daemonEndpoints port) with its kubelet client certificate and:
* SPDY/3.1 from the client (kubectl's fallback, or older clients): the upgrade is
  repeated towards the node and the two connections are piped byte for byte, like the
  real server's UpgradeAwareHandler;
* WebSocket v5.channel.k8s.io (kubectl 1.30+ exec/attach): translated into SPDY/3.1
  streams (error, stdin, stdout, stderr, resize) towards the node, like the real
  server's StreamTranslatorHandler;
* WebSocket "SPDY/3.1+portforward.k8s.io" (kubectl 1.31+ port-forward): SPDY tunnelled
  in binary messages; the server upgrades to SPDY towards the node and pipes, like
  its TunnelingHandler.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Callable
from urllib.parse import urlencode

from aiohttp import WSMsgType, web

from nodeagent.server.spdy import SpdySession, SpdyStream

from .errors import ApiStatusError

V5_PROTOCOLS = ["v5.channel.k8s.io", "v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io",
                "channel.k8s.io"]
SPDY_EXEC_PROTOCOLS = ["v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io"]
TUNNEL_PROTOCOL = "SPDY/3.1+portforward.k8s.io"


def _true(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true")


def node_path(sub: str, namespace: str, name: str, container: str, query) -> str:
    """The kubelet URL for one request (the API server's streamLocation)."""
    if sub == "portforward":
        return f"/portForward/{namespace}/{name}"
    params: list[tuple[str, str]] = []
    if sub == "exec":
        params += [("command", c) for c in query.getall("command", [])]
    for client, kubelet in (("stdin", "input"), ("stdout", "output"), ("stderr", "error"), ("tty", "tty")):
        if _true(query.get(client)):
            params.append((kubelet, "1"))
    kind = "exec" if sub == "exec" else "attach"
    return f"/{kind}/{namespace}/{name}/{container}" + ("?" + urlencode(params) if params else "")


async def dial_upgrade(host: str, port: int, ctx: ssl.SSLContext, path: str,
                       protocols: list[str], timeout: float = 10.0):
    """Open TLS to the node and send an SPDY/3.1 upgrade; returns (status, headers, body,
    reader, writer). On 101, reader/writer carry SPDY from here on."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=ctx), timeout)
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: Upgrade",
             "Upgrade: SPDY/3.1", "Content-Length: 0"]
    lines += [f"X-Stream-Protocol-Version: {p}" for p in protocols]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    for line in header_lines:
        if ":" in line:
            key, value = line.split(":", 1)
            headers[key.strip().lower()] = value.strip()
    body = b""
    if status != 101:
        length = int(headers.get("content-length", "0") or 0)
        if length:
            body = await asyncio.wait_for(reader.readexactly(min(length, 65536)), timeout)
        writer.close()
    return status, headers, body, reader, writer


def _refused(status: int, body: bytes, url: str) -> ApiStatusError:
    text = body.decode(errors="replace").strip()
    reason = {401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 400: "BadRequest"}.get(status, "InternalError")
    return ApiStatusError(reason, f"error dialing backend: {url}: {status} {text}", code=status if status >= 400 else 500)


async def _pipe_reader_to(reader: asyncio.StreamReader, send: Callable) -> None:
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
        while chunk := await reader.read(256 * 1024):
            await send(chunk)


async def serve(request: web.Request, sub: str, namespace: str, name: str, container: str,
                host: str, port: int, ctx: ssl.SSLContext) -> web.StreamResponse:
    path = node_path(sub, namespace, name, container, request.query)
    url = f"https://{host}:{port}{path}"
    upgrade = request.headers.get("Upgrade", "").lower()
    if upgrade == "websocket":
        if sub == "portforward":
            return await _tunnel(request, host, port, ctx, path, url)
        return await _translate(request, sub, host, port, ctx, path, url)
    if "spdy/3.1" in upgrade:
        return await _raw_spdy(request, host, port, ctx, path, url)
    raise ApiStatusError("BadRequest", "Upgrade request required")


async def _raw_spdy(request: web.Request, host: str, port: int, ctx: ssl.SSLContext, path: str,
                    url: str) -> web.StreamResponse:
    protocols = [p.strip() for v in request.headers.getall("X-Stream-Protocol-Version", [])
                 for p in v.split(",") if p.strip()]
    try:
        status, headers, body, reader, writer = await dial_upgrade(host, port, ctx, path, protocols)
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
        raise ApiStatusError("ServiceUnavailable", f"error dialing backend: {exc}", code=503) from exc
    if status != 101:
        raise _refused(status, body, url)
    reply = {"Connection": "Upgrade", "Upgrade": "SPDY/3.1"}
    if "x-stream-protocol-version" in headers:
        reply["X-Stream-Protocol-Version"] = headers["x-stream-protocol-version"]
    response = web.StreamResponse(status=101, headers=reply)
    response.force_close()
    await response.prepare(request)
    transport, proto = request.transport, request.protocol
    assert transport is not None and proto is not None
    done = asyncio.Event()

    class Feeder:
        def feed_data(self, data: bytes):
            writer.write(bytes(data))
            return False, b""

        def feed_eof(self) -> None:
            done.set()

        def set_exception(self, exc: BaseException, *args: object) -> None:
            done.set()

    proto.set_parser(Feeder())  # type: ignore[arg-type]

    async def to_client(chunk: bytes) -> None:
        transport.write(chunk)
        if transport.get_write_buffer_size() > 1024 * 1024:
            await proto._drain_helper()

    from_node = asyncio.create_task(_pipe_reader_to(reader, to_client))
    client_gone = asyncio.create_task(done.wait())
    await asyncio.wait({from_node, client_gone}, return_when=asyncio.FIRST_COMPLETED)
    for task in (from_node, client_gone):
        task.cancel()
    writer.close()
    transport.close()
    return response


async def _tunnel(request: web.Request, host: str, port: int, ctx: ssl.SSLContext, path: str,
                  url: str) -> web.StreamResponse:
    ws = web.WebSocketResponse(protocols=[TUNNEL_PROTOCOL], max_msg_size=0)
    if not ws.can_prepare(request).protocol:
        raise ApiStatusError("BadRequest", f"port-forward over WebSocket needs subprotocol {TUNNEL_PROTOCOL}")
    try:
        status, headers, body, reader, writer = await dial_upgrade(host, port, ctx, path, ["portforward.k8s.io"])
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
        raise ApiStatusError("ServiceUnavailable", f"error dialing backend: {exc}", code=503) from exc
    if status != 101:
        raise _refused(status, body, url)
    await ws.prepare(request)

    async def from_client() -> None:
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                writer.write(msg.data)
                await writer.drain()
            elif msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
                break

    tasks = {asyncio.create_task(from_client()), asyncio.create_task(_pipe_reader_to(reader, ws.send_bytes))}
    with contextlib.suppress(ConnectionError):
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()
    writer.close()
    await ws.close()
    return ws


async def _translate(request: web.Request, sub: str, host: str, port: int, ctx: ssl.SSLContext,
                     path: str, url: str) -> web.StreamResponse:
    ws = web.WebSocketResponse(protocols=V5_PROTOCOLS, max_msg_size=0)
    ready = ws.can_prepare(request)
    if not ready.protocol:
        raise ApiStatusError("BadRequest", f"no supported WebSocket subprotocol; the server speaks {V5_PROTOCOLS}")
    q = request.query
    stdin, stdout, stderr, tty = (_true(q.get(k)) for k in ("stdin", "stdout", "stderr", "tty"))
    try:
        status, headers, body, reader, writer = await dial_upgrade(host, port, ctx, path, SPDY_EXEC_PROTOCOLS)
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
        raise ApiStatusError("ServiceUnavailable", f"error dialing backend: {exc}", code=503) from exc
    if status != 101:
        raise _refused(status, body, url)
    session = SpdySession(writer.write, writer.drain, server=False)

    async def feed() -> None:
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(256 * 1024):
                session.feed(chunk)
        session.feed_eof()

    feeder = asyncio.create_task(feed())
    await ws.prepare(request)
    v5 = ws.ws_protocol == "v5.channel.k8s.io"
    tasks: list[asyncio.Task] = []
    try:
        streams: dict[str, SpdyStream] = {}
        for kind, wanted in (("error", True), ("stdin", stdin), ("stdout", stdout),
                             ("stderr", stderr and not tty), ("resize", tty)):
            if wanted:
                streams[kind] = await session.open_stream({"streamtype": kind})

        async def from_client() -> None:
            async for msg in ws:
                if msg.type != WSMsgType.BINARY or not msg.data:
                    continue
                channel, payload = msg.data[0], msg.data[1:]
                if channel == 0 and "stdin" in streams and payload:
                    await streams["stdin"].write(payload)
                elif channel == 4 and "resize" in streams:
                    await streams["resize"].write(payload)
                elif channel == 255 and v5 and payload[:1] == b"\x00" and "stdin" in streams:
                    streams["stdin"].close()

        async def to_client(kind: str, channel: int) -> None:
            stream = streams[kind]
            while data := await stream.read():
                await ws.send_bytes(bytes([channel]) + data)

        async def error_to_client() -> None:
            data = bytearray()
            while chunk := await streams["error"].read():
                data += chunk
            if data:
                await ws.send_bytes(b"\x03" + bytes(data))

        client = asyncio.create_task(from_client())
        outputs = [asyncio.create_task(to_client(k, c)) for k, c in (("stdout", 1), ("stderr", 2)) if k in streams]
        tasks = [client, *outputs]
        # The command's status arrives last, after its output streams ended; a client
        # that goes away first ends everything (the node then stops the command).
        all_out = asyncio.ensure_future(asyncio.gather(*outputs))
        tasks.append(all_out)
        await asyncio.wait({all_out, client}, return_when=asyncio.FIRST_COMPLETED)
        if all_out.done():
            errors = asyncio.create_task(error_to_client())
            tasks.append(errors)
            await asyncio.wait({errors, client}, return_when=asyncio.FIRST_COMPLETED)
    except (ConnectionError, asyncio.TimeoutError):
        pass
    finally:
        for task in tasks:
            task.cancel()
        session.go_away()
        feeder.cancel()
        writer.close()
        await ws.close()
    return ws
