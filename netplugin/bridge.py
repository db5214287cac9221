"""The node's pod bridge and the host ends of the pods' veth pairs (host namespace)."""

from __future__ import annotations

import errno
import hashlib
from ipaddress import IPv4Address

import structlog
from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from netplugin.links import LinkInfo, get_link, ipv4_addresses, list_links, set_up
from netplugin.types import NetworkError

log = structlog.get_logger(__name__)

IFNAMSIZ = 15  # usable bytes of a Linux interface name
HOST_VETH_PREFIX = "nav"  # "node agent veth"; GC only ever touches names of this shape
_HOST_VETH_HASH_LEN = IFNAMSIZ - len(HOST_VETH_PREFIX)


def validate_bridge_name(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise NetworkError(f"bridge_name must be a non-empty string, got {name!r}")
    if len(name.encode()) > IFNAMSIZ:
        raise NetworkError(f"bridge_name {name!r} is longer than {IFNAMSIZ} bytes (Linux IFNAMSIZ)")
    if name in (".", "..") or any(c in name for c in "/: \t\n\0"):
        raise NetworkError(f"bridge_name {name!r} is not a valid interface name")
    return name


def host_veth_name(bridge_name: str, pod_uid: str) -> str:
    """Deterministic host-side veth name for a pod, <= 15 chars.

    Derived from the pod uid so a restarted agent finds (and can clean up) the veth of a
    pod without any state of its own; the bridge name is mixed in so two node agents on
    one machine (tests) never fight over a name.
    """
    digest = hashlib.sha256(f"{bridge_name}/{pod_uid}".encode()).hexdigest()
    return HOST_VETH_PREFIX + digest[:_HOST_VETH_HASH_LEN]


def looks_like_host_veth(name: str) -> bool:
    suffix = name[len(HOST_VETH_PREFIX):]
    return (
        name.startswith(HOST_VETH_PREFIX)
        and len(suffix) == _HOST_VETH_HASH_LEN
        and all(c in "0123456789abcdef" for c in suffix)
    )


def bridge_mac(bridge_name: str) -> str:
    """A fixed, locally administered unicast MAC for the bridge.

    Without an explicit address a Linux bridge takes the lowest MAC of its ports, so it
    would change whenever a pod comes or goes and every pod's ARP entry for the gateway
    would go stale for a while.
    """
    digest = hashlib.sha256(f"nodeagent-bridge/{bridge_name}".encode()).digest()
    octets = [0x02, *digest[:5]]
    return ":".join(f"{o:02x}" for o in octets)


async def ensure_bridge(
    ipr: AsyncIPRoute, name: str, gateway: IPv4Address, prefix_len: int
) -> LinkInfo:
    """Create or verify the bridge: a bridge, carrying ``gateway/prefix_len``, up.

    A bridge that carries some other IPv4 address (left by an agent that ran with
    another pod CIDR) is re-addressed only when that is provably safe: it is ours (it
    has the MAC ``bridge_mac`` gives every bridge this plugin creates) and no port is
    attached (no pod of the old CIDR can lose its network). Otherwise it is refused,
    and the error names the ports and the command that removes the bridge.
    """
    bridge = await get_link(ipr, name)
    if bridge is None:
        try:
            await ipr.link("add", ifname=name, kind="bridge", address=bridge_mac(name))
            log.info("pod bridge created", bridge=name)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:  # EEXIST: another starter won the race
                raise NetworkError(f"bridge {name!r}: cannot create: {exc}") from exc
        bridge = await get_link(ipr, name)
        if bridge is None:
            raise NetworkError(f"bridge {name!r} vanished right after it was created")
    if bridge.kind != "bridge":
        raise NetworkError(
            f"bridge_name {name!r} names an existing {bridge.kind or 'non-bridge'} link, not a bridge"
        )
    wanted = (str(gateway), prefix_len)
    present = await ipv4_addresses(ipr, bridge.index)
    foreign = [f"{a}/{p}" for a, p in present if (a, p) != wanted]
    if foreign:
        await _readdress_or_refuse(ipr, bridge, foreign, gateway, prefix_len)
    if wanted not in present:
        try:
            await ipr.addr("add", index=bridge.index, address=str(gateway), prefixlen=prefix_len)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise NetworkError(f"bridge {name!r}: cannot add {gateway}/{prefix_len}: {exc}") from exc
    await set_up(ipr, bridge)
    return bridge


async def _readdress_or_refuse(
    ipr: AsyncIPRoute, bridge: LinkInfo, foreign: list[str], gateway: IPv4Address, prefix_len: int
) -> None:
    name = bridge.name
    ours = (bridge.mac or "").lower() == bridge_mac(name)
    ports = sorted(link.name for link in await list_links(ipr) if link.master == bridge.index)
    if ours and not ports:
        for cidr in foreign:
            address, prefix = cidr.split("/")
            try:
                await ipr.addr("del", index=bridge.index, address=address, prefixlen=int(prefix))
            except NetlinkError as exc:
                if exc.code != errno.EADDRNOTAVAIL:  # someone removed it meanwhile
                    raise NetworkError(f"bridge {name!r}: cannot remove {cidr}: {exc}") from exc
        log.warning("pod bridge re-addressed for the new pod CIDR", bridge=name,
                    removed=foreign, gateway=f"{gateway}/{prefix_len}")
        return
    if not ours:
        why = "it was not created by nodeagent (its MAC is not ours)"
    else:
        shown = ", ".join(ports[:5]) + (f" and {len(ports) - 5} more" if len(ports) > 5 else "")
        why = f"pods of the old CIDR are still attached to it ({shown})"
    raise NetworkError(
        f"bridge {name!r} carries {', '.join(foreign)} but the pod CIDR's gateway is "
        f"{gateway}/{prefix_len}, and it cannot be re-addressed safely: {why}. Fix: stop "
        f"those pods, then run `nodeagent cleanup --bridge-name {name}` (or choose another "
        f"bridge-name); the agent retries and creates the bridge anew"
    )


async def attach_host_veth(ipr: AsyncIPRoute, veth: LinkInfo, bridge: LinkInfo) -> None:
    """Enslave the host end to the bridge, up, with hairpin mode on.

    Hairpin lets a frame leave through the port it came in on, which a pod needs to
    reach itself through a service address (the DNAT'd reply goes back to its own port).
    """
    if veth.master != bridge.index or not veth.up:
        await ipr.link("set", index=veth.index, master=bridge.index, state="up")
    await enable_hairpin(ipr, veth.index)


async def enable_hairpin(ipr: AsyncIPRoute, port_index: int) -> None:
    await ipr.brport("set", index=port_index, mode=1)  # IFLA_BRPORT_MODE: hairpin
