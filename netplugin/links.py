"""Small netlink helpers shared by the host (bridge, host veths) and pod sides.

Each takes the ``AsyncIPRoute`` of the namespace it works in, so the same helper serves
the host namespace and a pod namespace (see ``nsnetlink.NetnsRoute``).
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

IFF_UP = 0x1
RT_TABLE_MAIN = 254


@dataclass(frozen=True)
class LinkInfo:
    index: int
    name: str
    kind: str | None
    up: bool  # administratively up (IFF_UP)
    master: int | None  # the bridge's ifindex, for a bridge port
    peer_index: int | None  # IFLA_LINK: a veth's peer ifindex, in the peer's namespace
    peer_netnsid: int | None  # IFLA_LINK_NETNSID: the peer's namespace, as seen from here
    mtu: int
    mac: str | None


def link_info(msg: Any) -> LinkInfo:
    return LinkInfo(
        index=msg["index"],
        name=msg.get("ifname"),
        kind=msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND"),
        up=bool(msg["flags"] & IFF_UP),
        master=msg.get("master"),
        peer_index=msg.get("link"),
        peer_netnsid=msg.get("link_netnsid"),
        mtu=msg.get("mtu"),
        mac=msg.get("address"),
    )


def is_gone(exc: NetlinkError) -> bool:
    """The object the request named does not exist (any more)."""
    return exc.code in (errno.ENODEV, errno.ENOENT)


async def get_link(ipr: AsyncIPRoute, ifname: str) -> LinkInfo | None:
    """The link called ``ifname`` in ``ipr``'s namespace, or None."""
    try:
        msgs = await ipr.link("get", ifname=ifname)
    except NetlinkError as exc:
        if is_gone(exc):
            return None
        raise
    return link_info(msgs[0]) if msgs else None


async def list_links(ipr: AsyncIPRoute) -> list[LinkInfo]:
    return [link_info(msg) async for msg in await ipr.link("dump")]


async def delete_link(ipr: AsyncIPRoute, *, index: int | None = None, ifname: str | None = None) -> bool:
    """Delete a link by index or name; False when it was already gone."""
    try:
        if index is not None:
            await ipr.link("del", index=index)
        else:
            await ipr.link("del", ifname=ifname)
    except NetlinkError as exc:
        if is_gone(exc):
            return False
        raise
    return True


async def set_up(ipr: AsyncIPRoute, link: LinkInfo) -> None:
    if not link.up:
        await ipr.link("set", index=link.index, state="up")


async def ipv4_addresses(ipr: AsyncIPRoute, index: int) -> tuple[tuple[str, int], ...]:
    """(address, prefix_len) of every IPv4 address on the link, sorted."""
    found = []
    async for msg in await ipr.addr("dump", family=socket.AF_INET, index=index):
        if msg["index"] == index:
            found.append((msg.get("address"), msg["prefixlen"]))
    return tuple(sorted(found))


async def default_gateway(ipr: AsyncIPRoute) -> str | None:
    """The gateway of the IPv4 default route in the main table, if any."""
    async for msg in await ipr.route("dump", family=socket.AF_INET, table=RT_TABLE_MAIN):
        if msg["dst_len"] == 0 and msg.get("table") == RT_TABLE_MAIN and msg.get("gateway"):
            return msg.get("gateway")
    return None
