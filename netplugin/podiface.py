"""What the pod sees: its eth0, lo and default route, read and written over netlink
inside the pod's network namespace (an ``AsyncIPRoute`` from ``nsnetlink.NetnsRoute``)."""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from netplugin.links import LinkInfo, default_gateway, get_link, ipv4_addresses, set_up

POD_IFNAME = "eth0"
LOOPBACK_IFINDEX = 1  # the kernel gives every namespace's lo ifindex 1


@dataclass(frozen=True)
class PodNetnsState:
    eth0: LinkInfo | None
    eth0_ipv4: tuple[tuple[str, int], ...]  # (address, prefix_len) on eth0
    lo_up: bool
    default_gateway: str | None


async def inspect_pod_netns(ipr: AsyncIPRoute) -> PodNetnsState:
    eth0 = await get_link(ipr, POD_IFNAME)
    lo = await get_link(ipr, "lo")
    return PodNetnsState(
        eth0=eth0,
        eth0_ipv4=await ipv4_addresses(ipr, eth0.index) if eth0 else (),
        lo_up=bool(lo and lo.up),
        default_gateway=await default_gateway(ipr),
    )


async def configure_pod_interface(
    ipr: AsyncIPRoute, *, ip: str, prefix_len: int, gateway: str
) -> None:
    """Make eth0 carry exactly ``ip/prefix_len``, bring lo and eth0 up, and route
    everything via ``gateway``. Idempotent: only what is missing or wrong is changed,
    so it also finishes a setup that was interrupted half-way."""
    eth0 = await get_link(ipr, POD_IFNAME)
    if eth0 is None:
        raise LookupError(f"{POD_IFNAME} vanished from the pod namespace during setup")
    present = await ipv4_addresses(ipr, eth0.index)
    for address, prefix in present:
        if (address, prefix) != (ip, prefix_len):
            # A leftover from an earlier allocation would make the pod answer on two
            # addresses and pick the wrong source address.
            await ipr.addr("del", index=eth0.index, address=address, prefixlen=prefix)
    if (ip, prefix_len) not in present:
        try:
            await ipr.addr("add", index=eth0.index, address=ip, prefixlen=prefix_len)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
    lo = await get_link(ipr, "lo")
    if lo is not None:
        await set_up(ipr, lo)
    await set_up(ipr, eth0)
    if await default_gateway(ipr) != gateway:
        # Replace rather than add: a runtime may have left some default route behind.
        await ipr.route(
            "replace", family=socket.AF_INET, dst="0.0.0.0/0", gateway=gateway, oif=eth0.index
        )


async def configure_new_pod_interface(
    ipr: AsyncIPRoute, *, eth0_index: int, ip: str, prefix_len: int, gateway: str
) -> None:
    """``configure_pod_interface`` for an eth0 that was created a moment ago: nothing
    can be there yet, so add without looking first (4 requests instead of 9)."""
    await ipr.addr("add", index=eth0_index, address=ip, prefixlen=prefix_len)
    await ipr.link("set", index=LOOPBACK_IFINDEX, state="up")
    await ipr.link("set", index=eth0_index, state="up")
    await ipr.route(
        "replace", family=socket.AF_INET, dst="0.0.0.0/0", gateway=gateway, oif=eth0_index
    )
