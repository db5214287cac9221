"""Host-local IPAM: pure file-system tests, no root needed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from netplugin.ipam import (
    CURSOR_FILE,
    NETWORK_FILE,
    HostLocalIPAM,
    IPAMConfigError,
    IPAMError,
    IPAMExhaustedError,
)
from netplugin.types import NetworkError

REPO = Path(__file__).resolve().parents[2]


def address_files(state_dir: Path) -> dict[str, str]:
    """What the e2e tests read: files named by an address -> first line (owner)."""
    return {
        p.name: p.read_text().split("\n", 1)[0]
        for p in state_dir.iterdir()
        if p.is_file() and p.name[0].isdigit()
    }


def test_allocates_from_first_host_after_gateway_and_writes_owner_file(tmp_path: Path) -> None:
    ipam = HostLocalIPAM(tmp_path, "10.201.3.0/24")
    assert ipam.gateway == IPv4Address("10.201.3.1")
    assert ipam.allocate("pod-a") == IPv4Address("10.201.3.2")
    assert ipam.allocate("pod-b") == IPv4Address("10.201.3.3")
    assert address_files(tmp_path) == {"10.201.3.2": "pod-a", "10.201.3.3": "pod-b"}
    # Bookkeeping never looks like an address file.
    others = {p.name for p in tmp_path.iterdir()} - set(address_files(tmp_path))
    assert others == {NETWORK_FILE, CURSOR_FILE, "lock"}
    assert all(not name[0].isdigit() for name in others)


def test_allocate_is_idempotent_per_owner(tmp_path: Path) -> None:
    ipam = HostLocalIPAM(tmp_path, "10.201.3.0/24")
    first = ipam.allocate("pod-a")
    assert ipam.allocate("pod-a") == first
    assert ipam.allocations() == {"pod-a": first}
    assert ipam.address_of("pod-a") == first
    assert ipam.owner_of(first) == "pod-a"
    assert ipam.owner_of("10.201.3.9") is None
    assert ipam.owner_of("10.201.3.1") is None  # the gateway belongs to no pod


def test_release_frees_and_cursor_avoids_immediate_reuse(tmp_path: Path) -> None:
    ipam = HostLocalIPAM(tmp_path, "10.201.3.0/24")
    a = ipam.allocate("pod-a")
    ipam.allocate("pod-b")
    assert ipam.release("pod-a") == a
    assert ipam.owner_of(a) is None
    assert ipam.release("pod-a") is None  # idempotent
    # The freed .2 is not handed out again right away: the cursor moves on.
    assert ipam.allocate("pod-c") == IPv4Address("10.201.3.4")
    assert (tmp_path / CURSOR_FILE).read_text().strip() == "10.201.3.4"


def test_never_hands_out_network_gateway_or_broadcast_and_wraps(tmp_path: Path) -> None:
    ipam = HostLocalIPAM(tmp_path, "10.201.3.0/29")  # .2 .. .6 allocatable
    assert ipam.capacity == 5
    got = [ipam.allocate(f"p{i}") for i in range(5)]
    assert [str(ip) for ip in got] == [f"10.201.3.{i}" for i in range(2, 7)]
    ipam.release("p1")  # frees .3
    # Cursor is at .6, the end: the search wraps around to the free .3.
    assert ipam.allocate("late") == IPv4Address("10.201.3.3")


def test_exhaustion_names_the_cidr(tmp_path: Path) -> None:
    ipam = HostLocalIPAM(tmp_path, "10.201.3.0/30")  # only .2
    ipam.allocate("only")
    with pytest.raises(IPAMExhaustedError, match=r"10\.201\.3\.0/30") as info:
        ipam.allocate("one-too-many")
    assert isinstance(info.value, NetworkError)
    assert "one-too-many" in str(info.value)
    assert ipam.allocations() == {"only": IPv4Address("10.201.3.2")}


def test_persists_across_instances(tmp_path: Path) -> None:
    first = HostLocalIPAM(tmp_path, "10.201.3.0/24")
    a = first.allocate("pod-a")
    first.allocate("pod-b")
    first.release("pod-b")
    second = HostLocalIPAM(tmp_path, "10.201.3.0/24")
    assert second.allocations() == {"pod-a": a}
    assert second.allocate("pod-a") == a
    # The cursor survived too: .3 was last reserved, so the next one is .4.
    assert second.allocate("pod-c") == IPv4Address("10.201.3.4")


def test_refuses_a_changed_cidr(tmp_path: Path) -> None:
    HostLocalIPAM(tmp_path, "10.201.3.0/24").allocate("pod-a")
    with pytest.raises(IPAMConfigError, match=r"10\.201\.3\.0/24.*10\.201\.4\.0/24"):
        HostLocalIPAM(tmp_path, "10.201.4.0/24")


def test_refuses_foreign_addresses_without_marker(tmp_path: Path) -> None:
    (tmp_path / "10.9.9.9").write_text("someone\n")
    with pytest.raises(IPAMConfigError, match=r"10\.9\.9\.9"):
        HostLocalIPAM(tmp_path, "10.201.3.0/24")


@pytest.mark.parametrize(
    "cidr, complaint",
    [
        ("10.201.3.1/24", "not a valid network"),  # host bits set
        ("fd00::/64", "IPv4"),
        ("10.201.3.0/31", "too small"),
        ("banana", "not a valid network"),
    ],
)
def test_bad_cidr_is_named(tmp_path: Path, cidr: str, complaint: str) -> None:
    with pytest.raises(IPAMConfigError, match=complaint) as info:
        HostLocalIPAM(tmp_path, cidr)
    assert repr(cidr) in str(info.value)


def test_bad_owner_is_refused(tmp_path: Path) -> None:
    ipam = HostLocalIPAM(tmp_path, "10.201.3.0/24")
    for owner in ("", "two\nlines"):
        with pytest.raises(IPAMError, match="owner"):
            ipam.allocate(owner)
    assert ipam.allocations() == {}


def test_fifty_concurrent_allocations_are_distinct_across_instances(tmp_path: Path) -> None:
    # Two instances on one store stand in for two processes: only the on-disk
    # exclusivity (flock + link) keeps them apart.
    instances = [HostLocalIPAM(tmp_path, "10.201.3.0/24") for _ in range(2)]
    owners = [f"pod-{i}" for i in range(50)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        got = list(pool.map(lambda i: instances[i % 2].allocate(owners[i]), range(50)))
    assert len(set(got)) == 50
    assert address_files(tmp_path) == {str(ip): owner for ip, owner in zip(got, owners)}


def test_stale_temp_files_are_removed_on_open(tmp_path: Path) -> None:
    HostLocalIPAM(tmp_path, "10.201.3.0/24").allocate("pod-a")
    (tmp_path / ".tmp-123-abcdef").write_text("pod-half")
    ipam = HostLocalIPAM(tmp_path, "10.201.3.0/24")
    assert not (tmp_path / ".tmp-123-abcdef").exists()
    assert list(ipam.allocations()) == ["pod-a"]


_CHURN = """
import sys
from netplugin.ipam import HostLocalIPAM
ipam = HostLocalIPAM(sys.argv[1], "10.201.3.0/26")
print("ready", flush=True)
i = 0
while True:
    ipam.allocate(f"churn-{i}")
    ipam.release(f"churn-{i - 10}")  # about ten held at any time
    i += 1
