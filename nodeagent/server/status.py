"""The node's HTTP status endpoint (kubelet's read-only port): /healthz, /readyz, /pods,
/proxy (the service proxy's service -> endpoints table) and, on loopback,
/containerLogs/{namespace}/{pod}/{container}; stats, metrics and the status page are
mounted from their own modules (``mount``)."""

from __future__ import annotations

import json
from typing import Callable

import structlog
from aiohttp import web

from nodeagent.server.metrics import limits_middleware

log = structlog.get_logger(__name__)

HealthCheck = Callable[[], tuple[bool, str]]


class StatusServer:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        pods: Callable[[], list[dict]],
        checks: dict[str, HealthCheck],
        proxy: Callable[[], str] | None = None,
        info: Callable[[], list[str]] | None = None,
        container_logs: Callable | None = None,
        ready_checks: dict[str, HealthCheck] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._pods = pods
        self._checks = checks
        # Informational lines for ?verbose (node pressure conditions): never a failure.
        self._info = info
        self._ready_checks = {**checks, **(ready_checks or {})}
        self._runner: web.AppRunner | None = None
        # Bounded requests in flight and a deadline per answer (nodeagent/server/metrics.py).
        self.app = web.Application(middlewares=[limits_middleware()])
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/readyz", self._readyz)
        self.app.router.add_get("/pods", self._list_pods)
        self.app.router.add_get("/pods/", self._list_pods)
        self._proxy = proxy
        if proxy is not None:
            self.app.router.add_get("/proxy", self._show_proxy)
        if container_logs is not None:
            # kubelet's path and query parameters (nodeagent.kubelet.logs).
            self.app.router.add_get("/containerLogs/{namespace}/{pod}/{container}", container_logs)
        self.bound_port: int | None = None

    def mount(self, routes: list[web.RouteDef]) -> None:
        """Add handlers owned by other modules (stats, metrics, the status page)."""
        self.app.router.add_routes(routes)

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server  # aiohttp keeps the asyncio server here
        sockets = getattr(server, "sockets", None) or []
        self.bound_port = sockets[0].getsockname()[1] if sockets else self.port
        log.info("status server listening", address=f"{self.host}:{self.bound_port}")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, request: web.Request) -> web.Response:
        return self._run_checks(request, self._checks, "healthz")

    async def _readyz(self, request: web.Request) -> web.Response:
        return self._run_checks(request, self._ready_checks, "readyz")

    def _run_checks(self, request: web.Request, checks: dict[str, HealthCheck], what: str) -> web.Response:
        lines = []
        healthy = True
        for name, check in checks.items():
            ok, detail = check()
            healthy &= ok
            if ok:  # a healthy check may still say something (e.g. manifests not loaded)
                lines.append(f"[+]{name} ok" if detail in ("", "ok") else f"[+]{name} ok: {detail}")
            else:
                lines.append(f"[-]{name} failed: {detail}")
        verbose = "verbose" in request.query
        if self._info is not None:
            lines += [f"[i]{line}" for line in self._info()]
        if healthy:
            body = "\n".join(lines + [f"{what} check passed"]) if verbose else "ok"
            return web.Response(text=body)
        return web.Response(status=500, text="\n".join(lines + [f"{what} check failed"]))

    async def _show_proxy(self, request: web.Request) -> web.Response:
        assert self._proxy is not None
        return web.Response(text=self._proxy())

    async def _list_pods(self, request: web.Request) -> web.Response:
        body = {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": self._pods()}
        return web.Response(text=json.dumps(body), content_type="application/json")
