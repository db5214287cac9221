"""Feeds the service proxy from the node's own state (standalone mode).

Without an API server, Services come from the manifest directory and endpoints from
the local pods' readiness (hostPorts: ``nodeagent.kubelet.hostports``). Changes are
coalesced: any number of pod status updates between two passes cost one recompute,
and the proxy itself applies at most one kernel transaction per min-sync period.
"""

from __future__ import annotations

import asyncio
from typing import Callable

import structlog

from netplugin.proxy import ServiceProxy, StandaloneServices
from nodeagent.kubelet.events import WARNING, EventSink

log = structlog.get_logger(__name__)


class StandaloneServiceFeed:
    def __init__(
        self,
        proxy: ServiceProxy,
        services: StandaloneServices,
        *,
        pods: Callable[[], list[dict]],
        events: EventSink,
    ) -> None:
        self._proxy = proxy
        self._services = services
        self._pods = pods
        self._events = events
        self._manifests: list[dict] = []
        self._computed_manifests: list[dict] | None = None
        self._dirty = asyncio.Event()
        self._reported: set[str] = set()

    def set_manifests(self, services: list[dict]) -> None:
        self._manifests = services
        self._dirty.set()

    def pods_changed(self) -> None:
        self._dirty.set()

    def services(self) -> list[dict]:
        """The Services as the proxy has them (cluster IPs assigned), for containers'
        service environment variables; computed now if the manifests changed since."""
        if self._computed_manifests is not self._manifests:
            self.recompute()
        return self._services.fed_services()

    async def run(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                self.recompute()
            except Exception:  # never end the feed (and the agent): retry on the next change
                log.exception("service recompute failed; keeping the proxy's current state")
            await asyncio.sleep(0.05)  # coalesce bursts of pod updates

    def recompute(self) -> None:
        self._computed_manifests = self._manifests
        pods = self._pods()
        errors = self._services.sync(self._proxy, self._manifests, pods)
        current = set()
        for err in errors:
            text = str(err)
            current.add(text)
            if text in self._reported:
                continue
            log.error("service skipped", error=text)
            svc = next((s for s in self._manifests
                        if f"{s['metadata'].get('namespace', 'default')}/{s['metadata'].get('name')}"
                        in text), None)
            if svc is not None:
                self._events.event(svc, WARNING, "InvalidService", text)
        self._reported = current
