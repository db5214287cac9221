"""The node API (kubelet's HTTPS port 10250): authenticated and authorized access to
pods, container logs, exec/attach/port-forward streams, health, stats and metrics.

Every request is authenticated (client certificate / TokenReview / anonymous when
enabled) and authorized (SubjectAccessReview on nodes/<subresource>) before any
handler runs, so refused callers never reach Docker. Long-lived streams are bounded
in number and closed after an idle period.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

import aiohttp
import structlog
from aiohttp import web

from nodeagent.server import containerlogs
from nodeagent.server.auth import NodeAuth, Unauthenticated

log = structlog.get_logger(__name__)

_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")

# The authenticated caller, for handlers that log or audit it.
USER_KEY: web.RequestKey = web.RequestKey("nodeagent.user", object)


class NotFound(Exception):
    pass


@dataclass
class Target:
    """A pod (and one of its containers) the node runs."""

    pod: dict
    uid: str
    container_name: str = ""
    container_id: str = ""
    netns_path: str | None = None


class PodLocator:
    """Finds the node's pods and their Docker containers (current and previous)."""

    def __init__(self, pods: Callable[[], list[dict]], runtime) -> None:
        self._pods = pods
        self.runtime = runtime

    def pod(self, namespace: str, name: str) -> dict | None:
        if not _LABEL.match(namespace or "") or not _SUBDOMAIN.match(name or ""):
            return None
        for pod in self._pods():
            meta = pod.get("metadata") or {}
            if meta.get("namespace", "default") == namespace and meta.get("name") == name:
                return pod
        return None

    async def instances(self, pod: dict, container: str) -> list:
        uid = pod["metadata"]["uid"]
        found = [c for c in await self.runtime.list_containers(uid) if c.name == container]
        found.sort(key=lambda c: (c.attempt, c.created_at), reverse=True)
        return found

    async def netns(self, pod: dict) -> str | None:
        uid = pod["metadata"]["uid"]
        sandboxes = [s for s in await self.runtime.list_pod_sandboxes(uid) if s.netns_path]
        sandboxes.sort(key=lambda s: s.created_at, reverse=True)
        return sandboxes[0].netns_path if sandboxes else None


def container_names(pod: dict) -> list[str]:
    spec = pod.get("spec") or {}
    return [c.get("name", "") for key in ("initContainers", "containers", "ephemeralContainers")
            for c in spec.get(key) or []]


