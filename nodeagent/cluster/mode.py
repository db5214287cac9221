"""Cluster mode wiring: the pieces that make the agent a Kubernetes node, and how the
Agent's pods, kubelet and workers connect to them.

    Agent ── ClusterMode ── KubeClient (kubeconfig, 50 QPS / burst 100)
                 ├─ NodeManager   Node registration, node status, Lease
                 ├─ ApiPodSource  pods with spec.nodeName=<node> (Informer)
                 ├─ admission     once per pod uid, before it first runs
                 ├─ StatusManager kubelet statuses -> pods/status; final DELETE
                 └─ MirrorManager mirror pods for static pods

Which source a pod came from is kept here (``api_pods``) and in the Agent (file pods).
Pods found in the runtime that no source wants are removed only once the API informer
has synced too (``synced``): while the API is unreachable nothing that runs is touched.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from nodeagent.cluster.admission import ADMISSION_REASONS, REJECTED_PREFIX, admit
from nodeagent.cluster.apisource import ApiPodSource
from nodeagent.cluster.events import ApiEventRecorder
from nodeagent.cluster.mirror import MirrorManager
from nodeagent.cluster.node import NodeManager
from nodeagent.cluster.refs import ClusterEnvSources
from nodeagent.cluster.statusmanager import TERMINAL_PHASES, StatusManager
from nodeagent.config import parse_node_labels
from nodeagent.kubelet.events import NORMAL, WARNING
from nodeagent.kube import KubeClient, load_kubeconfig

if TYPE_CHECKING:  # pragma: no cover
    from nodeagent.agent import Agent

log = structlog.get_logger(__name__)

POD_CIDR_FILE = "cluster-pod-cidr"


def _running_containers(status: dict) -> list[str]:
    return [cs["name"] for cs in (status.get("initContainerStatuses") or [])
            + (status.get("containerStatuses") or []) if "running" in (cs.get("state") or {})]


class ClusterSyncer:
    """The kubelet as the pod workers see it, plus what cluster mode must learn from
    each sync: when a deleted pod's containers are all stopped (time for the final
    DELETE), and when a pod is gone for good."""

    def __init__(self, cluster: "ClusterMode") -> None:
        self.cluster = cluster

    async def sync_pod(self, pod: dict) -> float | None:
        kubelet = self.cluster.agent.kubelet
        requeue = await kubelet.sync_pod(pod)
        meta = pod["metadata"]
        uid = meta["uid"]
        if meta.get("deletionTimestamp") and uid in self.cluster.api_pods:
            record = kubelet.record(uid)
            status = record.status if record is not None else {}
            # sync_pod returned normally with terminating semantics: the kill is done.
            if not _running_containers(status or {}):
                self.cluster.status.mark_terminated(uid, pod)
        return requeue

    async def terminate_pod(self, uid: str, pod: dict | None) -> None:
        await self.cluster.agent.kubelet.terminate_pod(uid, pod)
        self.cluster.pod_terminated(uid)


class ClusterMode:
    def __init__(self, agent: "Agent") -> None:
        self.agent = agent
        settings = agent.settings
        self.settings = settings
        self.node_name = settings.node_name
        # Read at startup (the CLI has already validated it, with errors naming the
        # file and field).
        self.client = KubeClient(load_kubeconfig(settings.kubeconfig),
                                 qps=settings.kube_api_qps, burst=settings.kube_api_burst)
        # Events to the API (aggregated, rate-limited, never blocking) and configMap/
        # secret/token lookups for env and volumes: given to the Kubelet and the
        # VolumeManager by the Agent.
        self.events = ApiEventRecorder(self.client, node_name=settings.node_name,
                                       host_ip=agent.host_ip)
        self.env_sources = ClusterEnvSources(self.client, node_name=settings.node_name,
                                             on_change=self._on_reference_change)
        self.node = NodeManager(
            self.client,
            node_name=settings.node_name,
            host_ip=agent.host_ip,
            root_dir=settings.root_dir,
            max_pods=settings.max_pods,
            labels=parse_node_labels(settings.node_labels),
            runtime_version=agent.runtime.version,
            ready=self._ready,
            kubelet_port=self._kubelet_port,
            status_update_period=settings.node_status_update_period,
            status_report_period=settings.node_status_report_period,
            lease_renew_period=settings.lease_renew_period,
            lease_duration_seconds=settings.lease_duration_seconds,
            on_condition_change=self._on_node_condition,
        )
        self.status = StatusManager(self.client, resolve=self._resolve_status_target)
        self.mirrors = MirrorManager(
            self.client, node_name=settings.node_name, node_uid=lambda: self.node.uid,
            api_synced=lambda: self.source.synced, on_mirror_ready=self.status.kick)
        self.source = ApiPodSource(
            self.client, settings.node_name,
            on_pod=self._on_api_pod, on_pod_removed=self._on_api_pod_removed,
            on_api_copy=self.status.observe, on_mirror=self._on_mirror)
        self.api_pods: dict[str, dict] = {}  # uid -> pod, the pods this source gives
        self.static_pods: dict[str, dict] = {}  # uid -> static pod (manifest source)
        self._admission: dict[str, tuple[str, str] | None] = {}
        self._not_run: set[str] = set()  # terminal in the API when first seen
        self.syncer = ClusterSyncer(self)

    # --- hooks the Agent calls ---------------------------------------------------------

    @property
    def synced(self) -> bool:
        return self.source.synced

    def on_status(self, uid: str, status: dict) -> None:
        """Kubelet(on_status=...): never blocks."""
        record = self.agent.kubelet.record(uid)
        if record is not None and record.rejected:
            # A rejected pod never had containers: like kubelet's rejectPod, its status
            # carries phase, reason and message but no container statuses (which would
            # show as ContainerCreating in kubectl instead of the reason).
            status = {k: v for k, v in status.items()
                      if k not in ("containerStatuses", "initContainerStatuses")}
        self.status.set_status(uid, status)

    def set_static_pods(self, pods: dict[str, dict]) -> None:
        self.static_pods = dict(pods)
        self.mirrors.set_static_pods(pods)

    def pod_terminated(self, uid: str) -> None:
        self.status.forget(uid)
        self.env_sources.release_pod(uid)
        self._admission.pop(uid, None)

    async def prepare(self) -> str | None:
        """Register the Node (bounded wait) and pick the pod CIDR: the Node's
        spec.podCIDR, else the one used last time, else None (the configured one)."""
        remembered = self._remembered_pod_cidr()
        wait = self.settings.node_registration_wait
        if remembered:
            # spec.podCIDR never changes once set: a node that knows its range from an
            # earlier run need not hold its pods back for long while the API is away.
            wait = min(wait, 2.0)
        try:
            async with asyncio.timeout(wait):
                await self.node.register()
        except TimeoutError:
            log.warning("API server not reachable; starting without a registered node "
                        "(registration continues in the background)", waited=wait,
                        pod_cidr=remembered or self.settings.pod_cidr)
        cidr = self.node.pod_cidr
        if cidr:
            if remembered and remembered != cidr:
                log.warning("the Node's podCIDR differs from the range this node used before",
                            pod_cidr=cidr, previous=remembered)
            self._remember_pod_cidr(cidr)
            return cidr
        return remembered

    def _remembered_pod_cidr(self) -> str | None:
        try:
            return (Path(self.settings.root_dir) / POD_CIDR_FILE).read_text().strip() or None
        except OSError:
            return None

    def _remember_pod_cidr(self, cidr: str) -> None:
        path = Path(self.settings.root_dir) / POD_CIDR_FILE
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(cidr + "\n")
        except OSError as exc:
            log.warning("cannot remember the pod CIDR", path=str(path), error=str(exc))

    async def run(self) -> None:
        self.events.node_event(NORMAL, "Starting", "Starting kubelet.")
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.events.run(), name="cluster-events")
                tg.create_task(self.env_sources.run(), name="cluster-references")
                tg.create_task(self.node.run(), name="cluster-node")
                tg.create_task(self.source.run(), name="cluster-pod-source")
                tg.create_task(self.status.run(), name="cluster-status-manager")
                tg.create_task(self.mirrors.run(), name="cluster-mirror-pods")
        finally:
            await self.env_sources.close()
            await self.client.close()

    # --- references and node events ---------------------------------------------------

    def _on_reference_change(self, kind: str, namespace: str, name: str) -> None:
        """A ConfigMap/Secret changed: the pods using it resync (their volumes are
        rewritten atomically on the next sync)."""
        for uid in self.env_sources.pods_referencing(kind, namespace, name):
            self.agent.workers.kick(uid)

    def _on_node_condition(self, condition: dict) -> None:
        """kubelet's node events: NodeReady / NodeNotReady and the pressure ones."""
        kind, true = condition["type"], condition["status"] == "True"
        if kind == "Ready":
            reason = "NodeReady" if true else "NodeNotReady"
        else:
            reason = {"MemoryPressure": ("NodeHasInsufficientMemory", "NodeHasSufficientMemory"),
                      "DiskPressure": ("NodeHasDiskPressure", "NodeHasNoDiskPressure"),
                      "PIDPressure": ("NodeHasInsufficientPID", "NodeHasSufficientPID")}.get(
                          kind, (kind, kind))[0 if true else 1]
        self.events.node_event(NORMAL, reason, f"Node {self.node_name} status is now: {reason}")

    # --- node facts for the node manager ---------------------------------------------

    def _ready(self) -> tuple[bool, str]:
        problems = []
        ok, why = self.agent.pleg.healthy()
        if not ok:
            problems.append(f"container runtime is down, PLEG is not healthy: {why}")
        ok, why = self.agent._network_health()
        if not ok:
            problems.append(f"container runtime network not ready: NetworkReady=false "
                            f"reason:NetworkPluginNotReady message:{why}")
        return (not problems, ", ".join(problems))

    def _kubelet_port(self) -> int:
        api = getattr(self.agent, "node_api", None)
        if api is not None:
            return api.bound_port or api.port
        server = self.agent.server
        return server.bound_port or server.port

    # --- API pods ----------------------------------------------------------------------

    def _on_api_pod(self, pod: dict) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        self.api_pods[uid] = pod
        if uid in self._not_run:
            return
        if uid not in self._admission:
            decision = self._first_sight(pod)
            if decision == "not-run":
                self._not_run.add(uid)
                return
            self._admission[uid] = decision
        self.agent.kubelet.set_desired(pod, self._admission[uid])
        self.agent.workers.update(pod)

    def _first_sight(self, pod: dict) -> tuple[str, str] | None | str:
        """Admission, decided once per pod uid."""
        meta = pod["metadata"]
        status = pod.get("status") or {}
        phase = status.get("phase")
        if meta.get("deletionTimestamp"):
            return None  # only to be stopped
        if phase in TERMINAL_PHASES:
            if phase == "Failed" and status.get("reason") in ADMISSION_REASONS:
                # Rejected by an earlier run of this node: stays rejected.
                return status["reason"], status.get("message") or ""
            log.info("pod is already finished; not running it", pod=f"{meta.get('namespace')}/{meta['name']}",
                     phase=phase)
            return "not-run"
        if phase == "Running":
            return None  # admitted by an earlier run of this node (agent restart)
        admitted = [
            record.pod for uid, record in self.agent.kubelet.pods.items()
            if uid != meta["uid"] and record.rejected is None
            and (record.status or {}).get("phase") not in TERMINAL_PHASES
        ]
        decision = admit(pod, self.node.view(), admitted)
        if decision is not None:
            reason, message = decision
            log.warning("pod rejected at admission", pod=f"{meta.get('namespace')}/{meta['name']}",
                        reason=reason, message=message)
            self.agent.kubelet.events.event(pod, WARNING, reason, message.removeprefix(REJECTED_PREFIX))
        return decision

    def _on_api_pod_removed(self, pod: dict) -> None:
        uid = pod["metadata"]["uid"]
        self.api_pods.pop(uid, None)
        self.status.forget_object(uid)
        if uid in self._not_run:
            self._not_run.discard(uid)
            return
        record = self.agent.kubelet.record(uid)
        if record is None and uid not in self.agent.workers.known():
            self._admission.pop(uid, None)
            return
        log.info("pod removed from the API; terminating it", pod=f"{pod['metadata'].get('namespace')}/{pod['metadata']['name']}")
        self.agent.workers.remove(uid, record.pod if record else pod)

    def _on_mirror(self, event: str, pod: dict) -> None:
        if event == "DELETED":
            self.status.forget_object(pod["metadata"]["uid"])
        else:
            self.status.observe(pod)
        self.mirrors.mirror_event(event, pod)

    def _resolve_status_target(self, uid: str) -> str | None:
        if uid in self.api_pods:
            return uid
        static = self.static_pods.get(uid)
        if static is not None:
            return self.mirrors.mirror_uid(static)
        return None
