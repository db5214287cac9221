"""Docker label keys the shim writes on every object it creates.

The whole pod/container state is rebuilt from these labels after a restart, so the
keys are part of the on-disk format: change them only with a migration.
"""

from __future__ import annotations

POD_NAME = "io.kubernetes.pod.name"
POD_NAMESPACE = "io.kubernetes.pod.namespace"
POD_UID = "io.kubernetes.pod.uid"
CONTAINER_NAME = "io.kubernetes.container.name"
DOCKER_TYPE = "io.kubernetes.docker.type"
ATTEMPT = "io.kubernetes.container.attempt"
SPEC_HASH = "io.kubernetes.container.hash"
SANDBOX_ID = "io.kubernetes.sandbox.id"

# nodeagent's own keys.
KIND = "io.nodeagent.kind"  # init | sidecar | app (sandboxes: "sandbox")
NODE = "io.nodeagent.node"  # owning agent; every list and event query filters on it
POD_LABELS = "io.nodeagent.pod.labels"  # JSON object (sandboxes only)
POD_ANNOTATIONS = "io.nodeagent.pod.annotations"  # JSON object (sandboxes only)
SHARE_PID = "io.nodeagent.share-pid"  # "true" | "false" (sandboxes only)
HOST_NETWORK = "io.nodeagent.host-network"  # "true" | "false" (sandboxes only)
HOST_PID = "io.nodeagent.host-pid"  # "true" | "false" (sandboxes only)
HOST_IPC = "io.nodeagent.host-ipc"  # "true" | "false" (sandboxes only)
# The pod's cgroup parent, applied to the sandbox and to every container created in it.
CGROUP_PARENT = "io.nodeagent.cgroup-parent"  # (sandboxes only; absent = Docker's default)

TYPE_SANDBOX = "podsandbox"
TYPE_CONTAINER = "container"
SANDBOX_CONTAINER_NAME = "POD"
KIND_SANDBOX = "sandbox"
CONTAINER_KINDS = frozenset({"init", "sidecar", "app"})

# Keys a ContainerConfig.labels entry may not override.
RESERVED = frozenset(
    {
        POD_NAME,
        POD_NAMESPACE,
        POD_UID,
        CONTAINER_NAME,
        DOCKER_TYPE,
        ATTEMPT,
        SPEC_HASH,
        SANDBOX_ID,
        KIND,
        NODE,
        POD_LABELS,
        POD_ANNOTATIONS,
        SHARE_PID,
        HOST_NETWORK,
        HOST_PID,
        HOST_IPC,
        CGROUP_PARENT,
    }
)
