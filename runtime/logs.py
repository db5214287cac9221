"""Container logs read back through the Docker engine (json-file, rotated).

``read_logs`` streams a container's stdout and stderr as bytes, in the order Docker
recorded them, with kubelet's /containerLogs options: ``follow`` (until the container
stops), ``tail`` (last N lines), ``since`` (unix seconds), ``timestamps`` (each line
prefixed with its RFC 3339 time) and ``limit_bytes`` (stop after that many bytes).

Docker's logs API is used rather than parsing the json-file on disk: it reads across
rotated files, follows rotations while streaming, and needs no access to Docker's data
root (which may be another machine's or another mount namespace's). Memory stays
bounded: frames are passed on as they arrive (a json-file line is at most 16 KiB).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from runtime.types import NotFound

if TYPE_CHECKING:
    from runtime.docker import DockerRuntime

_HEADER = struct.Struct(">BxxxI")  # stream (0 stdin, 1 stdout, 2 stderr), payload size
_CHUNK = 64 * 1024


async def read_logs(
    runtime: "DockerRuntime",
    container_id: str,
    *,
    follow: bool = False,
    tail: int | None = None,
    since: float | None = None,
    timestamps: bool = False,
    limit_bytes: int | None = None,
) -> AsyncIterator[bytes]:
    """Yield the container's log output; raises NotFound for an unknown container.

    Callers that may stop early should close the generator (``contextlib.aclosing``)
    so the engine connection is released at once.

    Containers of other nodes sharing the engine count as unknown.
    """
    what = f"logs of container {container_id[:12]}"
    info = await runtime._inspect_own(container_id, what)
    tty = bool((info.get("Config") or {}).get("Tty"))
    if limit_bytes is not None and limit_bytes <= 0:
        return
    params = {"stdout": "1", "stderr": "1", "follow": "1" if follow else "0",
              "timestamps": "1" if timestamps else "0"}
    if tail is not None:
        params["tail"] = str(max(0, int(tail)))
    if since is not None and since > 0:
        params["since"] = f"{since:.9f}"
    response = await runtime.engine.open_stream(what, "GET", f"containers/{info['Id']}/logs", params=params)
    left = limit_bytes
    try:
        async for piece in (_raw(response) if tty else _frames(response)):
            if left is not None:
                if len(piece) >= left:
                    yield piece[:left]
                    return
                left -= len(piece)
            yield piece
    finally:
        response.close()


async def _raw(response) -> AsyncIterator[bytes]:
    async for chunk in response.content.iter_chunked(_CHUNK):
        yield chunk


async def _frames(response) -> AsyncIterator[bytes]:
    """Docker's multiplexed stream: an 8-byte header, then the payload."""
    content = response.content
    while True:
        try:
            header = await content.readexactly(_HEADER.size)
        except asyncio.IncompleteReadError:  # the end of the stream
            return
        _stream, size = _HEADER.unpack(header)
        remaining = size
        while remaining:
            piece = await content.read(min(remaining, _CHUNK))
            if not piece:
                return
            remaining -= len(piece)
            yield piece


async def tail_text(runtime: "DockerRuntime", container_id: str, *, lines: int, max_bytes: int) -> str:
    """The last ``lines`` lines of the log, cut to their last ``max_bytes`` bytes
    (kubelet's FallbackToLogsOnError message). Empty when the container is gone."""
    kept = bytearray()
    try:
        async with contextlib.aclosing(read_logs(runtime, container_id, tail=lines)) as pieces:
            async for piece in pieces:
                kept += piece
                if len(kept) > 2 * max_bytes:
                    del kept[: len(kept) - max_bytes]
    except NotFound:
        return ""
    return bytes(kept[-max_bytes:]).decode("utf-8", errors="replace")


__all__ = ["read_logs", "tail_text"]
