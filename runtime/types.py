"""The runtime shim's contract with the kubelet side (think CRI, minus gRPC).

The kubelet side speaks only these types. The Docker implementation lives in
``runtime.docker``; nothing here knows about the Kubernetes API or about Docker.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol


class RuntimeError_(Exception):
    """Base class for runtime failures the kubelet side reacts to."""


class RuntimeUnavailable(RuntimeError_):
    """The engine cannot be reached (socket gone, daemon down)."""


class RuntimeTimeout(RuntimeError_):
    """A runtime call did not finish within its deadline."""


class NotFound(RuntimeError_):
    """The sandbox, container or image does not exist."""


class ImageError(RuntimeError_):
    """Base for image failures; ``reason`` is the kubelet waiting reason."""

    reason = "ErrImagePull"


class ImagePullError(ImageError):
    reason = "ErrImagePull"


class ImageNeverPull(ImageError):
    reason = "ErrImageNeverPull"


class InvalidImageName(ImageError):
    reason = "InvalidImageName"


class CreateContainerError(RuntimeError_):
    """The engine refused to create the container (bad config, missing mount...)."""

    reason = "CreateContainerError"


class ContainerConfigRefused(CreateContainerError):
    """The shim refused the config before asking the engine (e.g. runAsNonRoot with an
    image that runs as root): kubelet's CreateContainerConfigError."""

    reason = "CreateContainerConfigError"


