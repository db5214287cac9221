"""Cluster-mode inputs of the service proxy and the host-gw pod routes.

Services and EndpointSlices (discovery.k8s.io/v1) are watched from the API and handed
to the proxy's change trackers as they arrive; Node objects drive the routes to every
other node's podCIDR via its InternalIP. Watches resume and relist through the
Reflector, so a dropped watch or a 410 never loses a change.
"""

from __future__ import annotations

import asyncio

import structlog

from netplugin.proxy import PodRoutes, ServiceProxy
from nodeagent.kube import KubeClient
from nodeagent.kube.resources import ENDPOINTSLICES, NODES, SERVICES
from nodeagent.kube.watch import Informer, Reflector

log = structlog.get_logger(__name__)


class ClusterServiceFeed:
    def __init__(self, client: KubeClient, proxy: ServiceProxy, *, node_name: str,
                 routes: PodRoutes | None = None, route_sync_period: float = 30.0,
                 events=None, services: Informer | None = None) -> None:
        self._client = client
        self._proxy = proxy
        self._routes = routes if routes is not None else PodRoutes(node_name=node_name)
        self._route_sync_period = route_sync_period
        self._routes_dirty = asyncio.Event()
        self._reported: set[str] = set()
        # An ApiEventRecorder (or None): invalid Services get a Warning event too.
        self._events = events
        self._services: dict[str, dict] = {}
        # A Services informer shared with the rest of cluster mode; else our own watch.
        self._services_informer = services

    def _on_service(self, event: str, svc: dict, _old: dict | None) -> None:
        meta = svc.get("metadata") or {}
        key = f"{meta.get('namespace', 'default')}/{meta.get('name')}"
        if event == "DELETED":
            self._services.pop(key, None)
        else:
            self._services[key] = svc
        self._proxy.on_service(event, svc)
        self._report_errors()

    def _on_slice(self, event: str, slice_: dict, _old: dict | None) -> None:
        self._proxy.on_endpoint_slice(event, slice_)

    def _on_node(self, event: str, node: dict, _old: dict | None) -> None:
        self._routes.on_node(event, node)
        self._routes_dirty.set()

    def _report_errors(self) -> None:
        errors = {str(e): e for e in self._proxy.errors}
        for text in errors.keys() - self._reported:
            log.error("service skipped", error=text)
            svc = self._services.get(errors[text].service)
            if self._events is not None and svc is not None:
                meta = svc["metadata"]
                self._events.record(
                    {"apiVersion": "v1", "kind": "Service", "namespace": meta.get("namespace", "default"),
                     "name": meta["name"], "uid": meta.get("uid"),
                     "resourceVersion": meta.get("resourceVersion")},
                    "Warning", "InvalidService", text)
        self._reported = set(errors)

    async def run(self) -> None:
        watches = [(ENDPOINTSLICES, self._on_slice), (NODES, self._on_node)]
        if self._services_informer is not None:
            self._services_informer.add_handler(self._on_service)
            for svc in self._services_informer.list():  # what it read before we joined
                self._on_service("ADDED", svc, None)
        else:
            watches.insert(0, (SERVICES, self._on_service))
        async with asyncio.TaskGroup() as tg:
            for resource, handler in watches:
                tg.create_task(Reflector(self._client, resource, handler).run(),
                               name=f"proxy-watch-{resource.plural}")
            tg.create_task(self._sync_routes(), name="pod-routes")

    async def _sync_routes(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self._route_sync_period):
                    await self._routes_dirty.wait()
            except TimeoutError:
                pass
            self._routes_dirty.clear()
            try:
                result = await self._routes.sync()
                for error in getattr(result, "errors", []) or []:
                    log.warning("pod route skipped", error=error)
            except Exception as exc:  # a route failure must not stop the watches
                log.warning("pod route sync failed; will retry", error=str(exc))
