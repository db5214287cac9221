"""Container resource usage read straight from the cgroup filesystem.

Synchronous and cheap (a handful of small files); callers run it in a thread.
Handles cgroup v1 and v2, with Docker's cgroupfs (``docker/<id>``) and systemd
(``system.slice/docker-<id>.scope``) layouts, a custom cgroup parent, or the
container's own ``/proc/<pid>/cgroup`` when its pid is known.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from runtime.types import NotFound

CGROUP_ROOT = Path("/sys/fs/cgroup")
# v1 reports "no limit" as a huge page-aligned number; anything this big is unlimited.
_UNLIMITED = 1 << 62


@dataclass(frozen=True)
class CgroupStats:
    cpu_usage_ns: int
    memory_usage: int
    memory_working_set: int  # usage - inactive_file, never below 0
    memory_rss: int
    memory_cache: int
    memory_limit: int | None  # None = unlimited


def is_cgroup_v2(root: Path = CGROUP_ROOT) -> bool:
    return (root / "cgroup.controllers").is_file()


def _relative_candidates(container_id: str, cgroup_parent: str | None) -> list[str]:
    candidates = [f"docker/{container_id}", f"system.slice/docker-{container_id}.scope"]
    if cgroup_parent:
        parent = cgroup_parent.strip("/")
        if parent.endswith(".slice"):
            # systemd driver: the parent names a slice nested by its dashes.
            nested = _expand_slice(parent)
            candidates.insert(0, f"{nested}/docker-{container_id}.scope")
        candidates.insert(0, f"{parent}/{container_id}")
    return candidates


def _expand_slice(slice_name: str) -> str:
    """``kubepods-burstable.slice`` -> ``kubepods.slice/kubepods-burstable.slice``."""
    stem = slice_name[: -len(".slice")]
    parts = stem.split("-")
    return "/".join("-".join(parts[: i + 1]) + ".slice" for i in range(len(parts)))


def _from_proc(pid: int, controller: str | None) -> str | None:
    """The cgroup path of ``pid`` for ``controller`` (v1) or the unified hierarchy (v2)."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _hier, controllers, path = line.split(":", 2)
        names = controllers.split(",") if controllers else []
        if (controller is None and not names) or (controller is not None and controller in names):
            return path.lstrip("/")
    return None


def _find_dir(root: Path, controller: str | None, container_id: str,
              cgroup_parent: str | None, pid: int | None) -> Path:
    base = root / controller if controller else root
    relatives = _relative_candidates(container_id, cgroup_parent)
    if pid:
        from_proc = _from_proc(pid, controller)
        if from_proc:
            relatives.insert(0, from_proc)
    for relative in relatives:
        path = base / relative
        if path.is_dir():
            return path
    raise NotFound(
        f"cgroup of container {container_id[:12]} not found under {base} "
        f"(tried {', '.join(relatives)})"
    )


def _read_int(path: Path) -> int:
    return int(path.read_text().strip())


def _read_stat(path: Path) -> dict[str, int]:
    values: dict[str, int] = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(" ")
        try:
            values[key] = int(value)
        except ValueError:
            continue
    return values


def read_container_stats(
    container_id: str,
    *,
    root: Path = CGROUP_ROOT,
    cgroup_parent: str | None = None,
    pid: int | None = None,
) -> CgroupStats:
    """CPU and memory usage of a Docker container; NotFound when it has no cgroup."""
    if not container_id:
        raise ValueError("container_id must not be empty")
    try:
        if is_cgroup_v2(root):
            return _read_v2(_find_dir(root, None, container_id, cgroup_parent, pid))
        memory = _find_dir(root, "memory", container_id, cgroup_parent, pid)
        cpuacct = _find_dir(root, "cpuacct", container_id, cgroup_parent, pid)
        return _read_v1(memory, cpuacct)
    except FileNotFoundError as exc:
        # The container went away between finding its directory and reading it.
        raise NotFound(f"cgroup of container {container_id[:12]} vanished: {exc}") from None


def _read_v1(memory: Path, cpuacct: Path) -> CgroupStats:
    stat = _read_stat(memory / "memory.stat")
    usage = _read_int(memory / "memory.usage_in_bytes")
    limit = _read_int(memory / "memory.limit_in_bytes")
    inactive_file = stat.get("total_inactive_file", stat.get("inactive_file", 0))
    return CgroupStats(
        cpu_usage_ns=_read_int(cpuacct / "cpuacct.usage"),
        memory_usage=usage,
        memory_working_set=max(0, usage - inactive_file),
        memory_rss=stat.get("total_rss", stat.get("rss", 0)),
        memory_cache=stat.get("total_cache", stat.get("cache", 0)),
        memory_limit=None if limit >= _UNLIMITED else limit,
    )


def _read_v2(group: Path) -> CgroupStats:
    stat = _read_stat(group / "memory.stat")
    usage = _read_int(group / "memory.current")
    raw_limit = (group / "memory.max").read_text().strip()
    cpu = _read_stat(group / "cpu.stat")
    return CgroupStats(
        cpu_usage_ns=cpu.get("usage_usec", 0) * 1000,
        memory_usage=usage,
        memory_working_set=max(0, usage - stat.get("inactive_file", 0)),
        memory_rss=stat.get("anon", 0),
        memory_cache=stat.get("file", 0),
        memory_limit=None if raw_limit == "max" else int(raw_limit),
    )


__all__ = ["CgroupStats", "read_container_stats", "is_cgroup_v2"]


def read_container_pids(
    container_id: str, *, root: Path = CGROUP_ROOT, cgroup_parent: str | None = None,
    pid: int | None = None,
) -> int:
    """Number of tasks in a container's cgroup (``pids.current``); NotFound when gone."""
    try:
        group = (_find_dir(root, None, container_id, cgroup_parent, pid) if is_cgroup_v2(root)
                 else _find_dir(root, "pids", container_id, cgroup_parent, pid))
        return _read_int(group / "pids.current")
    except FileNotFoundError as exc:
        raise NotFound(f"cgroup of container {container_id[:12]} vanished: {exc}") from None
