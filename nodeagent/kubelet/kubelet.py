"""The kubelet core: desired pods in, runtime actions out, PodStatus back.

``sync_pod`` is kubelet's SyncPod for one pod: read what the runtime holds for it,
let ``compute_pod_actions`` decide, carry the actions out, and record the status.
Nothing about a pod's runtime state is kept only in memory: after a restart the same
calls rebuild it from Docker's labels, so ``kill -9`` of the agent loses nothing.
"""

from __future__ import annotations

import asyncio
import copy
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import structlog

from netplugin.types import NetworkError, PodNetwork
from nodeagent.backoff import Backoff
from nodeagent.kubelet.containerconfig import ConfigError, EnvSources, build_container_config
from nodeagent.kubelet.events import NORMAL, WARNING, EventSink, LogEventSink, container_field_path
from nodeagent.kubelet.podactions import compute_pod_actions, termination_order
from nodeagent.api.podspec import iter_containers
from nodeagent.kubelet.podstatus import generate_pod_status
from nodeagent.kubelet.volumes import VolumeManager
from nodeagent.prober.kubelet import hook_labels, post_start, pre_stop, probe_inputs, probe_results
from runtime.types import (
    ContainerStatus,
    ContainerState,
    CreateContainerError,
    ImageError,
    ImageService,
    NotFound,
    PodRef,
    PullPolicy,
    RuntimeError_,
    RuntimeService,
    RuntimeTimeout,
    RuntimeUnavailable,
    SandboxConfig,
    SandboxState,
    SandboxStatus,
)

if TYPE_CHECKING:
    from nodeagent.prober import HookRunner, ProbeManager

log = structlog.get_logger(__name__)

GRACE_PERIOD_LABEL = "io.kubernetes.pod.terminationGracePeriod"
# How often a running pod's configMap/secret/downwardAPI volumes are re-checked even
# without a change event (kubelet's default sync frequency is about a minute).
VOLUME_RESYNC = 60.0
_DATA_VOLUME_KINDS = ("configMap", "secret", "downwardAPI", "projected")


def _has_projected_data(pod: dict) -> bool:
    return any(
        kind in volume for volume in pod["spec"].get("volumes") or () for kind in _DATA_VOLUME_KINDS
    )


@dataclass
class PodRecord:
    """What the node knows about one pod, for /pods and the status manager."""

    pod: dict
    status: dict = field(default_factory=dict)
    # (reason, message) when the node refuses to run the pod: an invalid manifest,
    # or an admission failure such as OutOfcpu. The pod then goes to phase Failed.
    rejected: tuple[str, str] | None = None


def _now() -> float:
    return time.time()


def _pod_ref(pod: dict) -> PodRef:
    meta = pod["metadata"]
    return PodRef(name=meta["name"], namespace=meta.get("namespace", "default"), uid=meta["uid"])


def _grace_period(pod: dict | None, containers: list[ContainerStatus]) -> int:
    if pod is not None:
        meta_grace = pod["metadata"].get("deletionGracePeriodSeconds")
        if meta_grace is not None:
            return int(meta_grace)
        return int(pod["spec"].get("terminationGracePeriodSeconds", 30))
    for c in containers:
        value = c.labels.get(GRACE_PERIOD_LABEL)
        if value and value.isdigit():
            return int(value)
    return 30


