"""BridgeNetwork against the real kernel, in the host namespace, with Docker's
iptables rules present. "Pods" are network namespaces the tests create.

Everything is checked with ``ip``/``iptables``/``/sys`` rather than with the code under
test, and traffic only ever goes to addresses inside the test's own namespaces (see the
routing safety net in conftest.py)."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
import subprocess
import time
import uuid
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from netplugin.bridge import bridge_mac, host_veth_name
from netplugin.forwarding import CHAIN, bridge_rules
from netplugin.ipam import IPAMConfigError
from netplugin.podnet import BridgeNetwork
from netplugin.types import NetworkError, PodNetworkStatus
from tests.netplugin.conftest import Netns, host_veths_on, ping, route_dev, run

pytestmark = pytest.mark.root


def ip_json(*argv: str) -> list[dict]:
    return json.loads(run("ip", "-j", *argv).stdout or "[]")


def pod_view(ns: Netns) -> dict:
    """eth0's addresses, lo/eth0 state and the default route, as ``ip`` reports them."""
    links = {link["ifname"]: link for link in ip_json("-n", ns.name, "-d", "link", "show")}
    addrs = {
        a["ifname"]: sorted((i["local"], i["prefixlen"]) for i in a["addr_info"] if i["family"] == "inet")
        for a in ip_json("-n", ns.name, "addr", "show")
    }
    routes = ip_json("-n", ns.name, "route", "show", "default")
    return {
        "links": sorted(links),
        "eth0_kind": links.get("eth0", {}).get("linkinfo", {}).get("info_kind"),
        "eth0_up": "UP" in links.get("eth0", {}).get("flags", []),
        "lo_up": "UP" in links.get("lo", {}).get("flags", []),
        "eth0_ipv4": addrs.get("eth0", []),
        "default_via": [(r.get("gateway"), r.get("dev")) for r in routes],
        "eth0_index": links.get("eth0", {}).get("ifindex"),
    }


def uid() -> str:
    return str(uuid.uuid4())


def ipam_files(state_dir: Path) -> dict[str, str]:
    return {
        p.name: p.read_text().split("\n", 1)[0]
        for p in state_dir.iterdir()
        if p.is_file() and p.name[0].isdigit()
    }


def assert_pod_configured(ns: Netns, status: PodNetworkStatus, cidr: str) -> None:
    net = IPv4Network(cidr)
    view = pod_view(ns)
    assert view["eth0_kind"] == "veth"
    assert view["eth0_ipv4"] == [(status.ip, net.prefixlen)]
    assert view["eth0_up"] and view["lo_up"]
    assert view["default_via"] == [(str(net.network_address + 1), "eth0")]


# --------------------------------------------------------------------------- start


async def test_start_creates_bridge_with_gateway_and_forwarding_idempotently(
    network: BridgeNetwork, bridge_name: str, pod_cidr: str, state_dir: Path
) -> None:
    gateway = str(IPv4Network(pod_cidr).network_address + 1)
    (bridge,) = ip_json("-d", "link", "show", bridge_name)
    assert bridge["linkinfo"]["info_kind"] == "bridge"
    assert "UP" in bridge["flags"]
    assert bridge["address"] == bridge_mac(bridge_name)  # fixed MAC, not a port's
    (addrs,) = ip_json("addr", "show", bridge_name)
    assert [(a["local"], a["prefixlen"]) for a in addrs["addr_info"] if a["family"] == "inet"] == [
        (gateway, 24)
    ]
    assert route_dev(str(IPv4Network(pod_cidr).network_address + 9)) == bridge_name
    rules = run("iptables", "-S", CHAIN).stdout
    assert f"-A {CHAIN} -o {bridge_name} " in rules  # into the pods (bridged or routed)
    assert f"-A {CHAIN} -i {bridge_name} " in rules  # out of the pods (egress)
    assert run("iptables", "-C", "FORWARD", "-m", "comment", "--comment", "nodeagent pod networks",
               "-j", CHAIN, check=False).returncode == 0
    assert (state_dir / "network").read_text() == f"{pod_cidr}\n"

    # Again, and from a second instance: nothing is duplicated or changed.
    await network.start()
    other = BridgeNetwork(bridge_name=bridge_name, pod_cidr=pod_cidr, state_dir=state_dir)
    await other.start()
    await other.stop()
    assert ip_json("-d", "link", "show", bridge_name)[0]["ifindex"] == bridge["ifindex"]
    (addrs,) = ip_json("addr", "show", bridge_name)
    assert len([a for a in addrs["addr_info"] if a["family"] == "inet"]) == 1
    rules = run("iptables", "-S", CHAIN).stdout
    assert rules.count(f"-i {bridge_name} ") == 1 and rules.count(f"-o {bridge_name} ") == 1


