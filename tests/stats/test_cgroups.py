"""cgroup readers against recorded trees (v1 recorded on this machine from a busybox
container that wrote 8 MiB to /dev/shm; v2 in the kernel's file formats), layout
variants, faults (vanished groups, unreadable files, unknown layouts), and the real
cgroup2 hierarchy of this hybrid host."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from nodeagent.stats.cgroups import (CgroupGone, CgroupReader, UnknownLayout, V1, V2, _expand_slice,
                                     detect_version)

FIXTURES = Path(__file__).parent / "fixtures"
CID = "c0ffee" + "0" * 58
MiB = 1 << 20


def _tree(tmp_path: Path, name: str) -> Path:
    root = tmp_path / name
    shutil.copytree(FIXTURES / name, root)
    return root


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_recorded_v1_tree():
    reader = CgroupReader(FIXTURES / "v1")
    assert reader.version == V1
    s = reader.read(CID)
    # recorded: memory.usage_in_bytes 8867840, cpuacct.usage 42539120, 8 MiB shm as cache
    assert (s.memory_usage, s.cpu_usage_ns) == (8867840, 42539120)
    assert s.memory_working_set == 8867840  # total_inactive_file 0 in the recording
    assert (s.memory_cache, s.memory_rss) == (8 * MiB, 110592)
    assert (s.page_faults, s.major_page_faults, s.oom_events, s.pids) == (1629, 0, 0, 2)
    assert s.memory_limit is None and s.memory_unlimited
    assert (s.cpu_user_ns, s.cpu_system_ns) == (2 * 10_000_000, 1 * 10_000_000)
    assert (s.io_read_bytes, s.io_write_bytes) == (0, 0)  # "Total 0" only: no device lines
    assert s.errors == []


def test_v1_working_set_limit_and_block_io(tmp_path):
    root = _tree(tmp_path, "v1")
    mem = root / "memory" / "docker" / CID
    stat = (mem / "memory.stat").read_text().replace("total_inactive_file 0", "total_inactive_file 4194304")
    (mem / "memory.stat").write_text(stat)
    (mem / "memory.limit_in_bytes").write_text("67108864\n")
    (mem / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    blkio = root / "blkio" / "docker" / CID
    (blkio / "blkio.throttle.io_service_bytes").write_text(
        "8:0 Read 4096\n8:0 Write 8192\n8:0 Sync 0\n8:0 Async 12288\n8:0 Total 12288\n"
        "8:16 Read 100\n8:16 Write 0\nTotal 12388\n")
    (blkio / "blkio.throttle.io_serviced").write_text("8:0 Read 1\n8:0 Write 2\n8:16 Read 3\nTotal 6\n")
    s = CgroupReader(root).read(CID)
    assert s.memory_working_set == 8867840 - 4 * MiB
    assert (s.memory_limit, s.memory_unlimited, s.oom_events) == (64 * MiB, False, 2)
    assert (s.io_read_bytes, s.io_write_bytes, s.io_read_ops, s.io_write_ops) == (4196, 8192, 4, 2)


def test_recorded_v2_tree_systemd_driver():
    reader = CgroupReader(FIXTURES / "v2")
    assert reader.version == V2
    s = reader.read(CID)  # found as system.slice/docker-<id>.scope
    assert (s.cpu_usage_ns, s.cpu_user_ns, s.cpu_system_ns) == (2_500_000_000, 2_000_000_000, 500_000_000)
    assert (s.memory_usage, s.memory_working_set) == (50 * MiB, 50 * MiB - 8 * MiB)
    assert (s.memory_rss, s.memory_cache, s.memory_limit) == (40 * MiB, 10 * MiB, 100 * MiB)
    assert (s.page_faults, s.major_page_faults, s.oom_events, s.pids) == (12000, 3, 1, 3)
    assert (s.io_read_bytes, s.io_write_bytes, s.io_read_ops, s.io_write_ops) == (1052672, 2 * MiB, 11, 20)
    assert s.errors == []


def test_v2_cgroup_parent_and_slices(tmp_path):
    _write(tmp_path / "cgroup.controllers", "cpu memory\n")
    group = tmp_path / "kubepods.slice" / "kubepods-burstable.slice" / f"docker-{CID}.scope"
    _write(group / "cpu.stat", "usage_usec 7\n")
    s = CgroupReader(tmp_path).read(CID, cgroup_parent="kubepods-burstable.slice")
    assert s.cpu_usage_ns == 7000
    assert _expand_slice("kubepods-burstable-pod1.slice") == (
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice")
    # memory files absent: a gap with a reason, not a failure
    assert s.memory_usage is None and any("memory" in e for e in s.errors)


def test_working_set_never_negative(tmp_path):
    _write(tmp_path / "cgroup.controllers", "memory\n")
    group = tmp_path / "docker" / CID
    _write(group / "memory.current", "100\n")
    _write(group / "memory.stat", "inactive_file 500\n")
    assert CgroupReader(tmp_path).read(CID).memory_working_set == 0


def test_vanished_group_is_gone_not_an_error(tmp_path):
    root = _tree(tmp_path, "v1")
    reader = CgroupReader(root)
    reader.read(CID)  # path now cached
    for controller in ("memory", "cpuacct", "blkio", "pids"):
        shutil.rmtree(root / controller / "docker" / CID)
    with pytest.raises(CgroupGone):
        reader.read(CID)
    with pytest.raises(CgroupGone, match="not found"):
        CgroupReader(root).read("f" * 64)


def test_unreadable_file_leaves_a_gap(tmp_path):
    root = _tree(tmp_path, "v2")
    group = root / "system.slice" / f"docker-{CID}.scope"
    (group / "memory.stat").unlink()
    (group / "memory.stat").mkdir()  # reading it fails with IsADirectoryError
    (group / "io.stat").write_text("8:0 rbytes=notanumber\n")
    s = CgroupReader(root).read(CID)
    assert s.cpu_usage_ns == 2_500_000_000 and s.memory_usage == 50 * MiB
    assert s.memory_working_set is None and s.memory_rss is None
    assert s.io_read_bytes is None
    assert any(e.startswith("memory:") for e in s.errors) and any(e.startswith("io:") for e in s.errors)


def test_unknown_layout(tmp_path):
    (tmp_path / "something-else").mkdir()
    with pytest.raises(UnknownLayout):
        detect_version(tmp_path)


@pytest.mark.root
@pytest.mark.docker
def test_real_cgroup2_hierarchy_agrees_with_v1():
    """This hybrid host mounts the unified (v2) hierarchy beside the v1 controllers;
    Docker creates each container's group in both. Without the cpu controller on the
    v2 side, cpu.stat still carries usage_usec: the v2 reader must read it and agree
    with v1's cpuacct.usage for the same busy container (memory: a gap, reason given)."""
    unified = Path("/sys/fs/cgroup/unified")
    mounted = None
    if not (unified / "cgroup.controllers").is_file():
        mounted = Path(f"/tmp/nodeagent-cg2-{os.getpid()}")
        mounted.mkdir(exist_ok=True)
        if subprocess.run(["mount", "-t", "cgroup2", "none", str(mounted)]).returncode != 0:
            pytest.fail("cannot mount cgroup2 on this kernel")
        unified = mounted
    name = f"nodeagent-cg2test-{os.getpid()}"
    cid = subprocess.run(
        ["docker", "run", "-d", "--network", "none", "--name", name, "--label", "nodeagent-test=cg2",
         "busybox:1.35", "sh", "-c", "i=0; while [ $i -lt 400000 ]; do i=$((i+1)); done; exec sleep 60"],
        capture_output=True, text=True, check=True, timeout=120).stdout.strip()
    try:
        v2 = CgroupReader(unified)
        v1 = CgroupReader()
        assert (v2.version, v1.version) == (V2, V1)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            a = v2.read(cid)
            if a.cpu_usage_ns and a.cpu_usage_ns > 200_000_000:
                break
            time.sleep(0.3)
        # the loop is over once usage stops growing; then both views must agree
        time.sleep(1.0)
        a, b = v2.read(cid), v1.read(cid)
        assert a.cpu_usage_ns is not None and b.cpu_usage_ns is not None
        assert abs(a.cpu_usage_ns - b.cpu_usage_ns) <= 0.02 * b.cpu_usage_ns + 2_000_000, (a, b)
        assert a.memory_usage is None and any("memory" in e for e in a.errors)
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=120)
        if mounted is not None:
            subprocess.run(["umount", str(mounted)])
            mounted.rmdir()
