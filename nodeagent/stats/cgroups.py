"""Per-container resource usage read straight from the cgroup filesystem, v1 and v2.

Synchronous and cheap (a handful of small files per container): the sampler calls it
from its one worker thread, never on the event loop. Each figure is read on its own,
so an unreadable file leaves a gap (``None``) and an entry in ``errors`` rather than
losing the whole container; only a cgroup that is gone altogether raises
``CgroupGone`` (the container exited between the list and the read).

Layouts: Docker's cgroupfs driver (``docker/<id>``), the systemd driver
(``system.slice/docker-<id>.scope``), a custom cgroup parent, or whatever
``/proc/<pid>/cgroup`` names when the container's pid is known. v1 controllers may be
mounted alone (``cpuacct``) or co-mounted (``cpu,cpuacct``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
# v1 reports "no limit" as a huge page-aligned number; anything this big is unlimited.
_UNLIMITED = 1 << 62

V1 = "v1"
V2 = "v2"


class CgroupGone(Exception):
    """The container's cgroup does not exist (any more)."""


class UnknownLayout(Exception):
    """The cgroup mount is neither a v2 unified tree nor v1 controller directories."""


@dataclass
class CgroupSample:
    """One reading of one cgroup. ``None`` = not available (see ``errors``)."""

    cpu_usage_ns: int | None = None
    cpu_user_ns: int | None = None
    cpu_system_ns: int | None = None
    memory_usage: int | None = None
    memory_working_set: int | None = None  # usage - inactive_file, never below 0
    memory_rss: int | None = None
    memory_cache: int | None = None
    memory_limit: int | None = None  # None also when unlimited (see memory_unlimited)
    memory_unlimited: bool = False
    page_faults: int | None = None
    major_page_faults: int | None = None
    oom_events: int | None = None
    pids: int | None = None
    io_read_bytes: int | None = None
    io_write_bytes: int | None = None
    io_read_ops: int | None = None
    io_write_ops: int | None = None
    errors: list[str] = field(default_factory=list)


def detect_version(root: Path = CGROUP_ROOT) -> str:
    """``v2`` for a unified mount, ``v1`` for controller directories (hybrid counts as
    v1: the controllers we read live on the v1 side); UnknownLayout otherwise."""
    if (root / "cgroup.controllers").is_file():
        return V2
    if any((root / name).is_dir() for name in ("memory", "cpuacct", "cpu,cpuacct")):
        return V1
    raise UnknownLayout(f"{root}: neither cgroup v2 (cgroup.controllers) nor v1 controller directories")


def is_cgroup_v2(root: Path = CGROUP_ROOT) -> bool:
    return (root / "cgroup.controllers").is_file()


def _expand_slice(slice_name: str) -> str:
    """``kubepods-burstable.slice`` -> ``kubepods.slice/kubepods-burstable.slice``."""
    stem = slice_name[: -len(".slice")]
    parts = stem.split("-")
    return "/".join("-".join(parts[: i + 1]) + ".slice" for i in range(len(parts)))


def _relative_candidates(container_id: str, cgroup_parent: str | None) -> list[str]:
    candidates = [f"docker/{container_id}", f"system.slice/docker-{container_id}.scope"]
    if cgroup_parent:
        parent = cgroup_parent.strip("/")
        if parent.endswith(".slice"):
            # systemd driver: the parent names a slice nested by its dashes.
            candidates.insert(0, f"{_expand_slice(parent)}/docker-{container_id}.scope")
        candidates.insert(0, f"{parent}/{container_id}")
    return candidates


