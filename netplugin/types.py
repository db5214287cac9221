"""The pod network's contract with the kubelet side (think CNI ADD/DEL)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol


class NetworkError(Exception):
    """Setting up or tearing down a pod's network failed."""


@dataclass(frozen=True)
class PodNetworkStatus:
    ip: str  # the pod's IPv4 address
    gateway: str
    prefix_len: int
    interface: str = "eth0"


@dataclass(frozen=True)
class SandboxNetns:
    """A running sandbox as the runtime reports it: its pod (from the sandbox's
    labels) and the path of its network namespace. The plugin reads the addresses
    on that namespace's eth0 itself."""

    pod_uid: str
    netns_path: str


# The runtime's view the kubelet side passes in: every running, non-host-network
# sandbox of this node. The pod network uses it to heal a damaged IPAM store; it never
# talks to the runtime itself.
RuntimeView = Callable[[], Awaitable[list[SandboxNetns]]]


class PodNetwork(Protocol):
    async def start(self) -> None:
        """Create/verify the node bridge and IPAM store; idempotent."""

    async def reserve(self, pod_uid: str) -> PodNetworkStatus:
        """Allocate the pod's address (idempotent) before its sandbox runs."""

    async def setup_pod(self, pod_uid: str, netns_path: str) -> PodNetworkStatus:
        """Give the pod an eth0 with an address; idempotent (re-running returns the
        same address and does not create a second interface)."""

    async def teardown_pod(self, pod_uid: str, netns_path: str | None) -> None:
        """Remove the pod's veth and release its address; idempotent."""

    async def pod_status(self, pod_uid: str) -> PodNetworkStatus | None:
        """The pod's allocation as IPAM recorded it, if any."""

    async def garbage_collect(self, live_pod_uids: set[str]) -> list[str]:
        """Release addresses and veths of pods not in ``live_pod_uids``; returns the
        released pod uids."""