class StreamLimiter:
    """At most `limit` concurrent long-lived streams."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    def try_acquire(self) -> bool:
        if self.active >= self.limit:
            return False
        self.active += 1
        return True

    def release(self) -> None:
        self.active -= 1


def _text(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message)


class NodeApiServer:
    def __init__(self, host: str, port: int, *, node_name: str, auth: NodeAuth,
                 ssl_context, pods: Callable[[], list[dict]], runtime,
                 checks: dict[str, Callable[[], tuple[bool, str]]] | None = None,
                 max_streams: int = 64, idle_timeout: float = 14400.0,
                 extra_routes: Callable[[web.Application], None] | None = None) -> None:
        self.host, self.port = host, port
        self.node_name = node_name
        self.auth = auth
        self.ssl_context = ssl_context
        self.locator = PodLocator(pods, runtime)
        self.runtime = runtime
        self._pods = pods
        self._checks = checks or {}
        self.streams = StreamLimiter(max_streams)
        self.idle_timeout = idle_timeout
        self.bound_port: int | None = None
        self._runner: web.AppRunner | None = None
        self.app = web.Application(middlewares=[self._guard], client_max_size=1024 * 1024)
        r = self.app.router
        r.add_get("/healthz", self._healthz)
        r.add_get("/pods", self._list_pods)
        r.add_get("/pods/", self._list_pods)
        r.add_get("/runningpods/", self._list_pods)
        r.add_get("/containerLogs/{ns}/{pod}/{container}", self._container_logs)
        from nodeagent.server import portforward, remotecommand  # noqa: PLC0415

        for kind in ("exec", "attach"):
            handler = remotecommand.make_handler(self, kind)
            for path in (f"/{kind}/{{ns}}/{{pod}}/{{container}}", f"/{kind}/{{ns}}/{{pod}}/{{uid}}/{{container}}"):
                r.add_route("GET", path, handler)
                r.add_route("POST", path, handler)
        pf = portforward.make_handler(self)
        for path in ("/portForward/{ns}/{pod}", "/portForward/{ns}/{pod}/{uid}"):
            r.add_route("GET", path, pf)
            r.add_route("POST", path, pf)
        if extra_routes is not None:
            extra_routes(self.app)

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context,
                           reuse_address=True)
        try:
            await site.start()
        except OSError:
            await self.stop()
            raise
        server = site._server  # aiohttp keeps the asyncio server here
        sockets = getattr(server, "sockets", None) or []
        self.bound_port = sockets[0].getsockname()[1] if sockets else self.port
        log.info("node API listening", address=f"{self.host}:{self.bound_port}")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- authentication and authorization ---------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler) -> web.StreamResponse:
        if len(request.raw_path) > 8192:
            return _text(414, "Request-URI Too Long")
        peercert = request.transport.get_extra_info("peercert") if request.transport else None
        try:
            user = await self.auth.authenticate(peercert, request.headers.get("Authorization"))
        except Unauthenticated:
            return _text(401, "Unauthorized")
        allowed, message = await self.auth.authorize(user, request.method, request.path)
        if not allowed:
            log.info("node API request forbidden", user=user.name, path=request.path[:200])
            return _text(403, message)
        request[USER_KEY] = user
        return await handler(request)

    # --- simple endpoints --------------------------------------------------------------

    async def _healthz(self, request: web.Request) -> web.Response:
        failed = [f"[-]{name} failed: {detail}" for name, check in self._checks.items()
                  for ok, detail in [check()] if not ok]
        if failed:
            return _text(500, "\n".join(failed + ["healthz check failed"]))
        return _text(200, "ok")

    async def _list_pods(self, request: web.Request) -> web.Response:
        body = {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": self._pods()}
        return web.Response(text=json.dumps(body), content_type="application/json")

    # --- container logs ----------------------------------------------------------------

    async def _container_logs(self, request: web.Request) -> web.StreamResponse:
        ns, name, container = (request.match_info[k] for k in ("ns", "pod", "container"))
        pod = self.locator.pod(ns, name)
        if pod is None:
            return _text(404, f'pod "{name}" does not exist\n')
        if container not in container_names(pod):
            return _text(404, f'container "{container}" not found in pod "{name}"\n')
        try:
            opts = containerlogs.parse_log_options(request.query)
        except containerlogs.LogOptionsError as exc:
            return _text(400, str(exc))
        instances = await self.locator.instances(pod, container)
        if opts.previous:
            if len(instances) < 2:
                return _text(400, f'previous terminated container "{container}" in pod "{name}" not found')
            instance = instances[1]
        else:
            if not instances:
                return _text(400, f'container "{container}" in pod "{name}" is waiting to start: '
                                  f"ContainerCreating")
            instance = instances[0]
        streaming = opts.follow
        if streaming and not self.streams.try_acquire():
            return _text(429, "too many concurrent streams on this node")
        try:
            tty = await self._container_tty(instance.id)
            response = web.StreamResponse(status=200, headers={"Content-Type": "text/plain"})
            chunks = containerlogs.stream_logs(self.runtime.docker, instance.id, opts, time.time(), tty)
            prepared = False
            try:
                async for chunk in chunks:
                    if not prepared:
                        await response.prepare(request)
                        prepared = True
                    await response.write(chunk)
            except (ConnectionError, aiohttp.ClientError) as exc:
                if not prepared:
                    return _text(500, f"failed to read the container's logs: {exc}")
                log.debug("log stream ended early", error=str(exc))
                return response
            finally:
                await chunks.aclose()
            if not prepared:
                await response.prepare(request)
            await response.write_eof()
            return response
        finally:
            if streaming:
                self.streams.release()

    async def _container_tty(self, container_id: str) -> bool:
        info = await self.runtime.docker.containers.container(container_id).show()
        return bool((info.get("Config") or {}).get("Tty"))

    # --- shared by the streaming handlers ------------------------------------------------

    async def resolve(self, request: web.Request, *, container: bool) -> Target:
        ns, name = request.match_info["ns"], request.match_info["pod"]
        pod = self.locator.pod(ns, name)
        uid = request.match_info.get("uid")
        if pod is None or (uid and pod["metadata"].get("uid") != uid):
            raise NotFound("pod does not exist")
        target = Target(pod=pod, uid=pod["metadata"]["uid"])
        if container:
            cname = request.match_info["container"]
            instances = await self.locator.instances(pod, cname) if cname in container_names(pod) else []
            running = [c for c in instances if c.state.value == "running"]
            if not running:
                raise NotFound(f'container not found ("{cname}")')
            target.container_name, target.container_id = cname, running[0].id
        else:
            target.netns_path = await self.locator.netns(pod)
            if target.netns_path is None:
                raise NotFound("pod does not exist")
        return target


async def idle_watchdog(last_activity: Callable[[], float], timeout: float, on_idle: Callable[[], Any],
                        done: asyncio.Event) -> None:
    """Calls on_idle once nothing moved for `timeout` seconds (or returns when done)."""
    while not done.is_set():
        remaining = last_activity() + timeout - time.monotonic()
        if remaining <= 0:
            log.info("closing an idle stream", idle_seconds=timeout)
            result = on_idle()
            if asyncio.iscoroutine(result):
                await result
            return
        try:
            await asyncio.wait_for(done.wait(), remaining)
        except asyncio.TimeoutError:
            pass

