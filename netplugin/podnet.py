"""What the pod sees: its eth0, lo and default route, read and written over netlink
inside the pod's network namespace (an ``AsyncIPRoute`` from ``NetnsRoute``)."""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

IFF_UP = 0x1
RT_TABLE_MAIN = 254
POD_IFNAME = "eth0"


@dataclass(frozen=True)
class LinkInfo:
    index: int
    name: str
    kind: str | None
    up: bool  # administratively up (IFF_UP)
    master: int | None  # bridge index for a bridge port
    peer_index: int | None  # IFLA_LINK: a veth's peer ifindex (in the peer's namespace)
    mtu: int
    mac: str | None


@dataclass(frozen=True)
class PodNetnsState:
    eth0: LinkInfo | None
    eth0_ipv4: tuple[tuple[str, int], ...]  # (address, prefix_len) on eth0
    lo_up: bool
    default_gateway: str | None


def link_info(msg: Any) -> LinkInfo:
    return LinkInfo(
        index=msg["index"],
        name=msg.get("ifname"),
        kind=msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND"),
        up=bool(msg["flags"] & IFF_UP),
        master=msg.get("master"),
        peer_index=msg.get("link"),
        mtu=msg.get("mtu"),
        mac=msg.get("address"),
    )


async def get_link(ipr: AsyncIPRoute, ifname: str) -> LinkInfo | None:
    """The link called ``ifname`` in ``ipr``'s namespace, or None."""
    try:
        msgs = await ipr.link("get", ifname=ifname)
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return None
        raise
    return link_info(msgs[0]) if msgs else None


async def delete_link(ipr: AsyncIPRoute, index: int) -> bool:
    """Delete a link; False when it was already gone."""
    try:
        await ipr.link("del", index=index)
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return False
        raise
    return True


async def ipv4_addresses(ipr: AsyncIPRoute, index: int) -> tuple[tuple[str, int], ...]:
    found = []
    async for msg in await ipr.addr("dump", family=socket.AF_INET, index=index):
        if msg["index"] == index:
            found.append((msg.get("address"), msg["prefixlen"]))
    return tuple(sorted(found))


async def default_gateway(ipr: AsyncIPRoute) -> str | None:
    async for msg in await ipr.route("dump", family=socket.AF_INET):
        if msg["dst_len"] == 0 and msg.get("table") == RT_TABLE_MAIN and msg.get("gateway"):
            return msg.get("gateway")
    return None


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
    """Address eth0, bring lo and eth0 up, route everything via the gateway."""
    eth0 = await get_link(ipr, POD_IFNAME)
    if eth0 is None:
        raise LookupError(f"{POD_IFNAME} vanished from the pod namespace during setup")
    await ipr.addr("add", index=eth0.index, address=ip, prefixlen=prefix_len)
    lo = await get_link(ipr, "lo")
    if lo is not None and not lo.up:
        await ipr.link("set", index=lo.index, state="up")
    await ipr.link("set", index=eth0.index, state="up")
    # Replace rather than add: a runtime may have left some default route behind.
    await ipr.route("replace", dst="0.0.0.0/0", gateway=gateway, oif=eth0.index)
