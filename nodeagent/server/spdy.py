"""SPDY/3.1 framing and sessions, as far as Kubernetes' streaming uses them.

The API server talks SPDY/3.1 to the node for exec, attach and port-forward (an HTTP
upgrade, then many streams over one connection). Its peer is Go's moby/spdystream,
which does no flow control (it neither sends nor honours WINDOW_UPDATE; back-pressure
is TCP's), so neither do we: WINDOW_UPDATE and SETTINGS are read and ignored.

Written here rather than taken from PyPI's `spdy-py` (0.2.0, 2021, synchronous, no
session layer, LGPL): the framing is ~200 lines and the session must fit asyncio.

The session is transport-agnostic: `feed()` takes received bytes, `write` sends
bytes, `drain` waits for the transport's buffer, `pause`/`resume` stop reading when
streams' unread data piles up.
"""

from __future__ import annotations

import asyncio
import collections
import struct
import time
import zlib
from typing import Awaitable, Callable

VERSION = 3

SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE = 1, 2, 3, 4, 6, 7, 8, 9
FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02

# RST_STREAM status codes.
PROTOCOL_ERROR, INVALID_STREAM, REFUSED_STREAM, CANCEL, INTERNAL_ERROR = 1, 2, 3, 5, 6

MAX_DATA_FRAME = 32 * 1024
# Header blocks are small in this protocol (streamType, port, requestID); a peer sending
# more is broken or hostile.
MAX_HEADER_BLOCK = 64 * 1024
MAX_FRAME = 1 << 24


def _dictionary() -> bytes:
    """The SPDY/3 header compression dictionary (draft-mbelshe-httpbis-spdy-00,
    section 2.6.10.1): length-prefixed header names and words, then a run of status
    codes, reason phrases, dates and common values."""
    words = (
        "options head post put delete trace accept accept-charset accept-encoding "
        "accept-language accept-ranges age allow authorization cache-control connection "
        "content-base content-encoding content-language content-length content-location "
        "content-md5 content-range content-type date etag expect expires from host if-match "
        "if-modified-since if-none-match if-range if-unmodified-since last-modified location "
        "max-forwards pragma proxy-authenticate proxy-authorization range referer retry-after "
        "server te trailer transfer-encoding upgrade user-agent vary via warning "
        "www-authenticate method get status 200_OK version HTTP/1.1 url public set-cookie "
        "keep-alive origin"
    )
    out = bytearray()
    for word in words.split(" "):
        word = word.replace("_", " ")  # the one entry with a space: "200 OK"
        out += struct.pack(">I", len(word)) + word.encode()
    out += (
        b"100101201202205206300302303304305306307402405406407408409410411412413414415416417"
        b"502504505203 Non-Authoritative Information204 No Content301 Moved Permanently"
        b"400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error"
        b"501 Not Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct"
        b" Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,"
        b"image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,"
        b"text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset="
        b"iso-8859-1,utf-,*,enq=0."
    )
    return bytes(out)


DICTIONARY = _dictionary()
# zlib puts the dictionary's Adler-32 in the stream; Go's reader refuses any other.
DICTIONARY_ADLER32 = 0xE3C6A7C2


class SpdyError(Exception):
    pass


def encode_headers(headers: dict[str, str | list[str]]) -> bytes:
    """A header block before compression; names lowercase, repeated values NUL-joined."""
    out = bytearray(struct.pack(">I", len(headers)))
    for name, value in headers.items():
        raw = "\x00".join(value) if isinstance(value, list) else value
        n, v = name.lower().encode(), raw.encode()
        out += struct.pack(">I", len(n)) + n + struct.pack(">I", len(v)) + v
    return bytes(out)


def decode_headers(block: bytes) -> dict[str, str]:
    def take(i: int) -> tuple[bytes, int]:
        if i + 4 > len(block):
            raise SpdyError("truncated header block")
        (n,) = struct.unpack_from(">I", block, i)
        if i + 4 + n > len(block):
            raise SpdyError("truncated header block")
        return block[i + 4:i + 4 + n], i + 4 + n

    if len(block) < 4:
        raise SpdyError("truncated header block")
    (count,) = struct.unpack_from(">I", block, 0)
    if count > 1024:
        raise SpdyError("too many headers")
    headers: dict[str, str] = {}
    i = 4
    for _ in range(count):
        name, i = take(i)
        value, i = take(i)
        headers[name.decode("utf-8", "replace").lower()] = value.decode("utf-8", "replace")
    return headers


def control_frame(kind: int, flags: int, payload: bytes) -> bytes:
    return struct.pack(">HHI", 0x8000 | VERSION, kind, (flags << 24) | len(payload)) + payload


def data_frame(stream_id: int, data: bytes, fin: bool = False) -> bytes:
    return struct.pack(">II", stream_id & 0x7FFFFFFF, ((FLAG_FIN if fin else 0) << 24) | len(data)) + data


