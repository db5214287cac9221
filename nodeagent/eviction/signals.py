"""What the eviction manager observes, read like kubelet's summary provider does.

* memory.available = MemTotal − working set of the root memory cgroup (usage minus
  inactive file pages), so reclaimable page cache does not count as used; where the
  root cgroup cannot be read, psutil's ``available``.
* nodefs = the filesystem of the agent's root directory (pod volumes, logs);
  imagefs = the filesystem of Docker's data root (images, writable layers).
* pid.available = the task limit (the lower of kernel.pid_max and kernel.threads-max)
  − the tasks that exist (/proc/loadavg), as kubelet's rlimit stats.

Blocking reads of a few small files: the manager runs ``observe`` in a thread.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import psutil

from nodeagent.stats.host import read_task_limits

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class Observation:
    available: int
    capacity: int


def _stat_value(path: Path, key: str) -> int | None:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        return None
    return None


def memory_observation(cgroup_root: Path = CGROUP_ROOT) -> Observation:
    total = psutil.virtual_memory().total
    working_set = None
    try:
        if (cgroup_root / "cgroup.controllers").is_file():  # v2: no root memory.current
            meminfo = psutil.virtual_memory()
            inactive = getattr(meminfo, "inactive", 0)
            working_set = meminfo.total - meminfo.free - inactive
        else:
            usage = int((cgroup_root / "memory" / "memory.usage_in_bytes").read_text())
            inactive = _stat_value(cgroup_root / "memory" / "memory.stat", "total_inactive_file") or 0
            working_set = max(0, usage - inactive)
    except (OSError, ValueError):
        working_set = None
    if working_set is None:
        return Observation(psutil.virtual_memory().available, total)
    return Observation(max(0, total - working_set), total)


def filesystem_observations(path: str) -> tuple[Observation, Observation] | None:
    """(bytes, inodes) of the filesystem holding ``path``; None when unreadable."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return (Observation(st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize),
            Observation(st.f_favail, st.f_files))


def pid_observation() -> Observation:
    limit, tasks = read_task_limits()
    limit = limit or 32768
    return Observation(max(0, limit - (tasks or 0)), limit)


def observe(root_dir: str, image_dir: str | None) -> dict[str, Observation]:
    """Every signal that can be read now (a missing one has no entry)."""
    out = {"memory.available": memory_observation(), "pid.available": pid_observation()}
    nodefs = filesystem_observations(root_dir if os.path.exists(root_dir) else "/")
    if nodefs is not None:
        out["nodefs.available"], out["nodefs.inodesFree"] = nodefs
    imagefs = filesystem_observations(image_dir) if image_dir else None
    if imagefs is None:
        imagefs = nodefs  # one filesystem for both, as on most single-disk nodes
    if imagefs is not None:
        out["imagefs.available"], out["imagefs.inodesFree"] = imagefs
    return out