def _from_proc(pid: int, controller: str | None, proc: Path = Path("/proc")) -> str | None:
    """The cgroup path of ``pid`` for ``controller`` (v1) or the unified hierarchy (v2)."""
    try:
        lines = (proc / str(pid) / "cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        names = parts[1].split(",") if parts[1] else []
        if (controller is None and not names) or (controller is not None and controller in names):
            return parts[2].lstrip("/")
    return None


class CgroupReader:
    """Finds and reads container cgroups under one mount root (detected once)."""

    def __init__(self, root: Path = CGROUP_ROOT, *, version: str | None = None) -> None:
        self.root = Path(root)
        self.version = version or detect_version(self.root)
        if self.version == V1:
            self._cpuacct = next((self.root / n for n in ("cpuacct", "cpu,cpuacct", "cpuacct,cpu")
                                  if (self.root / n).is_dir()), self.root / "cpuacct")
            self._memory = self.root / "memory"
            self._blkio = self.root / "blkio"
            self._pids = self.root / "pids"
            self._has_blkio = self._blkio.is_dir()
            self._has_pids = self._pids.is_dir()
        # container id -> relative cgroup path, found once per container
        self._paths: dict[str, str] = {}
        # relative path -> the group's directories, joined once (pathlib's joins were a
        # sixth of a round's CPU at 220 containers)
        self._dirs: dict[str, tuple] = {}

    def forget(self, keep: set[str]) -> None:
        for cid in [c for c in self._paths if c not in keep]:
            self._dirs.pop(self._paths.pop(cid), None)

    def relative_path(self, container_id: str, *, cgroup_parent: str | None = None,
                      pid: int | None = None) -> str:
        cached = self._paths.get(container_id)
        if cached is not None:
            return cached
        base = self.root if self.version == V2 else self._memory
        relatives = _relative_candidates(container_id, cgroup_parent)
        if pid:
            from_proc = _from_proc(pid, None if self.version == V2 else "memory")
            if from_proc:
                relatives.insert(0, from_proc)
        for relative in relatives:
            if (base / relative).is_dir():
                self._paths[container_id] = relative
                return relative
        raise CgroupGone(f"cgroup of container {container_id[:12]} not found under {base} "
                         f"(tried {', '.join(relatives)})")

    def read(self, container_id: str, *, cgroup_parent: str | None = None,
             pid: int | None = None) -> CgroupSample:
        if not container_id:
            raise ValueError("container_id must not be empty")
        relative = self.relative_path(container_id, cgroup_parent=cgroup_parent, pid=pid)
        return self.read_path(relative, what=container_id[:12])

    def read_path(self, relative: str, *, what: str = "") -> CgroupSample:
        """Read the cgroup at ``relative`` (the root cgroup for ``""``)."""
        # No existence check up front (a syscall per container per round): a group that
        # vanished shows up as a missing file, which _Gaps turns into CgroupGone.
        dirs = self._dirs.get(relative)
        if dirs is None:
            if self.version == V2:
                dirs = (self.root / relative,)
            else:
                dirs = (self._memory / relative, self._cpuacct / relative,
                        self._blkio / relative if self._has_blkio else None,
                        self._pids / relative if self._has_pids else None)
            self._dirs[relative] = dirs
        if self.version == V2:
            return _read_v2(*dirs)
        return _read_v1(*dirs)


# --- file readers -----------------------------------------------------------------------

def _read(path: str | Path) -> bytes:
    # os.open/os.read: a third of the cost of open().read() for these tiny files,
    # which matters at ~10 files x 330 containers per round.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 65536)
    finally:
        os.close(fd)


def _read_int(path: str | Path) -> int:
    return int(_read(path).strip())


def _read_kv(path: str | Path) -> dict[str, int]:
    """``key value`` lines (memory.stat, cpu.stat, ...) as ints; other lines skipped."""
    return {k: int(v) for k, _, v in (line.partition(" ") for line in _read(path).decode().splitlines())
            if v.isdigit()}


class _Gaps:
    """Collects what could not be read; a vanished directory is re-raised as CgroupGone."""

    def __init__(self, sample: CgroupSample, group: Path) -> None:
        self.sample = sample
        self.group = group

    def __call__(self, what: str, fn):
        try:
            return fn()
        except FileNotFoundError as exc:
            if not self.group.is_dir():
                raise CgroupGone(f"cgroup {self.group} vanished") from None
            self.sample.errors.append(f"{what}: {exc.filename or exc}: not present")
        except (OSError, ValueError) as exc:
            self.sample.errors.append(f"{what}: {exc}")
        return None


def _read_v1(memory_dir: Path, cpuacct_dir: Path, blkio_dir: Path | None,
             pids_dir: Path | None) -> CgroupSample:
    s = CgroupSample()
    gap = _Gaps(s, memory_dir)
    memory, cpuacct, blkio, pids = (str(memory_dir) + "/", str(cpuacct_dir) + "/",
                                    f"{blkio_dir}/", f"{pids_dir}/")
    s.cpu_usage_ns = gap("cpu", lambda: _read_int(cpuacct + "cpuacct.usage"))
    cpu = gap("cpu", lambda: _read_kv(cpuacct + "cpuacct.stat"))
    if cpu:
        # USER_HZ ticks; the kernel's clock tick is 100 Hz on Linux builds we target.
        tick = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
        s.cpu_user_ns = cpu.get("user", 0) * tick
        s.cpu_system_ns = cpu.get("system", 0) * tick
    stat = gap("memory", lambda: _read_kv(memory + "memory.stat"))
    usage = gap("memory", lambda: _read_int(memory + "memory.usage_in_bytes"))
    limit = gap("memory", lambda: _read_int(memory + "memory.limit_in_bytes"))
    if usage is not None:
        s.memory_usage = usage
    if stat is not None:
        inactive_file = stat.get("total_inactive_file", stat.get("inactive_file", 0))
        if usage is not None:
            s.memory_working_set = max(0, usage - inactive_file)
        s.memory_rss = stat.get("total_rss", stat.get("rss", 0))
        s.memory_cache = stat.get("total_cache", stat.get("cache", 0))
        s.page_faults = stat.get("total_pgfault", stat.get("pgfault"))
        s.major_page_faults = stat.get("total_pgmajfault", stat.get("pgmajfault"))
    if limit is not None:
        s.memory_unlimited = limit >= _UNLIMITED
        s.memory_limit = None if s.memory_unlimited else limit
    oom = gap("oom", lambda: _read_kv(memory + "memory.oom_control"))
    if oom is not None:
        s.oom_events = oom.get("oom_kill", 0)
    if pids_dir is not None:
        s.pids = gap("pids", lambda: _read_int(pids + "pids.current"))
    if blkio_dir is not None:
        io_bytes = gap("io", lambda: _read_blkio(blkio + "blkio.throttle.io_service_bytes"))
        io_ops = gap("io", lambda: _read_blkio(blkio + "blkio.throttle.io_serviced"))
        if io_bytes is not None:
            s.io_read_bytes, s.io_write_bytes = io_bytes
        if io_ops is not None:
            s.io_read_ops, s.io_write_ops = io_ops
    return s


def _read_blkio(path: Path) -> tuple[int, int]:
    """Sum Read and Write over devices (lines ``MAJ:MIN Read N``; ``Total N`` skipped)."""
    read = write = 0
    if True:
        for line in _read(path).decode().splitlines():
            parts = line.split()
            if len(parts) != 3:
                continue
            if parts[1] == "Read":
                read += int(parts[2])
            elif parts[1] == "Write":
                write += int(parts[2])
    return read, write


def _read_io_stat(path: Path) -> tuple[int, int, int, int]:
    """v2 io.stat: ``MAJ:MIN rbytes=.. wbytes=.. rios=.. wios=..`` per device, summed."""
    totals = {"rbytes": 0, "wbytes": 0, "rios": 0, "wios": 0}
    if True:
        for line in _read(path).decode().splitlines():
            for item in line.split()[1:]:
                key, _, value = item.partition("=")
                if key in totals:
                    totals[key] += int(value)
    return totals["rbytes"], totals["wbytes"], totals["rios"], totals["wios"]


def _read_v2(group: Path) -> CgroupSample:
    s = CgroupSample()
    gap = _Gaps(s, group)
    cpu = gap("cpu", lambda: _read_kv(group / "cpu.stat"))
    if cpu is not None:
        s.cpu_usage_ns = cpu["usage_usec"] * 1000 if "usage_usec" in cpu else None
        s.cpu_user_ns = cpu.get("user_usec", 0) * 1000
        s.cpu_system_ns = cpu.get("system_usec", 0) * 1000
    usage = gap("memory", lambda: _read_int(group / "memory.current"))
    stat = gap("memory", lambda: _read_kv(group / "memory.stat"))
    raw_limit = gap("memory", lambda: (group / "memory.max").read_text().strip())
    if usage is not None:
        s.memory_usage = usage
    if stat is not None:
        if usage is not None:
            s.memory_working_set = max(0, usage - stat.get("inactive_file", 0))
        s.memory_rss = stat.get("anon", 0)
        s.memory_cache = stat.get("file", 0)
        s.page_faults = stat.get("pgfault")
        s.major_page_faults = stat.get("pgmajfault")
    if raw_limit is not None:
        s.memory_unlimited = raw_limit == "max"
        s.memory_limit = None if s.memory_unlimited else int(raw_limit)
    events = gap("oom", lambda: _read_kv(group / "memory.events"))
    if events is not None:
        s.oom_events = events.get("oom_kill", 0)
    s.pids = gap("pids", lambda: _read_int(group / "pids.current"))
    io = gap("io", lambda: _read_io_stat(group / "io.stat"))
    if io is not None:
        s.io_read_bytes, s.io_write_bytes, s.io_read_ops, s.io_write_ops = io
    return s


__all__ = ["CGROUP_ROOT", "CgroupGone", "CgroupReader", "CgroupSample", "UnknownLayout",
           "V1", "V2", "detect_version", "is_cgroup_v2"]