class SpdyStream:
    """One SPDY stream: headers, an inbound byte queue, and writes as DATA frames."""

    def __init__(self, session: "SpdySession", stream_id: int, headers: dict[str, str]) -> None:
        self.session = session
        self.id = stream_id
        self.headers = headers
        self._chunks: collections.deque[bytes] = collections.deque()
        self._readable = asyncio.Event()
        self.remote_closed = False  # peer sent FIN (or reset)
        self.local_closed = False  # we sent FIN
        self.reset = False
        self.replied = asyncio.Event()

    def __repr__(self) -> str:
        return f"<SpdyStream {self.id} {self.headers.get('streamtype', '')}>"

    # inbound
    def _feed(self, data: bytes) -> None:
        if data:
            self._chunks.append(data)
        self._readable.set()

    def _finish(self) -> None:
        self.remote_closed = True
        self._readable.set()

    async def read(self) -> bytes:
        """The next chunk of data; b"" at the end of the stream."""
        while not self._chunks:
            if self.remote_closed:
                return b""
            self._readable.clear()
            await self._readable.wait()
        chunk = self._chunks.popleft()
        self.session._consumed(len(chunk))
        return chunk

    # outbound
    async def write(self, data: bytes) -> None:
        if self.local_closed or self.reset:
            raise ConnectionResetError(f"write on closed SPDY stream {self.id}")
        view = memoryview(data)
        for i in range(0, len(view), MAX_DATA_FRAME):
            self.session._write(data_frame(self.id, bytes(view[i:i + MAX_DATA_FRAME])))
        await self.session._drain()

    def close(self) -> None:
        """Half-close: no more data from us (an empty DATA frame with FIN)."""
        if self.local_closed or self.reset or self.session.closed.is_set():
            self.local_closed = True
            return
        self.local_closed = True
        self.session._write(data_frame(self.id, b"", fin=True))
        self.session._maybe_forget(self)

    def send_reset(self, status: int = CANCEL) -> None:
        if not self.reset and not self.session.closed.is_set():
            self.session._write(control_frame(RST_STREAM, 0, struct.pack(">II", self.id, status)))
        self.reset = True
        self._finish()
        self.session._forget(self)

    def reply(self, headers: dict[str, str] | None = None) -> None:
        self.session._write(control_frame(
            SYN_REPLY, 0, struct.pack(">I", self.id) + self.session._compress(headers or {})))
        self.replied.set()