"""


def test_kill_9_at_any_moment_leaves_a_consistent_store(tmp_path: Path) -> None:
    for round_ in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHURN, str(tmp_path)],
            cwd=REPO, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
            time.sleep(0.05 + 0.03 * round_)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        ipam = HostLocalIPAM(tmp_path, "10.201.3.0/26")  # reopening cleans temp files
        files = address_files(tmp_path)
        assert (tmp_path / CURSOR_FILE).exists()  # the child did allocate before dying
        assert all(owner.startswith("churn-") for owner in files.values()), files
        assert len(set(files.values())) == len(files)  # no owner holds two addresses
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
        assert (tmp_path / NETWORK_FILE).read_text() == "10.201.3.0/26\n"
        # Still usable; then start the next round from empty to avoid exhaustion.
        extra = ipam.allocate(f"after-{round_}")
        assert ipam.owner_of(extra) == f"after-{round_}"
        for owner in list(ipam.allocations()):
            ipam.release(owner)


def test_an_empty_address_file_keeps_the_address_reserved(tmp_path: Path) -> None:
    # Only a power cut between link and fsync could leave this; the address must not
    # be handed out twice, and garbage collection can still release it.
    ipam = HostLocalIPAM(tmp_path, "10.201.3.0/24")
    (tmp_path / "10.201.3.2").write_bytes(b"")
    assert ipam.owner_of("10.201.3.2") == "<unknown:10.201.3.2>"
    assert ipam.allocate("pod-a") == IPv4Address("10.201.3.3")
    assert ipam.release("<unknown:10.201.3.2>") == IPv4Address("10.201.3.2")
