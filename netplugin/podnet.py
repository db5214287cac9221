"""``BridgeNetwork``: the node's pod network (what CNI's bridge + host-local plugins do).

Every pod gets a veth pair: the host end (``nav<hash of uid>``) is a port of the node
bridge, the other end is the pod's ``eth0`` with an address from the host-local IPAM
(``netplugin.ipam``) and a default route via the bridge, which carries the first address
of the pod CIDR. Everything is done over netlink (pyroute2); inside a pod's namespace
through a socket opened there by ``netplugin.nsnetlink``.

Concurrency: setups of different pods run concurrently; only IPAM allocation is
serialised, plus one lock per pod uid so two operations on the same pod never interleave.

Crash safety: every operation converges from whatever a crash left behind. The address
is tied to the pod uid, so a re-run of ``setup_pod`` (same or new netns) gets the same
address; a host veth that is not paired with the given namespace's ``eth0`` is deleted
and the pair recreated; missing addresses, routes, link states and bridge membership are
filled in. One ``BridgeNetwork`` at a time may use a given ``state_dir``.

Self-healing: given a ``runtime_view`` (the kubelet side's list of running sandboxes
and their namespaces), the first setup after a start, and any setup or garbage
collection after the store reported damage, first repairs the IPAM store from the
addresses the pods' eth0s actually carry (``HostLocalIPAM.repair``), so a damaged,
lost or wrong address file never makes one address reach two pods. A bridge left
carrying another pod CIDR is re-addressed when it is provably ours (our fixed MAC)
and has no ports; otherwise start() refuses with the exact command that fixes it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

import structlog
from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from netplugin import forwarding
from netplugin.bridge import (
    attach_host_veth,
    enable_hairpin,
    ensure_bridge,
    host_veth_name,
    looks_like_host_veth,
    validate_bridge_name,
)
from netplugin.ipam import HostLocalIPAM, gateway_of, is_unknown_owner, parse_pod_cidr
from netplugin.links import LinkInfo, delete_link, get_link, ipv4_addresses, list_links
from netplugin.nsnetlink import NetnsRoute
from netplugin.podiface import POD_IFNAME, configure_new_pod_interface, configure_pod_interface
from netplugin.types import NetworkError, PodNetworkStatus, RuntimeView

log = structlog.get_logger(__name__)

PORT_SCAN_PERIOD_S = 300.0
# After a repair that could not read every sandbox's namespace, the next attempt waits
# this long, so setups do not each pay a full runtime listing while it persists.
REPAIR_RETRY_S = 10.0
_NETNS_READ_CONCURRENCY = 16


@dataclass(frozen=True)
class _VethPair:
    host: LinkInfo | None  # looked up only when the pair already existed
    host_index: int
    eth0: LinkInfo
    created: bool


@dataclass
class _KeyedLock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class BridgeNetwork:
    """A ``PodNetwork`` on a Linux bridge with host-local IPAM.

    ``manage_forwarding`` (default on) keeps an iptables ACCEPT for traffic bridged
    between pods, needed on Docker hosts (see ``netplugin.forwarding``).
    """

    def __init__(
        self,
        bridge_name: str,
        pod_cidr: str,
        state_dir: str | Path,
        *,
        manage_forwarding: bool = True,
        runtime_view: RuntimeView | None = None,
    ) -> None:
        self.bridge_name = validate_bridge_name(bridge_name)
        self.network = parse_pod_cidr(pod_cidr)
        self.gateway: IPv4Address = gateway_of(self.network)
        self.prefix_len: int = self.network.prefixlen
        self.state_dir = Path(state_dir)
        self.manage_forwarding = manage_forwarding
        self.runtime_view = runtime_view
        # False until the store was checked against the runtime's view since start().
        self._reconciled = False
        self._repair_retry_at = 0.0
        self._ipam: HostLocalIPAM | None = None
        self._ipr: AsyncIPRoute | None = None
        # uid -> address, mirrors the IPAM store (we are its only writer), so that
        # pod_status, which the kubelet calls on every sync, does not touch the disk.
        self._addresses: dict[str, IPv4Address] = {}
        self._bridge_index: int | None = None
        self._start_lock = asyncio.Lock()
        self._bridge_lock = asyncio.Lock()
        self._ipam_lock = asyncio.Lock()
        self._pod_locks: dict[str, _KeyedLock] = {}
        # Pods whose setup or teardown is past the repair gate: their eth0 may be
        # between two addresses, so a repair leaves them to their own operation.
        self._in_flight: set[str] = set()
        self._next_port_scan = 0.0  # monotonic time of the next full port scan in GC

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open the IPAM store, create/verify the bridge and forwarding; idempotent."""
        async with self._start_lock:
            if self._ipam is None:
                self._ipam = await asyncio.to_thread(HostLocalIPAM, self.state_dir, str(self.network))
            self._addresses = await asyncio.to_thread(self._ipam.allocations)
            self._reconciled = False
            if self._ipr is None:
                self._ipr = AsyncIPRoute()
            await self._ensure_bridge()
            if self.manage_forwarding:
                await self._prune_stale_forwarding()
            self._next_port_scan = 0.0  # the first GC after a (re)start checks every port
        log.info(
            "pod network started",
            bridge=self.bridge_name,
            pod_cidr=str(self.network),
            gateway=str(self.gateway),
            allocated=len(self._addresses),
        )

    async def stop(self) -> None:
        """Release sockets. Leaves the bridge, veths and addresses: pods outlive the agent."""
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        self._bridge_index = None

    async def destroy(self) -> None:
        """Delete the bridge and its forwarding rule (uninstall, tests). Deleting the
        bridge does not delete the pods' veths; tear the pods down first. Works without
        start() (``nodeagent cleanup``)."""
        if self._ipr is None:
            self._ipr = AsyncIPRoute()
        ipr = self._ipr
        await delete_link(ipr, ifname=self.bridge_name)
        if self.manage_forwarding:
            await forwarding.remove_bridge_forwarding(self.bridge_name)
        self._bridge_index = None

    # ------------------------------------------------------------------- pod ops

    async def reserve(self, pod_uid: str) -> PodNetworkStatus:
        """The pod's address, allocated now if it has none, before any interface
        exists: the kubelet builds the containers' environment and hosts file while
        the sandbox is still starting. ``setup_pod`` then wires this same address."""
        _check_pod_uid(pod_uid)
        async with self._pod_lock(pod_uid):
            self._in_flight.add(pod_uid)
            try:
                await self._ensure_consistent(caller=pod_uid)
                address = await self._allocate(pod_uid)
            finally:
                self._in_flight.discard(pod_uid)
        return self._status(address)

    async def setup_pod(self, pod_uid: str, netns_path: str) -> PodNetworkStatus:
        _check_pod_uid(pod_uid)
        if not isinstance(netns_path, str) or not netns_path:
            raise NetworkError(f"pod {pod_uid}: netns_path must be a non-empty path, got {netns_path!r}")
        began = time.perf_counter()
        async with self._pod_lock(pod_uid):
            try:
                netns = await NetnsRoute(netns_path).open()
            except FileNotFoundError as exc:
                raise NetworkError(f"pod {pod_uid}: netns_path {netns_path!r} does not exist") from exc
            try:
                await self._ensure_consistent(caller=pod_uid)
                self._in_flight.add(pod_uid)
                address = await self._allocate(pod_uid)
                bridge = await self._current_bridge()
                pair = await self._ensure_veth_pair(pod_uid, netns, bridge)
                assert netns.ipr is not None
                if pair.created:
                    # Fresh pair: nothing to inspect, only to add (the fast, usual path).
                    await enable_hairpin(self._host(), pair.host_index)
                    await configure_new_pod_interface(
                        netns.ipr,
                        eth0_index=pair.eth0.index,
                        ip=str(address),
                        prefix_len=self.prefix_len,
                        gateway=str(self.gateway),
                    )
                else:
                    assert pair.host is not None
                    await attach_host_veth(self._host(), pair.host, bridge)
                    await configure_pod_interface(
                        netns.ipr,
                        ip=str(address),
                        prefix_len=self.prefix_len,
                        gateway=str(self.gateway),
                    )
            except (NetlinkError, LookupError) as exc:
                raise NetworkError(f"pod {pod_uid}: network setup in {netns_path} failed: {exc}") from exc
            finally:
                self._in_flight.discard(pod_uid)
                await netns.close()
        log.info(
            "pod network ready",
            pod_uid=pod_uid,
            ip=str(address),
            host_veth=host_veth_name(self.bridge_name, pod_uid),
            created=pair.created,
            duration_ms=round((time.perf_counter() - began) * 1000, 2),
        )
        return self._status(address)

    async def teardown_pod(self, pod_uid: str, netns_path: str | None) -> None:
        _check_pod_uid(pod_uid)
        async with self._pod_lock(pod_uid):
            self._in_flight.add(pod_uid)
            try:
                if netns_path:
                    await self._delete_pod_eth0(pod_uid, netns_path)
                deleted = await delete_link(self._host(), ifname=host_veth_name(self.bridge_name, pod_uid))
                released = await self._release(pod_uid)
            finally:
                self._in_flight.discard(pod_uid)
        if deleted or released:
            log.info("pod network removed", pod_uid=pod_uid, ip=str(released) if released else None)

    async def pod_status(self, pod_uid: str) -> PodNetworkStatus | None:
        self._require_started()
        address = self._addresses.get(pod_uid)
        return self._status(address) if address is not None else None

    async def garbage_collect(self, live_pod_uids: set[str]) -> list[str]:
        """Release addresses and delete host veths of pods not in ``live_pod_uids``."""
        ipam = self._require_started()
        try:
            await self._ensure_consistent(caller=None)
        except NetworkError as exc:
            # Not fatal to GC: addresses of damaged files stay reserved until then.
            log.warning("ipam repair postponed", error=str(exc))
        # Re-read the store: it is the truth, the cache only mirrors it.
        allocations = await asyncio.to_thread(ipam.allocations)
        released = []
        # "<unknown:...>" placeholders are freed only by a repair that saw the runtime.
        gone = {uid for uid in allocations if not is_unknown_owner(uid)} - set(live_pod_uids)
        for pod_uid in sorted(gone):
            async with self._pod_lock(pod_uid):
                await delete_link(self._host(), ifname=host_veth_name(self.bridge_name, pod_uid))
                await self._release(pod_uid)
            released.append(pod_uid)
        # Then the ports. The bridge is repaired first if someone removed it.
        bridge = await self._current_bridge()
        orphans: list[str] = []
        reattached: list[str] = []
        now = time.monotonic()
        # Listing every host link costs 0.3-1 ms per link in pyroute2 (it decodes every
        # attribute; its filters apply after decoding): with 110 pods a scan a minute
        # was a fifth of the idle agent's CPU. Stray ports are rare (a wiped store, a
        # recreated bridge, a veth detached by hand), so scan after a start, after the
        # bridge was recreated, and otherwise every PORT_SCAN_PERIOD_S.
        if now >= self._next_port_scan:
            self._next_port_scan = now + PORT_SCAN_PERIOD_S
            orphans, reattached = await self._reconcile_ports(bridge, live_pod_uids)
        if reattached:
            log.warning("pod veths re-attached to the bridge", host_veths=reattached)
        if released or orphans:
            log.info("pod network garbage collected", released=released, orphan_veths=orphans)
        return released

    # ------------------------------------------------------------------ self-healing

    async def _ensure_consistent(self, *, caller: str | None) -> None:
        """Repair the store from the runtime's view once per start and after damage."""
        ipam = self._require_started()

        def settled() -> bool:
            return self._reconciled and (not ipam.damaged or time.monotonic() < self._repair_retry_at)

        if self.runtime_view is None or settled():
            return
        async with self._ipam_lock:
            if settled():
                return  # another setup repaired it while this one waited
            await asyncio.shield(self._repair_locked(ipam, caller))

    async def _repair_locked(self, ipam: HostLocalIPAM, caller: str | None) -> None:
        assert self.runtime_view is not None
        try:
            sandboxes = await self.runtime_view()
        except Exception as exc:  # the runtime's errors are not ours to know
            raise NetworkError(f"cannot check the IPAM store against the runtime's sandboxes: {exc}") from exc
        # Pods with an operation in flight (other than the caller's) are left out:
        # their eth0 may be between two addresses, and their own operation settles it.
        # Pods merely waiting at the gate have changed nothing yet and are included.
        busy = self._in_flight - {caller}
        wanted = [s for s in sandboxes if s.pod_uid not in busy]
        slots = asyncio.Semaphore(_NETNS_READ_CONCURRENCY)
        unreadable: list[str] = []

        async def read(netns_path: str) -> set[IPv4Address]:
            async with slots:
                try:
                    return await self._eth0_addresses(netns_path)
                except (OSError, NetworkError, NetlinkError) as exc:
                    if not _netns_gone(exc):
                        unreadable.append(netns_path)
                    return set()

        found = await asyncio.gather(*(read(s.netns_path) for s in wanted))
        in_use: dict[str, set[IPv4Address]] = {}
        for sandbox, addresses in zip(wanted, found):
            in_use.setdefault(sandbox.pod_uid, set()).update(addresses)
        report = await asyncio.to_thread(ipam.repair, in_use, complete=not unreadable)
        self._addresses = await asyncio.to_thread(ipam.allocations)
        self._reconciled = True
        self._repair_retry_at = time.monotonic() + REPAIR_RETRY_S if unreadable else 0.0
        if any(report.values()) or unreadable:
            log.warning("ipam store repaired from the runtime's view", bridge=self.bridge_name,
                        sandboxes=len(wanted), unreadable_netns=unreadable, **report)
        else:
            log.debug("ipam store matches the runtime", sandboxes=len(wanted))

    @staticmethod
    async def _eth0_addresses(netns_path: str) -> set[IPv4Address]:
        async with NetnsRoute(netns_path) as netns:
            assert netns.ipr is not None
            eth0 = await get_link(netns.ipr, POD_IFNAME)
            if eth0 is None:
                return set()
            return {IPv4Address(a) for a, _prefix in await ipv4_addresses(netns.ipr, eth0.index)}

    # ------------------------------------------------------------------ internals

    async def _reconcile_ports(self, bridge: LinkInfo, live_pod_uids: set[str]) -> tuple[list[str], list[str]]:
        """Delete our ports of pods that are not live; re-attach live pods' veths."""
        live_names = {host_veth_name(self.bridge_name, uid) for uid in live_pod_uids}
        orphans, reattached = [], []
        for link in await list_links(self._host()):
            if link.name in live_names:
                # Ours for sure (the name hashes our bridge name): a live pod's port
                # that lost its bridge (bridge recreated) is put back.
                if link.master != bridge.index or not link.up:
                    await attach_host_veth(self._host(), link, bridge)
                    reattached.append(link.name)
            elif link.master == bridge.index and looks_like_host_veth(link.name):
                # One of our ports whose pod left no address behind (a store wiped
                # by hand, a pod released while its namespace lived on).
                if await delete_link(self._host(), index=link.index):
                    orphans.append(link.name)
        return orphans, reattached

    def _host(self) -> AsyncIPRoute:
        if self._ipr is None:
            raise NetworkError(f"pod network on bridge {self.bridge_name!r} is not started")
        return self._ipr

    def _require_started(self) -> HostLocalIPAM:
        if self._ipam is None or self._ipr is None:
            raise NetworkError(f"pod network on bridge {self.bridge_name!r} is not started")
        return self._ipam

    def _status(self, address: IPv4Address) -> PodNetworkStatus:
        return PodNetworkStatus(
            ip=str(address), gateway=str(self.gateway), prefix_len=self.prefix_len, interface=POD_IFNAME
        )

    @asynccontextmanager
    async def _pod_lock(self, pod_uid: str) -> AsyncIterator[None]:
        """Serialise operations on one pod; the entry lives only while in use."""
        entry = self._pod_locks.get(pod_uid)
        if entry is None:
            entry = self._pod_locks[pod_uid] = _KeyedLock()
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._pod_locks[pod_uid]

    async def _allocate(self, pod_uid: str) -> IPv4Address:
        ipam = self._require_started()
        cached = self._addresses.get(pod_uid)
        if cached is not None:
            return cached

        async def allocate_and_record() -> IPv4Address:
            async with self._ipam_lock:
                address = await asyncio.to_thread(ipam.allocate, pod_uid)
                self._addresses[pod_uid] = address
                return address

        # Shielded: once the file is written the cache must learn of it, even if the
        # caller is cancelled meanwhile.
        return await asyncio.shield(allocate_and_record())

    async def _release(self, pod_uid: str) -> IPv4Address | None:
        ipam = self._require_started()

        async def release_and_forget() -> IPv4Address | None:
            async with self._ipam_lock:
                address = await asyncio.to_thread(ipam.release, pod_uid)
                self._addresses.pop(pod_uid, None)
                return address

        return await asyncio.shield(release_and_forget())

    async def _ensure_bridge(self) -> LinkInfo:
        async with self._bridge_lock:
            return await self._ensure_bridge_locked()

    async def _ensure_bridge_locked(self) -> LinkInfo:
        bridge = await ensure_bridge(self._host(), self.bridge_name, self.gateway, self.prefix_len)
        if self.manage_forwarding:
            await forwarding.ensure_bridge_forwarding(self.bridge_name)
        if self._bridge_index is not None and bridge.index != self._bridge_index:
            # A new bridge: the other pods' veths lost their master; the next GC puts
            # them back.
            self._next_port_scan = 0.0
        self._bridge_index = bridge.index
        return bridge

    async def _current_bridge(self) -> LinkInfo:
        """The bridge, recreated (with address and forwarding) if someone removed it."""

        def as_known(bridge: LinkInfo | None) -> bool:
            return bridge is not None and bridge.index == self._bridge_index and bridge.up

        bridge = await get_link(self._host(), self.bridge_name)
        if as_known(bridge):
            assert bridge is not None
            return bridge
        async with self._bridge_lock:
            # Many setups notice at once; the first one repairs, the others find it done.
            bridge = await get_link(self._host(), self.bridge_name)
            if as_known(bridge):
                assert bridge is not None
                return bridge
            log.warning("pod bridge missing or changed; repairing", bridge=self.bridge_name)
            return await self._ensure_bridge_locked()

    async def _prune_stale_forwarding(self) -> None:
        # Rules first, links second: a rule is only ever added after its bridge exists,
        # so a bridge that appears meanwhile is never mistaken for a gone one.
        ruled = await forwarding.bridges_with_rules()
        if not ruled:
            return
        existing = {link.name for link in await list_links(self._host())}
        for gone in sorted(ruled - existing):
            await forwarding.remove_bridge_forwarding(gone)
            log.info("removed forwarding rule of a gone pod bridge", bridge=gone)

    async def _ensure_veth_pair(self, pod_uid: str, netns: NetnsRoute, bridge: LinkInfo) -> _VethPair:
        """The pod's host veth, paired with ``eth0`` in ``netns``; created if needed.

        A host veth whose peer is not this namespace's eth0 is stale (the sandbox was
        recreated while the old namespace lived on, or a crash left it) and is replaced.
        A new pair is created already on the bridge and up on the host side.
        """
        ipr = self._host()
        assert netns.ipr is not None
        name = host_veth_name(self.bridge_name, pod_uid)
        host = await get_link(ipr, name)
        pod_eth0 = await get_link(netns.ipr, POD_IFNAME)
        if host is not None:
            if pod_eth0 is not None and await self._paired(host, pod_eth0, netns):
                return _VethPair(host=host, host_index=host.index, eth0=pod_eth0, created=False)
            log.info("replacing stale host veth", pod_uid=pod_uid, host_veth=name)
            await delete_link(ipr, index=host.index)
            pod_eth0 = await get_link(netns.ipr, POD_IFNAME)
        if pod_eth0 is not None:
            if pod_eth0.kind != "veth":
                raise NetworkError(
                    f"pod {pod_uid}: {netns.path} already has an {POD_IFNAME} of kind "
                    f"{pod_eth0.kind!r} that this plugin did not create"
                )
            # A veth eth0 not paired with our host end: left over; its peer goes with it.
            log.info("replacing leftover pod eth0", pod_uid=pod_uid, netns=netns.path)
            await delete_link(netns.ipr, index=pod_eth0.index)
        await ipr.link(
            "add",
            ifname=name,
            kind="veth",
            master=bridge.index,
            state="up",
            peer={"ifname": POD_IFNAME, "net_ns_fd": netns.fd},
        )
        # eth0's IFLA_LINK is the host end's ifindex: one query answers for both ends.
        pod_eth0 = await get_link(netns.ipr, POD_IFNAME)
        if pod_eth0 is None or pod_eth0.peer_index is None:
            raise NetworkError(f"pod {pod_uid}: {POD_IFNAME} vanished from {netns.path} right after it was created")
        return _VethPair(host=None, host_index=pod_eth0.peer_index, eth0=pod_eth0, created=True)

    async def _paired(self, host: LinkInfo, pod_eth0: LinkInfo, netns: NetnsRoute) -> bool:
        if host.kind != "veth" or pod_eth0.kind != "veth" or host.peer_index != pod_eth0.index:
            return False
        # The ifindex alone is only unique per namespace: also check that the host
        # end's peer lives in *this* namespace.
        nsid = await self._host().get_netnsid(fd=netns.fd)
        return nsid is not None and nsid.get("nsid") not in (None, -1) and nsid["nsid"] == host.peer_netnsid

    async def _delete_pod_eth0(self, pod_uid: str, netns_path: str) -> None:
        try:
            async with NetnsRoute(netns_path) as netns:
                assert netns.ipr is not None
                eth0 = await get_link(netns.ipr, POD_IFNAME)
                if eth0 is not None and eth0.kind == "veth":
                    await delete_link(netns.ipr, index=eth0.index)
        except (OSError, NetworkError) as exc:
            # The namespace is gone (the usual case after the sandbox stopped): the
            # kernel already destroyed the pair with it.
            log.debug("pod netns not usable at teardown", pod_uid=pod_uid, netns=netns_path, error=str(exc))


def _netns_gone(exc: BaseException) -> bool:
    """The sandbox stopped between the runtime's list and our read: nothing to see."""
    return isinstance(exc, FileNotFoundError) or (
        isinstance(exc, NetworkError) and isinstance(exc.__cause__, FileNotFoundError)
    )


def _check_pod_uid(pod_uid: str) -> None:
    if not isinstance(pod_uid, str) or not pod_uid or "\n" in pod_uid or "\0" in pod_uid:
        raise NetworkError(f"pod uid must be a non-empty single-line string, got {pod_uid!r}")
