"""The Node object: registration, node status and the heartbeat Lease (kubelet's
node status manager and node lease controller).

* Registration creates the Node (labels, addresses, capacity/allocatable, nodeInfo,
  daemonEndpoints, conditions) or adopts an existing one; a Node deleted later is
  registered again (an informer on our own Node notices).
* Node status is computed every ``status_update_period`` (10 s) and sent as a strategic
  merge patch of ``nodes/status`` when it changed (heartbeat times aside) or at least
  every ``status_report_period`` (5 min).
* The Lease ``kube-node-lease/<node>`` (holder = node, 40 s duration, owned by the Node)
  is renewed every ``lease_renew_period`` (10 s); a conflict re-reads it and retries.

Conditions are honest: Ready follows the container runtime (PLEG) and the pod network;
MemoryPressure, DiskPressure and PIDPressure are the eviction manager's
(``nodeagent/eviction``: its thresholds and transition period). Allocatable is capacity
minus the hard eviction thresholds for memory and nodefs, as kubelet computes it.
"""

from __future__ import annotations

import asyncio
import os
import platform
import socket
import time
import uuid
from pathlib import Path
from typing import Awaitable, Callable

import psutil
import structlog

from nodeagent.backoff import Delay
from nodeagent import __version__ as AGENT_VERSION
from nodeagent.cluster.admission import NodeView, to_amounts
from nodeagent.eviction.thresholds import Threshold
from nodeagent.kube import ApiConnectionError, ApiError, Informer, KubeClient
from nodeagent.kube import resources as R

log = structlog.get_logger(__name__)

# What `kubectl get nodes` shows as VERSION: the Kubernetes API level the agent speaks,
# with the agent's own version as semver build metadata (like k3s' v1.32.0+k3s1).
KUBELET_VERSION = f"v1.32.0+nodeagent.{AGENT_VERSION}"
LEASE_NAMESPACE = "kube-node-lease"
# After creating the Node, how long to wait for the control plane's IPAM to fill in
# spec.podCIDR before the network starts with the configured range.
POD_CIDR_WAIT = 2.0
# kubelet's fastStatusUpdateOnce: until Ready has been reported, readiness is checked
# this often and the status posted the moment it turns true.
FAST_READY_CHECK = 0.1

_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "armv6l": "arm",
         "i686": "386", "i386": "386", "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}

ReadyCheck = Callable[[], tuple[bool, str]]


def rfc3339(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(ts)))


