"""RuntimeService over the Docker Engine API, with dockershim/cri-dockerd conventions.

A pod sandbox is a pause container (IPC ``shareable``, its own network namespace or
the host's); app containers join its network and IPC namespaces, and its PID
namespace when the pod shares one. Every object carries labels (``runtime.labels``)
from which the whole state is rebuilt after a restart, including
``io.nodeagent.node``: lists and events filter on it, so several agents can share
one engine without seeing each other's objects.

Relists are cheap in steady state: one ``docker ps`` per call, and an inspect only
for containers whose list-reported state changed since the last look (a running
container's inspect data does not change while it runs, an exited one's never).
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import re
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping
from typing import Any

import aiodocker
import structlog

from runtime import http1
from runtime import labels as L
from runtime.engine import SKIPPED_LINE, Engine, EngineError, iter_json_lines
from runtime.imageref import parse_image_ref
from runtime.timeutil import parse_docker_time
from runtime.types import (
    ContainerConfig,
    ContainerConfigRefused,
    ContainerState,
    ContainerStatus,
    CreateContainerError,
    ImageError,
    NotFound,
    RESYNC_ACTION,
    PodRef,
    RuntimeError_,
    RuntimeEvent,
    RuntimeTimeout,
    RuntimeUnavailable,
    SandboxConfig,
    SandboxState,
    SandboxStatus,
)

log = structlog.get_logger(__name__)

# Docker actions worth a pod re-sync; everything else (exec_*, attach, resize...) is noise.
EVENT_ACTIONS = ("create", "start", "kill", "die", "oom", "stop", "destroy")
# Parallel inspects during a relist with a cold cache (after a restart, 300+ containers).
_INSPECT_CONCURRENCY = 32
# RepoDigests of an image can grow (a later pull by digest); look again after this long.
_IMAGE_CACHE_TTL = 60.0
# Entries beyond this are pruned (expired first, then oldest): a node cycling through
# many images must not grow the cache without bound.
_IMAGE_CACHE_MAX = 256
# List states whose inspect data cannot change without the state changing too.
# "created" is not one: a failed start leaves the state at "created" but sets
# ExitCode and Error.
_STABLE_STATES = frozenset({"running", "exited", "dead"})
# The sandbox is the last thing the OOM killer should pick (kubelet uses -998).
_SANDBOX_OOM_SCORE_ADJ = -998
_DOCKER_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]+$")
_CAP_SYS_RESOURCE = 24


def can_lower_oom_score_adj() -> bool:
    """Whether processes here may get a negative oom_score_adj (needs CAP_SYS_RESOURCE).

    runc inherits the engine's capabilities; without this one a container asking for
    a negative value fails to start ("can't get final child's PID from pipe"), as in
    unprivileged build/CI sandboxes. The engine runs on this machine with the same
    bounding set, so our own capabilities are the best cheap guess.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_SYS_RESOURCE & 1)
    except (OSError, ValueError):
        pass
    return True


class StartContainerError(RuntimeError_):
    """Docker could not start the container's process (bad command, missing binary...).

    Docker keeps the error on the container (``State.Error``), so its status shows
    it as exited with ``error`` set: kubelet's ContainerCannotRun.
    """


def sandbox_name(pod: PodRef, attempt: int) -> str:
    return f"k8s_{L.SANDBOX_CONTAINER_NAME}_{pod.name}_{pod.namespace}_{pod.uid}_{attempt}"


def container_name(pod: PodRef, name: str, attempt: int) -> str:
    return f"k8s_{name}_{pod.name}_{pod.namespace}_{pod.uid}_{attempt}"