async def test_start_refuses_changed_cidr_and_bridge_with_pods_then_readdresses_it(
    network: BridgeNetwork, netns_factory, bridge_name: str, pod_cidr: str, state_dir: Path, tmp_path: Path
) -> None:
    other_cidr = "10.201.255.0/24" if not pod_cidr.startswith("10.201.255.") else "10.201.254.0/24"
    ns = netns_factory()
    pod = uid()
    await network.setup_pod(pod, ns.path)
    changed = BridgeNetwork(bridge_name=bridge_name, pod_cidr=other_cidr, state_dir=state_dir)
    with pytest.raises(IPAMConfigError, match=f"{pod_cidr}.*{other_cidr}"):
        await changed.start()
    await changed.stop()
    # A fresh store, but the bridge still carries the old gateway and a pod of the old
    # CIDR is attached: refused, untouched, and the error says what to run.
    fresh = BridgeNetwork(bridge_name=bridge_name, pod_cidr=other_cidr, state_dir=tmp_path / "other")
    veth = host_veth_name(bridge_name, pod)
    with pytest.raises(NetworkError, match=(
        rf"bridge '{bridge_name}' carries .*still attached to it \({veth}\).*"
        rf"`nodeagent cleanup --bridge-name {bridge_name}`")):
        await fresh.start()
    await fresh.stop()
    old_gateway = str(IPv4Network(pod_cidr).network_address + 1)
    (addrs,) = ip_json("addr", "show", bridge_name)
    assert [a["local"] for a in addrs["addr_info"] if a["family"] == "inet"] == [old_gateway]
    # Once no pod is attached, our own bridge is re-addressed for the new CIDR.
    await network.teardown_pod(pod, ns.path)
    await fresh.start()
    await fresh.stop()
    (addrs,) = ip_json("addr", "show", bridge_name)
    assert [(a["local"], a["prefixlen"]) for a in addrs["addr_info"] if a["family"] == "inet"] == [
        (str(IPv4Network(other_cidr).network_address + 1), 24)
    ]


async def test_foreign_bridge_with_another_address_is_refused(bridge_name: str, pod_cidr: str, tmp_path: Path) -> None:
    # Not created by us (no fixed MAC of ours): never re-addressed, even without ports.
    run("ip", "link", "add", bridge_name, "type", "bridge")
    run("ip", "addr", "add", "10.201.254.1/24", "dev", bridge_name)
    net = BridgeNetwork(bridge_name=bridge_name, pod_cidr=pod_cidr, state_dir=tmp_path / "ipam")
    with pytest.raises(NetworkError, match=(
        rf"carries 10.201.254.1/24 .*not created by nodeagent.*"
        rf"`nodeagent cleanup --bridge-name {bridge_name}`")):
        await net.start()
    await net.stop()
    (addrs,) = ip_json("addr", "show", bridge_name)
    assert [a["local"] for a in addrs["addr_info"] if a["family"] == "inet"] == ["10.201.254.1"]


def test_bad_configuration_is_named(tmp_path: Path) -> None:
    with pytest.raises(NetworkError, match="bridge_name 'this-name-is-too-long'"):
        BridgeNetwork(bridge_name="this-name-is-too-long", pod_cidr="10.201.0.0/24", state_dir=tmp_path)
    with pytest.raises(NetworkError, match="pod_cidr '10.201.0.0/33'"):
        BridgeNetwork(bridge_name="natx", pod_cidr="10.201.0.0/33", state_dir=tmp_path)


async def test_calls_before_start_fail_clearly(bridge_name: str, pod_cidr: str, state_dir: Path) -> None:
    net = BridgeNetwork(bridge_name=bridge_name, pod_cidr=pod_cidr, state_dir=state_dir)
    with pytest.raises(NetworkError, match="not started"):
        await net.pod_status("x")


# ------------------------------------------------------------------- pod set-up


