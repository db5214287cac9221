"""Container logs on the kubelet side: termination messages and /containerLogs.

* ``terminationMessagePath``: each container instance gets its own file under
  ``<root>/pods/<uid>/containers/<name>/<attempt>``, bind-mounted at the path the spec
  names (default /dev/termination-log, mode 0666 so any user may write it). Its host
  path rides on a container label; once the container has exited its last 4096 bytes
  become the terminated state's ``message`` (kubelet's limit). With
  ``FallbackToLogsOnError`` an empty file of a failed container is replaced by the
  last 80 lines of its log, cut to 2048 bytes.
* ``ContainerLogs`` resolves ``namespace/pod/container`` (``previous``: the last dead
  instance) to a runtime container and streams its log with kubelet's query
  parameters; ``handler`` serves ``/containerLogs/{ns}/{pod}/{container}`` with
  kubelet's errors. The byte stream itself comes from ``runtime.logs.read_logs``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import structlog

from runtime.logs import read_logs, tail_text
from runtime.types import ContainerState, ContainerStatus, NotFound, RuntimeError_

log = structlog.get_logger(__name__)

TERMINATION_MESSAGE_LABEL = "io.nodeagent.termination-message-path"
MAX_TERMINATION_MESSAGE = 4096  # kubelet's MaxContainerTerminationMessageLength
FALLBACK_LOG_LINES = 80  # MaxContainerTerminationMessageLogLines
FALLBACK_LOG_BYTES = 2048  # MaxContainerTerminationMessageLogLength


# --- termination messages --------------------------------------------------------------


def prepare_termination_message_file(pod_dir: str | os.PathLike, container: str, attempt: int) -> str:
    """Create (empty) the host file for one container instance; returns its path."""
    directory = Path(pod_dir) / "containers" / container
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / str(int(attempt))
    with open(path, "wb"):
        pass
    os.chmod(path, 0o666)
    return str(path)


def read_termination_file(path: str) -> str:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_TERMINATION_MESSAGE:
                f.seek(size - MAX_TERMINATION_MESSAGE)
            data = f.read(MAX_TERMINATION_MESSAGE)
    except FileNotFoundError:
        return ""
    except OSError as exc:
        return f"Error on reading termination log {path}: {exc.strerror}"
    return data.decode("utf-8", errors="replace")


class TerminationMessages:
    """The ``message`` of exited containers, read once per container and cached
    (an exited container never changes)."""

    def __init__(self, runtime) -> None:
        self.runtime = runtime
        self._cache: dict[str, str] = {}

    async def fill(self, pod: dict, containers: list[ContainerStatus]) -> None:
        """Set ``c.message`` on every exited container of ``pod``."""
        policies = {}
        for key in ("initContainers", "containers"):
            for c in (pod.get("spec") or {}).get(key) or []:
                if isinstance(c, dict):
                    policies[c.get("name")] = c.get("terminationMessagePolicy") or "File"
        for c in containers:
            if c.state != ContainerState.EXITED:
                continue
            cached = self._cache.get(c.id)
            if cached is None:
                cached = await self._read(c, policies.get(c.name) == "FallbackToLogsOnError")
                self._cache[c.id] = cached
            c.message = cached

    async def _read(self, c: ContainerStatus, fallback: bool) -> str:
        path = c.labels.get(TERMINATION_MESSAGE_LABEL)
        message = await asyncio.to_thread(read_termination_file, path) if path else ""
        if not message and fallback and (c.exit_code or 0) != 0:
            try:
                message = await tail_text(self.runtime, c.id, lines=FALLBACK_LOG_LINES,
                                          max_bytes=FALLBACK_LOG_BYTES)
            except RuntimeError_ as exc:
                log.warning("cannot read the log of a failed container", container=c.id[:12], error=str(exc))
                message = ""
        return message

    def forget_pod(self, container_ids) -> None:
        """Drop the entries of a removed pod's containers."""
        for cid in container_ids:
            self._cache.pop(cid, None)


# --- /containerLogs ------------------------------------------------------------------


