"""BridgeNetwork heals a damaged IPAM store from the runtime's view (real netns)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from netplugin.podnet import BridgeNetwork
from netplugin.types import NetworkError, SandboxNetns
from tests.netplugin.conftest import run

pytestmark = pytest.mark.root


def eth0_ipv4(ns) -> list[str]:
    out = run("ip", "-n", ns.name, "-4", "-o", "addr", "show", "dev", "eth0").stdout
    return [line.split()[3].split("/")[0] for line in out.splitlines()]


def address_files(state_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in state_dir.iterdir() if p.name[0].isdigit()}


async def test_damaged_store_is_repaired_before_the_next_setup(
    bridge_name: str, pod_cidr: str, state_dir: Path, netns_factory
) -> None:
    first = BridgeNetwork(bridge_name=bridge_name, pod_cidr=pod_cidr, state_dir=state_dir)
    await first.start()
    pods = {str(uuid.uuid4()): netns_factory() for _ in range(3)}
    a, b, c = pods
    ips = {uid: (await first.setup_pod(uid, ns.path)).ip for uid, ns in pods.items()}
    await first.stop()
    # Damage while the agent is down: the marker truncated, A's file names B, C's file
    # zero-filled, and a stray zero-filled file nobody uses.
    (state_dir / "network").write_text(pod_cidr[:5])
    (state_dir / ips[a]).write_text(f"{b}\n")
    (state_dir / ips[c]).write_bytes(b"\0" * 37)
    stray = pod_cidr.rsplit(".", 1)[0] + ".200"
    (state_dir / stray).write_bytes(b"\0" * 37)

    calls = 0

    async def view() -> list[SandboxNetns]:
        nonlocal calls
        calls += 1
        return [SandboxNetns(uid, ns.path) for uid, ns in pods.items()]

    net = BridgeNetwork(bridge_name=bridge_name, pod_cidr=pod_cidr, state_dir=state_dir, runtime_view=view)
    await net.start()  # the truncated marker does not stop the start
    try:
        newcomer_ns = netns_factory()
        newcomer = str(uuid.uuid4())
        got = await net.setup_pod(newcomer, newcomer_ns.path)
        assert calls == 1
        assert got.ip not in ips.values()  # no address reaches two pods
        assert address_files(state_dir) == {
            ips[a]: f"{a}\n".encode(), ips[b]: f"{b}\n".encode(), ips[c]: f"{c}\n".encode(),
            got.ip: f"{newcomer}\n".encode(),
        }  # the stray address is free again, nobody holds two
        # Re-running the existing pods' setup keeps their addresses; no second repair.
        for uid, ns in pods.items():
            assert (await net.setup_pod(uid, ns.path)).ip == ips[uid]
            assert eth0_ipv4(ns) == [ips[uid]]
        assert calls == 1
        assert (state_dir / "network").read_text() == f"{pod_cidr}\n"
    finally:
        await net.stop()
        await first.start()
        await first.destroy()
        await first.stop()


async def test_setup_waits_for_the_runtime_when_the_view_fails(
    bridge_name: str, pod_cidr: str, state_dir: Path, netns_factory
) -> None:
    async def view() -> list[SandboxNetns]:
        raise ConnectionError("docker is down")

    net = BridgeNetwork(bridge_name=bridge_name, pod_cidr=pod_cidr, state_dir=state_dir, runtime_view=view)
    await net.start()
    try:
        with pytest.raises(NetworkError, match="docker is down"):
            await net.setup_pod(str(uuid.uuid4()), netns_factory().path)
        assert address_files(state_dir) == {}
        assert await net.garbage_collect(set()) == []  # GC carries on
    finally:
        await net.destroy()
        await net.stop()