async def test_setup_gives_eth0_address_route_and_connectivity(
    network: BridgeNetwork, netns_factory, bridge_name: str, pod_cidr: str, state_dir: Path
) -> None:
    ns = netns_factory()
    pod = uid()
    status = await network.setup_pod(pod, ns.path)
    gateway = str(IPv4Network(pod_cidr).network_address + 1)
    assert status == PodNetworkStatus(ip=str(IPv4Network(pod_cidr).network_address + 2),
                                      gateway=gateway, prefix_len=24, interface="eth0")
    assert_pod_configured(ns, status, pod_cidr)
    assert await network.pod_status(pod) == status
    assert ipam_files(state_dir) == {status.ip: pod}

    veth = host_veth_name(bridge_name, pod)
    assert len(veth) <= 15
    assert host_veths_on(bridge_name) == {veth}
    assert Path(f"/sys/class/net/{veth}/brport/hairpin_mode").read_text().strip() == "1"
    assert "UP" in ip_json("link", "show", veth)[0]["flags"]

    assert route_dev(status.ip) == bridge_name  # never the default route
    assert ping(status.ip), "host cannot ping the pod"
    assert ping(gateway, netns=ns.path), "pod cannot ping its gateway"


async def test_pods_reach_each_other_across_the_bridge_despite_docker_forward_drop(
    network: BridgeNetwork, netns_factory, bridge_name: str
) -> None:
    a, b = netns_factory(), netns_factory()
    status_a = await network.setup_pod(uid(), a.path)
    status_b = await network.setup_pod(uid(), b.path)
    assert ping(status_b.ip, netns=a.path) and ping(status_a.ip, netns=b.path)

    # Where Docker's FORWARD policy is DROP and bridged frames go through iptables (as
    # on this host), show that it is our rule that makes it work.
    docker_drops = "-P FORWARD DROP" in run("iptables", "-S", "FORWARD").stdout
    br_nf = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
    if docker_drops and br_nf.exists() and br_nf.read_text().strip() == "1":
        # The bridge's own nf_call_iptables is off, and yet the frames are filtered:
        # the global sysctl wins, which is why a per-bridge opt-out cannot work.
        (info,) = ip_json("-d", "link", "show", bridge_name)
        assert info["linkinfo"]["info_data"]["nf_call_iptables"] == 0
        for rule in bridge_rules(bridge_name):
            run("iptables", "-w", "5", "-D", CHAIN, *rule)
        try:
            assert not ping(status_b.ip, netns=a.path), "expected Docker's FORWARD DROP to bite"
        finally:
            await network.start()  # restores the rule
        assert ping(status_b.ip, netns=a.path)


async def test_setup_is_idempotent(network: BridgeNetwork, netns_factory, bridge_name: str) -> None:
    ns = netns_factory()
    pod = uid()
    first = await network.setup_pod(pod, ns.path)
    before = pod_view(ns)
    veth_index = ip_json("link", "show", host_veth_name(bridge_name, pod))[0]["ifindex"]
    again = await network.setup_pod(pod, ns.path)
    assert again == first
    assert pod_view(ns) == before  # same eth0 (same ifindex), nothing added
    assert ip_json("link", "show", host_veth_name(bridge_name, pod))[0]["ifindex"] == veth_index
    assert host_veths_on(bridge_name) == {host_veth_name(bridge_name, pod)}


async def test_accepts_proc_pid_netns_paths(network: BridgeNetwork) -> None:
    # Docker reports a sandbox's namespace as /proc/<pid>/ns/net.
    holder = subprocess.Popen(["unshare", "--net", "sleep", "30"])
    try:
        path = f"/proc/{holder.pid}/ns/net"
        host_ns = os.stat("/proc/self/ns/net").st_ino
        for _ in range(100):  # until unshare has moved into the new namespace
            if os.stat(path).st_ino != host_ns:
                break
            await asyncio.sleep(0.02)
        status = await network.setup_pod(uid(), path)
        assert ping(status.ip)
    finally:
        holder.kill()
        holder.wait()


async def test_missing_or_bad_netns_is_a_clear_error(
    network: BridgeNetwork, tmp_path: Path, state_dir: Path
) -> None:
    pod = uid()
    # The agent's own namespace must never be treated as a pod's (its eth0 is the host's).
    for host_ns in ("/proc/self/ns/net", f"/proc/{os.getpid()}/ns/net"):
        with pytest.raises(NetworkError, match="host's own network namespace"):
            await network.setup_pod(pod, host_ns)
        await network.teardown_pod(pod, host_ns)
    assert run("ip", "link", "show", "eth0", check=False).returncode == 0
    with pytest.raises(NetworkError, match="does not exist"):
        await network.setup_pod(pod, "/var/run/netns/natns-not-there")
    not_a_netns = tmp_path / "plain-file"
    not_a_netns.write_text("")
    with pytest.raises(NetworkError, match="not a usable network namespace"):
        await network.setup_pod(pod, str(not_a_netns))
    assert ipam_files(state_dir) == {}  # nothing allocated for a pod we could not wire


