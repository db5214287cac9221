"""`/containerLogs/{ns}/{pod}/{container}`: kubelet's log options over Docker's logs API.

Streams: Docker's multiplexed log stream is de-framed chunk by chunk and written on,
never held whole. `previous` reads the instance before the current one; `limitBytes`
cuts the output; `follow` ends when the container stops (as kubelet's does).
"""

from __future__ import annotations

import datetime as dt
import struct
from dataclasses import dataclass
from typing import AsyncIterator, Mapping

import aiohttp

_HEADER = struct.Struct(">BxxxL")


class LogOptionsError(ValueError):
    """A query value kubelet would refuse (answered 400)."""


@dataclass
class LogOptions:
    follow: bool = False
    previous: bool = False
    timestamps: bool = False
    tail_lines: int | None = None
    since_seconds: int | None = None
    since_time: dt.datetime | None = None
    limit_bytes: int | None = None

    def since(self, now: float) -> float | None:
        if self.since_seconds is not None:
            return now - self.since_seconds
        if self.since_time is not None:
            return self.since_time.timestamp()
        return None


def _bool(name: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in ("true", "1", "t"):
        return True
    if lowered in ("false", "0", "f", ""):
        return False
    raise LogOptionsError(f"{name}: invalid boolean value {value[:64]!r}")


def _int(name: str, value: str) -> int:
    if len(value) > 20 or not value.lstrip("-").isdigit():
        raise LogOptionsError(f"{name}: invalid integer value {value[:64]!r}")
    return int(value)


def parse_log_options(query: Mapping[str, str]) -> LogOptions:
    """kubelet decodes the query into PodLogOptions and validates it like the API
    server: non-negative tailLines, positive limitBytes and sinceSeconds, and at most
    one of sinceSeconds/sinceTime."""
    opts = LogOptions()
    if "follow" in query:
        opts.follow = _bool("follow", query["follow"])
    if "previous" in query:
        opts.previous = _bool("previous", query["previous"])
    if "timestamps" in query:
        opts.timestamps = _bool("timestamps", query["timestamps"])
    if query.get("tailLines"):
        opts.tail_lines = _int("tailLines", query["tailLines"])
        if opts.tail_lines < 0:
            raise LogOptionsError("tailLines: Invalid value: must be greater than or equal to 0")
    if query.get("limitBytes"):
        opts.limit_bytes = _int("limitBytes", query["limitBytes"])
        if opts.limit_bytes < 1:
            raise LogOptionsError("limitBytes: Invalid value: must be greater than 0")
    if query.get("sinceSeconds"):
        opts.since_seconds = _int("sinceSeconds", query["sinceSeconds"])
        if opts.since_seconds < 1:
            raise LogOptionsError("sinceSeconds: Invalid value: must be greater than 0")
    if query.get("sinceTime"):
        raw = query["sinceTime"]
        try:
            if len(raw) > 64:
                raise ValueError
            opts.since_time = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
            if opts.since_time.tzinfo is None:
                raise ValueError
        except ValueError:
            raise LogOptionsError(f"sinceTime: invalid RFC3339 time {raw[:64]!r}") from None
    if opts.since_seconds is not None and opts.since_time is not None:
        raise LogOptionsError("at most one of `sinceTime` or `sinceSeconds` may be specified")
    return opts


def docker_params(opts: LogOptions, now: float) -> dict[str, str]:
    params = {"stdout": "1", "stderr": "1", "follow": "1" if opts.follow else "0",
              "timestamps": "1" if opts.timestamps else "0"}
    if opts.tail_lines is not None:
        params["tail"] = str(opts.tail_lines)
    since = opts.since(now)
    if since is not None:
        # Docker takes seconds[.nanoseconds]; 0 means "everything", so keep it positive.
        params["since"] = f"{max(since, 0.000001):.9f}"
    return params


async def _read_block(content: aiohttp.StreamReader, limit: int = 1 << 20) -> bytes:
    """What has arrived (at least one chunk, at most about `limit`): one write per
    wake-up instead of one per log line, without delaying a follower."""
    first = await content.readany()
    if not first:
        return b""
    block = bytearray(first)
    while len(block) < limit:
        more = content.read_nowait(-1)
        if not more:
            break
        block += more
    return bytes(block)


async def demux(content: aiohttp.StreamReader, tty: bool) -> AsyncIterator[bytes]:
    """Payload bytes of Docker's log stream (stdout and stderr interleaved as written)."""
    carry = b""  # an incomplete frame header from the previous block
    need = 0  # payload bytes still owed by the current frame
    while block := await _read_block(content):
        if tty:
            yield block
            continue
        data = carry + block if carry else block
        carry = b""
        view = memoryview(data)
        out = bytearray()
        pos, end = 0, len(data)
        while pos < end:
            if need:
                take = min(need, end - pos)
                out += view[pos:pos + take]
                pos += take
                need -= take
                continue
            if end - pos < _HEADER.size:
                carry = bytes(view[pos:])
                break
            need = _HEADER.unpack_from(data, pos)[1]
            pos += _HEADER.size
        if out:
            yield bytes(out)


async def stream_logs(docker, container_id: str, opts: LogOptions, now: float,
                      tty: bool) -> AsyncIterator[bytes]:
    """The container's log bytes, limited to limitBytes."""
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None, connect=10)
    remaining = opts.limit_bytes
    async with docker._query(f"containers/{container_id}/logs", params=docker_params(opts, now),
                             timeout=timeout) as response:
        async for chunk in demux(response.content, tty):
            if remaining is not None:
                chunk = chunk[:remaining]
                remaining -= len(chunk)
            if chunk:
                yield chunk
            if remaining is not None and remaining <= 0:
                return
