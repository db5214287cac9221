"""Wires the layers into one daemon and runs them under one TaskGroup."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import psutil
import structlog

from netplugin.podnet import BridgeNetwork
from nodeagent.backoff import Backoff, Delay, retry
from nodeagent.eviction import EvictionManager, parse_thresholds
from nodeagent.eviction.signals import observe as observe_signals
from nodeagent.eviction.usage import RuntimePodUsage
from nodeagent.images import PullCredentials
from nodeagent.kubelet.servicelinks import ServiceEnv
from nodeagent.images.gc import DockerImageRuntime, ImageGC
from nodeagent.config import Settings, container_log_max_bytes
from nodeagent.kubelet.dns import DNSSettings
from nodeagent.kubelet.logs import ContainerLogs
from nodeagent.kubelet.security import SecurityPolicy
from nodeagent.kubelet.gc import collect_dead_sandboxes
from nodeagent.kubelet.kubelet import Kubelet
from nodeagent.kubelet.netview import sandbox_netns_view
from nodeagent.standalone.manifests import ManifestSnapshot, ManifestSource
from nodeagent.kubelet.pleg import PLEG
from nodeagent.kubelet.hostports import HostPortFeed
from nodeagent.kubelet.podworkers import PodWorkers
from nodeagent.prober import HookRunner, ProbeManager
from netplugin.proxy import ServiceProxy, StandaloneServices
from nodeagent.server.status import StatusServer
from nodeagent.standalone.services import StandaloneServiceFeed
from nodeagent.kubelet.volumes import VolumeManager
from runtime.docker import DockerRuntime
from runtime.images import DockerImageService
from runtime.pause_image import ensure_pause_image

log = structlog.get_logger(__name__)

from nodeagent import __version__ as VERSION

# A housekeeping pass (network and volume GC) that takes longer is abandoned; the pods
# it holds back (added during the pass) then start anyway.
HOUSEKEEPING_DEADLINE = 30.0


# A deletion timestamp must stay representable (time.gmtime fails past year 9999).
_MAX_GRACE_FOR_TIMESTAMP = 10 * 365 * 24 * 3600


def mark_terminating(pod: dict) -> dict:
    """The pod as graceful deletion leaves it. Never raises: the pod was validated, but
    this runs on removal, where a surprise would take the agent down."""
    pod = dict(pod)
    meta = dict(pod["metadata"]) if isinstance(pod.get("metadata"), dict) else {}
    spec = pod.get("spec") if isinstance(pod.get("spec"), dict) else {}
    grace = spec.get("terminationGracePeriodSeconds", 30)
    if not isinstance(grace, int) or isinstance(grace, bool):
        grace = 30
    grace = min(max(grace, 0), _MAX_GRACE_FOR_TIMESTAMP)
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


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Agent:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        root = Path(settings.root_dir)
        self.host_ip = settings.node_ip or detect_host_ip()
        self.runtime = DockerRuntime(
            settings.node_name,
            docker_url=settings.docker_url,
            call_timeout=settings.runtime_call_timeout,
            log_max_size=container_log_max_bytes(settings),
            log_max_files=settings.container_log_max_files,
        )
        self.images = DockerImageService(
            self.runtime, pull_timeout=settings.image_pull_timeout,
            max_parallel_pulls=settings.max_parallel_image_pulls,
        )
        # Cluster mode (--kubeconfig): the API pod source, status manager, Node and
        # Lease, admission and mirror pods (nodeagent/cluster/). None when standalone.
        self.proxy = self._make_proxy(settings)
        self.cluster = None
        if settings.kubeconfig:
            from nodeagent.cluster.mode import ClusterMode

            self.cluster = ClusterMode(
                settings, host_ip=self.host_ip, runtime_version=self.runtime.version,
                health_checks=self._node_health, kubelet_port=self._kubelet_port,
                proxy=self.proxy,
                node_images=self.images.list_images,
                # The eviction manager is built below; these run only once it exists.
                pressure_conditions=lambda: self.eviction.conditions(),
                under_pressure=lambda: self.eviction.under_pressure(),
            )
        self.network = BridgeNetwork(
            bridge_name=settings.bridge_name,
            pod_cidr=settings.pod_cidr,
            state_dir=root / "ipam",
            runtime_view=sandbox_netns_view(self.runtime),
        )
        # Probes and lifecycle hooks; a changed probe result re-syncs its pod.
        self.prober = ProbeManager(self.runtime, events=self.cluster.events if self.cluster else None,
                                   on_change=lambda uid: self.workers.kick(uid))
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
            service_env=ServiceEnv(self._service_list),
            pull_credentials=PullCredentials(
                settings.image_credential_file,
                secrets=self.cluster.env_sources if self.cluster else None),
            security=SecurityPolicy(
                seccomp_profile_root=settings.seccomp_profile_root or str(root / "seccomp"),
                allowed_unsafe_sysctls=tuple(settings.allowed_unsafe_sysctls),
                seccomp_default=settings.seccomp_default,
            ),
            dns=DNSSettings(cluster_dns=tuple(settings.cluster_dns), cluster_domain=settings.cluster_domain,
                            resolv_conf=settings.resolv_conf),
            prober=self.prober,
            hooks=HookRunner(self.runtime, self.prober.http),
        )
        self.workers = PodWorkers(self.cluster.attach(self.kubelet) if self.cluster else self.kubelet)
        if self.cluster is not None:
            self.cluster.attach_workers(self.workers)
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
        self.service_feed = self._make_service_feed(settings, root)
        # hostPorts (kubelet's portmap job) in both modes; standalone's service feed
        # used to be the only one to program them.
        self.host_ports = HostPortFeed(self.proxy, pods=self.pod_list) if self.proxy else None
        # Docker's data root (images, writable layers): the image filesystem.
        self._image_dir: str | None = None
        self.image_gc = ImageGC(
            DockerImageRuntime(self.runtime.engine), image_dir=lambda: self._image_dir,
            pinned=lambda: {settings.pod_infra_image}, needed=self._needed_images,
            high=settings.image_gc_high_threshold, low=settings.image_gc_low_threshold,
            min_age=settings.image_minimum_gc_age, period=settings.image_gc_period,
            ready=lambda: self._sources_synced())
        self.eviction = EvictionManager(
            parse_thresholds(settings.eviction_hard),
            observe=lambda: observe_signals(settings.root_dir, self._image_dir),
            pods=self.pod_list, usage=RuntimePodUsage(self.runtime, root),
            evict=self._evict, reclaim=self._reclaim, node_event=self._node_event,
            period=settings.eviction_monitoring_interval,
            transition_period=settings.eviction_pressure_transition_period)
        self.server = StatusServer(
            *settings.status_host_port,
            pods=self.pod_list,
            proxy=self.proxy.describe if self.proxy else None,
            checks={"ping": lambda: (True, "ok"), "pleg": self.pleg.healthy,
                    "network": self._network_health,
                    **({"manifests": self.manifests.health} if self.manifests else {})},
            info=lambda: self.eviction.describe(),
            # Logs may hold secrets: served on this unauthenticated port only when it is
            # bound to loopback (kubelet serves them only on its authenticated port).
            container_logs=(ContainerLogs(self.runtime, self.pod_list).handler
                            if _is_loopback(settings.status_host_port[0]) else None),
        )
        # The node API (HTTPS, kubelet's port 10250); built at start (certificate files).
        self.node_api = None
        self._file_pods: set[str] = set()
        self._sandbox_image_id: str | None = None
        self._sandbox_lock = asyncio.Lock()
        self._network_error: str | None = "not started"
        self.started_at = time.time()
        # Resource usage sampling, /metrics*, /stats/summary and the status page.
        from nodeagent.metrics.wiring import setup_observability

        self.stats, self.metrics = setup_observability(self)

    def _make_proxy(self, settings: Settings) -> ServiceProxy | None:
        if not settings.proxy:
            return None
        return ServiceProxy(
            table=settings.proxy_table,
            node_name=settings.node_name,
            node_ips=[self.host_ip],
            cluster_cidr=settings.cluster_cidr,
            service_cidr=settings.service_cidr,
        )

    def _make_service_feed(self, settings: Settings, root: Path) -> StandaloneServiceFeed | None:
        if self.proxy is None or self.cluster is not None:
            # In cluster mode Services and EndpointSlices come from the API (ClusterMode).
            return None
        return StandaloneServiceFeed(
            self.proxy,
            StandaloneServices(state_dir=root / "services", node_name=settings.node_name,
                               service_cidr=settings.service_cidr),
            pods=self.pod_list,
            events=self.kubelet.events,
        )

    def _node_health(self) -> list[tuple[bool, str]]:
        ok, why = self.pleg.healthy()
        net_ok, net_why = self._network_health()
        return [(ok, f"container runtime is down, PLEG is not healthy: {why}"),
                (net_ok, "container runtime network not ready: NetworkReady=false "
                         f"reason:NetworkPluginNotReady message:{net_why}")]

    def _kubelet_port(self) -> int:
        """daemonEndpoints.kubeletEndpoint: the node API when it runs, else the status port."""
        if self.node_api is not None:
            return self.node_api.bound_port or self.node_api.port
        return self.server.bound_port or self.server.port

    def _on_status(self, uid: str, status: dict) -> None:
        self.metrics.pod_status(uid, status)
        if self.cluster is not None:
            self.cluster.on_status(uid, status)
        self._pods_changed()

    def _on_forget(self, uid: str) -> None:
        self.metrics.forget_pod(uid)
        self._pods_changed()

    def _pods_changed(self) -> None:
        if self.service_feed is not None:
            self.service_feed.pods_changed()
        if self.host_ports is not None:
            self.host_ports.pods_changed()

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
        self._pods_changed()
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
            await self.housekeeping_pass()

    async def housekeeping_pass(self) -> None:
        # The fence holds back pods added during the pass until it is over: they are
        # not in the snapshot, so GC must not race their first veth or volume dir.
        async with self.workers.gc_fence() as live:
            try:
                async with asyncio.timeout(HOUSEKEEPING_DEADLINE):
                    released = await self.network.garbage_collect(live)
                    if released:
                        log.info("released addresses of gone pods", pod_uids=released)
                    await self.volumes.cleanup_orphans(live)
                    # The relist and housekeeping share a period: GC decides on the
                    # PLEG's last relist and needs no listing of its own.
                    await collect_dead_sandboxes(self.runtime, self.workers.known,
                                                 self.pleg.recent_listing(self.settings.relist_period))
            except Exception as exc:  # housekeeping must never stop the node
                log.warning("housekeeping failed", error=str(exc) or type(exc).__name__)

    def _service_list(self) -> list[dict] | None:
        if self.cluster is not None:
            return self.cluster.service_list()
        return self.service_feed.services() if self.service_feed is not None else []

    # --- eviction and image GC -----------------------------------------------------

    def _needed_images(self) -> set[str]:
        return {c.get("image", "") for record in self.kubelet.pods.values()
                for key in ("initContainers", "containers")
                for c in (record.pod.get("spec") or {}).get(key) or [] if isinstance(c, dict)}

    def _evict(self, pod: dict, message: str) -> None:
        uid = pod["metadata"]["uid"]
        if self.kubelet.evict(uid, message):
            self.workers.kick(uid)

    async def _reclaim(self) -> None:
        """Disk pressure: node-level resources go before any pod (unused images)."""
        freed = await self.image_gc.delete_unused()
        log.info("reclaimed image space", bytes=freed)

    def _node_event(self, type_: str, reason: str, message: str) -> None:
        if self.cluster is not None:
            self.cluster.events.node_event(type_, reason, message)
        else:
            log.warning("node event", type=type_, reason=reason, message=message)

    async def _learn_image_dir(self) -> None:
        try:
            info = await self.runtime.engine.call("engine info", "GET", "info")
            self._image_dir = info.get("DockerRootDir") or None
        except Exception as exc:  # image GC and imagefs signals wait for the next start
            log.warning("Docker's data root unknown; imagefs taken as nodefs", error=str(exc))

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
        def failed(exc: Exception, retry_in: float) -> None:
            self._network_error = str(exc) or f"{type(exc).__name__} (no answer from netlink)"
            log.error("pod network setup failed; retrying", error=self._network_error, retry_in=retry_in)

        async def start() -> None:
            # A hung netlink call must not hold the node's start for ever.
            async with asyncio.timeout(HOUSEKEEPING_DEADLINE * 2):
                await self.network.start()

        await retry(start, Delay(1.0, 30.0), on_error=failed)
        self._network_error = None

    async def _start_node_api(self) -> None:
        from nodeagent.server.wiring import build_node_api

        try:
            self.node_api = await asyncio.to_thread(build_node_api, self)
            if self.node_api is not None:
                await self.node_api.start()
        except (OSError, ValueError) as exc:  # a bad certificate or a taken port: say so, run on
            log.error("node API not started", error=str(exc), address=self.settings.node_api_address)
            self.node_api = None

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
        await self._start_node_api()
        # systemd: WATCHDOG=1 from this loop from the start (registration and network setup
        # may take a while), READY=1 once every source synced.
        from nodeagent.systemd import for_agent

        notify = asyncio.create_task(for_agent(self).run(), name="systemd-notify")
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
            await self._learn_image_dir()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.eviction.run(), name="eviction")
                tg.create_task(self.image_gc.run(), name="image-gc")
                tg.create_task(self.workers.run(), name="pod-workers")
                tg.create_task(self.pleg.run(), name="pleg")
                tg.create_task(self.prober.run(), name="prober")
                tg.create_task(self._housekeeping(), name="housekeeping")
                tg.create_task(self.stats.run(), name="stats-sampler")
                if self.manifests is not None:
                    tg.create_task(self.manifests.run(), name="manifest-source")
                if self.cluster is not None:
                    tg.create_task(self.cluster.run(), name="cluster-mode")
                if self.proxy is not None:
                    tg.create_task(self.proxy.run(), name="service-proxy")
                if self.host_ports is not None:
                    tg.create_task(self.host_ports.run(), name="host-ports")
                if self.node_api is not None:
                    from nodeagent.server.wiring import reload_serving_cert

                    tg.create_task(reload_serving_cert(self.settings, self.node_api.ssl_context),
                                   name="node-api-certificate")
                if self.service_feed is not None:
                    tg.create_task(self.service_feed.run(), name="service-feed")
        finally:
            notify.cancel()
            await asyncio.gather(notify, return_exceptions=True)
            if self.proxy is not None:
                self.proxy.close()
            if self.cluster is not None:
                await self.cluster.client.close()
            await self.server.stop()
            if self.node_api is not None:
                await self.node_api.stop()
            await self.runtime.close()
            await self.network.stop()