class Kubelet:
    def __init__(
        self,
        *,
        node_name: str,
        runtime: RuntimeService,
        images: ImageService,
        network: PodNetwork,
        volumes: VolumeManager,
        backoff: Backoff,
        pull_backoff: Backoff,
        sandbox_image: Callable[[], "asyncio.Future[str] | object"],
        host_ip: str,
        on_status: Callable[[str, dict], None] | None = None,
        events: EventSink | None = None,
        env_sources: EnvSources | None = None,
        on_forget: Callable[[str], None] | None = None,
        prober: "ProbeManager | None" = None,
        hooks: "HookRunner | None" = None,
    ) -> None:
        self.node_name = node_name
        self.runtime = runtime
        self.images = images
        self.network = network
        self.volumes = volumes
        self.backoff = backoff
        self.pull_backoff = pull_backoff
        self._sandbox_image = sandbox_image
        self.host_ip = host_ip
        self.pods: dict[str, PodRecord] = {}
        self._on_status = on_status
        self.events: EventSink = events or LogEventSink()
        self._on_forget = on_forget
        # configMap/secret lookups for env; None in standalone mode.
        self.env_sources = env_sources
        # Image pull failures per (pod uid, container): reason shown until the retry.
        self._pull_failures: dict[tuple[str, str], tuple[str, str]] = {}
        self._start_times: dict[str, float] = {}
        # Sandbox ids whose network this process has set up or verified.
        self._network_ready: set[str] = set()
        # Probes and lifecycle hooks (nodeagent/prober); None runs neither.
        self.prober = prober
        self.hooks = hooks

    # --- desired state -------------------------------------------------------------

    def record(self, uid: str) -> PodRecord | None:
        return self.pods.get(uid)

    def set_desired(self, pod: dict, rejected: tuple[str, str] | None = None) -> None:
        uid = pod["metadata"]["uid"]
        record = self.pods.get(uid)
        if record is None:
            self.pods[uid] = PodRecord(pod=pod, rejected=rejected)
        else:
            record.pod, record.rejected = pod, rejected
        if self.prober is not None and not rejected:
            self.prober.add_pod(pod)

    def forget(self, uid: str) -> None:
        if self.pods.pop(uid, None) is not None and self._on_forget is not None:
            self._on_forget(uid)
        if self.prober is not None:
            self.prober.remove_pod(uid)
        self._start_times.pop(uid, None)
        for key in [k for k in self._pull_failures if k[0] == uid]:
            del self._pull_failures[key]

    # --- sync ----------------------------------------------------------------------

    async def sync_pod(self, pod: dict) -> float | None:
        uid = pod["metadata"]["uid"]
        record = self.pods.get(uid)
        if record is not None and record.rejected:
            self._set_status(uid, self._rejected_status(pod, *record.rejected))
            return None

        sandboxes = await self.runtime.list_pod_sandboxes(uid)
        containers = await self.runtime.list_containers(uid)
        now = _now()
        terminating = pod["metadata"].get("deletionTimestamp") is not None
        actions = compute_pod_actions(
            pod, sandboxes, containers, self.backoff, now, terminating=terminating,
            **probe_inputs(self.prober, uid, containers),
        )
        waiting: dict[str, tuple[str, str]] = dict(actions.waiting)
        for name, (reason, message) in actions.waiting.items():
            if reason == "CrashLoopBackOff":
                self.events.event(pod, WARNING, "BackOff", f"Back-off restarting failed container {name}")
        requeue = actions.requeue_after
        self._start_times.setdefault(uid, now)

        if actions.kill_pod:
            await self._kill_pod(pod, sandboxes, containers, release_network=False)
            sandboxes = await self.runtime.list_pod_sandboxes(uid)
            containers = await self.runtime.list_containers(uid)

        sandbox: SandboxStatus | None = None
        if actions.create_sandbox and not terminating:
            try:
                sandbox = await self._create_sandbox(pod, actions.sandbox_attempt)
            except (RuntimeError_, NetworkError) as exc:
                log.warning("creating pod sandbox failed", pod=_fmt(pod), error=str(exc))
                for _kind, c in iter_containers(pod):
                    waiting[c["name"]] = ("ContainerCreating", f"failed to create pod sandbox: {exc}")
                await self._publish(pod, sandboxes, containers, waiting)
                raise
            sandboxes = await self.runtime.list_pod_sandboxes(uid)
        elif actions.sandbox_id:
            sandbox = next((s for s in sandboxes if s.id == actions.sandbox_id), None)
            if sandbox is not None and not terminating:
                await self._ensure_network(pod, sandbox)

        for kill in actions.to_kill:
            log.info("killing container", pod=_fmt(pod), container=kill.name, reason=kill.reason)
            self.events.event(pod, NORMAL, "Killing", f"Stopping container {kill.name}: {kill.message}")
            grace = kill.grace if kill.grace is not None else _grace_period(pod, containers)
            await self._stop_container(kill.container_id, grace, pod, kill.name)
        for container_id in actions.to_remove:
            try:
                await self.runtime.remove_container(container_id)
            except NotFound:
                pass

        if actions.to_start and sandbox is not None:
            retry = await self._start_containers(pod, sandbox, actions.to_start, waiting)
            if retry is not None:
                requeue = retry if requeue is None else min(requeue, retry)
        elif sandbox is not None and _has_projected_data(pod) and not terminating:
            # configMap/secret/downwardAPI contents can change under a running pod:
            # rewrite them (atomically, only when changed) on every sync.
            await self._refresh_volumes(pod)
            requeue = VOLUME_RESYNC if requeue is None else min(requeue, VOLUME_RESYNC)

        if actions.kill_pod or actions.create_sandbox or actions.to_kill or actions.to_start:
            containers = await self.runtime.list_containers(uid)
            sandboxes = await self.runtime.list_pod_sandboxes(uid)
        await self._publish(pod, sandboxes, containers, waiting)
        return requeue

    async def _create_sandbox(self, pod: dict, attempt: int) -> SandboxStatus:
        spec = pod["spec"]
        meta = pod["metadata"]
        config = SandboxConfig(
            pod=_pod_ref(pod),
            attempt=attempt,
            hostname=spec.get("hostname") or meta["name"][:63],
            host_network=bool(spec.get("hostNetwork")),
            share_process_namespace=bool(spec.get("shareProcessNamespace")),
            labels=dict(meta.get("labels") or {}),
            annotations=dict(meta.get("annotations") or {}),
        )
        image = await self._sandbox_image()
        log.info("creating pod sandbox", pod=_fmt(pod), attempt=attempt)
        sandbox_id = await self.runtime.run_pod_sandbox(config, image)
        sandbox = next(
            (s for s in await self.runtime.list_pod_sandboxes(meta["uid"]) if s.id == sandbox_id),
            None,
        )
        if sandbox is None:
            raise NotFound(f"sandbox {sandbox_id[:12]} vanished right after it was created")
        await self._ensure_network(pod, sandbox)
        return sandbox

    async def _ensure_network(self, pod: dict, sandbox: SandboxStatus) -> None:
        """Wire the sandbox's network once per sandbox and agent lifetime.

        A sandbox adopted after a restart may have been started by an agent killed
        before it set up the network; setup is idempotent, so checking each adopted
        sandbox once repairs that and costs little for the rest.
        """
        if sandbox.host_network or sandbox.id in self._network_ready:
            return
        if not sandbox.netns_path:
            raise NetworkError(f"sandbox {sandbox.id[:12]} has no network namespace (not running?)")
        await self.network.setup_pod(pod["metadata"]["uid"], sandbox.netns_path)
        self._network_ready.add(sandbox.id)

    async def _start_containers(
        self, pod: dict, sandbox: SandboxStatus, to_start, waiting: dict[str, tuple[str, str]]
    ) -> float | None:
        specs = {c["name"]: c for _kind, c in iter_containers(pod)}
        try:
            await self._prefetch(pod)
            volume_paths = await self.volumes.setup(pod)
        except (ConfigError, OSError) as exc:
            # Like kubelet: containers wait in ContainerCreating with the mount error.
            message = f"MountVolume.SetUp failed: {exc}"
            log.warning("volume setup failed", pod=_fmt(pod), error=str(exc))
            self.events.event(pod, WARNING, "FailedMount", message)
            for start in to_start:
                waiting[start.name] = ("ContainerCreating", message)
            return 10.0
        pod_ip = await self._pod_ip(pod)
        requeue: float | None = None
        for start in to_start:
            problem = await self._start_one(pod, sandbox, specs[start.name], start, volume_paths, pod_ip)
            if problem is None:
                continue
            reason, message, retry_in = problem
            if reason:
                waiting[start.name] = (reason, message)
            if retry_in is not None:
                requeue = retry_in if requeue is None else min(requeue, retry_in)
            if start.kind != "app":
                break  # init containers and sidecars start strictly in order
        return requeue

    async def _start_one(
        self, pod, sandbox, container, start, volume_paths, pod_ip
    ) -> tuple[str, str, float | None] | None:
        """Start one container; on failure return (waiting reason, message, retry in)."""
        uid = pod["metadata"]["uid"]
        image = container.get("image", "")
        path = container_field_path(start.kind, start.name, pod)
        pull_key = f"{uid}/{start.name}/{image}"
        remaining = self.pull_backoff.in_backoff(pull_key, _now())
        if remaining is not None:
            reason, message = self._pull_failures.get((uid, start.name), ("ErrImagePull", ""))
            if reason not in ("ErrImageNeverPull", "InvalidImageName"):
                reason, message = "ImagePullBackOff", f'Back-off pulling image "{image}"'
                self.events.event(pod, NORMAL, "BackOff", message, field_path=path)
            return reason, message, remaining
        try:
            policy = PullPolicy(container.get("imagePullPolicy", "IfNotPresent"))
            if policy == PullPolicy.ALWAYS or await self.images.image_present(image) is None:
                self.events.event(pod, NORMAL, "Pulling", f'Pulling image "{image}"', field_path=path)
                started = time.monotonic()
                await self.images.ensure_image(image, policy)
                self.events.event(pod, NORMAL, "Pulled",
                                  f'Successfully pulled image "{image}" in {time.monotonic() - started:.3f}s',
                                  field_path=path)
            self._pull_failures.pop((uid, start.name), None)
        except ImageError as exc:
            log.warning("image not available", pod=_fmt(pod), container=start.name,
                        image=image, reason=exc.reason, error=str(exc))
            self.events.event(pod, WARNING, "Failed", str(exc), field_path=path)
            self._pull_failures[(uid, start.name)] = (exc.reason, str(exc))
            self.pull_backoff.record_failure(pull_key, _now())
            return exc.reason, str(exc), self.pull_backoff.in_backoff(pull_key, _now())
        try:
            config = build_container_config(
                pod, container, kind=start.kind, attempt=start.attempt,
                pod_ip=pod_ip, host_ip=self.host_ip, node_name=self.node_name,
                volume_paths=volume_paths, env_sources=self.env_sources,
            )
        except ConfigError as exc:
            self.events.event(pod, WARNING, "Failed", f"Error: {exc}", field_path=path)
            return exc.reason, str(exc), 10.0
        config.labels[GRACE_PERIOD_LABEL] = str(pod["spec"].get("terminationGracePeriodSeconds", 30))
        config.labels.update(hook_labels(container))
        try:
            log.info("starting container", pod=_fmt(pod), container=start.name,
                     kind=start.kind, attempt=start.attempt)
            container_id = await self.runtime.create_container(sandbox, config)
            self.events.event(pod, NORMAL, "Created", f"Created container {start.name}", field_path=path)
            await self.runtime.start_container(container_id)
            self.events.event(pod, NORMAL, "Started", f"Started container {start.name}", field_path=path)
            if self.hooks is not None and await post_start(self, pod, container, container_id, pod_ip, path):
                return "", "", None  # killed: its exit takes the restart-policy path
        except (CreateContainerError, RuntimeTimeout) as exc:
            log.warning("container failed to start", pod=_fmt(pod), container=start.name, error=str(exc))
            self.events.event(pod, WARNING, "Failed", f"Error: {exc}", field_path=path)
            return "CreateContainerError", str(exc), 10.0
        except (NotFound, RuntimeUnavailable):
            raise  # the pod worker retries the whole sync
        except RuntimeError_ as exc:
            # The process could not run (bad command...): Docker keeps the error on the
            # container and the status shows it terminated with ContainerCannotRun.
            log.warning("container failed to run", pod=_fmt(pod), container=start.name, error=str(exc))
            self.events.event(pod, WARNING, "Failed", f"Error: {exc}", field_path=path)
            return "", "", None
        return None

    async def _prefetch(self, pod: dict) -> None:
        """Let cluster-mode sources fetch the configMaps/secrets/tokens the pod uses,
        so the synchronous lookups of env and volume building find them."""
        prefetch = getattr(self.env_sources, "prefetch", None)
        if prefetch is not None:
            await prefetch(pod)

    async def _refresh_volumes(self, pod: dict) -> None:
        try:
            await self._prefetch(pod)
            await self.volumes.setup(pod)
        except (ConfigError, OSError) as exc:
            log.warning("volume refresh failed", pod=_fmt(pod), error=str(exc))

    async def _pod_ip(self, pod: dict) -> str | None:
        if pod["spec"].get("hostNetwork"):
            return self.host_ip
        status = await self.network.pod_status(pod["metadata"]["uid"])
        return status.ip if status else None

    # --- termination ---------------------------------------------------------------

    async def terminate_pod(self, uid: str, pod: dict | None) -> None:
        sandboxes = await self.runtime.list_pod_sandboxes(uid)
        containers = await self.runtime.list_containers(uid)
        if pod is None:
            record = self.pods.get(uid)
            pod = record.pod if record else None
        await self._kill_pod(pod, sandboxes, containers, release_network=True, uid=uid)
        for c in containers:
            try:
                await self.runtime.remove_container(c.id)
            except NotFound:
                pass
        for s in sandboxes:
            try:
                await self.runtime.remove_pod_sandbox(s.id)
            except NotFound:
                pass
        await self.volumes.teardown(uid)
        self._network_ready.difference_update(s.id for s in sandboxes)
        self.backoff.gc({k for k in self.pods if k != uid})
        self.pull_backoff.gc({k for k in self.pods if k != uid})
        log.info("pod removed", pod_uid=uid, pod=_fmt(pod) if pod else None)
        self.forget(uid)

    async def _kill_pod(
        self,
        pod: dict | None,
        sandboxes: list[SandboxStatus],
        containers: list[ContainerStatus],
        *,
        release_network: bool,
        uid: str | None = None,
    ) -> None:
        uid = uid or (pod["metadata"]["uid"] if pod else None)
        grace = _grace_period(pod, containers)
        deadline = time.monotonic() + grace
        running = [c for c in containers if c.state in (ContainerState.RUNNING, ContainerState.CREATED)]
        if running:
            groups = termination_order(pod, running) if pod is not None else [running]
            for group in groups:
                # Each group gets what is left of the pod's grace period, like kubelet:
                # sidecars stop only after the app containers are gone.
                remaining = max(0, int(deadline - time.monotonic() + 0.999))
                await asyncio.gather(*(self._stop_container(c.id, remaining, pod, c.name, c) for c in group))
        for s in sandboxes:
            if s.state == SandboxState.READY:
                try:
                    await self.runtime.stop_pod_sandbox(s.id)
                except NotFound:
                    pass
        if release_network and uid is not None:
            netns = next((s.netns_path for s in sandboxes if s.netns_path), None)
            await self.network.teardown_pod(uid, netns)

    async def _stop_container(
        self, container_id: str, grace: int, pod: dict | None = None, name: str | None = None,
        status: ContainerStatus | None = None,
    ) -> None:
        if self.hooks is not None and name is not None:
            grace = await pre_stop(self, pod, name, container_id, grace, status)
        try:
            await self.runtime.stop_container(container_id, grace)
        except NotFound:
            pass

    # --- status --------------------------------------------------------------------

    async def _publish(self, pod, sandboxes, containers, waiting) -> None:
        uid = pod["metadata"]["uid"]
        record = self.pods.get(uid)
        previous = record.status if record else None
        pod_ips: list[str] = []
        if any(s.state == SandboxState.READY for s in sandboxes):
            ip = await self._pod_ip(pod)
            pod_ips = [ip] if ip else []
        if not pod_ips and previous and previous.get("podIPs"):
            # A finished pod's sandbox is gone, but like kubelet it keeps reporting
            # the address it ran with.
            pod_ips = [entry["ip"] for entry in previous["podIPs"]]
        status = generate_pod_status(
            pod, sandboxes, containers,
            waiting=waiting, pod_ips=pod_ips, host_ips=[self.host_ip],
            previous=previous or None, now=_now(), start_time=self._start_times.get(uid),
            **probe_results(self.prober, uid, containers),
        )
        self._set_status(uid, status)
        if self.prober is not None:
            self.prober.on_status(uid, pod, status)

    def _set_status(self, uid: str, status: dict) -> None:
        record = self.pods.get(uid)
        if record is None:
            return
        record.status = status
        if self._on_status is not None:
            self._on_status(uid, status)

    def _rejected_status(self, pod: dict, reason: str, message: str) -> dict:
        status = copy.deepcopy(generate_pod_status(
            pod, [], [], waiting={}, pod_ips=[], host_ips=[self.host_ip],
            previous=None, now=_now(), start_time=None,
        ))
        status["phase"] = "Failed"
        status["reason"] = reason
        status["message"] = message
        return status


def _fmt(pod: dict | None) -> str:
    if not pod:
        return "?"
    meta = pod["metadata"]
    return f"{meta.get('namespace', 'default')}/{meta['name']}"
