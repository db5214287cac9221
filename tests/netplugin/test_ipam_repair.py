"""A damaged IPAM store heals and never lets one address reach two pods (no root)."""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path

import pytest

from netplugin.ipam import NETWORK_FILE, HostLocalIPAM, IPAMConfigError

CIDR = "10.201.3.0/24"


def ip(last: int) -> IPv4Address:
    return IPv4Address(f"10.201.3.{last}")


def files(state_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in state_dir.iterdir() if p.name[0].isdigit()}


@pytest.mark.parametrize("marker", [b"", b"10.201.3.0/2", b"10.20", b"\0" * 64, b"\xff\xfe garbage", b"banana\n"])
def test_truncated_or_garbled_marker_is_rewritten_and_allocations_kept(tmp_path: Path, marker: bytes) -> None:
    HostLocalIPAM(tmp_path, CIDR).allocate("pod-a")
    (tmp_path / NETWORK_FILE).write_bytes(marker)
    ipam = HostLocalIPAM(tmp_path, CIDR)  # no exception: the agent starts
    assert (tmp_path / NETWORK_FILE).read_text() == f"{CIDR}\n"
    assert ipam.allocations() == {"pod-a": ip(2)}
    assert ipam.allocate("pod-b") == ip(3)


def test_marker_of_another_cidr_without_its_addresses_is_reclaimed(tmp_path: Path) -> None:
    (tmp_path / NETWORK_FILE).write_text("10.201.9.0/24\n")
    (tmp_path / "10.201.3.7").write_text("pod-a\n")
    ipam = HostLocalIPAM(tmp_path, CIDR)
    assert (tmp_path / NETWORK_FILE).read_text() == f"{CIDR}\n"
    assert ipam.allocations() == {"pod-a": ip(7)}


def test_garbled_marker_with_foreign_addresses_is_refused_with_the_fix(tmp_path: Path) -> None:
    (tmp_path / NETWORK_FILE).write_bytes(b"10.201.9.")
    (tmp_path / "10.201.9.2").write_text("old-pod\n")
    with pytest.raises(IPAMConfigError, match=r"10\.201\.9\.2.*remove the pods of the old CIDR"):
        HostLocalIPAM(tmp_path, CIDR)


@pytest.mark.parametrize("content", [b"\0" * 37, b"", b"pod-", b"\xff\xfe\n", b"a\nb\n"])
def test_damaged_address_file_stays_reserved_until_repair_frees_it(tmp_path: Path, content: bytes) -> None:
    ipam = HostLocalIPAM(tmp_path, CIDR)
    (tmp_path / "10.201.3.2").write_bytes(content)
    # Never handed out on a guess...
    assert ipam.allocate("pod-a") == ip(3)
    assert ipam.damaged
    assert ipam.owner_of(ip(2)) == "<unknown:10.201.3.2>"
    # ...and freed once the runtime shows nobody uses it (no leak).
    report = ipam.repair({"pod-a": {ip(3)}})
    assert report["removed"] == ["10.201.3.2=<unknown:10.201.3.2>"]
    assert not ipam.damaged
    assert ipam.allocations() == {"pod-a": ip(3)}
    assert "10.201.3.2" not in files(tmp_path)


def test_damaged_address_file_in_use_is_given_back_to_its_pod(tmp_path: Path) -> None:
    ipam = HostLocalIPAM(tmp_path, CIDR)
    (tmp_path / "10.201.3.5").write_bytes(b"\0" * 37)
    report = ipam.repair({"pod-a": {ip(5)}})
    assert report["recorded"] == ["10.201.3.5=pod-a (was <unknown:10.201.3.5>)"]
    assert files(tmp_path) == {"10.201.3.5": b"pod-a\n"}
    assert ipam.allocate("pod-a") == ip(5)


def test_file_naming_another_pod_never_leaves_a_pod_with_two_addresses(tmp_path: Path) -> None:
    ipam = HostLocalIPAM(tmp_path, CIDR)
    assert ipam.allocate("pod-a") == ip(2)
    assert ipam.allocate("pod-b") == ip(3)
    (tmp_path / "10.201.3.2").write_text("pod-b\n")  # A's file now names B
    assert ipam.damaged is False
    ipam.allocations()
    assert ipam.damaged  # B is named twice
    # The pods' eth0s tell the truth: A uses .2, B uses .3.
    report = ipam.repair({"pod-a": {ip(2)}, "pod-b": {ip(3)}})
    assert report["recorded"] == ["10.201.3.2=pod-a (was pod-b)"]
    assert ipam.allocations() == {"pod-a": ip(2), "pod-b": ip(3)}
    assert ipam.allocate("pod-c") == ip(4)  # neither address is handed out again


def test_duplicate_owner_of_a_stopped_pod_keeps_one_address(tmp_path: Path) -> None:
    ipam = HostLocalIPAM(tmp_path, CIDR)
    (tmp_path / "10.201.3.9").write_text("pod-x\n")
    (tmp_path / "10.201.3.4").write_text("pod-x\n")
    assert ipam.allocate("pod-x") == ip(4)  # deterministic: the lowest
    assert ipam.allocations() == {"pod-x": ip(4)}
    report = ipam.repair({})
    assert report["removed"] == ["10.201.3.9=pod-x"]
    assert files(tmp_path) == {"10.201.3.4": b"pod-x\n"}


def test_lost_file_of_a_running_pod_is_recorded_so_it_is_not_handed_out(tmp_path: Path) -> None:
    ipam = HostLocalIPAM(tmp_path, CIDR)
    ipam.repair({"pod-a": {ip(2)}, "pod-b": {IPv4Address("192.0.2.7")}})  # outside: ignored
    assert ipam.allocations() == {"pod-a": ip(2)}
    assert ipam.allocate("pod-new") == ip(3)


def test_two_running_pods_on_one_address_keep_the_recorded_owner(tmp_path: Path) -> None:
    ipam = HostLocalIPAM(tmp_path, CIDR)
    assert ipam.allocate("pod-b") == ip(2)
    report = ipam.repair({"pod-a": {ip(2)}, "pod-b": {ip(2)}})
    assert report["conflicts"] == ["10.201.3.2: pod-a, pod-b (kept pod-b)"]
    # pod-a gets a fresh address at its next setup (which replaces eth0's).
    assert ipam.allocate("pod-a") == ip(3)
    assert ipam.allocations() == {"pod-a": ip(3), "pod-b": ip(2)}


def test_incomplete_view_removes_nothing(tmp_path: Path) -> None:
    ipam = HostLocalIPAM(tmp_path, CIDR)
    (tmp_path / "10.201.3.6").write_bytes(b"")
    report = ipam.repair({"pod-a": {ip(2)}}, complete=False)
    assert report["removed"] == [] and report["recorded"] == ["10.201.3.2=pod-a (was free)"]
    assert ipam.damaged  # tried again next time
    assert ipam.owner_of(ip(6)) == "<unknown:10.201.3.6>"