def _require(value: Any, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise CreateContainerError(f"{what} must be a non-empty string, got {value!r}")


def _check_pod(pod: PodRef, what: str) -> None:
    _require(pod.name, f"{what}: pod.name")
    _require(pod.namespace, f"{what}: pod.namespace")
    _require(pod.uid, f"{what}: pod.uid")


def _check_attempt(attempt: Any, what: str) -> None:
    if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 0:
        raise CreateContainerError(f"{what}: attempt must be an integer >= 0, got {attempt!r}")


def _int_label(labels: Mapping[str, str], key: str) -> int:
    try:
        return int(labels.get(key, "0"))
    except ValueError:
        return 0


def _json_label(labels: Mapping[str, str], key: str) -> dict[str, str]:
    try:
        value = json.loads(labels.get(key) or "{}")
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def _pod_ref(labels: Mapping[str, str]) -> PodRef | None:
    try:
        return PodRef(labels[L.POD_NAME], labels[L.POD_NAMESPACE], labels[L.POD_UID])
    except KeyError:
        return None


# Time for libnetwork's watch loop to process a sandbox's endpoint delete.
_NETWORK_LEAVE_SETTLE = 0.005
# The first engine releases with libnetwork's lock-order fix (moby/moby#46693 in
# 20.10.27; 23.0 carried it from the start).
_NETWORK_EXIT_FIXED_IN = (20, 10, 27)


def has_network_exit_deadlock(engine_version: str) -> bool:
    """Whether a Docker engine of ``engine_version`` ("20.10.24+dfsg1") has the
    libnetwork deadlock between two containers leaving the same network
    (moby/moby#46661). An unreadable version counts as affected: the guard costs
    little, the hang costs the node."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", engine_version or "")
    if match is None:
        return True
    major, minor, patch = (int(part or 0) for part in match.groups())
    return (major, minor, patch) < _NETWORK_EXIT_FIXED_IN


RuntimeObserver = Callable[[str, float, "BaseException | None"], None]


def _observed(operation: str):
    """Report each call's duration and failure to ``self.observer`` (metrics), under
    CRI's operation names; the runtime itself knows nothing of what observes it."""

    def wrap(method):
        async def call(self, *args, **kwargs):
            observer = self.observer
            if observer is None:
                return await method(self, *args, **kwargs)
            started = time.monotonic()
            error: BaseException | None = None
            try:
                return await method(self, *args, **kwargs)
            except Exception as exc:
                error = exc
                raise
            finally:
                try:
                    observer(operation, time.monotonic() - started, error)
                except Exception:
                    pass  # an observer must never break a runtime call

        return functools.wraps(method)(call)

    return wrap


class DockerRuntime:
    """The RuntimeService for one node on one Docker engine.

    ``node_name`` goes into the ``io.nodeagent.node`` label of everything created and
    scopes every list and event query. ``call_timeout`` bounds each engine call
    (stop calls get their grace period on top).
    """

    def __init__(
        self,
        node_name: str,
        docker_url: str | None = None,
        call_timeout: float = 30.0,
        *,
        allow_negative_oom_score_adj: bool | None = None,
        log_max_size: int | None = 10 * 1024 * 1024,
        log_max_files: int | None = 5,
    ) -> None:
        """``allow_negative_oom_score_adj``: None = detect (see can_lower_oom_score_adj);
        when False, negative values are raised to 0 instead of failing every start.
        ``log_max_size``/``log_max_files``: json-file log rotation of every container
        (kubelet's containerLogMaxSize 10Mi / containerLogMaxFiles 5)."""
        if not isinstance(node_name, str) or not node_name:
            raise ValueError(f"node_name must be a non-empty string, got {node_name!r}")
        self.node_name = node_name
        self.allow_negative_oom_score_adj = (
            can_lower_oom_score_adj()
            if allow_negative_oom_score_adj is None
            else allow_negative_oom_score_adj
        )
        self.engine = Engine(docker_url, call_timeout=call_timeout)
        # Always json-file, whatever the daemon's default driver: logs are read back
        # through the engine (runtime.logs) and rotated like kubelet's.
        log_opts: dict[str, str] = {}
        if log_max_size:
            log_opts["max-size"] = str(int(log_max_size))
            if log_max_files:
                log_opts["max-file"] = str(int(log_max_files))
        self.log_config: dict[str, Any] = {"Type": "json-file", "Config": log_opts}
        # container id -> (docker type, list-reported state, status built from inspect)
        self._status_cache: dict[str, tuple[str, str, ContainerStatus | SandboxStatus | None]] = {}
        # image id -> (expires at, RepoDigests)
        self._image_cache: dict[str, tuple[float, list[str]]] = {}
        self._inspect_slots = asyncio.Semaphore(_INSPECT_CONCURRENCY)
        # Docker before 20.10.27 deadlocks when one container leaves a network (its
        # sbLeave reads the network's service records: network lock, then controller
        # lock) while libnetwork's watch loop processes another's endpoint delete on
        # the same network (controller lock, then network lock): moby/moby#46661.
        # Every sandbox holds an endpoint on Docker's "none" network (or "host" for
        # hostNetwork pods), even though the pod network itself is ours. So exits of
        # *running* sandboxes are serialized per network, with a moment for the watch
        # loop to drain; removing a stopped sandbox leaves no network, and app
        # containers join the sandbox's namespace and hold no endpoint. Engines with
        # the fix take no lock at all (see has_network_exit_deadlock).
        self._network_exits: dict[str, asyncio.Lock] = {}
        self._network_exit_guard: bool | None = None  # decided from the engine version
        # Labels of sandboxes this runtime created or inspected (immutable in Docker):
        # creating a container in a known sandbox needs no inspect of it.
        self._sandbox_labels: dict[str, dict[str, str]] = {}
        # Engine calls made for inspects (tests check relists stay cheap).
        self.inspect_calls = 0
        # Optional: called with (operation, seconds, error) after each runtime call.
        self.observer: RuntimeObserver | None = None

    @property
    def docker(self) -> aiodocker.Docker:
        """The shared aiodocker client (also used by DockerImageService and the pause build)."""
        return self.engine.docker

    @property
    def call_timeout(self) -> float:
        return self.engine.call_timeout

    async def close(self) -> None:
        await self.engine.close()

    # --- engine ----------------------------------------------------------------------

    @_observed("version")
    async def version(self) -> str:
        info = await self.engine.version()
        return f"docker://{info.get('Version', 'unknown')}"

    # --- sandboxes -------------------------------------------------------------------

    async def run_pod_sandbox(self, config: SandboxConfig, image: str) -> str:
        sandbox_id = await self.create_pod_sandbox(config, image)
        await self.start_container(sandbox_id)
        return sandbox_id

    @_observed("run_podsandbox")  # CRI's RunPodSandbox; its start is a start_container
    async def create_pod_sandbox(self, config: SandboxConfig, image: str) -> str:
        """Create the pause container without starting it: the pod's containers may be
        created in it at once (Docker resolves ``container:<id>`` namespaces only when
        they start), while it starts."""
        what = f"run pod sandbox for {config.pod.namespace}/{config.pod.name}"
        _check_pod(config.pod, what)
        _check_attempt(config.attempt, what)
        _require(image, f"{what}: image")
        sandbox_labels = {
            L.POD_NAME: config.pod.name,
            L.POD_NAMESPACE: config.pod.namespace,
            L.POD_UID: config.pod.uid,
            L.CONTAINER_NAME: L.SANDBOX_CONTAINER_NAME,
            L.DOCKER_TYPE: L.TYPE_SANDBOX,
            L.ATTEMPT: str(config.attempt),
            L.KIND: L.KIND_SANDBOX,
            L.NODE: self.node_name,
            L.POD_LABELS: json.dumps(config.labels, sort_keys=True),
            L.POD_ANNOTATIONS: json.dumps(config.annotations, sort_keys=True),
            L.SHARE_PID: "true" if config.share_process_namespace else "false",
            L.HOST_NETWORK: "true" if config.host_network else "false",
            L.HOST_PID: "true" if config.host_pid else "false",
            L.HOST_IPC: "true" if config.host_ipc else "false",
        }
        host_config: dict[str, Any] = {
            "NetworkMode": "host" if config.host_network else "none",
            "IpcMode": "host" if config.host_ipc else "shareable",
            "RestartPolicy": {"Name": "no"},
        }
        if config.host_pid:
            host_config["PidMode"] = "host"
        if self.allow_negative_oom_score_adj:
            host_config["OomScoreAdj"] = _SANDBOX_OOM_SCORE_ADJ
        if config.dns_servers:
            host_config["Dns"] = list(config.dns_servers)
        if config.dns_searches:
            host_config["DnsSearch"] = list(config.dns_searches)
        if config.cgroup_parent:
            host_config["CgroupParent"] = config.cgroup_parent
            sandbox_labels[L.CGROUP_PARENT] = config.cgroup_parent
        if config.sysctls:
            host_config["Sysctls"] = {str(k): str(v) for k, v in config.sysctls.items()}
        body: dict[str, Any] = {
            "Image": image,
            "Labels": sandbox_labels,
            "HostConfig": host_config,
        }
        if not config.host_network and config.hostname:
            # Docker refuses a hostname together with the host's UTS/network namespace.
            body["Hostname"] = config.hostname
        name = sandbox_name(config.pod, config.attempt)
        sandbox_id = await self._create(name, body, what)
        self._sandbox_labels[sandbox_id] = sandbox_labels
        log.info("pod sandbox created", sandbox=name, id=sandbox_id[:12])
        return sandbox_id

    @_observed("podsandbox_status")
    async def sandbox_status(self, sandbox_id: str) -> SandboxStatus:
        """Fresh status of one of this node's sandboxes (one inspect)."""
        info = await self._inspect_own(sandbox_id, f"status of sandbox {sandbox_id[:12]}")
        status = await self._sandbox_status(info)
        if status is None or (info["Config"].get("Labels") or {}).get(L.DOCKER_TYPE) != L.TYPE_SANDBOX:
            raise NotFound(f"status of sandbox {sandbox_id[:12]}: not a pod sandbox")
        return status

    @_observed("stop_podsandbox")
    async def stop_pod_sandbox(self, sandbox_id: str, timeout: int = 10) -> None:
        """Stop the sandbox's containers (each within ``timeout``), then the pause."""
        pause, members = await self._sandbox_and_members(sandbox_id, f"stop pod sandbox {sandbox_id[:12]}")

        async def stop_quietly(container_id: str) -> None:
            try:
                await self.stop_container(container_id, timeout)
            except NotFound:
                pass

        await _run_all(stop_quietly(m["Id"]) for m in members if m.get("State") == "running")
        await self._stop_pause(pause, timeout)

    @_observed("remove_podsandbox")
    async def remove_pod_sandbox(self, sandbox_id: str) -> None:
        """Remove the pause container and the sandbox's containers (forcibly), together."""
        pause, members = await self._sandbox_and_members(sandbox_id, f"remove pod sandbox {sandbox_id[:12]}")

        async def remove_quietly(container_id: str) -> None:
            try:
                await self.remove_container(container_id)
            except NotFound:
                pass

        # A running pause leaves its network when it stops; on engines with the
        # deadlock that exit is taken alone, and the removal after it touches no network.
        if _running(pause) and await self._guard_network_exits():
            await self._stop_pause(pause, 0)
        # Docker lets the pause go before its members: they only name it.
        await _run_all([self.remove_container(sandbox_id), *(remove_quietly(m["Id"]) for m in members)])
        self._sandbox_labels.pop(sandbox_id, None)

    async def _sandbox_and_members(self, sandbox_id: str, what: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The sandbox's list entry and its containers' entries, from one ``docker ps``
        of its pod; NotFound when it is not one of this node's sandboxes."""
        labels = self._sandbox_labels.get(sandbox_id)
        if labels is None:
            labels = (await self._inspect_own(sandbox_id, what))["Config"].get("Labels") or {}
        uid = labels.get(L.POD_UID)
        if labels.get(L.DOCKER_TYPE) != L.TYPE_SANDBOX or not uid:
            raise NotFound(f"{what}: {sandbox_id[:12]} is not a pod sandbox of node {self.node_name}")
        entries = await self._list(None, uid)
        pause = next((e for e in entries if e["Id"] == sandbox_id), None)
        if pause is None:
            self._sandbox_labels.pop(sandbox_id, None)
            raise NotFound(f"{what}: no such sandbox")
        members = [e for e in entries if (e.get("Labels") or {}).get(L.SANDBOX_ID) == sandbox_id]
        return pause, members

    async def _stop_pause(self, pause: dict[str, Any], timeout: int) -> None:
        """Stop a sandbox's pause container (its list entry); on engines with the
        network-exit deadlock (see ``__init__``) one exit per network at a time. Docker
        releases a container's network before it marks it stopped, so the stop call
        returning means the endpoint is gone; the settle time lets libnetwork's watch
        loop finish with it before the next exit begins."""
        if not _running(pause):
            return
        if not await self._guard_network_exits():
            await self.stop_container(pause["Id"], timeout)
            return
        network = "host" if (pause.get("Labels") or {}).get(L.HOST_NETWORK) == "true" else "none"
        async with self._network_exits.setdefault(network, asyncio.Lock()):
            try:
                await self.stop_container(pause["Id"], timeout)
            finally:
                await asyncio.sleep(_NETWORK_LEAVE_SETTLE)

    async def _guard_network_exits(self) -> bool:
        if self._network_exit_guard is None:
            info = await self.engine.version()
            self._network_exit_guard = has_network_exit_deadlock(str(info.get("Version", "")))
            log.info("docker network exit guard", engine=info.get("Version"), enabled=self._network_exit_guard)
        return self._network_exit_guard

    @_observed("list_pod")
    async def list_pod(self, pod_uid: str) -> tuple[list[SandboxStatus], list[ContainerStatus]]:
        """The pod's sandboxes and containers from one ``docker ps``."""
        statuses = await self._relist(None, pod_uid)
        return ([s for s in statuses if isinstance(s, SandboxStatus)],
                [c for c in statuses if isinstance(c, ContainerStatus)])

    @_observed("list_podsandbox")
    async def list_pod_sandboxes(self, pod_uid: str | None = None) -> list[SandboxStatus]:
        return await self._relist(L.TYPE_SANDBOX, pod_uid)

    # --- containers ------------------------------------------------------------------

    @_observed("create_container")
    async def create_container(self, sandbox: SandboxStatus, config: ContainerConfig) -> str:
        pod = sandbox.pod
        what = f"create container {config.name!r} of pod {pod.namespace}/{pod.name}"
        _check_pod(pod, what)
        _check_attempt(config.attempt, what)
        _require(config.name, f"{what}: name")
        _require(config.image, f"{what}: image")
        if config.kind not in L.CONTAINER_KINDS:
            raise CreateContainerError(
                f"{what}: kind must be one of {sorted(L.CONTAINER_KINDS)}, got {config.kind!r}"
            )
        sandbox_labels = self._sandbox_labels.get(sandbox.id)
        if sandbox_labels is None:
            try:
                sandbox_info = await self._inspect_own(sandbox.id, what)
            except NotFound:
                raise CreateContainerError(f"{what}: sandbox {sandbox.id[:12]} does not exist") from None
            sandbox_labels = sandbox_info["Config"].get("Labels") or {}
        if sandbox_labels.get(L.DOCKER_TYPE) != L.TYPE_SANDBOX:
            raise CreateContainerError(f"{what}: {sandbox.id[:12]} is not a pod sandbox")
        if sandbox_labels.get(L.POD_UID) != pod.uid:
            raise CreateContainerError(
                f"{what}: sandbox {sandbox.id[:12]} belongs to pod uid "
                f"{sandbox_labels.get(L.POD_UID)!r}, not {pod.uid!r}"
            )
        sandbox_id = sandbox.id

        container_labels = dict(config.labels)
        overridden = sorted(set(container_labels) & L.RESERVED)
        if overridden:
            log.warning("ignoring reserved keys in container labels", container=config.name,
                        keys=overridden)
        container_labels.update(
            {
                L.POD_NAME: pod.name,
                L.POD_NAMESPACE: pod.namespace,
                L.POD_UID: pod.uid,
                L.CONTAINER_NAME: config.name,
                L.DOCKER_TYPE: L.TYPE_CONTAINER,
                L.ATTEMPT: str(config.attempt),
                L.SPEC_HASH: config.spec_hash,
                L.SANDBOX_ID: sandbox_id,
                L.KIND: config.kind,
                L.NODE: self.node_name,
            }
        )
        join = f"container:{sandbox_id}"
        host_config: dict[str, Any] = {
            "NetworkMode": join,
            "IpcMode": join,
            "RestartPolicy": {"Name": "no"},
            "Privileged": bool(config.privileged),
            "Binds": [self._bind(m.host_path, m.container_path, m.read_only, what)
                      for m in config.mounts],
        }
        if sandbox_labels.get(L.HOST_IPC) == "true":
            host_config["IpcMode"] = "host"  # dockershim: the host's, not the sandbox's
        if sandbox_labels.get(L.HOST_PID) == "true":
            host_config["PidMode"] = "host"
        elif sandbox_labels.get(L.SHARE_PID) == "true":
            host_config["PidMode"] = join
        host_config["LogConfig"] = self.log_config
        self._security(host_config, config)
        if config.run_as_non_root:
            await self._verify_non_root(config, what)
        if sandbox_labels.get(L.CGROUP_PARENT):
            host_config["CgroupParent"] = sandbox_labels[L.CGROUP_PARENT]
        res = config.resources
        if res.memory_limit is not None:
            host_config["Memory"] = res.memory_limit
            host_config["MemorySwap"] = res.memory_limit  # no swap beyond the limit
        if res.cpu_shares is not None:
            host_config["CpuShares"] = res.cpu_shares
        if res.cpu_quota is not None:
            host_config["CpuQuota"] = res.cpu_quota
        if res.cpu_period is not None:
            host_config["CpuPeriod"] = res.cpu_period
        if res.oom_score_adj is not None:
            host_config["OomScoreAdj"] = (
                res.oom_score_adj if self.allow_negative_oom_score_adj
                else max(0, res.oom_score_adj)
            )

        body: dict[str, Any] = {
            "Image": config.image,
            "Env": [f"{k}={v}" for k, v in config.env.items()],
            "Labels": container_labels,
            "Tty": bool(config.tty),
            "OpenStdin": bool(config.stdin),
            "StdinOnce": bool(config.stdin and config.stdin_once),
            "HostConfig": host_config,
        }
        # An empty list means "not set" in Kubernetes; for Docker it would clear the
        # image's ENTRYPOINT/CMD, so only non-empty lists override.
        if config.entrypoint:
            body["Entrypoint"] = list(config.entrypoint)
        if config.cmd:
            body["Cmd"] = list(config.cmd)
        if config.working_dir:
            body["WorkingDir"] = config.working_dir
        if config.stop_signal:
            body["StopSignal"] = config.stop_signal
        user = self._user(config.run_as_user, config.run_as_group)
        if user:
            body["User"] = user
        name = container_name(pod, config.name, config.attempt)
        container_id = await self._create(name, body, what)
        log.info("container created", container=name, id=container_id[:12])
        return container_id

    @_observed("start_container")
    async def start_container(self, container_id: str) -> None:
        what = f"start container {container_id[:12]}"
        self._status_cache.pop(container_id, None)
        try:
            await self.engine.start_container(what, container_id)
        except EngineError as exc:
            # The process could not be started; Docker recorded why on the container.
            raise StartContainerError(str(exc)) from None
        finally:
            self._status_cache.pop(container_id, None)

    @_observed("stop_container")
    async def stop_container(self, container_id: str, timeout: int) -> None:
        """Send the container's stop signal, SIGKILL after ``timeout`` s (Docker's own
        stop: one round trip). Already stopped: returns at once. Missing: NotFound.
        The whole call may take ``timeout`` plus one ``call_timeout`` before it raises
        RuntimeTimeout."""
        grace = max(0, int(timeout))
        try:
            await self.engine.stop_container(f"stop container {container_id[:12]}", container_id, grace)
        finally:
            self._status_cache.pop(container_id, None)

    @_observed("remove_container")
    async def exec_sync(
        self, container_id: str, cmd: list[str], timeout: float, *, max_output: int = 10 * 1024
    ) -> tuple[int, bytes]:
        """Run ``cmd`` in the running container; return (exit code, stdout+stderr).

        CRI's ExecSync: the whole call (create, run, exit code) is bounded by
        ``timeout`` and raises RuntimeTimeout past it. Docker cannot kill an exec'd
        process, so a hung command keeps running in the container (as with
        cri-dockerd); only the caller stops waiting. Output beyond ``max_output`` bytes
        is read and dropped. A command that cannot be started (not found) comes back
        as exit code 126/127 with Docker's message, like ``docker exec``.

        Exec probes make this the node's most frequent engine call (100 pods probing
        every 10 s: 30 requests/s), so it speaks HTTP/1.1 to the engine directly
        (``runtime.http1``): about 60 % of the CPU of the same calls via aiodocker.
        """
        what = f"exec in container {container_id[:12]}"
        try:
            async with asyncio.timeout(timeout):
                created = await self._raw(what, "POST", f"/containers/{container_id}/exec",
                                          {"Cmd": list(cmd), "AttachStdout": True, "AttachStderr": True})
                exec_id = json.loads(created)["Id"]
                stream = await self._raw(what, "POST", f"/exec/{exec_id}/start",
                                         {"Detach": False, "Tty": False}, keep=max_output * 2 + 4096)
                info = json.loads(await self._raw(what, "GET", f"/exec/{exec_id}/json"))
        except TimeoutError:
            raise RuntimeTimeout(f"{what}: command {cmd!r} timed out after {timeout:g}s") from None
        code = info.get("ExitCode")
        return (int(code) if code is not None else -1), _demultiplex(stream, max_output)

    async def _raw(self, what: str, method: str, path: str, body: Any = None, *, keep: int = 1 << 20) -> bytes:
        """One engine request on its own connection; the body of a 2xx answer (the
        first ``keep`` bytes; the rest is read and dropped). 404 -> NotFound, 409 (not
        running) -> NotFound, other errors -> EngineError, no engine -> RuntimeUnavailable."""
        url = self.engine.url
        try:
            if url.startswith("unix://"):
                reader, writer = await asyncio.open_unix_connection(url[len("unix://"):])
            else:
                host, _, port = url.split("://", 1)[1].rstrip("/").rpartition(":")
                reader, writer = await asyncio.open_connection(host, int(port))
        except OSError as exc:
            raise RuntimeUnavailable(f"{what}: Docker at {url} unreachable: {exc}") from None
        try:
            data = json.dumps(body).encode() if body is not None else None
            headers = {"Host": "docker", "Content-Type": "application/json"}
            response = await http1.request(reader, writer, method, path, headers, body=data, body_limit=keep)
            while await reader.read(65536):
                pass  # output beyond ``keep``: drained so the exec can finish
        except (OSError, http1.ProtocolError) as exc:
            raise RuntimeUnavailable(f"{what}: Docker at {url}: {exc}") from None
        finally:
            writer.close()
        if response.status >= 400:
            try:
                message = json.loads(response.body).get("message", "")
            except ValueError:
                message = response.body.decode("utf-8", "replace")
            if response.status in (404, 409):
                raise NotFound(f"{what}: {message}")
            raise EngineError(response.status, f"{what}: Docker error {response.status}: {message}")
        return response.body

    async def remove_container(self, container_id: str) -> None:
        what = f"remove container {container_id[:12]}"
        self._status_cache.pop(container_id, None)
        try:
            await self.engine.remove_container(what, container_id)
        except EngineError as exc:
            if exc.status == 409 and "already in progress" in str(exc):
                return
            raise

    @_observed("list_containers")
    async def list_containers(self, pod_uid: str | None = None) -> list[ContainerStatus]:
        return await self._relist(L.TYPE_CONTAINER, pod_uid)

    @_observed("container_status")
    async def container_status(self, container_id: str) -> ContainerStatus:
        """Fresh status of one of this node's containers (a sandbox's too)."""
        info = await self._inspect_own(container_id, f"status of container {container_id[:12]}")
        return await self._container_status(info)

    async def events(self, since: float | None = None) -> AsyncIterator[RuntimeEvent]:
        """Lifecycle events of this node's containers and sandboxes, until the stream breaks.

        ``since`` (unix seconds) replays earlier events first. Raises RuntimeUnavailable
        when the stream breaks or ends; the caller reconnects and relists.
        """
        filters = {
            "type": ["container"],
            "label": [f"{L.NODE}={self.node_name}"],
            "event": list(EVENT_ACTIONS),
        }
        params = {"filters": json.dumps(filters)}
        if since is not None:
            params["since"] = f"{since:.6f}"
        response = await self.engine.open_stream("docker events", "GET", "events", params=params)
        try:
            async for event in iter_json_lines(response, "docker events"):
                if event is SKIPPED_LINE:
                    # An event we could not read: whatever it said, a relist will see.
                    yield RuntimeEvent(pod_uid="", container_id="", action=RESYNC_ACTION)
                    continue
                actor = event.get("Actor") or {}
                if not isinstance(actor, dict):
                    actor = {}
                container_id = str(actor.get("ID") or event.get("id") or "")
                action = str(event.get("Action") or event.get("status") or "")
                attributes = actor.get("Attributes") or {}
                if not isinstance(attributes, dict):
                    attributes = {}
                if not container_id or not action:
                    continue
                self._status_cache.pop(container_id, None)
                yield RuntimeEvent(
                    pod_uid=str(attributes.get(L.POD_UID, "")),
                    container_id=container_id,
                    action=action,
                )
        finally:
            response.close()
        raise RuntimeUnavailable(f"docker events: Docker at {self.engine.url} ended the stream")

    # --- internals: create -------------------------------------------------------------

    async def _create(self, name: str, body: dict[str, Any], what: str) -> str:
        """Create under ``name``; a stale same-named container of ours is replaced.

        A stale one is left when the agent died between create and start (or a create
        timed out on our side but completed in Docker); a retry must not wedge on it.
        """
        if not _DOCKER_NAME_RE.match(name):
            raise CreateContainerError(f"{what}: {name!r} is not a valid Docker container name")
        for attempt in range(2):
            try:
                return await self.engine.create_container(what, name, body)
            except NotFound as exc:  # 404: the image is not there
                raise CreateContainerError(f"{what}: {exc}") from None
            except EngineError as exc:
                if exc.status != 409 or attempt > 0:
                    raise CreateContainerError(str(exc)) from None
            await self._replace_stale(name, what)
        raise AssertionError("unreachable")

    async def _replace_stale(self, name: str, what: str) -> None:
        try:
            existing = await self.engine.inspect_container(f"{what}: inspect {name}", name)
        except NotFound:
            return  # gone meanwhile; just retry
        labels = existing["Config"].get("Labels") or {}
        short = existing["Id"][:12]
        if labels.get(L.NODE) != self.node_name:
            raise CreateContainerError(
                f"{what}: name {name} is taken by container {short}, which this node "
                f"({self.node_name}) did not create; remove it by hand"
            )
        if existing["State"].get("Running"):
            raise CreateContainerError(
                f"{what}: container {short} named {name} already exists and is running"
            )
        log.warning("removing stale container left by an interrupted create", name=name, id=short)
        await self.remove_container(existing["Id"])

    @staticmethod
    def _bind(host_path: str, container_path: str, read_only: bool, what: str) -> str:
        for label, path in (("host_path", host_path), ("container_path", container_path)):
            if not path or not path.startswith("/"):
                raise CreateContainerError(f"{what}: mount {label} must be absolute, got {path!r}")
            if ":" in path:
                raise CreateContainerError(f"{what}: mount {label} {path!r} may not contain ':'")
        return f"{host_path}:{container_path}" + (":ro" if read_only else "")

    @staticmethod
    def _security(host_config: dict[str, Any], config: ContainerConfig) -> None:
        """The container's Linux security settings, as cri-dockerd passes them."""
        if config.supplemental_groups:
            host_config["GroupAdd"] = [str(int(g)) for g in config.supplemental_groups]
        if config.cap_add:
            host_config["CapAdd"] = list(config.cap_add)
        if config.cap_drop:
            host_config["CapDrop"] = list(config.cap_drop)
        if config.read_only_rootfs:
            host_config["ReadonlyRootfs"] = True
        security_opt: list[str] = []
        if config.no_new_privileges:
            security_opt.append("no-new-privileges")
        if config.seccomp is not None:
            security_opt.append(f"seccomp={config.seccomp}")
        if security_opt:
            host_config["SecurityOpt"] = security_opt
        if config.unmasked_proc:
            host_config["MaskedPaths"] = []
            host_config["ReadonlyPaths"] = []

    async def _verify_non_root(self, config: ContainerConfig, what: str) -> None:
        """kubelet's verifyRunAsNonRoot: without runAsUser, the image's USER decides."""
        if config.run_as_user is not None:
            if int(config.run_as_user) == 0:
                raise ContainerConfigRefused(f"container {config.name!r} has runAsNonRoot and runAsUser 0: "
                                             "it would run as root")
            return
        try:
            info = await self.engine.call(f"{what}: inspect image", "GET", f"images/{config.image}/json")
        except NotFound:
            raise CreateContainerError(f"{what}: image {config.image!r} is not present") from None
        user = str((info.get("Config") or {}).get("User") or "").partition(":")[0]
        if not user or user == "0" or user == "root":
            raise ContainerConfigRefused("container has runAsNonRoot and image will run as root "
                                         f"(container {config.name!r}, image {config.image!r})")
        if not user.isdigit():
            raise ContainerConfigRefused(f"container has runAsNonRoot and image has non-numeric user ({user}), "
                                         f"cannot verify user is non-root (container {config.name!r})")

    @staticmethod
    def _user(uid: int | None, gid: int | None) -> str | None:
        if uid is None and gid is None:
            return None
        user = "" if uid is None else str(int(uid))
        return user if gid is None else f"{user}:{int(gid)}"

    # --- internals: list & status ------------------------------------------------------

    async def _list(
        self,
        docker_type: str | None,
        pod_uid: str | None = None,
        *,
        extra: list[str] | None = None,
        status: str | None = None,
    ) -> list[dict[str, Any]]:
        """``docker ps -a`` of this node's objects: sandboxes, containers or (None) both."""
        label_filters = [f"{L.NODE}={self.node_name}"]
        if docker_type is not None:
            label_filters.append(f"{L.DOCKER_TYPE}={docker_type}")
        if pod_uid is not None:
            label_filters.append(f"{L.POD_UID}={pod_uid}")
        label_filters.extend(extra or [])
        filters: dict[str, list[str]] = {"label": label_filters}
        if status:
            filters["status"] = [status]
        return await self.engine.list_containers(f"list {docker_type or 'pod object'}s", filters)

    async def _relist(self, docker_type: str | None, pod_uid: str | None) -> list[Any]:
        entries = await self._list(docker_type, pod_uid)
        statuses: dict[str, Any] = {}
        stale: list[tuple[str, str, str]] = []
        for entry in entries:
            container_id, state = entry["Id"], entry.get("State", "")
            kind = (entry.get("Labels") or {}).get(L.DOCKER_TYPE) or docker_type or L.TYPE_CONTAINER
            cached = self._status_cache.get(container_id)
            if cached is not None and cached[1] == state and state in _STABLE_STATES:
                statuses[container_id] = cached[2]
            else:
                stale.append((container_id, state, kind))

        async def refresh(container_id: str, state: str, kind: str) -> None:
            try:
                info = await self._inspect(container_id)
            except NotFound:
                return  # removed between the list and the inspect
            build = self._sandbox_status if kind == L.TYPE_SANDBOX else self._container_status
            status = await build(info)  # None (unusable labels) is cached too
            statuses[container_id] = status
            self._status_cache[container_id] = (kind, state, status)

        await _run_all(refresh(*item) for item in stale)
        if pod_uid is None:
            listed = {entry["Id"] for entry in entries}
            for container_id in [cid for cid, (kind, _s, _v) in self._status_cache.items()
                                 if (docker_type is None or kind == docker_type) and cid not in listed]:
                del self._status_cache[container_id]
                self._sandbox_labels.pop(container_id, None)
        # Copies: callers may modify what they get without touching the cache.
        return [_copy_status(statuses[e["Id"]]) for e in entries
                if statuses.get(e["Id"]) is not None]

    async def _inspect(self, container_id: str) -> dict[str, Any]:
        async with self._inspect_slots:
            self.inspect_calls += 1
            return await self.engine.inspect_container(f"inspect container {container_id[:12]}", container_id)

    async def _inspect_own(self, container_id: str, what: str) -> dict[str, Any]:
        """Inspect, treating containers of other nodes (or not ours at all) as missing."""
        info = await self.engine.inspect_container(what, container_id)
        if (info["Config"].get("Labels") or {}).get(L.NODE) != self.node_name:
            raise NotFound(f"{what}: container {container_id[:12]} does not belong to node "
                           f"{self.node_name}")
        return info

    async def _sandbox_status(self, info: dict[str, Any]) -> SandboxStatus | None:
        labels = info["Config"].get("Labels") or {}
        pod = _pod_ref(labels)
        if pod is None:
            log.warning("sandbox without pod labels ignored", id=info["Id"][:12])
            return None
        if labels.get(L.NODE) == self.node_name:
            self._sandbox_labels[info["Id"]] = dict(labels)
        state = info["State"]
        running = bool(state.get("Running"))
        pid = int(state.get("Pid") or 0) if running else 0
        return SandboxStatus(
            id=info["Id"],
            pod=pod,
            attempt=_int_label(labels, L.ATTEMPT),
            state=SandboxState.READY if running else SandboxState.NOTREADY,
            created_at=parse_docker_time(info.get("Created")) or 0.0,
            netns_path=f"/proc/{pid}/ns/net" if pid else None,
            pid=pid or None,
            host_network=labels.get(L.HOST_NETWORK) == "true",
            labels=_json_label(labels, L.POD_LABELS),
            annotations=_json_label(labels, L.POD_ANNOTATIONS),
        )

    async def _container_status(self, info: dict[str, Any]) -> ContainerStatus | None:
        labels = info["Config"].get("Labels") or {}
        pod = _pod_ref(labels)
        if pod is None:
            log.warning("container without pod labels ignored", id=info["Id"][:12])
            return None
        state = info["State"]
        docker_state = state.get("Status", "")
        created = parse_docker_time(info.get("Created")) or 0.0
        started = parse_docker_time(state.get("StartedAt"))
        finished = parse_docker_time(state.get("FinishedAt"))
        exit_code: int | None = None
        if state.get("Running") or docker_state in ("running", "paused"):
            runtime_state, finished = ContainerState.RUNNING, None
        elif finished is not None:
            runtime_state, exit_code = ContainerState.EXITED, int(state.get("ExitCode", 0))
        elif int(state.get("ExitCode") or 0) != 0:
            # The process never ran (bad command): report it exited at creation time,
            # with Docker's error as the message, like dockershim did.
            runtime_state, exit_code = ContainerState.EXITED, int(state["ExitCode"])
            started = finished = created
        elif docker_state == "created":
            runtime_state = ContainerState.CREATED
        else:
            runtime_state = ContainerState.UNKNOWN
        requested_image = info["Config"].get("Image", "")
        return ContainerStatus(
            id=info["Id"],
            pod=pod,
            name=labels.get(L.CONTAINER_NAME, ""),
            attempt=_int_label(labels, L.ATTEMPT),
            state=runtime_state,
            image=requested_image,
            image_id=await self._image_ref(info.get("Image", ""), requested_image),
            created_at=created,
            started_at=started,
            finished_at=finished,
            exit_code=exit_code,
            oom_killed=bool(state.get("OOMKilled")),
            error=str(state.get("Error") or ""),
            spec_hash=labels.get(L.SPEC_HASH, ""),
            kind=labels.get(L.KIND, "app"),
            sandbox_id=labels.get(L.SANDBOX_ID, ""),
            labels=dict(labels),
        )

    async def _image_ref(self, image_id: str, requested: str) -> str:
        """kubelet's imageID: ``docker-pullable://repo@sha256:…`` or ``docker://sha256:…``."""
        if not image_id:
            return ""
        now = time.monotonic()
        cached = self._image_cache.get(image_id)
        if cached is not None and cached[0] > now:
            digests = cached[1]
        else:
            try:
                info = await self.engine.inspect_image(f"inspect image {image_id[:19]}", image_id)
                digests = list(info.get("RepoDigests") or [])
            except NotFound:
                digests = []
            self._image_cache.pop(image_id, None)
            self._image_cache[image_id] = (now + _IMAGE_CACHE_TTL, digests)
            if len(self._image_cache) > _IMAGE_CACHE_MAX:
                for key in [k for k, (expires, _d) in self._image_cache.items() if expires <= now]:
                    del self._image_cache[key]
                while len(self._image_cache) > _IMAGE_CACHE_MAX:
                    del self._image_cache[next(iter(self._image_cache))]
        if not digests:
            return f"docker://{image_id}"
        return f"docker-pullable://{_matching_digest(digests, requested)}"


def _demultiplex(stream: bytes, limit: int) -> bytes:
    """stdout and stderr of a non-TTY attach stream (8-byte frame headers: stream
    type, 3 zero bytes, big-endian length), in arrival order, at most ``limit`` bytes."""
    data = bytearray()
    i = 0
    while i + 8 <= len(stream) and len(data) < limit:
        size = int.from_bytes(stream[i + 4:i + 8], "big")
        data += stream[i + 8:i + 8 + size]
        i += 8 + size
    return bytes(data[:limit])


def _copy_status(status: Any) -> Any:
    duplicate = copy.copy(status)
    duplicate.labels = dict(status.labels)
    if isinstance(status, SandboxStatus):
        duplicate.annotations = dict(status.annotations)
    return duplicate


def _running(entry: dict[str, Any]) -> bool:
    """A ``docker ps`` entry whose process is alive (it will leave its network)."""
    return entry.get("State") in ("running", "restarting", "paused")


async def _run_all(coros: Iterable[Coroutine[Any, Any, None]]) -> None:
    """Run concurrently; on failure the others are cancelled and the first error is
    raised as itself (callers catch RuntimeError_ subclasses, not ExceptionGroups)."""
    try:
        async with asyncio.TaskGroup() as tg:
            for coro in coros:
                tg.create_task(coro)
    except BaseExceptionGroup as group:
        raise _first_leaf(group) from None


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def _matching_digest(digests: list[str], requested: str) -> str:
    """The repo digest of the repository the container asked for, else the first."""
    try:
        wanted = parse_image_ref(requested).normalized().name
    except ImageError:
        return digests[0]
    for digest in digests:
        try:
            if parse_image_ref(digest).normalized().name == wanted:
                return digest
        except ImageError:
            continue
    return digests[0]


__all__ = [
    "DockerRuntime",
    "StartContainerError",
    "container_name",
    "sandbox_name",
]
