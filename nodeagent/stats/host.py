"""Node-wide figures (psutil and /proc) and per-pod network and filesystem readers.

All synchronous; the sampler runs them on its worker thread.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil


@dataclass
class NodeSample:
    cpu_usage_ns: int
    memory_total: int
    memory_available: int
    memory_usage: int
    memory_working_set: int
    memory_rss: int
    page_faults: int | None
    major_page_faults: int | None
    fs_capacity: int
    fs_available: int
    fs_used: int
    fs_inodes: int
    fs_inodes_free: int
    image_fs_capacity: int
    image_fs_available: int
    image_fs_used: int
    max_pid: int
    num_processes: int
    interfaces: dict[str, "NetSample"] = field(default_factory=dict)


@dataclass
class NetSample:
    rx_bytes: int
    rx_errors: int
    tx_bytes: int
    tx_errors: int


def _meminfo(path: str = "/proc/meminfo") -> dict[str, int]:
    values: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                values[key] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    return values


def _vmstat(path: str = "/proc/vmstat") -> dict[str, int]:
    values: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.partition(" ")
            if key in ("pgfault", "pgmajfault"):
                values[key] = int(value)
    return values


def read_node(root_dir: str, image_dir: str = "/var/lib/docker") -> NodeSample:
    """The node as kubelet's summary sees it: CPU from all non-idle time, memory
    working set = usage - inactive file pages (the same rule as for containers)."""
    times = psutil.cpu_times()
    busy = sum(getattr(times, f) for f in times._fields if f not in ("idle", "iowait", "guest", "guest_nice"))
    mem = psutil.virtual_memory()
    info = _meminfo()
    usage = mem.total - mem.free
    working_set = max(0, usage - info.get("Inactive(file)", 0))
    vm = _vmstat()
    fs = os.statvfs(root_dir if os.path.isdir(root_dir) else "/")
    img = os.statvfs(image_dir if os.path.isdir(image_dir) else "/")
    max_pid, tasks = read_task_limits()
    return NodeSample(
        cpu_usage_ns=int(busy * 1e9),
        memory_total=mem.total,
        memory_available=max(0, mem.total - working_set),
        memory_usage=usage,
        memory_working_set=working_set,
        memory_rss=info.get("AnonPages", 0),
        page_faults=vm.get("pgfault"),
        major_page_faults=vm.get("pgmajfault"),
        fs_capacity=fs.f_blocks * fs.f_frsize,
        fs_available=fs.f_bavail * fs.f_frsize,
        fs_used=(fs.f_blocks - fs.f_bfree) * fs.f_frsize,
        fs_inodes=fs.f_files,
        fs_inodes_free=fs.f_ffree,
        image_fs_capacity=img.f_blocks * img.f_frsize,
        image_fs_available=img.f_bavail * img.f_frsize,
        image_fs_used=(img.f_blocks - img.f_bfree) * img.f_frsize,
        max_pid=max_pid or 0,
        num_processes=tasks or 0,
        interfaces=_node_interfaces(),
    )


def read_task_limits(proc: Path = Path("/proc")) -> tuple[int | None, int | None]:
    """(the node's task limit, tasks now) as kubelet's rlimit stats read them: the
    lower of kernel.pid_max and kernel.threads-max (each thread takes a PID), and the
    tasks that exist from /proc/loadavg's fourth field — threads, not processes, and
    one small read instead of a walk of /proc. None where a file is unreadable."""
    limits = []
    for name in ("sys/kernel/pid_max", "sys/kernel/threads-max"):
        try:
            limits.append(int((proc / name).read_bytes()))
        except (OSError, ValueError):
            pass
    try:
        tasks: int | None = int((proc / "loadavg").read_bytes().split()[3].split(b"/")[1])
    except (OSError, ValueError, IndexError):
        tasks = None
    return (min(limits) if limits else None), tasks


def _node_interfaces() -> dict[str, NetSample]:
    """The node's physical interfaces (pod veths, bridges and tunnels left out, as the
    Summary's node network is about the machine's own links); all of them when the
    machine has no device-backed interface (some VMs and containers)."""
    counters = {name: c for name, c in psutil.net_io_counters(pernic=True).items() if name != "lo"}
    physical = {name for name in counters if os.path.exists(f"/sys/class/net/{name}/device")}
    return {name: NetSample(c.bytes_recv, c.errin, c.bytes_sent, c.errout)
            for name, c in counters.items() if not physical or name in physical}


def read_net_dev(pid: int, proc: Path = Path("/proc")) -> dict[str, NetSample]:
    """Interfaces of the network namespace ``pid`` lives in (``/proc/<pid>/net/dev``
    shows the namespace of that process), loopback left out as kubelet does."""
    result: dict[str, NetSample] = {}
    with open(proc / str(pid) / "net" / "dev") as f:
        lines = f.read().splitlines()[2:]
    for line in lines:
        name, _, rest = line.partition(":")
        name = name.strip()
        fields = rest.split()
        if name == "lo" or len(fields) < 16:
            continue
        result[name] = NetSample(rx_bytes=int(fields[0]), rx_errors=int(fields[2]),
                                 tx_bytes=int(fields[8]), tx_errors=int(fields[10]))
    return result


@dataclass
class DirUsage:
    used_bytes: int
    inodes_used: int


def dir_usage(path: str | os.PathLike, *, budget: float = 2.0) -> DirUsage:
    """Bytes allocated on disk and inodes under ``path`` (like ``du``), without
    following symlinks or crossing into other mounts. Stops after ``budget`` seconds
    (a huge tree is reported as far as it was counted rather than stalling the sampler).
    """
    root = os.fspath(path)
    st = os.lstat(root)
    device = st.st_dev
    used, inodes = st.st_blocks * 512, 1
    seen: set[int] = set()
    deadline = time.monotonic() + budget
    stack = [root]
    while stack:
        if time.monotonic() > deadline:
            break
        current = stack.pop()
        try:
            entries = os.scandir(current)
        except OSError:
            continue
        with entries:
            for entry in entries:
                try:
                    est = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if est.st_dev != device:
                    continue
                if est.st_nlink > 1:
                    if est.st_ino in seen:
                        continue
                    seen.add(est.st_ino)
                used += est.st_blocks * 512
                inodes += 1
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
    return DirUsage(used, inodes)


def file_usage(paths: list[str]) -> DirUsage:
    """Bytes and inodes of the given files (a container's log and its rotations)."""
    used = inodes = 0
    for p in paths:
        try:
            st = os.lstat(p)
        except OSError:
            continue
        used += st.st_blocks * 512
        inodes += 1
    return DirUsage(used, inodes)
