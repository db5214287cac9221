"""hostPorts: kubelet's (CNI portmap's) job, in standalone and in cluster mode alike.

The mappings are derived from the node's pods (running, not host-network, with an
address) and handed to the service proxy, which owns the node's nft table and programs
the DNAT. Pod changes are coalesced, and the proxy is told only when the set of
mappings actually changed (each call costs it a sync).
"""

from __future__ import annotations

import asyncio
from typing import Callable, Protocol

from netplugin.proxy import HostPortMapping


class HostPortSink(Protocol):
    def set_host_ports(self, mappings: list[HostPortMapping]) -> None: ...


def host_port_mappings(pods: list[dict]) -> list[HostPortMapping]:
    """hostPort DNAT entries for running, non-host-network pods with an address."""
    mappings = []
    for pod in pods:
        status = pod.get("status") or {}
        ip = status.get("podIP")
        if not ip or pod["spec"].get("hostNetwork") or status.get("phase") != "Running":
            continue
        for container in pod["spec"].get("containers") or ():
            for port in container.get("ports") or ():
                if port.get("hostPort"):
                    mappings.append(HostPortMapping(
                        port.get("protocol", "TCP"), int(port["hostPort"]), ip,
                        int(port["containerPort"]), host_ip=port.get("hostIP") or None,
                    ))
    return mappings


class HostPortFeed:
    def __init__(self, proxy: HostPortSink, *, pods: Callable[[], list[dict]],
                 coalesce: float = 0.05) -> None:
        self._proxy = proxy
        self._pods = pods
        self._coalesce = coalesce
        self._dirty = asyncio.Event()
        self._dirty.set()  # the first pass clears whatever an earlier run left
        self._last: list[HostPortMapping] | None = None

    def pods_changed(self) -> None:
        self._dirty.set()

    def recompute(self) -> bool:
        """Hand the current mappings to the proxy if they changed; returns whether."""
        mappings = host_port_mappings(self._pods())
        if mappings == self._last:
            return False
        self._last = mappings
        self._proxy.set_host_ports(mappings)
        return True

    async def run(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            self.recompute()
            await asyncio.sleep(self._coalesce)  # coalesce bursts of pod updates
