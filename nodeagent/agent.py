"""Wires the layers into one daemon and runs them under one TaskGroup."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import psutil
import structlog

from netplugin.podnet import BridgeNetwork
from nodeagent.backoff import Backoff
from nodeagent.config import Settings
from nodeagent.kubelet.gc import collect_dead_sandboxes
from nodeagent.kubelet.kubelet import Kubelet
from nodeagent.kubelet.netview import sandbox_netns_view
from nodeagent.standalone.manifests import ManifestSnapshot, ManifestSource
from nodeagent.kubelet.pleg import PLEG
from nodeagent.kubelet.podworkers import PodWorkers
from netplugin.proxy import ServiceProxy, StandaloneServices
from nodeagent.server.status import StatusServer
from nodeagent.standalone.services import StandaloneServiceFeed
from nodeagent.kubelet.volumes import VolumeManager
from runtime.docker import DockerRuntime
from runtime.images import DockerImageService
from runtime.pause_image import ensure_pause_image

log = structlog.get_logger(__name__)

from nodeagent import __version__ as VERSION


def mark_terminating(pod: dict) -> dict:
    pod = dict(pod)
    meta = dict(pod["metadata"])
    grace = int(pod["spec"].get("terminationGracePeriodSeconds", 30))
    meta.setdefault("deletionTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + grace)))
    meta.setdefault("deletionGracePeriodSeconds", grace)
    pod["metadata"] = meta
    return pod


def detect_host_ip() -> str:
    """The first IPv4 address of the interface that holds the default route.

    Read from /proc and psutil: a lookup only, nothing is sent.
    """
    try:
        with open("/proc/net/route") as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[1] == "00000000" and fields[7] == "00000000":
                    for addr in psutil.net_if_addrs().get(fields[0], []):
                        if addr.family == socket.AF_INET:
                            return addr.address
    except (OSError, StopIteration, IndexError):
        pass
    return "127.0.0.1"


class Agent:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        root = Path(settings.root_dir)
        self.host_ip = settings.node_ip or detect_host_ip()
        self.runtime = DockerRuntime(
            settings.node_name,
            docker_url=settings.docker_url,
            call_timeout=settings.runtime_call_timeout,
        )
        self.images = DockerImageService(
            self.runtime, pull_timeout=settings.image_pull_timeout
        )
        # Cluster mode (--kubeconfig): the API pod source, status manager, Node and
        # Lease, admission and mirror pods (nodeagent/cluster/). None when standalone.
        self.cluster = None
        if settings.kubeconfig:
            from nodeagent.cluster.mode import ClusterMode

            self.cluster = ClusterMode(self)
        self.network = BridgeNetwork(
            bridge_name=settings.bridge_name,
            pod_cidr=settings.pod_cidr,
            state_dir=root / "ipam",
            runtime_view=sandbox_netns_view(self.runtime),
        )
        self.volumes = VolumeManager(root, sources=self.cluster.env_sources if self.cluster else None)
        self.kubelet = Kubelet(
            node_name=settings.node_name,
            runtime=self.runtime,
            images=self.images,
            network=self.network,
            volumes=self.volumes,
            # kubelet restarts a crashed container at once the first time, then backs off.
            backoff=Backoff(base=settings.backoff_base, cap=settings.backoff_cap,
                            immediate_first_restart=True),
            pull_backoff=Backoff(base=settings.backoff_base, cap=settings.backoff_cap),
            sandbox_image=self._sandbox_image,
            host_ip=self.host_ip,
            on_status=self._on_status,
            on_forget=self._on_forget,
            events=self.cluster.events if self.cluster else None,
            env_sources=self.cluster.env_sources if self.cluster else None,
        )
        self.workers = PodWorkers(self.cluster.syncer if self.cluster else self.kubelet)
        self.pleg = PLEG(
            self.runtime,
            on_pod_event=self.workers.kick,
            on_relist=self._on_relist,
            relist_period=settings.relist_period,
        )
        self.manifests = (
            ManifestSource(
                settings.manifest_dir,
                settings.node_name,
                self._on_manifests,
                poll_period=settings.manifest_poll_period,
            )
            if settings.manifest_dir
            else None
        )
        self.proxy, self.service_feed = self._make_proxy(settings, root)
        self.server = StatusServer(
            *settings.status_host_port,
            pods=self.pod_list,
            proxy=self.proxy.describe if self.proxy else None,
            checks={"ping": lambda: (True, "ok"), "pleg": self.pleg.healthy,
                    "network": self._network_health},
        )
        self._file_pods: set[str] = set()
        self._sandbox_image_id: str | None = None
        self._sandbox_lock = asyncio.Lock()
        self._network_error: str | None = "not started"
        self.started_at = time.time()

    def _make_proxy(self, settings: Settings, root: Path):
        if not settings.proxy:
            return None, None
        proxy = ServiceProxy(
            table=settings.proxy_table,
            node_name=settings.node_name,
            node_ips=[self.host_ip],
            cluster_cidr=settings.cluster_cidr,
            service_cidr=settings.service_cidr,
        )
        if self.cluster is not None:
            # Services and EndpointSlices come from the API (ClusterMode feeds them).
            return proxy, None
        feed = StandaloneServiceFeed(
            proxy,
            StandaloneServices(state_dir=root / "services", node_name=settings.node_name,
                               service_cidr=settings.service_cidr),
            pods=self.pod_list,
            events=self.kubelet.events,
        )
        return proxy, feed

    def _on_status(self, uid: str, status: dict) -> None:
        if self.cluster is not None:
            self.cluster.on_status(uid, status)
        if self.service_feed is not None:
            self.service_feed.pods_changed()

    def _on_forget(self, uid: str) -> None:
        if self.service_feed is not None:
            self.service_feed.pods_changed()

    # --- sources -------------------------------------------------------------------

    def _on_manifests(self, snapshot: ManifestSnapshot) -> None:
        for uid, pod in snapshot.pods.items():
            reason = snapshot.rejected.get(uid)
            self.kubelet.set_desired(pod, ("InvalidManifest", reason) if reason else None)
            self.workers.update(pod)
        for uid in self._file_pods - set(snapshot.pods):
            record = self.kubelet.record(uid)
            if record is not None:
                # Like the API's graceful deletion: the pod is terminating from now on,
                # so its endpoints stop taking new traffic while it shuts down.
                record.pod = mark_terminating(record.pod)
            self.workers.remove(uid, record.pod if record else None)
        if self.service_feed is not None:
            self.service_feed.pods_changed()
        self._file_pods = set(snapshot.pods)
        if self.service_feed is not None:
            self.service_feed.set_manifests(snapshot.services)
        if self.cluster is not None:
            self.cluster.set_static_pods(snapshot.pods)

    def _sources_synced(self) -> bool:
        files = self.manifests is None or self.manifests.synced.is_set()
        return files and (self.cluster is None or self.cluster.synced)

    def _on_relist(self, runtime_uids: set[str]) -> None:
        # Until every source has reported, an unknown pod may simply not be read yet.
        if not self._sources_synced():
            return
        known = self.workers.known()
        for uid in runtime_uids - known:
            log.info("removing pod that no source wants", pod_uid=uid)
            self.workers.remove(uid, None)

    async def _housekeeping(self) -> None:
        """Free addresses and volumes of pods that no longer exist (after a crash)."""
        while True:
            await asyncio.sleep(self.settings.relist_period)
            if not self._sources_synced() or self.pleg.last_relist is None:
                continue
            live = self.workers.known()
            try:
                released = await self.network.garbage_collect(live)
                if released:
                    log.info("released addresses of gone pods", pod_uids=released)
                await self.volumes.cleanup_orphans(live)
                await collect_dead_sandboxes(self.runtime, self.workers.known)
            except Exception as exc:  # housekeeping must never stop the node
                log.warning("housekeeping failed", error=str(exc))

    # --- runtime helpers -------------------------------------------------------------

    async def _sandbox_image(self) -> str:
        async with self._sandbox_lock:
            if self._sandbox_image_id is None:
                self._sandbox_image_id = await ensure_pause_image(
                    self.runtime.docker, self.settings.pod_infra_image
                )
        return self.settings.pod_infra_image

    def _network_health(self) -> tuple[bool, str]:
        return (self._network_error is None, self._network_error or "ok")

    async def _start_network(self) -> None:
        delay = 1.0
        while True:
            try:
                await self.network.start()
                self._network_error = None
                return
            except Exception as exc:
                self._network_error = str(exc)
                log.error("pod network setup failed; retrying", error=str(exc), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    # --- views ---------------------------------------------------------------------

    def pod_list(self) -> list[dict]:
        items = []
        for record in self.kubelet.pods.values():
            pod = dict(record.pod)
            pod["status"] = record.status or {"phase": "Pending"}
            items.append(pod)
        items.sort(key=lambda p: (p["metadata"].get("namespace", ""), p["metadata"]["name"]))
        return items

    # --- lifecycle -----------------------------------------------------------------

    async def run(self) -> None:
        Path(self.settings.root_dir).mkdir(parents=True, exist_ok=True)
        log.info("nodeagent starting", version=VERSION, node=self.settings.node_name,
                 manifest_dir=self.settings.manifest_dir, pod_cidr=self.settings.pod_cidr,
                 host_ip=self.host_ip)
        await self.server.start()
        try:
            if self.cluster is not None:
                # The Node first: the pod network uses its spec.podCIDR when set.
                pod_cidr = await self.cluster.prepare()
                if pod_cidr and pod_cidr != self.settings.pod_cidr:
                    log.info("using the Node's pod CIDR", pod_cidr=pod_cidr)
                    self.network = BridgeNetwork(
                        bridge_name=self.settings.bridge_name,
                        pod_cidr=pod_cidr,
                        state_dir=Path(self.settings.root_dir) / "ipam",
                        runtime_view=sandbox_netns_view(self.runtime),
                    )
                    self.kubelet.network = self.network
            await self._start_network()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.workers.run(), name="pod-workers")
                tg.create_task(self.pleg.run(), name="pleg")
                tg.create_task(self._housekeeping(), name="housekeeping")
                if self.manifests is not None:
                    tg.create_task(self.manifests.run(), name="manifest-source")
                if self.cluster is not None:
                    tg.create_task(self.cluster.run(), name="cluster-mode")
                if self.proxy is not None:
                    tg.create_task(self.proxy.run(), name="service-proxy")
                    if self.cluster is not None:
                        from nodeagent.cluster.proxyfeed import ClusterServiceFeed

                        feed = ClusterServiceFeed(self.cluster.client, self.proxy,
                                                  node_name=self.settings.node_name,
                                                  events=self.cluster.events)
                        tg.create_task(feed.run(), name="cluster-service-feed")
                if self.service_feed is not None:
                    tg.create_task(self.service_feed.run(), name="service-feed")
        finally:
            if self.proxy is not None:
                self.proxy.close()
            if self.cluster is not None:
                await self.cluster.client.close()
            await self.server.stop()
            await self.runtime.close()
            await self.network.stop()