# -------------------------------------------------------------------- teardown


async def test_teardown_removes_veth_and_frees_address_idempotently(
    network: BridgeNetwork, netns_factory, bridge_name: str, state_dir: Path
) -> None:
    ns = netns_factory()
    pod = uid()
    status = await network.setup_pod(pod, ns.path)
    await network.teardown_pod(pod, ns.path)
    assert host_veths_on(bridge_name) == set()
    assert "eth0" not in pod_view(ns)["links"]
    assert ipam_files(state_dir) == {}
    assert await network.pod_status(pod) is None
    await network.teardown_pod(pod, ns.path)  # again: no error, nothing changes
    await network.teardown_pod(pod, None)
    # Freed, but not immediately reused.
    other = await network.setup_pod(uid(), netns_factory().path)
    assert other.ip != status.ip


async def test_teardown_after_netns_is_gone(
    network: BridgeNetwork, netns_factory, bridge_name: str, state_dir: Path
) -> None:
    ns = netns_factory()
    pod = uid()
    await network.setup_pod(pod, ns.path)
    ns.delete()
    await network.teardown_pod(pod, ns.path)
    assert host_veths_on(bridge_name) == set()
    assert ipam_files(state_dir) == {}


# ------------------------------------------------------ persistence and crashes


async def test_allocation_survives_a_new_instance(
    network: BridgeNetwork, netns_factory, bridge_name: str, pod_cidr: str, state_dir: Path
) -> None:
    ns = netns_factory()
    pod = uid()
    status = await network.setup_pod(pod, ns.path)
    view = pod_view(ns)
    await network.stop()  # like an agent restart (or kill -9: nothing is cleaned up)

    restarted = BridgeNetwork(bridge_name=bridge_name, pod_cidr=pod_cidr, state_dir=state_dir)
    await restarted.start()
    try:
        assert await restarted.pod_status(pod) == status
        assert await restarted.setup_pod(pod, ns.path) == status  # a no-op
        assert pod_view(ns) == view
    finally:
        await restarted.stop()
    await network.start()  # so the fixture can clean up with it


async def test_new_netns_for_same_pod_gets_same_address_and_stale_veth_is_replaced(
    network: BridgeNetwork, netns_factory, bridge_name: str, pod_cidr: str
) -> None:
    old, new = netns_factory(), netns_factory()
    pod = uid()
    first = await network.setup_pod(pod, old.path)
    old_veth = ip_json("link", "show", host_veth_name(bridge_name, pod))[0]["ifindex"]
    # The sandbox was recreated while the old namespace still lives on.
    second = await network.setup_pod(pod, new.path)
    assert second == first
    assert_pod_configured(new, second, pod_cidr)
    assert "eth0" not in pod_view(old)["links"]  # the stale pair is gone
    assert ip_json("link", "show", host_veth_name(bridge_name, pod))[0]["ifindex"] != old_veth
    assert host_veths_on(bridge_name) == {host_veth_name(bridge_name, pod)}
    assert ping(second.ip)


async def test_half_made_state_is_repaired(
    network: BridgeNetwork, netns_factory, bridge_name: str, pod_cidr: str
) -> None:
    ns = netns_factory()
    pod = uid()
    veth = host_veth_name(bridge_name, pod)
    # A crash right after the veth pair was created: no address, down, not on the bridge.
    run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns.name)
    status = await network.setup_pod(pod, ns.path)
    assert_pod_configured(ns, status, pod_cidr)
    assert host_veths_on(bridge_name) == {veth}
    assert ping(status.ip)

    # Drift inside the pod: a foreign extra address, eth0 down, no route.
    ns.ip("addr", "add", "192.0.2.77/32", "dev", "eth0")
    ns.ip("link", "set", "eth0", "down")
    assert await network.setup_pod(pod, ns.path) == status
    assert_pod_configured(ns, status, pod_cidr)
    assert ping(status.ip)


