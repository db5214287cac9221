"""HTTP upgrades of node API requests to SPDY/3.1 (or WebSocket), with kubelet's
protocol negotiation through X-Stream-Protocol-Version / Sec-WebSocket-Protocol."""

from __future__ import annotations

import asyncio
from typing import Callable

from aiohttp import web

from nodeagent.server.spdy import SpdySession, SpdyStream

# The 101 response of an upgraded request, returned by the handler when it ends.
RESPONSE_KEY: web.RequestKey = web.RequestKey("nodeagent.spdy_response", web.StreamResponse)


def client_protocols(request: web.Request) -> list[str]:
    return [p.strip() for value in request.headers.getall("X-Stream-Protocol-Version", [])
            for p in value.split(",") if p.strip()]


def negotiate(request: web.Request, supported: list[str]) -> str | web.Response:
    """kubelet's httpstream.Handshake: the first protocol the client lists that the
    server speaks; a 403 naming both lists when there is none."""
    offered = client_protocols(request)
    if not offered:
        return ""
    for proto in offered:
        if proto in supported:
            return proto
    response = web.Response(status=403, text=(
        f"unable to upgrade: unable to negotiate protocol: client supports {offered}, "
        f"server accepts {supported}"))
    for proto in supported:
        response.headers.add("X-Accepted-Stream-Protocol-Versions", proto)
    return response


def wants_spdy(request: web.Request) -> bool:
    return "spdy/3.1" in request.headers.get("Upgrade", "").lower()


def wants_websocket(request: web.Request) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket"


class _Feeder:
    """Stands in for aiohttp's payload parser after the upgrade: raw bytes to SPDY."""

    def __init__(self, session: SpdySession) -> None:
        self.session = session

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.session.feed(bytes(data))
        return False, b""

    def feed_eof(self) -> None:
        self.session.feed_eof()

    def set_exception(self, exc: BaseException, *args: object) -> None:
        self.session.feed_eof()


async def upgrade_to_spdy(request: web.Request, protocol: str,
                          on_stream: Callable[[SpdyStream], None]) -> SpdySession:
    """Answer 101 Switching Protocols and run a server-side SPDY session on the
    connection. The caller keeps the handler alive until the session is done and then
    calls `close_spdy`."""
    headers = {"Connection": "Upgrade", "Upgrade": "SPDY/3.1"}
    if protocol:
        headers["X-Stream-Protocol-Version"] = protocol
    response = web.StreamResponse(status=101, headers=headers)
    response.force_close()
    await response.prepare(request)
    transport = request.transport
    proto = request.protocol
    assert transport is not None and proto is not None

    async def drain() -> None:
        if transport.is_closing():
            raise ConnectionResetError("connection closed")
        if transport.get_write_buffer_size() > 256 * 1024:
            await proto._drain_helper()

    session = SpdySession(transport.write, drain, server=True, on_stream=on_stream,
                          pause=transport.pause_reading, resume=transport.resume_reading)
    proto.set_parser(_Feeder(session))  # type: ignore[arg-type]
    request[RESPONSE_KEY] = response
    return session


async def close_spdy(request: web.Request, session: SpdySession, grace: float = 0.0) -> web.StreamResponse:
    if not session.closed.is_set():
        session.go_away()
        if grace:
            try:
                await asyncio.wait_for(session.closed.wait(), grace)
            except asyncio.TimeoutError:
                pass
    session.feed_eof()
    if request.transport is not None:
        request.transport.close()
    return request[RESPONSE_KEY]
