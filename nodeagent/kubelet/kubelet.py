"""The kubelet core: desired pods in, runtime actions out, PodStatus back.

``sync_pod`` is kubelet's SyncPod for one pod: read what the runtime holds for it,
let ``compute_pod_actions`` decide, carry the actions out, and record the status.
Nothing about a pod's runtime state is kept only in memory: after a restart the same
calls rebuild it from Docker's labels, so ``kill -9`` of the agent loses nothing.
"""

from __future__ import annotations

import asyncio
import calendar
import copy
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Awaitable, Callable

import structlog

from netplugin.types import NetworkError, PodNetwork
from nodeagent.backoff import Backoff
from nodeagent.kubelet.containerconfig import ConfigError, EnvSources, build_container_config
from nodeagent.kubelet.events import NORMAL, WARNING, EventSink, LogEventSink, container_field_path
from nodeagent.kubelet.podactions import compute_pod_actions, termination_order
from nodeagent.api.podspec import iter_containers
from nodeagent.kubelet.podstatus import generate_pod_status
from nodeagent.kubelet.podworkers import SyncResult
from nodeagent.kubelet.servicelinks import ServiceEnv
from nodeagent.kubelet.volumes import VolumeManager
from nodeagent.images import PullCredentials, pull_with_credentials
from nodeagent.kubelet import dns as pod_dns
from nodeagent.kubelet import security as pod_security
from nodeagent.kubelet.logs import (
    TERMINATION_MESSAGE_LABEL,
    TerminationMessages,
    prepare_termination_message_file,
)
from nodeagent.prober.kubelet import hook_labels, post_start, pre_stop, probe_inputs, probe_results
from runtime.types import (
    ContainerStatus,
    ContainerState,
    CreateContainerError,
    Mount,
    ImageError,
    ImageNeverPull,
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
# Deadlines on pod network (netlink) and volume work: a hung call fails one pod's sync
# (retried by its worker), it never stalls the node.
NETWORK_DEADLINE = 30.0
VOLUME_DEADLINE = 60.0
_TERMINAL_PHASES = ("Succeeded", "Failed")


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
    # The same uid added again while this pod is being removed: (pod, rejected), which
    # takes over once the removal completes (until then the terminating pod shows).
    readd: tuple[dict, tuple[str, str] | None] | None = None
    # (reason, message) once the node ended the pod for good: node-pressure eviction
    # ("Evicted") or activeDeadlineSeconds ("DeadlineExceeded"). Its containers are
    # stopped and it ends in phase Failed with that reason.
    ended: tuple[str, str] | None = None


# kubelet stops evicted pods with a 1 s grace period under hard thresholds.
EVICTION_GRACE_SECONDS = 1
DEADLINE_MESSAGE = "Pod was active on the node longer than the specified deadline"


def _known_start(pod: dict, sandboxes: list[SandboxStatus]) -> float | None:
    """When this node started the pod, if known from before (an agent restart): the
    API's status.startTime, else the oldest sandbox's creation."""
    started = (pod.get("status") or {}).get("startTime")
    if isinstance(started, str):
        try:
            return calendar.timegm(time.strptime(started, "%Y-%m-%dT%H:%M:%SZ"))
        except ValueError:
            pass
    return min((s.created_at for s in sandboxes), default=None)


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
        pull_credentials: PullCredentials | None = None,
        service_env: ServiceEnv | None = None,
        security: pod_security.SecurityPolicy | None = None,
        dns: pod_dns.DNSSettings | None = None,
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
        # imagePullSecrets and the node's credential file.
        self.pull_credentials = pull_credentials or PullCredentials(secrets=env_sources)
        # Service environment variables (none when the node knows no Services).
        self.service_env = service_env or ServiceEnv(lambda: [])
        # Image pull failures per (pod uid, container): reason shown until the retry.
        self._pull_failures: dict[tuple[str, str], tuple[str, str]] = {}
        self._start_times: dict[str, float] = {}
        # Pod uid -> the sandbox id whose network this process has set up or verified
        # (one entry per pod, dropped when the pod finishes or goes).
        self._network_ready: dict[str, str] = {}
        self.security = security or pod_security.SecurityPolicy()
        self.dns = dns or pod_dns.DNSSettings()
        self.termination_messages = TerminationMessages(runtime)
        self._dns_warned: set[str] = set()
        # Probes and lifecycle hooks (nodeagent/prober); None runs neither.
        self.prober = prober
        self.hooks = hooks

    # --- desired state -------------------------------------------------------------

    def record(self, uid: str) -> PodRecord | None:
        return self.pods.get(uid)

    def set_desired(self, pod: dict, rejected: tuple[str, str] | None = None) -> None:
        uid = pod["metadata"]["uid"]
        if rejected is None:
            rejected = self._admit(pod)
        record = self.pods.get(uid)
        if record is None:
            self.pods[uid] = PodRecord(pod=pod, rejected=rejected)
        elif record.pod["metadata"].get("deletionTimestamp") and not pod["metadata"].get("deletionTimestamp"):
            record.readd = (pod, rejected)
        else:
            record.pod, record.rejected, record.readd = pod, rejected, None
        if self.prober is not None and not rejected and self.pods[uid].readd is None:
            self.prober.add_pod(pod)

    def evict(self, uid: str, message: str) -> bool:
        """Mark a pod evicted (node pressure); its worker's next sync carries it out."""
        record = self.pods.get(uid)
        if record is None or record.ended is not None:
            return False
        record.ended = ("Evicted", message)
        self.events.event(record.pod, WARNING, "Evicted", message)
        return True
    def _admit(self, pod: dict) -> tuple[str, str] | None:
        """What this node cannot honour (security context, DNS, naming): the pod is
        refused with a reason naming the field, like kubelet's admit handlers."""
        refusal = pod_security.admit_pod(pod, self.security) or pod_dns.admit_pod(pod)
        if refusal is None:
            try:
                pod_dns.kernel_hostname(pod, self.dns.cluster_domain)
            except pod_dns.DNSError as exc:
                refusal = ("InvalidDNSConfig", str(exc))
        if refusal is None:
            return None
        if pod["metadata"]["uid"] not in self.pods:
            self.events.event(pod, WARNING, refusal[0], refusal[1])
        # kubelet's rejectPod wording for the pod's status message.
        return refusal[0], "Pod was rejected: " + refusal[1]

    def forget(self, uid: str) -> None:
        if self.pods.pop(uid, None) is not None and self._on_forget is not None:
            self._on_forget(uid)
        if self.prober is not None:
            self.prober.remove_pod(uid)
        self._forget_runtime_memory(uid)

    def forget_pod(self, uid: str, *, readded: bool) -> None:
        """PodWorkers: the pod's removal is complete. When it was re-added meanwhile,
        its desired state (``set_desired`` by the source) stays and it starts afresh."""
        if not readded:
            self.forget(uid)
            return
        record = self.pods.get(uid)
        if record is not None:
            if record.readd is not None:
                (record.pod, record.rejected), record.readd = record.readd, None
            record.status = {}
            if self.prober is not None:
                self.prober.remove_pod(uid)
                if not record.rejected:
                    self.prober.add_pod(record.pod)
        self._forget_runtime_memory(uid)

    def _forget_runtime_memory(self, uid: str) -> None:
        self._start_times.pop(uid, None)
        self._network_ready.pop(uid, None)
        for key in [k for k in self._pull_failures if k[0] == uid]:
            del self._pull_failures[key]

    # --- sync ----------------------------------------------------------------------

    async def sync_pod(self, pod: dict) -> SyncResult | float | None:
        uid = pod["metadata"]["uid"]
        record = self.pods.get(uid)
        if record is not None and record.rejected:
            self._set_status(uid, self._rejected_status(pod, *record.rejected))
            # finish_pod kills whatever it already had (e.g. admitted by an earlier run).
            return SyncResult(finished=True)
        if record is not None and record.ended is None:
            deadline_in = self._active_deadline_in(pod)
            if deadline_in is not None and deadline_in <= 0:
                record.ended = ("DeadlineExceeded", DEADLINE_MESSAGE)
                self.events.event(pod, NORMAL, "DeadlineExceeded", DEADLINE_MESSAGE)
        if record is not None and record.ended is not None:
            await self._sync_ended(pod, *record.ended)
            return SyncResult(finished=True)

        sandboxes, containers = await self.runtime.list_pod(uid)
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
        if uid not in self._start_times:
            self._start_times[uid] = _known_start(pod, sandboxes) or now

        if actions.kill_pod:
            await self._kill_pod(pod, sandboxes, containers, release_network=False)
            sandboxes, containers = await self.runtime.list_pod(uid)

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

        sandbox: SandboxStatus | None = None
        if actions.create_sandbox and not terminating:
            retry = await self._start_in_new_sandbox(pod, actions, waiting, sandboxes, containers)
            if retry is not None:
                requeue = retry if requeue is None else min(requeue, retry)
        elif actions.sandbox_id:
            sandbox = next((s for s in sandboxes if s.id == actions.sandbox_id), None)
            if sandbox is not None and not terminating:
                await self._ensure_network(pod, sandbox)

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
            sandboxes, containers = await self.runtime.list_pod(uid)
        await self._publish(pod, sandboxes, containers, waiting)
        if actions.kill_pod and not actions.create_sandbox:
            # Every container is terminal and stays so (or the pod is being deleted):
            # the worker moves on to finish_pod, which releases the network.
            return SyncResult(requeue_after=requeue, finished=True)
        deadline_in = self._active_deadline_in(pod)
        if deadline_in is not None:
            requeue = max(deadline_in, 0.05) if requeue is None else min(requeue, max(deadline_in, 0.05))
        return requeue

    def _active_deadline_in(self, pod: dict) -> float | None:
        """Seconds until spec.activeDeadlineSeconds runs out, counted from the pod's
        start on this node (kubelet's startTime); None without a deadline."""
        deadline = (pod.get("spec") or {}).get("activeDeadlineSeconds")
        start = self._start_times.get(pod["metadata"]["uid"])
        if not isinstance(deadline, int) or start is None:
            return None
        return start + deadline - _now()

    async def _sync_ended(self, pod: dict, reason: str, message: str) -> None:
        """The node ended the pod for good: stop everything (an evicted pod within
        EVICTION_GRACE_SECONDS, kubelet's hard-eviction grace; a pod past its deadline
        within its own grace period), release the network, keep the dead containers
        (logs, exit codes) until the pod is deleted; phase Failed with ``reason``, and
        for an eviction a DisruptionTarget condition."""
        uid = pod["metadata"]["uid"]
        sandboxes, containers = await self.runtime.list_pod(uid)
        if any(c.state in (ContainerState.RUNNING, ContainerState.CREATED) for c in containers) or \
                any(s.state == SandboxState.READY for s in sandboxes):
            doomed = pod
            if reason == "Evicted":
                doomed = dict(pod, metadata=dict(pod["metadata"],
                                                 deletionGracePeriodSeconds=EVICTION_GRACE_SECONDS))
            await self._kill_pod(doomed, sandboxes, containers, release_network=True)
            sandboxes, containers = await self.runtime.list_pod(uid)
        await self._publish(pod, sandboxes, containers, {})
        record = self.pods.get(uid)
        if record is None:
            return
        status = copy.deepcopy(record.status)
        status.update(phase="Failed", reason=reason, message=message)
        if reason != "Evicted":
            self._set_status(uid, status)
            return
        conditions = [c for c in status.get("conditions") or [] if c.get("type") != "DisruptionTarget"]
        previous = next((c for c in (record.status.get("conditions") or [])
                         if c.get("type") == "DisruptionTarget"), None)
        conditions.append(previous or {
            "type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet",
            "message": message, "lastProbeTime": None,
            "lastTransitionTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
        status["conditions"] = conditions
        self._set_status(uid, status)

    async def _start_in_new_sandbox(self, pod: dict, actions, waiting, sandboxes, containers) -> float | None:
        """Create the pod's sandbox and start its first containers, overlapping what
        does not depend on the step before: the pause container is created (not
        started); then, while it starts and its network is wired, the first
        container's volumes, address, image and config are prepared and the
        container is created in the not-yet-running sandbox (Docker joins
        ``container:<id>`` namespaces only at start); it is started once the sandbox
        runs with its network. Returns the requeue delay of the starts."""
        spec = pod["spec"]
        meta = pod["metadata"]
        config = SandboxConfig(
            pod=_pod_ref(pod),
            attempt=actions.sandbox_attempt,
            hostname=pod_dns.kernel_hostname(pod, self.dns.cluster_domain),
            sysctls=pod_security.pod_sysctls(pod),
            host_network=bool(spec.get("hostNetwork")),
            share_process_namespace=bool(spec.get("shareProcessNamespace")),
            host_pid=bool(spec.get("hostPID")),
            host_ipc=bool(spec.get("hostIPC")),
            labels=dict(meta.get("labels") or {}),
            annotations=dict(meta.get("annotations") or {}),
        )

        async def run_sandbox(sandbox_id: str) -> SandboxStatus:
            await self.runtime.start_container(sandbox_id)
            sandbox = await self.runtime.sandbox_status(sandbox_id)
            await self._ensure_network(pod, sandbox)
            return sandbox

        ready: asyncio.Future[SandboxStatus] | None = None
        try:
            image = await self._sandbox_image()
            log.info("creating pod sandbox", pod=_fmt(pod), attempt=actions.sandbox_attempt)
            sandbox_id = await self.runtime.create_pod_sandbox(config, image)
            ready = asyncio.ensure_future(run_sandbox(sandbox_id))
            created = SandboxStatus(id=sandbox_id, pod=config.pod, attempt=config.attempt,
                                    state=SandboxState.NOTREADY, created_at=_now(),
                                    host_network=config.host_network)
            retry = None
            if actions.to_start:
                retry = await self._start_containers(pod, created, actions.to_start, waiting, sandbox_ready=ready)
            await ready
            return retry
        except (RuntimeError_, NetworkError) as exc:
            log.warning("creating pod sandbox failed", pod=_fmt(pod), error=str(exc))
            for _kind, c in iter_containers(pod):
                waiting[c["name"]] = ("ContainerCreating", f"failed to create pod sandbox: {exc}")
            await self._publish(pod, sandboxes, containers, waiting)
            raise
        finally:
            if ready is not None and not ready.done():
                ready.cancel()
            if ready is not None:
                # Never leave the sandbox task behind (its failure is the one raised).
                await asyncio.gather(ready, return_exceptions=True)

    async def _ensure_network(self, pod: dict, sandbox: SandboxStatus) -> None:
        """Wire the sandbox's network once per sandbox and agent lifetime.

        A sandbox adopted after a restart may have been started by an agent killed
        before it set up the network; setup is idempotent, so checking each adopted
        sandbox once repairs that and costs little for the rest.
        """
        uid = pod["metadata"]["uid"]
        if sandbox.host_network or self._network_ready.get(uid) == sandbox.id:
            return
        if not sandbox.netns_path:
            raise NetworkError(f"sandbox {sandbox.id[:12]} has no network namespace (not running?)")
        try:
            async with asyncio.timeout(NETWORK_DEADLINE):
                await self.network.setup_pod(uid, sandbox.netns_path)
        except TimeoutError:
            raise NetworkError(f"pod network setup did not finish within {NETWORK_DEADLINE:.0f}s") from None
        self._network_ready[uid] = sandbox.id

    async def _start_containers(
        self, pod: dict, sandbox: SandboxStatus, to_start, waiting: dict[str, tuple[str, str]],
        sandbox_ready: Awaitable[SandboxStatus] | None = None,
    ) -> float | None:
        """Start ``to_start`` in order. With ``sandbox_ready`` (a sandbox still
        starting), each container is created at once and started once it is ready."""
        specs = {c["name"]: c for _kind, c in iter_containers(pod)}
        try:
            await self._prefetch(pod)
            volume_paths = await self._setup_volumes(pod)
        except (ConfigError, OSError) as exc:
            # Like kubelet: containers wait in ContainerCreating with the mount error.
            message = f"MountVolume.SetUp failed: {exc}"
            log.warning("volume setup failed", pod=_fmt(pod), error=str(exc))
            self.events.event(pod, WARNING, "FailedMount", message)
            for start in to_start:
                waiting[start.name] = ("ContainerCreating", message)
            return 10.0
        pod_ip = await self._reserve_pod_ip(pod)
        try:
            pod_mounts, dns_warnings = await asyncio.to_thread(
                pod_dns.write_pod_files, self.volumes.pod_dir(pod["metadata"]["uid"]), pod,
                [pod_ip] if pod_ip else [], self.dns)
        except (pod_dns.DNSError, OSError) as exc:
            message = f"cannot write the pod's resolv.conf and hosts files: {exc}"
            self.events.event(pod, WARNING, "FailedCreatePodSandBox", message)
            for start in to_start:
                waiting[start.name] = ("ContainerCreating", message)
            return 10.0
        if sandbox.id not in self._dns_warned:
            # Once per sandbox, as kubelet forms a pod's DNS config at sandbox creation.
            self._dns_warned.add(sandbox.id)
            for reason, message in dns_warnings:
                self.events.event(pod, WARNING, reason, message)
        requeue: float | None = None
        for start in to_start:
            problem = await self._start_one(pod, sandbox, specs[start.name], start, volume_paths, pod_ip,
                                            pod_mounts, sandbox_ready)
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
        self, pod, sandbox, container, start, volume_paths, pod_ip, pod_mounts=(), sandbox_ready=None,
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
            present = None if policy == PullPolicy.ALWAYS else await self.images.image_present(image)
            if present is not None:
                # kubelet's image manager says so on every container start.
                self.events.event(pod, NORMAL, "Pulled",
                                  f'Container image "{image}" already present on machine',
                                  field_path=path)
            elif policy == PullPolicy.NEVER:
                raise ImageNeverPull(f'Container image "{image}" is not present with pull policy of Never')
            else:
                keyring, problems = self.pull_credentials.for_pod(pod)
                for problem in problems:
                    self.events.event(pod, WARNING, "FailedToRetrieveImagePullSecret",
                                      f"Unable to retrieve some image pull secrets ({problem}); "
                                      "attempting to pull the image may not succeed.")
                self.events.event(pod, NORMAL, "Pulling", f'Pulling image "{image}"', field_path=path)
                started = time.monotonic()
                await pull_with_credentials(self.images, image, policy, keyring)
                self.events.event(pod, NORMAL, "Pulled", _pulled_message(
                    image, time.monotonic() - started, self.images, image), field_path=path)
            self._pull_failures.pop((uid, start.name), None)
        except ImageError as exc:
            log.warning("image not available", pod=_fmt(pod), container=start.name,
                        image=image, reason=exc.reason, error=str(exc))
            # A missing image under policy Never is its own event (nothing was pulled).
            event_reason = exc.reason if isinstance(exc, ImageNeverPull) else "Failed"
            self.events.event(pod, WARNING, event_reason, str(exc), field_path=path)
            self._pull_failures[(uid, start.name)] = (exc.reason, str(exc))
            self.pull_backoff.record_failure(pull_key, _now())
            remaining = self.pull_backoff.in_backoff(pull_key, _now())
            # Sync again soon: the status then says ImagePullBackOff (with its event) for
            # the rest of the wait, as kubelet's does after ErrImagePull.
            return exc.reason, str(exc), None if remaining is None else min(remaining, 1.0)
        try:
            config = build_container_config(
                pod, container, kind=start.kind, attempt=start.attempt,
                pod_ip=pod_ip, host_ip=self.host_ip, node_name=self.node_name,
                volume_paths=volume_paths, env_sources=self.env_sources,
                service_env=self.service_env.for_pod(pod),
                security_policy=self.security,
            )
            pod_dns.add_pod_mounts(config.mounts, list(pod_mounts))
            await self._termination_message_mount(pod, container, start.attempt, config)
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
            if sandbox_ready is not None:
                await sandbox_ready  # its failure is the sync's (raised past the handlers below)
            await self.runtime.start_container(container_id)
            self.events.event(pod, NORMAL, "Started", f"Started container {start.name}", field_path=path)
            if self.hooks is not None and await post_start(self, pod, container, container_id, pod_ip, path):
                return "", "", None  # killed: its exit takes the restart-policy path
        except (CreateContainerError, RuntimeTimeout) as exc:
            log.warning("container failed to start", pod=_fmt(pod), container=start.name, error=str(exc))
            self.events.event(pod, WARNING, "Failed", f"Error: {exc}", field_path=path)
            return getattr(exc, "reason", "CreateContainerError"), str(exc), 10.0
        except (NotFound, RuntimeUnavailable):
            raise  # the pod worker retries the whole sync
        except RuntimeError_ as exc:
            # The process could not run (bad command...): Docker keeps the error on the
            # container and the status shows it terminated with ContainerCannotRun.
            log.warning("container failed to run", pod=_fmt(pod), container=start.name, error=str(exc))
            self.events.event(pod, WARNING, "Failed", f"Error: {exc}", field_path=path)
            return "", "", None
        return None

    async def _termination_message_mount(self, pod: dict, container: dict, attempt: int, config) -> None:
        """A fresh file per container instance at its terminationMessagePath."""
        target = container.get("terminationMessagePath")
        if not target:
            return
        if not target.startswith("/") or ":" in target:
            raise ConfigError(f"container {container.get('name')!r}: terminationMessagePath {target!r} must be "
                              "an absolute path without ':'")
        try:
            host = await asyncio.to_thread(prepare_termination_message_file,
                                           self.volumes.pod_dir(pod["metadata"]["uid"]), container["name"], attempt)
        except OSError as exc:
            raise ConfigError(f"cannot create the termination message file: {exc}") from None
        config.mounts.append(Mount(host_path=host, container_path=target))
        config.labels[TERMINATION_MESSAGE_LABEL] = host

    async def _prefetch(self, pod: dict) -> None:
        """Let cluster-mode sources fetch the configMaps/secrets/tokens the pod uses,
        so the synchronous lookups of env and volume building find them."""
        prefetch = getattr(self.env_sources, "prefetch", None)
        if prefetch is not None:
            await prefetch(pod)

    async def _setup_volumes(self, pod: dict) -> dict[str, str]:
        try:
            async with asyncio.timeout(VOLUME_DEADLINE):
                return await self.volumes.setup(pod)
        except TimeoutError:
            raise OSError(f"volume setup did not finish within {VOLUME_DEADLINE:.0f}s") from None

    async def _refresh_volumes(self, pod: dict) -> None:
        try:
            await self._prefetch(pod)
            await self._setup_volumes(pod)
        except (ConfigError, OSError) as exc:
            log.warning("volume refresh failed", pod=_fmt(pod), error=str(exc))

    async def _reserve_pod_ip(self, pod: dict) -> str | None:
        """The pod's address for its containers' environment and hosts file: the
        host's, or the one the network allocated (possibly before it is wired)."""
        if pod["spec"].get("hostNetwork"):
            return self.host_ip
        return (await self.network.reserve(pod["metadata"]["uid"])).ip

    async def _pod_ip(self, pod: dict) -> str | None:
        if pod["spec"].get("hostNetwork"):
            return self.host_ip
        status = await self.network.pod_status(pod["metadata"]["uid"])
        return status.ip if status else None

    # --- termination ---------------------------------------------------------------

    async def finish_pod(self, uid: str, pod: dict) -> None:
        """PodWorkers: the pod must not run again (finished, rejected or deleted). Stop
        what still runs within the grace period, stop the sandbox and release its
        address at once; keep the exited containers (exit codes, logs) until the pod
        is removed."""
        sandboxes, containers = await self.runtime.list_pod(uid)
        live = [c for c in containers if c.state in (ContainerState.RUNNING, ContainerState.CREATED)]
        ready = [s for s in sandboxes if s.state == SandboxState.READY]
        if live or ready:
            log.info("stopping finished pod", pod=_fmt(pod), containers=[c.name for c in live])
        for c in live:
            self.events.event(pod, NORMAL, "Killing", f"Stopping container {c.name}",
                              field_path=container_field_path(c.kind, c.name, pod))
        await self._kill_pod(pod, sandboxes, containers, release_network=True, uid=uid)
        self._network_ready.pop(uid, None)
        record = self.pods.get(uid)
        if record is None:
            return
        if record.rejected:
            self._set_status(uid, self._rejected_status(pod, *record.rejected))
            return
        phase = (record.status or {}).get("phase")
        if live or phase not in _TERMINAL_PHASES:
            # Containers were stopped here (deletion): report their final states. A pod
            # already reported terminal keeps its status (its containers may be gone,
            # e.g. terminal in the API when first seen after a restart).
            await self._publish(pod, *await self.runtime.list_pod(uid), {})

    async def terminate_pod(self, uid: str, pod: dict | None) -> None:
        sandboxes, containers = await self.runtime.list_pod(uid)
        if pod is None:
            record = self.pods.get(uid)
            pod = record.pod if record else None
        # Containers stop within the grace period; the sandboxes are not stopped first:
        # removing one kills its pause and takes its containers (one list, one call
        # each, together). The address goes last, with the namespace already gone.
        await self._kill_pod(pod, sandboxes, containers, release_network=False, stop_sandboxes=False)

        async def remove(call, object_id: str) -> None:
            try:
                await call(object_id)
            except NotFound:
                pass

        sandbox_ids = {s.id for s in sandboxes}
        await _gather_all([remove(self.runtime.remove_pod_sandbox, s.id) for s in sandboxes]
                          + [remove(self.runtime.remove_container, c.id) for c in containers
                             if c.sandbox_id not in sandbox_ids])
        await self._release_network(uid)
        try:
            async with asyncio.timeout(VOLUME_DEADLINE):
                await self.volumes.teardown(uid)
        except TimeoutError:
            raise OSError(f"volume teardown did not finish within {VOLUME_DEADLINE:.0f}s") from None
        self.termination_messages.forget_pod(c.id for c in containers)
        self._network_ready.pop(uid, None)
        self._dns_warned.difference_update(s.id for s in sandboxes)
        self.backoff.gc({k for k in self.pods if k != uid})
        self.pull_backoff.gc({k for k in self.pods if k != uid})
        log.info("pod removed", pod_uid=uid, pod=_fmt(pod) if pod else None)

    async def _kill_pod(
        self,
        pod: dict | None,
        sandboxes: list[SandboxStatus],
        containers: list[ContainerStatus],
        *,
        release_network: bool,
        uid: str | None = None,
        stop_sandboxes: bool = True,
    ) -> None:
        """Stop the containers (termination order, within the grace period), then the
        sandboxes, then release the pod's network. The sandbox goes first (kubelet's
        CNI teardown runs before it) because its namespace takes the pod's veth pair
        with it asynchronously, where deleting the veth ourselves waits ~20 ms on the
        kernel per pod."""
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
        if stop_sandboxes:
            for s in sandboxes:
                if s.state == SandboxState.READY:
                    try:
                        await self.runtime.stop_pod_sandbox(s.id)
                    except NotFound:
                        pass
        if release_network and uid is not None:
            await self._release_network(uid)

    async def _release_network(self, uid: str) -> None:
        """Release the address and the host's end of the veth. Called once the
        sandboxes are stopped: no namespace is passed, since a dead pause's
        /proc/<pid>/ns/net could by now name another process's namespace."""
        try:
            async with asyncio.timeout(NETWORK_DEADLINE):
                await self.network.teardown_pod(uid, None)
        except TimeoutError:
            raise NetworkError(f"pod network teardown did not finish within {NETWORK_DEADLINE:.0f}s") from None

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
        await self.termination_messages.fill(pod, containers)
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


async def _gather_all(coros: list) -> None:
    """Run concurrently; wait for all; raise the first failure (not a group)."""
    results = await asyncio.gather(*coros, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


def _fmt(pod: dict | None) -> str:
    if not pod:
        return "?"
    meta = pod["metadata"]
    return f"{meta.get('namespace', 'default')}/{meta['name']}"


def _pulled_message(image: str, elapsed: float, images: object, key: str) -> str:
    """kubelet's Pulled message: the pull time, the time including the wait for a
    parallel-pull slot, and the image size."""
    info = getattr(images, "last_pull", {}).pop(key, None)
    if info is None:
        return f'Successfully pulled image "{image}" in {elapsed:.3f}s'
    return (f'Successfully pulled image "{image}" in {info.seconds:.3f}s '
            f'({elapsed:.3f}s including waiting). Image size: {info.size_bytes} bytes.')
