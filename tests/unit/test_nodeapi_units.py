"""Pure parts of the node API: SPDY/3.1 framing and sessions, log options, exit status."""

from __future__ import annotations

import asyncio
import datetime as dt
import struct
import zlib

import pytest
from hypothesis import given, settings, strategies as st

from nodeagent.server import spdy
from nodeagent.server.containerlogs import LogOptionsError, docker_params, parse_log_options
from nodeagent.server.remotecommand import exit_status


def test_dictionary_is_the_spdy3_one():
    # zlib writes the dictionary's Adler-32 into the stream; Go's reader checks it.
    assert len(spdy.DICTIONARY) == 1423
    assert zlib.adler32(spdy.DICTIONARY) == spdy.DICTIONARY_ADLER32


def test_control_and_data_frame_layout():
    frame = spdy.control_frame(spdy.PING, 0, struct.pack(">I", 7))
    assert frame == bytes([0x80, 0x03, 0x00, 0x06, 0, 0, 0, 4, 0, 0, 0, 7])
    data = spdy.data_frame(5, b"abc", fin=True)
    assert data == bytes([0, 0, 0, 5, 1, 0, 0, 3]) + b"abc"


@given(st.dictionaries(st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=20),
                       st.text(max_size=40), max_size=8))
def test_header_block_round_trip(headers):
    assert spdy.decode_headers(spdy.encode_headers(headers)) == headers


@given(st.binary(max_size=200))
@settings(max_examples=100, deadline=None)
def test_garbage_never_raises_out_of_the_session(data):
    async def run():
        out = []
        session = spdy.SpdySession(out.append, _noop, server=True, on_stream=lambda s: s.reply())
        session.feed(data)
        session.feed(data)
        return session
    asyncio.run(run())


async def _noop() -> None:
    return None


async def test_two_sessions_talk_through_memory():
    """A client and a server session wired back to back: streams, headers (with one
    shared compression context per direction), data both ways, FIN, reset, ping."""
    server_streams: list[spdy.SpdyStream] = []
    client: spdy.SpdySession
    server: spdy.SpdySession

    def to_server(data: bytes) -> None:
        asyncio.get_running_loop().call_soon(server.feed, data)

    def to_client(data: bytes) -> None:
        asyncio.get_running_loop().call_soon(client.feed, data)

    def on_stream(stream: spdy.SpdyStream) -> None:
        stream.reply()
        server_streams.append(stream)

    client = spdy.SpdySession(to_server, _noop, server=False)
    server = spdy.SpdySession(to_client, _noop, server=True, on_stream=on_stream)
    a = await client.open_stream({"streamtype": "error"})
    b = await client.open_stream({"streamtype": "stdout", "port": "80", "requestid": "1"})
    assert (a.id, b.id) == (1, 3)
    assert [s.headers for s in server_streams] == [{"streamtype": "error"},
                                                   {"streamtype": "stdout", "port": "80", "requestid": "1"}]
    big = bytes(range(256)) * 1000
    await server_streams[1].write(big)
    server_streams[1].close()
    got = bytearray()
    while chunk := await b.read():
        got += chunk
    assert got == big
    await a.write(b"to server")
    a.close()
    assert await server_streams[0].read() == b"to server"
    assert await server_streams[0].read() == b""
    server_streams[0].send_reset()
    await asyncio.sleep(0.01)
    assert a.reset
    client.go_away()
    await asyncio.wait_for(server.closed.wait(), 1)


def test_log_options_like_kubelet():
    opts = parse_log_options({"follow": "true", "tailLines": "10", "timestamps": "1", "limitBytes": "5",
                              "sinceTime": "2026-01-02T03:04:05Z", "previous": "false"})
    assert opts.follow and opts.timestamps and not opts.previous
    assert opts.tail_lines == 10 and opts.limit_bytes == 5
    assert opts.since_time == dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    params = docker_params(opts, now=0)
    assert params["tail"] == "10" and params["follow"] == "1" and params["since"].startswith("1767323045.")
    assert docker_params(parse_log_options({"sinceSeconds": "30"}), now=1000.0)["since"] == "970.000000000"
    for query, fragment in [({"tailLines": "-1"}, "greater than or equal to 0"),
                            ({"limitBytes": "0"}, "greater than 0"),
                            ({"sinceSeconds": "0"}, "greater than 0"),
                            ({"sinceSeconds": "5", "sinceTime": "2026-01-02T03:04:05Z"}, "at most one"),
                            ({"sinceTime": "yesterday"}, "RFC3339"),
                            ({"follow": "maybe"}, "boolean"),
                            ({"tailLines": "9" * 40}, "integer")]:
        with pytest.raises(LogOptionsError, match=fragment):
            parse_log_options(query)


def test_exit_status_is_what_kubectl_reads():
    assert exit_status(0, ["true"]) == {"metadata": {}, "status": "Success"}
    failed = exit_status(3, ["sh", "-c", "exit 3"])
    assert failed["reason"] == "NonZeroExitCode"
    assert failed["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]


@given(st.lists(st.tuples(st.integers(1, 12), st.integers(0, 255), st.binary(max_size=64)), max_size=12),
       st.booleans())
@settings(max_examples=100, deadline=None)
def test_fuzzed_control_frames_only_close_the_session(frames, server):
    """Well-framed control frames with arbitrary payloads: the session either handles
    them or closes itself with a protocol error; nothing escapes into the transport."""
    async def run():
        out: list[bytes] = []
        opened: list[spdy.SpdyStream] = []
        session = spdy.SpdySession(out.append, _noop, server=server,
                                   on_stream=lambda s: (s.reply(), opened.append(s)))
        for kind, flags, payload in frames:
            session.feed(spdy.control_frame(kind, flags, payload))
        assert session.closed.is_set() or session.error is None
        # Whatever it wrote back is itself well-framed SPDY.
        data = b"".join(out)
        pos = 0
        while pos < len(data):
            length = int.from_bytes(data[pos + 5:pos + 8], "big")
            assert data[pos] & 0x80 and data[pos + 1] == 3
            pos += 8 + length
        assert pos == len(data)
    asyncio.run(run())