class LogsError(Exception):
    """A request for logs that cannot be served; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class LogOptions:
    follow: bool = False
    previous: bool = False
    tail: int | None = None
    since: float | None = None  # unix seconds
    timestamps: bool = False
    limit_bytes: int | None = None


def _bool(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes")


def _int(query, key: str, minimum: int) -> int | None:
    raw = query.get(key)
    if raw in (None, ""):
        return None
    try:
        value = int(raw)
    except ValueError:
        raise LogsError(400, f"invalid {key} {raw!r}: must be an integer") from None
    if value < minimum:
        raise LogsError(400, f"invalid {key} {value}: must be at least {minimum}")
    return value


def parse_log_options(query, now: float | None = None) -> LogOptions:
    """kubelet's PodLogOptions from a query: follow, previous, tailLines, sinceSeconds,
    sinceTime (RFC 3339), timestamps, limitBytes."""
    now = time.time() if now is None else now
    options = LogOptions(
        follow=_bool(query.get("follow")),
        previous=_bool(query.get("previous")),
        timestamps=_bool(query.get("timestamps")),
        tail=_int(query, "tailLines", 0),
        limit_bytes=_int(query, "limitBytes", 1),
    )
    since_seconds = _int(query, "sinceSeconds", 1)
    since_time = query.get("sinceTime")
    if since_seconds is not None and since_time:
        raise LogsError(400, "at most one of sinceTime or sinceSeconds may be specified")
    if since_seconds is not None:
        options.since = now - since_seconds
    elif since_time:
        try:
            options.since = datetime.fromisoformat(since_time.replace("Z", "+00:00")).timestamp()
        except ValueError:
            raise LogsError(400, f"invalid sinceTime {since_time!r}: must be RFC 3339") from None
    return options


class ContainerLogs:
    """Finds a pod's container in the runtime and streams its log.

    ``pods`` returns the node's pods (as on /pods); the runtime is the node's
    DockerRuntime (list_containers by pod uid, and the engine for read_logs).
    """

    def __init__(self, runtime, pods: Callable[[], list[dict]]) -> None:
        self.runtime = runtime
        self._pods = pods

    def find_pod(self, namespace: str, name: str) -> dict:
        for pod in self._pods():
            meta = pod.get("metadata") or {}
            if meta.get("name") == name and (meta.get("namespace") or "default") == namespace:
                return pod
        raise LogsError(404, f'pods "{name}" not found')

    async def resolve(self, namespace: str, pod_name: str, container: str, previous: bool) -> str:
        """The runtime container id to read; LogsError with kubelet's wording otherwise."""
        pod = self.find_pod(namespace, pod_name)
        spec = pod.get("spec") or {}
        names = [c.get("name") for key in ("initContainers", "containers", "ephemeralContainers")
                 for c in spec.get(key) or [] if isinstance(c, dict)]
        if container not in names:
            raise LogsError(400, f"container {container} is not valid for pod {pod_name}")
        # kubelet's validateContainerLogStatus: the IDs come from the pod's status.
        status = next((cs for key in ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses")
                       for cs in (pod.get("status") or {}).get(key) or [] if cs.get("name") == container), {})
        state = status.get("state") or {}
        last = (status.get("lastState") or {}).get("terminated") or {}
        if previous:
            cid = last.get("containerID")
            if not cid:
                raise LogsError(400, f'previous terminated container "{container}" in pod "{pod_name}" not found')
        elif state.get("running") is not None and status.get("containerID"):
            cid = status["containerID"]
        elif (state.get("terminated") or {}).get("containerID"):
            cid = state["terminated"]["containerID"]
        elif last.get("containerID"):
            cid = last["containerID"]  # waiting in back-off: the last run's log
        else:
            reason = ((state.get("waiting") or {}).get("reason")) or "ContainerCreating"
            raise LogsError(400, f'container "{container}" in pod "{pod_name}" is waiting to start: {reason}')
        return cid.partition("://")[2] or cid

    def stream(self, container_id: str, options: LogOptions) -> AsyncIterator[bytes]:
        """The log bytes; close it (``contextlib.aclosing``) when stopping early, so the
        engine connection is released at once."""
        return read_logs(self.runtime, container_id, follow=options.follow, tail=options.tail,
                         since=options.since, timestamps=options.timestamps, limit_bytes=options.limit_bytes)

    async def handler(self, request):
        """aiohttp handler for GET /containerLogs/{namespace}/{pod}/{container}."""
        from aiohttp import web

        info = request.match_info
        try:
            options = parse_log_options(request.query)
            container_id = await self.resolve(info["namespace"], info["pod"], info["container"], options.previous)
        except LogsError as exc:
            return web.Response(status=exc.status, text=str(exc) + "\n")
        except RuntimeError_ as exc:
            return web.Response(status=503, text=f"{exc}\n")
        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        started = False
        try:
            async with contextlib.aclosing(self.stream(container_id, options)) as pieces:
                async for piece in pieces:
                    if not started:
                        await response.prepare(request)
                        started = True
                    await response.write(piece)
        except NotFound:
            if not started:
                return web.Response(status=404, text=f"container {info['container']} of pod {info['pod']} "
                                                     "no longer exists on this node\n")
        except (RuntimeError_, ConnectionResetError) as exc:
            if not started:
                return web.Response(status=503, text=f"{exc}\n")
            log.info("log stream ended early", container=container_id[:12], error=str(exc))
            return response
        if not started:
            await response.prepare(request)
        await response.write_eof()
        return response