async def test_leftover_eth0_from_elsewhere_is_replaced(
    network: BridgeNetwork, netns_factory, bridge_name: str, pod_cidr: str
) -> None:
    ns = netns_factory()
    stray = f"natst{secrets.token_hex(4)}"
    run("ip", "link", "add", stray, "type", "veth", "peer", "name", "eth0", "netns", ns.name)
    pod = uid()
    status = await network.setup_pod(pod, ns.path)
    assert_pod_configured(ns, status, pod_cidr)
    assert run("ip", "link", "show", stray, check=False).returncode != 0  # went with its peer


async def test_deleted_bridge_is_recreated_and_ports_reattached(
    network: BridgeNetwork, netns_factory, bridge_name: str, pod_cidr: str
) -> None:
    a, b = uid(), uid()
    ns_a, ns_b = netns_factory(), netns_factory()
    status_a = await network.setup_pod(a, ns_a.path)
    status_b = await network.setup_pod(b, ns_b.path)
    run("ip", "link", "del", bridge_name)
    # The next setup repairs the bridge (address, forwarding) and its own pod ...
    assert await network.setup_pod(a, ns_a.path) == status_a
    assert host_veths_on(bridge_name) == {host_veth_name(bridge_name, a)}
    assert route_dev(status_a.ip) == bridge_name
    assert ping(status_a.ip)
    # ... and the next garbage collection puts the other live pods back.
    assert await network.garbage_collect({a, b}) == []
    assert host_veths_on(bridge_name) == {host_veth_name(bridge_name, a), host_veth_name(bridge_name, b)}
    assert ping(status_b.ip) and ping(status_b.ip, netns=ns_a.path)


# ------------------------------------------------------------------------- GC


async def test_garbage_collect_releases_gone_pods_and_orphan_veths(
    network: BridgeNetwork, netns_factory, bridge_name: str, state_dir: Path
) -> None:
    pods = {uid(): netns_factory() for _ in range(3)}
    statuses = {pod: await network.setup_pod(pod, ns.path) for pod, ns in pods.items()}
    keep, *gone = list(pods)
    # An orphan: one of our veths on the bridge whose pod has no address any more.
    orphan = host_veth_name(bridge_name, "pod-that-crashed-before-ipam")
    orphan_ns = netns_factory()
    run("ip", "link", "add", orphan, "master", bridge_name, "type", "veth", "peer", "name", "eth0",
        "netns", orphan_ns.name)

    released = await network.garbage_collect({keep})
    assert released == sorted(gone)
    assert ipam_files(state_dir) == {statuses[keep].ip: keep}
    assert host_veths_on(bridge_name) == {host_veth_name(bridge_name, keep)}
    for pod in gone:
        assert await network.pod_status(pod) is None
    assert await network.garbage_collect({keep}) == []
    assert ping(statuses[keep].ip)


# ---------------------------------------------------------------- concurrency


async def test_110_pods_set_up_concurrently(
    network: BridgeNetwork, netns_factory, bridge_name: str, state_dir: Path, pod_cidr: str
) -> None:
    namespaces = [netns_factory() for _ in range(110)]
    pods = [uid() for _ in namespaces]

    async def timed_setup(pod: str, ns: Netns) -> tuple[PodNetworkStatus, float]:
        began = time.perf_counter()
        status = await network.setup_pod(pod, ns.path)
        return status, time.perf_counter() - began

    began = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(timed_setup(p, ns)) for p, ns in zip(pods, namespaces)]
    wall = time.perf_counter() - began
    results = [t.result() for t in tasks]
    latencies = sorted(seconds for _status, seconds in results)
    print(
        f"\n110 concurrent setups: wall {wall * 1000:.0f} ms, "
        f"per pod median {latencies[55] * 1000:.1f} ms, p95 {latencies[104] * 1000:.1f} ms"
    )
    ips = [status.ip for status, _ in results]
    assert len(set(ips)) == 110
    assert ipam_files(state_dir) == dict(zip(ips, pods))
    assert len(host_veths_on(bridge_name)) == 110
    for i in (0, 54, 109):  # spot checks; each is a full kernel-level check
        assert_pod_configured(namespaces[i], results[i][0], pod_cidr)
        assert ping(ips[i])
    assert ping(ips[109], netns=namespaces[0].path)

    async with asyncio.TaskGroup() as tg:
        for p, ns in zip(pods, namespaces):
            tg.create_task(network.teardown_pod(p, ns.path))
    assert host_veths_on(bridge_name) == set()
    assert ipam_files(state_dir) == {}


