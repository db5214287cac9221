"""Fixtures for the pod network tests: real kernel, real netlink, per-test names.

Every test gets its own bridge (``nat<hex>``), its own /24 out of 10.201.0.0/16, its
own state directory and its own network namespaces; finalizers delete all of them.

Network safety: before a bridge exists, the test's /24 is routed into an
``unreachable`` route (metric 4000). The bridge's connected route (metric 0) wins while
the bridge is up; if it is ever missing, packets to the range fail locally instead of
following the host's default route off the machine. Adding that route also reserves the
/24 against concurrent test runs (a second add of the same route fails).
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from netplugin.podnet import BridgeNetwork

SINK_METRIC = "4000"


def run(*argv: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({out.returncode}): {out.stderr.strip()}")
    return out


def ping(target: str, *, netns: str | None = None) -> bool:
    """One bounded ICMP echo (busybox ping: 1 packet, 1 s), optionally from a netns."""
    argv = ["busybox", "ping", "-c", "1", "-W", "1", target]
    if netns is not None:
        argv = ["nsenter", f"--net={netns}", *argv]
    return run(*argv, check=False, timeout=10).returncode == 0


def route_dev(address: str) -> str:
    """The device the host would send ``address`` out of (asserted before any ping)."""
    words = run("ip", "-o", "route", "get", address).stdout.split()
    return words[words.index("dev") + 1] if "dev" in words else words[0]


class Netns:
    """A network namespace made with ``ip netns add``; its path is what a runtime passes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.path = f"/var/run/netns/{name}"

    def ip(self, *argv: str) -> str:
        return run("ip", "-n", self.name, *argv).stdout

    def delete(self) -> None:
        run("ip", "netns", "del", self.name, check=False)


@pytest.fixture
def netns_factory() -> Iterator:
    made: list[Netns] = []

    def make() -> Netns:
        ns = Netns(f"natns-{secrets.token_hex(5)}")
        run("ip", "netns", "add", ns.name)
        made.append(ns)
        return ns

    yield make
    for ns in made:
        ns.delete()


@pytest.fixture
def pod_cidr() -> Iterator[str]:
    """A /24 of 10.201.0.0/16 nobody else uses right now, sunk as described above."""
    candidates = list(range(0, 256))
    random.shuffle(candidates)
    for third in candidates:
        cidr = f"10.201.{third}.0/24"
        if run("ip", "route", "show", "root", cidr).stdout.strip():
            continue
        added = run("ip", "route", "add", "unreachable", cidr, "metric", SINK_METRIC, check=False)
        if added.returncode == 0:
            break
    else:
        raise AssertionError("no free /24 left in 10.201.0.0/16")
    yield cidr
    run("ip", "route", "del", "unreachable", cidr, "metric", SINK_METRIC, check=False)


@pytest.fixture
def bridge_name() -> Iterator[str]:
    name = f"nat{secrets.token_hex(4)}"
    yield name
    run("ip", "link", "del", name, check=False)
    # The forwarding rule of this bridge, if the test left one.
    rule = ["-i", name, "-o", name, "-m", "comment", "--comment", f"nodeagent pod network {name}", "-j", "ACCEPT"]
    while run("iptables", "-w", "5", "-D", "NODEAGENT-PODNET", *rule, check=False).returncode == 0:
        pass


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "ipam"


@pytest.fixture
async def network(bridge_name: str, pod_cidr: str, state_dir: Path) -> AsyncIterator[BridgeNetwork]:
    net = BridgeNetwork(bridge_name=bridge_name, pod_cidr=pod_cidr, state_dir=state_dir)
    await net.start()
    yield net
    with contextlib.suppress(Exception):
        await net.destroy()
    await net.stop()


def host_veths_on(bridge: str) -> set[str]:
    path = Path(f"/sys/class/net/{bridge}/brif")
    return set(os.listdir(path)) if path.exists() else set()