def micro_time(ts: float) -> str:
    """metav1.MicroTime: RFC 3339 with microseconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1e6):06d}Z"


def _read(path: str, default: str = "") -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return default


def os_image() -> str:
    for line in _read("/etc/os-release").splitlines():
        key, _, value = line.partition("=")
        if key == "PRETTY_NAME":
            return value.strip().strip('"')
    return "Linux"


def machine_id() -> str:
    return _read("/etc/machine-id") or _read("/var/lib/dbus/machine-id")


def system_uuid(fallback_from: str) -> str:
    value = _read("/sys/class/dmi/id/product_uuid").lower()
    if value:
        return value
    # No DMI (containers, some VMs): a stable UUID derived from the machine id.
    return str(uuid.uuid5(uuid.NAMESPACE_OID, fallback_from or socket.gethostname()))


def architecture() -> str:
    machine = platform.machine()
    return _ARCH.get(machine, machine.lower())


def _condition(kind: str, true: bool, reasons: tuple[str, str, str, str]) -> dict:
    """reasons = (reason if true, message if true, reason if false, message if false)."""
    reason, message = (reasons[0], reasons[1]) if true else (reasons[2], reasons[3])
    return {"type": kind, "status": "True" if true else "False", "reason": reason, "message": message}


def ready_condition(ok: bool, why: str) -> dict:
    return _condition("Ready", ok, ("KubeletReady", "kubelet is posting ready status",
                                    "KubeletNotReady", why))


def _without_heartbeats(status: dict) -> dict:
    out = dict(status)
    out["conditions"] = [{k: v for k, v in c.items() if k != "lastHeartbeatTime"}
                         for c in status.get("conditions") or []]
    return out


class NodeManager:
    def __init__(
        self,
        client: KubeClient,
        *,
        node_name: str,
        host_ip: str,
        root_dir: str,
        max_pods: int,
        labels: dict[str, str],
        runtime_version: Callable[[], Awaitable[str]],
        ready: ReadyCheck,
        kubelet_port: Callable[[], int],
        status_update_period: float = 10.0,
        status_report_period: float = 300.0,
        lease_renew_period: float = 10.0,
        lease_duration_seconds: int = 40,
        on_condition_change: Callable[[dict], None] | None = None,
        clock: Callable[[], float] = time.time,
        images: Callable[[], Awaitable[list[dict]]] | None = None,
        pressure: Callable[[], list[dict]] | None = None,
        eviction_thresholds: list[Threshold] | None = None,
    ) -> None:
        self.client = client
        self.name = node_name
        self.host_ip = host_ip
        self.root_dir = root_dir
        self.max_pods = max_pods
        self.labels = {
            "kubernetes.io/hostname": node_name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": architecture(),
            # The beta labels kubelet still sets (some tools select on them).
            "beta.kubernetes.io/os": "linux",
            "beta.kubernetes.io/arch": architecture(),
            **labels,
        }
        self._runtime_version = runtime_version
        self._ready = ready
        self._kubelet_port = kubelet_port
        self.status_update_period = status_update_period
        self.status_report_period = status_report_period
        self.lease_renew_period = lease_renew_period
        self.lease_duration_seconds = lease_duration_seconds
        self._clock = clock
        self._on_condition_change = on_condition_change
        self._images = images
        self._pressure = pressure or (lambda: [])
        self._eviction_thresholds = eviction_thresholds or []
        self._last_images: list[dict] = []
        self.node: dict | None = None  # the API's Node, as last seen
        self.registered = asyncio.Event()
        self._register_needed = asyncio.Event()
        self._lease: dict | None = None
        self._runtime_version_value: str | None = None
        self._last_status: dict | None = None  # last sent, heartbeats stripped
        self._last_sent_at = 0.0
        self._conditions: dict[str, dict] = {}
        self._capacity = self._compute_capacity()
        mid = machine_id()
        self._node_info_static = {
            "machineID": mid,
            "systemUUID": system_uuid(mid),
            "bootID": _read("/proc/sys/kernel/random/boot_id"),
            "kernelVersion": platform.release(),
            "osImage": os_image(),
            "kubeletVersion": KUBELET_VERSION,
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": architecture(),
        }
        self.informer = Informer(client, R.NODES, field_selector=f"metadata.name={node_name}",
                                 name="node")
        self.informer.add_handler(self._on_node_event)
        self.stats = {"status_patches": 0, "lease_renewals": 0, "registrations": 0}

    # --- facts -------------------------------------------------------------------------

    def _compute_capacity(self) -> tuple[dict[str, str], dict[str, str]]:
        cpus = psutil.cpu_count() or 1
        memory = psutil.virtual_memory().total
        try:
            storage = psutil.disk_usage(self.root_dir if os.path.exists(self.root_dir) else "/").total
        except OSError:
            storage = 0
        capacity = {
            "cpu": str(cpus),
            "ephemeral-storage": f"{storage // 1024}Ki",
            "memory": f"{memory // 1024}Ki",
            "pods": str(self.max_pods),
        }
        # allocatable = capacity - reserved (none) - the hard eviction thresholds.
        hard = {t.signal: t for t in self._eviction_thresholds}
        memory_reserved = hard["memory.available"].value(memory) if "memory.available" in hard else 0
        storage_reserved = hard["nodefs.available"].value(storage) if "nodefs.available" in hard else 0
        allocatable = {
            "cpu": str(cpus),
            "ephemeral-storage": str(max(int(storage - storage_reserved), 0)),
            "memory": f"{max(int(memory - memory_reserved), 0) // 1024}Ki",
            "pods": str(self.max_pods),
        }
        return capacity, allocatable

    @property
    def pod_cidr(self) -> str | None:
        spec = (self.node or {}).get("spec") or {}
        return spec.get("podCIDR") or next(iter(spec.get("podCIDRs") or []), None)

    @property
    def uid(self) -> str | None:
        return ((self.node or {}).get("metadata") or {}).get("uid")

    def view(self) -> NodeView:
        """The node as admission sees it: the API's labels when known (an admin may have
        labelled the node), else the labels we register; our own allocatable."""
        labels = dict(self.labels)
        if self.node is not None:
            labels = dict((self.node.get("metadata") or {}).get("labels") or labels)
        allocatable = to_amounts(self._capacity[1])
        allocatable.pop("pods", None)
        return NodeView(name=self.name, labels=labels, allocatable=allocatable, max_pods=self.max_pods)

    async def _runtime_version_now(self) -> str:
        if self._runtime_version_value is None:
            try:
                self._runtime_version_value = await self._runtime_version()
            except Exception as exc:  # the runtime may be down; Ready says so
                log.debug("runtime version unavailable", error=str(exc))
                return "docker://unknown"
        return self._runtime_version_value

    async def compute_status(self) -> dict:
        now = self._clock()
        ok, why = self._ready()
        fresh = [dict(c) for c in self._pressure()] + [ready_condition(ok, why)]
        conditions = []
        for cond in fresh:
            old = self._conditions.get(cond["type"])
            if old is not None and old["status"] == cond["status"]:
                cond["lastTransitionTime"] = old["lastTransitionTime"]
            else:
                cond["lastTransitionTime"] = rfc3339(now)
                if self._on_condition_change is not None:
                    self._on_condition_change(cond)
            cond["lastHeartbeatTime"] = rfc3339(now)
            conditions.append(cond)
        self._conditions = {c["type"]: c for c in conditions}
        capacity, allocatable = self._capacity
        status = {
            "conditions": conditions,
            "addresses": [{"type": "InternalIP", "address": self.host_ip},
                          {"type": "Hostname", "address": self.name}],
            "capacity": dict(capacity),
            "allocatable": dict(allocatable),
            "daemonEndpoints": {"kubeletEndpoint": {"Port": int(self._kubelet_port())}},
            "nodeInfo": dict(self._node_info_static,
                             containerRuntimeVersion=await self._runtime_version_now()),
        }
        if self._images is not None:
            status["images"] = await self._images_now()
        return status

    async def _images_now(self) -> list[dict]:
        """status.images (largest first, at most 50 as kubelet); the last list while the
        runtime does not answer."""
        try:
            self._last_images = await self._images()
        except Exception as exc:  # the runtime may be down; keep the last answer
            log.debug("image list unavailable", error=str(exc))
        return self._last_images

    # --- registration ------------------------------------------------------------------

    async def register(self) -> dict:
        """Create (or adopt) the Node; retries until it succeeds (callers bound it)."""
        delay = Delay(0.5, 10.0)
        while True:
            try:
                return await self._register_once()
            except (ApiError, ApiConnectionError) as exc:
                wait = delay.next()
                log.warning("node registration failed; retrying", node=self.name,
                            error=str(exc), retry_in=wait)
                await asyncio.sleep(wait)

    async def _register_once(self) -> dict:
        status = await self.compute_status()
        body = {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {
                "name": self.name,
                "labels": dict(self.labels),
                "annotations": {"volumes.kubernetes.io/controller-managed-attach-detach": "true"},
            },
            "spec": {},
            "status": status,
        }
        created = False
        try:
            node = await self.client.create(R.NODES, body)
            created = True
            log.info("node registered", node=self.name, uid=node["metadata"]["uid"])
        except ApiError as exc:
            if not exc.is_already_exists:
                raise
            node = await self.client.get(R.NODES, self.name)
            missing = {k: v for k, v in self.labels.items()
                       if (node["metadata"].get("labels") or {}).get(k) != v}
            if missing:
                node = await self.client.patch(R.NODES, self.name, {"metadata": {"labels": missing}})
            node = await self.client.patch(R.NODES, self.name, {"status": status}, subresource="status")
            log.info("node already registered; adopted it", node=self.name,
                     uid=node["metadata"]["uid"])
        self.stats["registrations"] += 1
        self.node = node
        self._last_status = _without_heartbeats(status)
        self._last_sent_at = time.monotonic()
        if created and not self.pod_cidr:
            await self._wait_for_pod_cidr(POD_CIDR_WAIT)
        self._register_needed.clear()
        self.registered.set()
        return self.node

    async def _wait_for_pod_cidr(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            try:
                node = await self.client.get(R.NODES, self.name)
            except (ApiError, ApiConnectionError):
                return
            self.node = node
            if self.pod_cidr:
                return

    def _on_node_event(self, event: str, obj: dict, old: dict | None) -> None:
        if event == "DELETED":
            if obj["metadata"].get("uid") == self.uid or self.node is None:
                log.warning("node object deleted from the API; registering again", node=self.name)
                self.node = None
                self.registered.clear()
                self._register_needed.set()
            return
        before = self.pod_cidr
        self.node = obj
        if before and self.pod_cidr and before != self.pod_cidr:
            log.warning("node podCIDR changed in the API; the pod network keeps its range "
                        "until the agent restarts", old=before, new=self.pod_cidr)

    # --- loops -------------------------------------------------------------------------

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.informer.run(), name="node-informer")
            tg.create_task(self._status_loop(), name="node-status")
            tg.create_task(self._lease_loop(), name="node-lease")

    async def _status_loop(self) -> None:
        delay = 0.5
        while True:
            wait = self.status_update_period
            succeeded = False  # a failed step waits its back-off, never the fast check
            try:
                if self.node is None:
                    await self._register_once()
                else:
                    await self.sync_status()
                delay = 0.5
                succeeded = True
            except ApiError as exc:
                if exc.is_not_found:
                    log.warning("node object is gone; registering again", node=self.name)
                    self.node = None
                    self.registered.clear()
                    wait = 0.0
                else:
                    log.warning("node status update failed", node=self.name, error=str(exc))
                    wait, delay = min(delay, wait), min(delay * 2, wait)
            except ApiConnectionError as exc:
                log.warning("node status update failed: API unreachable", node=self.name, error=str(exc))
                wait, delay = min(delay, wait), min(delay * 2, wait)
            try:
                async with asyncio.timeout(wait):
                    if succeeded and self.node is not None and not self.is_ready_reported():
                        await self._ready_or_register_needed()
                    else:
                        await self._register_needed.wait()
            except TimeoutError:
                pass

    async def _ready_or_register_needed(self) -> None:
        """Return once the node is ready (so the status loop posts it at once) or must
        register again; readiness is a cheap in-memory check (PLEG, pod network)."""
        while not self._register_needed.is_set() and not self._ready()[0]:
            await asyncio.sleep(FAST_READY_CHECK)

    def is_ready_reported(self) -> bool:
        for cond in (self._last_status or {}).get("conditions") or []:
            if cond.get("type") == "Ready":
                return cond.get("status") == "True"
        return False

    async def sync_status(self, force: bool = False) -> bool:
        """Compute the status; patch it when it changed or is due. Returns True if sent."""
        status = await self.compute_status()
        comparable = _without_heartbeats(status)
        due = time.monotonic() - self._last_sent_at >= self.status_report_period
        if not force and not due and comparable == self._last_status:
            return False
        node = await self.client.patch(R.NODES, self.name, {"status": status}, subresource="status")
        self.node = node
        self._last_status = comparable
        self._last_sent_at = time.monotonic()
        self.stats["status_patches"] += 1
        return True

    async def _lease_loop(self) -> None:
        # kubelet retries a failed renewal quickly (200 ms doubling to 7 s).
        delay = Delay(0.2, 7.0)
        while True:
            try:
                await self.renew_lease()
                delay.reset()
                wait = self.lease_renew_period
            except (ApiError, ApiConnectionError) as exc:
                wait = min(delay.next(), self.lease_renew_period)
                log.warning("lease renewal failed", node=self.name, error=str(exc), retry_in=wait)
            await asyncio.sleep(wait)

    def _lease_body(self, base: dict | None) -> dict:
        lease = dict(base or {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                              "metadata": {"name": self.name, "namespace": LEASE_NAMESPACE}})
        meta = dict(lease.get("metadata") or {})
        if self.uid:
            meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "Node", "name": self.name,
                                        "uid": self.uid}]
        lease["metadata"] = meta
        lease["spec"] = dict(lease.get("spec") or {}, holderIdentity=self.name,
                             leaseDurationSeconds=self.lease_duration_seconds,
                             renewTime=micro_time(self._clock()))
        return lease

    async def renew_lease(self) -> dict:
        for _attempt in range(3):
            if self._lease is None:
                try:
                    self._lease = await self.client.get(R.LEASES, self.name, LEASE_NAMESPACE)
                except ApiError as exc:
                    if not exc.is_not_found:
                        raise
                    try:
                        self._lease = await self.client.create(R.LEASES, self._lease_body(None),
                                                               LEASE_NAMESPACE)
                        self.stats["lease_renewals"] += 1
                        return self._lease
                    except ApiError as exc2:
                        if not exc2.is_already_exists:
                            raise
                        continue
            try:
                self._lease = await self.client.update(R.LEASES, self._lease_body(self._lease),
                                                       LEASE_NAMESPACE)
                self.stats["lease_renewals"] += 1
                return self._lease
            except ApiError as exc:
                if exc.is_conflict or exc.is_not_found:
                    self._lease = None  # re-read (or re-create) and try again
                    continue
                raise
        raise ApiError(409, "Conflict", f"lease {LEASE_NAMESPACE}/{self.name}: kept conflicting")