class ContainerState(str, enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    EXITED = "exited"
    UNKNOWN = "unknown"


class SandboxState(str, enum.Enum):
    READY = "ready"
    NOTREADY = "notready"


class PullPolicy(str, enum.Enum):
    ALWAYS = "Always"
    IF_NOT_PRESENT = "IfNotPresent"
    NEVER = "Never"


@dataclass(frozen=True)
class PodRef:
    """Identity of a pod as the runtime records it in names and labels."""

    name: str
    namespace: str
    uid: str


@dataclass
class Mount:
    host_path: str
    container_path: str
    read_only: bool = False


@dataclass
class Resources:
    """Linux resources already converted from Kubernetes quantities."""

    cpu_shares: int | None = None  # cgroup cpu.shares (2..262144)
    cpu_quota: int | None = None  # microseconds per period; None = unlimited
    cpu_period: int | None = None  # microseconds (kubelet uses 100000)
    memory_limit: int | None = None  # bytes; None = unlimited
    oom_score_adj: int | None = None


@dataclass
class SandboxConfig:
    pod: PodRef
    attempt: int
    hostname: str
    host_network: bool = False
    share_process_namespace: bool = False
    # The host's PID / IPC namespaces (hostPID, hostIPC) for the sandbox and every
    # container of the pod.
    host_pid: bool = False
    host_ipc: bool = False
    # Kubernetes labels/annotations of the pod, copied onto the sandbox so a relist
    # can rebuild what the pod looked like without the API.
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    dns_servers: list[str] = field(default_factory=list)
    dns_searches: list[str] = field(default_factory=list)
    cgroup_parent: str | None = None
    # Namespaced sysctls (net.*, kernel.shm*...) set in the sandbox's namespaces, which
    # every container of the pod joins.
    sysctls: dict[str, str] = field(default_factory=dict)
    # Published by the kubelet side for hostPort bookkeeping, never used by Docker here.
    port_mappings: list[dict] = field(default_factory=list)


@dataclass
class ContainerConfig:
    name: str
    image: str
    attempt: int
    # Final argv pieces after Kubernetes command/args semantics and $(VAR) expansion:
    # entrypoint overrides the image ENTRYPOINT when not None, cmd overrides CMD.
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    env: dict[str, str] = field(default_factory=dict)
    working_dir: str | None = None
    mounts: list[Mount] = field(default_factory=list)
    resources: Resources = field(default_factory=Resources)
    spec_hash: str = ""
    stop_signal: str | None = None
    termination_grace_period: int = 30
    tty: bool = False
    stdin: bool = False
    # Close stdin when the first attached client leaves (the spec's stdinOnce).
    stdin_once: bool = False
    privileged: bool = False
    run_as_user: int | None = None
    run_as_group: int | None = None
    # Refuse to create when the process would run as uid 0 (the image's USER counts
    # when run_as_user is None).
    run_as_non_root: bool = False
    supplemental_groups: list[int] = field(default_factory=list)
    # Capability names with the CAP_ prefix, or "ALL"; applied to the engine's default
    # set: drop first, then add.
    cap_add: list[str] = field(default_factory=list)
    cap_drop: list[str] = field(default_factory=list)
    read_only_rootfs: bool = False
    no_new_privileges: bool = False
    # None: the engine's default seccomp profile; "unconfined"; else a profile's JSON.
    seccomp: str | None = None
    # No masked or read-only paths in /proc (procMount: Unmasked).
    unmasked_proc: bool = False
    # Extra labels (e.g. io.kubernetes.container.restartCount) written verbatim.
    labels: dict[str, str] = field(default_factory=dict)
    # "init" | "sidecar" | "app": which list of the pod spec this container came from.
    kind: str = "app"


@dataclass
class SandboxStatus:
    id: str
    pod: PodRef
    attempt: int
    state: SandboxState
    created_at: float  # unix seconds
    # Path of the sandbox's network namespace (/proc/<pid>/ns/net) while it runs.
    netns_path: str | None = None
    pid: int | None = None
    host_network: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass
class ContainerStatus:
    id: str
    pod: PodRef
    name: str
    attempt: int
    state: ContainerState
    image: str  # as requested in the spec
    image_id: str  # "docker-pullable://repo@sha256:..." or "docker://sha256:..."
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    oom_killed: bool = False
    # Docker's error text when the process could not start (ContainerCannotRun).
    error: str = ""
    # The termination message of an exited container (CRI's ContainerStatus.message),
    # filled in by the kubelet side from the container's terminationMessagePath file.
    message: str = ""
    spec_hash: str = ""
    kind: str = "app"
    sandbox_id: str = ""
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def container_id(self) -> str:
        return f"docker://{self.id}"


@dataclass
class RuntimeEvent:
    """A container or sandbox changed; the kubelet side re-syncs the pod."""

    pod_uid: str
    container_id: str
    action: str  # docker action: start, die, oom, destroy, ... or RESYNC_ACTION


# An event that could not be read (over-long or malformed): the consumer relists.
RESYNC_ACTION = "resync"


class RuntimeService(Protocol):
    """What the kubelet side needs from a container runtime.

    Every method has its own deadline and raises RuntimeTimeout past it, so one hung
    engine call affects only the pod whose worker made it.
    """

    async def version(self) -> str:
        """``docker://<engine version>``; raises RuntimeUnavailable when down."""

    async def run_pod_sandbox(self, config: SandboxConfig, image: str) -> str: ...

    async def create_pod_sandbox(self, config: SandboxConfig, image: str) -> str:
        """Create the sandbox without starting it (start it with ``start_container``);
        containers can be created in it meanwhile."""

    async def sandbox_status(self, sandbox_id: str) -> SandboxStatus: ...

    async def list_pod(self, pod_uid: str) -> tuple[list[SandboxStatus], list[ContainerStatus]]:
        """The pod's sandboxes and containers in one look."""

    async def stop_pod_sandbox(self, sandbox_id: str, timeout: int = 10) -> None: ...

    async def remove_pod_sandbox(self, sandbox_id: str) -> None: ...

    async def list_pod_sandboxes(self, pod_uid: str | None = None) -> list[SandboxStatus]: ...

    async def create_container(
        self, sandbox: SandboxStatus, config: ContainerConfig
    ) -> str: ...

    async def start_container(self, container_id: str) -> None: ...

    async def stop_container(self, container_id: str, timeout: int) -> None: ...

    async def remove_container(self, container_id: str) -> None: ...

    async def list_containers(self, pod_uid: str | None = None) -> list[ContainerStatus]: ...

    async def container_status(self, container_id: str) -> ContainerStatus: ...

    async def exec_sync(self, container_id: str, cmd: list[str], timeout: float) -> tuple[int, bytes]:
        """Run ``cmd`` in the running container: (exit code, output); RuntimeTimeout past
        ``timeout``, NotFound when the container is not running (CRI's ExecSync)."""

    def events(self) -> AsyncIterator[RuntimeEvent]:
        """Container lifecycle events for containers this shim created."""
        ...


class ImageService(Protocol):
    async def image_present(self, image: str) -> str | None:
        """The image ID when the image is local, else None."""

    async def ensure_image(self, image: str, policy: PullPolicy) -> str:
        """Return the image ID, pulling per policy; raises an ImageError subclass."""