class SpdySession:
    """Both ends of a SPDY/3.1 connection. Servers use odd ids from the peer and even
    ids of their own; `on_stream` is called for every stream the peer opens."""

    def __init__(self, write: Callable[[bytes], None], drain: Callable[[], Awaitable[None]], *,
                 server: bool, on_stream: Callable[[SpdyStream], None] | None = None,
                 pause: Callable[[], None] | None = None, resume: Callable[[], None] | None = None,
                 buffer_limit: int = 4 * 1024 * 1024) -> None:
        self._write_raw = write
        self._drain_raw = drain
        self.server = server
        self.on_stream = on_stream
        self._pause, self._resume = pause, resume
        self._paused = False
        self._buffered = 0
        self._limit = buffer_limit
        self.streams: dict[int, SpdyStream] = {}
        self._next_id = 2 if server else 1
        self._buf = bytearray()
        self._deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, 15, 9,
                                         zlib.Z_DEFAULT_STRATEGY, DICTIONARY)
        self._inflate = zlib.decompressobj(zdict=DICTIONARY)
        self.closed = asyncio.Event()
        self.error: str | None = None
        self.last_activity = time.monotonic()

    # --- sending -----------------------------------------------------------------------

    def _write(self, frame: bytes) -> None:
        self.last_activity = time.monotonic()
        if not self.closed.is_set():
            self._write_raw(frame)

    async def _drain(self) -> None:
        if self.closed.is_set():
            raise ConnectionResetError("SPDY connection closed")
        await self._drain_raw()

    def _compress(self, headers: dict[str, str | list[str]]) -> bytes:
        return self._deflate.compress(encode_headers(headers)) + self._deflate.flush(zlib.Z_SYNC_FLUSH)

    async def open_stream(self, headers: dict[str, str], *, timeout: float = 30.0) -> SpdyStream:
        """Open a stream and wait for the peer's SYN_REPLY."""
        stream_id = self._next_id
        self._next_id += 2
        stream = SpdyStream(self, stream_id, dict(headers))
        self.streams[stream_id] = stream
        payload = struct.pack(">IIBB", stream_id, 0, 0, 0) + self._compress(headers)
        self._write(control_frame(SYN_STREAM, 0, payload))
        closed = asyncio.ensure_future(self.closed.wait())
        replied = asyncio.ensure_future(stream.replied.wait())
        try:
            done, _ = await asyncio.wait({closed, replied}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            replied.cancel()
        if stream.reset:
            raise ConnectionResetError(f"SPDY stream {stream_id} was reset by the peer")
        if not stream.replied.is_set():
            raise ConnectionResetError(f"no reply to SPDY stream {stream_id}")
        return stream

    def ping(self, ping_id: int) -> None:
        self._write(control_frame(PING, 0, struct.pack(">I", ping_id)))

    def go_away(self) -> None:
        last = max((s for s in self.streams if (s % 2 == 1) == self.server), default=0)
        self._write(control_frame(GOAWAY, 0, struct.pack(">II", last, 0)))

    # --- receiving ---------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        self._buf += data
        try:
            while len(self._buf) >= 8:
                first, second = struct.unpack_from(">II", self._buf, 0)
                length = second & 0xFFFFFF
                if len(self._buf) < 8 + length:
                    if first & 0x80000000 and length > MAX_HEADER_BLOCK + 16:
                        raise SpdyError(f"control frame of {length} bytes")
                    break
                if first & 0x80000000 and length > MAX_HEADER_BLOCK + 16:
                    raise SpdyError(f"control frame of {length} bytes")
                flags = second >> 24
                payload = bytes(self._buf[8:8 + length])
                del self._buf[:8 + length]
                if first & 0x80000000:
                    version, kind = (first >> 16) & 0x7FFF, first & 0xFFFF
                    if version != VERSION:
                        raise SpdyError(f"unsupported SPDY version {version}")
                    self._control(kind, flags, payload)
                else:
                    self._data(first & 0x7FFFFFFF, flags, payload)
        except (SpdyError, zlib.error, struct.error, UnicodeDecodeError) as exc:
            self.error = f"SPDY protocol error: {exc}"
            self.feed_eof()
        except Exception as exc:  # a handler's bug must not escape into the transport
            self.error = f"SPDY session failed: {exc!r}"
            self.feed_eof()

    def feed_eof(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for stream in list(self.streams.values()):
            stream.reset = stream.reset or not stream.remote_closed
            stream._finish()
        self.streams.clear()
        if self._paused and self._resume is not None:
            self._paused = False

    def _headers(self, block: bytes) -> dict[str, str]:
        if len(block) > MAX_HEADER_BLOCK:
            raise SpdyError("header block too large")
        raw = self._inflate.decompress(block, MAX_HEADER_BLOCK + 1)
        if len(raw) > MAX_HEADER_BLOCK or self._inflate.unconsumed_tail:
            raise SpdyError("header block too large")
        return decode_headers(raw)

    def _control(self, kind: int, flags: int, payload: bytes) -> None:
        if kind == SYN_STREAM:
            stream_id = struct.unpack_from(">I", payload, 0)[0] & 0x7FFFFFFF
            headers = self._headers(payload[10:])
            if stream_id in self.streams:
                raise SpdyError(f"stream {stream_id} reused")
            stream = SpdyStream(self, stream_id, headers)
            self.streams[stream_id] = stream
            if flags & (FLAG_FIN | FLAG_UNIDIRECTIONAL):
                stream.remote_closed = True
            if self.on_stream is None:
                stream.send_reset(REFUSED_STREAM)
            else:
                self.on_stream(stream)
        elif kind == SYN_REPLY:
            stream_id = struct.unpack_from(">I", payload, 0)[0] & 0x7FFFFFFF
            self._headers(payload[4:])  # keeps the shared decompressor in step
            stream = self.streams.get(stream_id)
            if stream is not None:
                stream.replied.set()
                if flags & FLAG_FIN:
                    stream._finish()
        elif kind == HEADERS:
            self._headers(payload[4:])
        elif kind == RST_STREAM:
            stream_id = struct.unpack_from(">I", payload, 0)[0] & 0x7FFFFFFF
            stream = self.streams.pop(stream_id, None)
            if stream is not None:
                stream.reset = True
                stream._finish()
                stream.replied.set()
        elif kind == PING:
            ping_id = struct.unpack_from(">I", payload, 0)[0]
            # Answer the peer's pings (ids of the other parity); ours come back.
            if (ping_id % 2 == 1) == self.server:
                self._write(control_frame(PING, 0, payload[:4]))
        elif kind == GOAWAY:
            self.feed_eof()
        # SETTINGS, WINDOW_UPDATE and unknown control frames: ignored (see module doc).

    def _data(self, stream_id: int, flags: int, payload: bytes) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return  # a stream we reset or forgot: drop, as spdystream does
        if payload:
            self._buffered += len(payload)
            stream._feed(payload)
            if self._buffered > self._limit and not self._paused and self._pause is not None:
                self._paused = True
                self._pause()
        if flags & FLAG_FIN:
            stream._finish()
            self._maybe_forget(stream)

    def _consumed(self, n: int) -> None:
        self._buffered -= n
        if self._paused and self._buffered <= self._limit // 2 and self._resume is not None:
            self._paused = False
            self._resume()

    def _maybe_forget(self, stream: SpdyStream) -> None:
        if stream.local_closed and stream.remote_closed and not stream._chunks:
            self.streams.pop(stream.id, None)

    def _forget(self, stream: SpdyStream) -> None:
        self.streams.pop(stream.id, None)
