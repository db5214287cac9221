"""The Docker Engine connection shared by the runtime and image services.

One aiodocker client per engine, with:

* no connection-pool limit: aiohttp's connectors cap a session at 100 connections by
  default, which would queue the 101st concurrent call behind the others (the node
  runs up to 110 pods whose workers call the engine independently). Docker serves
  each connection separately, so an unbounded pool is what keeps a hung call for one
  container from delaying the calls for the rest;
* no aiohttp-level timeout: every call runs under its own ``asyncio.timeout`` deadline
  chosen by the caller and raises RuntimeTimeout past it;
* engine errors mapped onto the runtime contract: 404 -> NotFound, unreachable socket
  -> RuntimeUnavailable, any other HTTP error -> EngineError (with ``status``).

Calls go through aiodocker's public API where it has one (version, container create /
start / inspect / list / kill / wait / delete, image inspect: the typed methods below,
each under the same deadline and error mapping). Three streams use aiodocker's request
layer (``Docker._do_query``, and ``_query_json`` behind the generic :meth:`Engine.call`)
because the public helpers do not fit: ``images.import_image`` cannot pass ``changes``
(the pause image's ENTRYPOINT); ``images.pull`` and ``events.subscribe`` parse the
stream themselves in a background task, so the caller gets neither a deadline on the
response headers nor control over the line reader (``iter_json_lines``). Those private
calls were checked against aiodocker 0.27.0, which ``pyproject.toml`` pins as the upper
bound (``aiodocker>=0.22,<0.28``); re-check them before raising it.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import aiodocker
import aiohttp
import structlog
from aiodocker.exceptions import DockerError

from runtime.types import NotFound, RuntimeError_, RuntimeTimeout, RuntimeUnavailable

T = TypeVar("T")

DEFAULT_DOCKER_URL = "unix:///var/run/docker.sock"
_log = structlog.get_logger(__name__)
# aiodocker reports a failed connection as a DockerError with this pseudo status.
_CONNECT_FAILED = 900


class EngineError(RuntimeError_):
    """Docker answered with an HTTP error other than 404."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def resolve_docker_url(docker_url: str | None) -> str:
    return docker_url or os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_URL


def make_docker_client(docker_url: str | None = None) -> aiodocker.Docker:
    """An aiodocker client with an unbounded connection pool (see module docstring).

    Must be called with a running event loop. The caller owns the connector too:
    close it with :func:`close_docker_client`.
    """
    url = resolve_docker_url(docker_url)
    connector: aiohttp.BaseConnector
    if url.startswith("unix://"):
        connector = aiohttp.UnixConnector(url[len("unix://") :], limit=0)
        base = "http://docker"  # only composes URLs; the connector picks the socket
    elif url.startswith(("tcp://", "http://")):
        connector = aiohttp.TCPConnector(limit=0)
        base = "http://" + url.split("://", 1)[1]
    else:
        raise ValueError(f"docker_url {url!r}: expected unix://PATH or tcp://HOST:PORT")
    return aiodocker.Docker(url=base, connector=connector)


async def close_docker_client(docker: aiodocker.Docker) -> None:
    await docker.close()
    # A connector we passed in is not closed by aiodocker.
    await docker.connector.close()


