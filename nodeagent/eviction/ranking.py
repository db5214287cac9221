"""The order pods are evicted in, per resource, as kubelet ranks them:

* memory: pods using more than they request first, then lower priority first, then
  the most usage above the request;
* ephemeral storage (nodefs/imagefs): the same, over ephemeral-storage requests;
* pids: lower priority first, then the most processes.

Static pods, mirror pods and pods at system-critical priority (≥ 2000000000) are
critical: never evicted (kubelet's ``IsCriticalPod``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

from nodeagent.api.podspec import effective_requests

SYSTEM_CRITICAL_PRIORITY = 2_000_000_000
MEMORY, EPHEMERAL_STORAGE, PIDS = "memory", "ephemeral-storage", "pids"


@dataclass(frozen=True)
class ContainerUsage:
    memory: int = 0  # working set, bytes
    disk: int = 0  # writable layer + logs, bytes
    processes: int = 0


@dataclass
class PodUsageStats:
    containers: dict[str, ContainerUsage] = field(default_factory=dict)
    volumes_disk: int = 0  # emptyDir bytes (counted towards ephemeral storage)

    def total(self, resource: str) -> int:
        if resource == MEMORY:
            return sum(c.memory for c in self.containers.values())
        if resource == EPHEMERAL_STORAGE:
            return sum(c.disk for c in self.containers.values()) + self.volumes_disk
        return sum(c.processes for c in self.containers.values())


def is_critical(pod: dict) -> bool:
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    if annotations.get("kubernetes.io/config.source", "api") != "api":
        return True  # a static pod
    if "kubernetes.io/config.mirror" in annotations:
        return True
    priority = (pod.get("spec") or {}).get("priority")
    return isinstance(priority, int) and priority >= SYSTEM_CRITICAL_PRIORITY


def container_request(container: dict, resource: str) -> int:
    try:
        return int(effective_requests(container).get(resource, Decimal(0)))
    except Exception:  # validated already; never let ranking fail on one pod
        return 0


def pod_request(pod: dict, resource: str) -> int:
    return sum(container_request(c, resource) for c in (pod.get("spec") or {}).get("containers") or [])


def _priority(pod: dict) -> int:
    value = (pod.get("spec") or {}).get("priority")
    return value if isinstance(value, int) else 0


def rank(pods: list[dict], usage: dict[str, PodUsageStats], resource: str) -> list[dict]:
    """Candidates for eviction, first to go first (critical pods left out)."""
    def key(pod: dict):
        stats = usage.get(pod["metadata"]["uid"]) or PodUsageStats()
        used = stats.total(resource)
        if resource == PIDS:
            return (_priority(pod), -used)
        over = used - pod_request(pod, resource)
        return (0 if over > 0 else 1, _priority(pod), -over)
    return sorted((p for p in pods if not is_critical(p)), key=key)


def format_bytes(amount: int) -> str:
    for unit, size in (("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if amount >= size:
            return f"{amount // size}{unit}"
    return str(amount)


def eviction_message(pod: dict, stats: PodUsageStats | None, resource: str,
                     threshold: str, available: str) -> str:
    """kubelet's wording: node low on a resource, the threshold, and each container
    that used more than it requested."""
    message = (f"The node was low on resource: {resource}. "
               f"Threshold quantity: {threshold}, available: {available}. ")
    for container in (pod.get("spec") or {}).get("containers") or []:
        used_stats = (stats.containers.get(container["name"]) if stats else None) or ContainerUsage()
        used = {MEMORY: used_stats.memory, EPHEMERAL_STORAGE: used_stats.disk,
                PIDS: used_stats.processes}[resource]
        request = container_request(container, resource) if resource != PIDS else 0
        if used > request:
            shown = str(used) if resource == PIDS else format_bytes(used)
            shown_request = str(request) if resource == PIDS or request == 0 else format_bytes(request)
            message += (f"Container {container['name']} was using {shown}, request is "
                        f"{shown_request}, has larger consumption of {resource}. ")
    return message.strip()