# ------------------------------------------------------- exhaustion, rules, kill -9


async def test_exhaustion_is_a_clear_error_and_wires_nothing(
    bridge_name: str, pod_cidr: str, state_dir: Path, netns_factory
) -> None:
    tiny = pod_cidr.replace(".0/24", ".0/30")  # inside the test's sunk /24; one pod fits
    net = BridgeNetwork(bridge_name=bridge_name, pod_cidr=tiny, state_dir=state_dir)
    await net.start()
    try:
        first = await net.setup_pod(uid(), netns_factory().path)
        assert first.prefix_len == 30
        second_ns = netns_factory()
        with pytest.raises(NetworkError, match=f"pod CIDR {tiny} is exhausted"):
            await net.setup_pod(uid(), second_ns.path)
        assert "eth0" not in pod_view(second_ns)["links"]
        assert len(host_veths_on(bridge_name)) == 1
    finally:
        await net.destroy()
        await net.stop()


async def test_destroy_and_pruning_of_rules_for_gone_bridges(network: BridgeNetwork, bridge_name: str) -> None:
    gone = f"natgone{secrets.token_hex(3)}"
    for rule in bridge_rules(gone):
        run("iptables", "-w", "5", "-A", CHAIN, *rule)
    try:
        await network.start()  # any start prunes rules whose bridge no longer exists
        rules = run("iptables", "-S", CHAIN).stdout
        assert f"-i {gone} " not in rules
        assert f"-i {bridge_name} " in rules
    finally:
        for rule in bridge_rules(gone):
            run("iptables", "-w", "5", "-D", CHAIN, *rule, check=False)
    await network.destroy()
    assert run("ip", "link", "show", bridge_name, check=False).returncode != 0
    assert f"-i {bridge_name} " not in run("iptables", "-S", CHAIN).stdout


_CRASHING_AGENT = """
import asyncio, logging, sys
import structlog
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
from netplugin.podnet import BridgeNetwork

async def main(bridge, cidr, state_dir, paths):
    net = BridgeNetwork(bridge_name=bridge, pod_cidr=cidr, state_dir=state_dir)
    await net.start()

    async def setup(i, path):
        await net.setup_pod(f"pod-{i}", path)
        print(f"set {i}", flush=True)

    await asyncio.gather(*(setup(i, p) for i, p in enumerate(paths)))
    await asyncio.sleep(60)

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]))
"""


async def test_kill_9_during_concurrent_setups_is_repaired_by_the_next_run(
    bridge_name: str, pod_cidr: str, state_dir: Path, netns_factory
) -> None:
    repo = Path(__file__).resolve().parents[2]
    namespaces = [netns_factory() for _ in range(12)]
    proc = subprocess.Popen(
        [sys.executable, "-c", _CRASHING_AGENT,
         bridge_name, pod_cidr, str(state_dir), *[ns.path for ns in namespaces]],
        cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    try:
        assert proc.stdout is not None
        # Kill it once three pods are done: the other nine are somewhere in between.
        for _ in range(3):
            assert proc.stdout.readline().startswith(b"set ")
    finally:
        proc.kill()
        proc.wait(10)

    net = BridgeNetwork(bridge_name=bridge_name, pod_cidr=pod_cidr, state_dir=state_dir)
    await net.start()
    try:
        before = ipam_files(state_dir)  # whatever the dead agent got to allocate
        print(f"\nkilled with {len(before)} addresses allocated and "
              f"{len(host_veths_on(bridge_name))} veths on the bridge")
        statuses = [await net.setup_pod(f"pod-{i}", ns.path) for i, ns in enumerate(namespaces)]
        for pod_ip, owner in before.items():  # allocations made before the crash are kept
            assert statuses[int(owner.split("-")[1])].ip == pod_ip
        assert len({s.ip for s in statuses}) == 12
        assert ipam_files(state_dir) == {s.ip: f"pod-{i}" for i, s in enumerate(statuses)}
        assert host_veths_on(bridge_name) == {host_veth_name(bridge_name, f"pod-{i}") for i in range(12)}
        for ns, status in zip(namespaces, statuses):
            assert_pod_configured(ns, status, pod_cidr)
        assert ping(statuses[0].ip) and ping(statuses[11].ip, netns=namespaces[0].path)
    finally:
        await net.destroy()
        await net.stop()