class Engine:
    """Deadline-bounded, error-mapped calls to one Docker engine."""

    def __init__(
        self,
        docker_url: str | None = None,
        *,
        call_timeout: float = 30.0,
        client: aiodocker.Docker | None = None,
    ) -> None:
        """``client``: use an existing aiodocker client (not closed by :meth:`close`)."""
        if call_timeout <= 0:
            raise ValueError(f"call_timeout must be positive, got {call_timeout!r}")
        self.url = client.docker_host if client is not None else resolve_docker_url(docker_url)
        self.call_timeout = call_timeout
        self._docker: aiodocker.Docker | None = client
        self._owns_client = client is None
        self._closed = False

    @property
    def docker(self) -> aiodocker.Docker:
        """The aiodocker client (created on first use, inside the event loop)."""
        if self._closed:
            raise RuntimeUnavailable(f"Docker client for {self.url} is closed")
        if self._docker is None:
            self._docker = make_docker_client(self.url)
        return self._docker

    async def close(self) -> None:
        self._closed = True
        if self._docker is not None:
            docker, self._docker = self._docker, None
            if self._owns_client:
                await close_docker_client(docker)

    async def run(
        self,
        what: str,
        request: Callable[[aiodocker.Docker], Awaitable[T]],
        *,
        timeout: float | None = None,
        ok_statuses: tuple[int, ...] = (),
    ) -> T | None:
        """Run one aiodocker call under its own deadline (``timeout`` or
        ``call_timeout``), with engine errors mapped onto the runtime contract.

        ``what`` names the operation and object for error messages. HTTP statuses in
        ``ok_statuses`` return None instead of raising.
        """
        deadline = self.call_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(deadline):
                return await request(self.docker)
        except TimeoutError:
            raise RuntimeTimeout(
                f"{what}: Docker at {self.url} did not answer within {deadline:g}s"
            ) from None
        except DockerError as exc:
            if exc.status in ok_statuses:
                return None
            raise self.translate(exc, what) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise RuntimeUnavailable(f"{what}: Docker at {self.url} unreachable: {exc}") from None

    async def call(
        self,
        what: str,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        timeout: float | None = None,
        ok_statuses: tuple[int, ...] = (),
    ) -> Any:
        """A raw JSON request (aiodocker's request layer), for endpoints without a
        public aiodocker call; otherwise like :meth:`run`."""
        return await self.run(
            what,
            lambda docker: docker._query_json(
                path, method, params=dict(params) if params else None, data=body
            ),
            timeout=timeout,
            ok_statuses=ok_statuses,
        )

    # --- public aiodocker calls ---------------------------------------------------

    async def version(self, what: str = "docker version") -> dict[str, Any]:
        return await self.run(what, lambda d: d.version())  # type: ignore[return-value]

    async def create_container(self, what: str, name: str, body: dict[str, Any]) -> str:
        created = await self.run(what, lambda d: d.containers.create(body, name=name))
        assert created is not None
        return str(created.id)

    async def start_container(self, what: str, container_id: str) -> None:
        await self.run(what, lambda d: d.containers.container(container_id).start())

    async def inspect_container(self, what: str, container_id: str) -> dict[str, Any]:
        return await self.run(what, lambda d: d.containers.container(container_id).show())  # type: ignore[return-value]

    async def list_containers(self, what: str, filters: Mapping[str, list[str]]) -> list[dict[str, Any]]:
        """``docker ps -a`` with ``filters``: each entry's ``Id``, ``State`` and ``Labels``."""
        found = await self.run(what, lambda d: d.containers.list(all="1", filters=json.dumps(filters)))
        return [{key: c[key] for key in ("Id", "State", "Labels") if key in c} for c in found or []]

    async def stop_container(self, what: str, container_id: str, grace: int) -> None:
        """Docker's own stop in one round trip: the container's stop signal, SIGKILL
        after ``grace`` seconds, and the wait for its exit. Already stopped is fine
        (304). The deadline is the grace plus one call timeout."""
        await self.run(what, lambda d: d.containers.container(container_id).stop(t=int(grace)),
                       timeout=grace + self.call_timeout, ok_statuses=(304,))

    async def remove_container(self, what: str, container_id: str) -> None:
        await self.run(what, lambda d: d.containers.container(container_id).delete(force=True, v=True))

    async def inspect_image(self, what: str, name: str) -> dict[str, Any]:
        return await self.run(what, lambda d: d.images.inspect(name))  # type: ignore[return-value]

    async def open_stream(
        self,
        what: str,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> aiohttp.ClientResponse:
        """Send a request and return the response once its headers arrived.

        The deadline covers only getting the headers; the body is read by the caller
        (who must ``close()`` the response) under whatever deadline it needs.
        """
        deadline = self.call_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(deadline):
                return await self.docker._do_query(
                    path,
                    method,
                    params=dict(params) if params else None,
                    data=data,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(),
                )
        except TimeoutError:
            raise RuntimeTimeout(
                f"{what}: Docker at {self.url} did not answer within {deadline:g}s"
            ) from None
        except DockerError as exc:
            raise self.translate(exc, what) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise RuntimeUnavailable(f"{what}: Docker at {self.url} unreachable: {exc}") from None

    def translate(self, exc: DockerError, what: str) -> RuntimeError_:
        message = str(exc.message).strip()
        if exc.status == 404:
            return NotFound(f"{what}: {message}")
        if exc.status == _CONNECT_FAILED:
            return RuntimeUnavailable(f"{what}: Docker at {self.url} unreachable: {message}")
        return EngineError(exc.status, f"{what}: Docker error {exc.status}: {message}")


# Longest stream line accepted. An event line carries the container's labels, which
# include the pod's annotations (at most 256 KiB, JSON-escaped twice on the way).
MAX_STREAM_LINE = 4 * 1024 * 1024
# Marker yielded in place of a line that was skipped, so a consumer that must not
# miss anything (the PLEG) knows to resynchronise.
SKIPPED_LINE: dict[str, Any] = {"__nodeagent_skipped__": True}


async def iter_json_lines(
    response: aiohttp.ClientResponse, what: str, *, max_line: int = MAX_STREAM_LINE
) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of a Docker progress/event stream (one per line).

    Never holds more than ``max_line`` bytes of one line: a longer line is dropped as
    it arrives, and so is a line that is not a JSON object; either is logged and
    replaced by ``SKIPPED_LINE``, and the stream goes on. Raises RuntimeUnavailable
    when the connection breaks mid-stream; returns at a clean end of stream. In-band
    ``error`` objects are yielded for the caller to judge.
    """
    buffer = bytearray()
    dropping = False  # inside a line longer than max_line: discard up to its newline
    dropped = 0
    try:
        while True:
            chunk = await response.content.readany()
            if not chunk:
                if buffer.strip() and not dropping:
                    obj = _decode_line(bytes(buffer), what)
                    yield obj if obj is not None else SKIPPED_LINE
                return
            start = 0
            while True:
                newline = chunk.find(b"\n", start)
                piece = chunk[start:] if newline < 0 else chunk[start:newline]
                if dropping:
                    dropped += len(piece)
                elif len(buffer) + len(piece) > max_line:
                    dropping, dropped = True, len(buffer) + len(piece)
                    buffer.clear()
                else:
                    buffer += piece
                if newline < 0:
                    break
                start = newline + 1
                if dropping:
                    _log.warning("stream line over the size limit skipped", stream=what,
                                 bytes=dropped, limit=max_line)
                    dropping = False
                    yield SKIPPED_LINE
                    continue
                line = bytes(buffer).strip()
                buffer.clear()
                if line:
                    obj = _decode_line(line, what)
                    yield obj if obj is not None else SKIPPED_LINE
    except (aiohttp.ClientError, OSError) as exc:
        raise RuntimeUnavailable(f"{what}: stream from Docker broke: {exc}") from None


def _decode_line(line: bytes, what: str) -> dict[str, Any] | None:
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        _log.warning("malformed stream line skipped", stream=what, line=line[:200].decode("utf-8", "replace"))
        return None
    if not isinstance(obj, dict):
        _log.warning("stream line is not a JSON object; skipped", stream=what,
                     line=line[:200].decode("utf-8", "replace"))
        return None
    return obj


def stream_error(obj: Mapping[str, Any]) -> str | None:
    """The error message carried in-band by a progress-stream object, if any."""
    detail = obj.get("errorDetail")
    if isinstance(detail, dict) and detail.get("message"):
        return str(detail["message"])
    if obj.get("error"):
        return str(obj["error"])
    return None
