"""Per-pod usage for eviction ranking, read from the runtime and the cgroups:
memory working set and process count per container from its cgroup; ephemeral
storage as the container's writable layer plus its log file, plus the pod's emptyDir
volumes (kubelet's accounting). Only the resource under pressure is read."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import structlog

from nodeagent.eviction.ranking import EPHEMERAL_STORAGE, MEMORY, ContainerUsage, PodUsageStats
from nodeagent.stats.cgroups import CgroupGone, CgroupReader
from runtime.docker import DockerRuntime
from runtime.types import ContainerState, NotFound

log = structlog.get_logger(__name__)

EMPTY_DIR = "kubernetes.io~empty-dir"


def _du(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                continue
    return total


class RuntimePodUsage:
    def __init__(self, runtime: DockerRuntime, root_dir: str | Path) -> None:
        self.runtime = runtime
        self.pods_dir = Path(root_dir) / "pods"
        self._cgroups: CgroupReader | None = None  # detected on first use (reads sysfs)

    async def usage(self, pods: list[dict], resource: str) -> dict[str, PodUsageStats]:
        wanted = {p["metadata"]["uid"] for p in pods}
        out: dict[str, PodUsageStats] = {uid: PodUsageStats() for uid in wanted}
        containers = [c for c in await self.runtime.list_containers(None)
                      if c.pod.uid in wanted and c.state == ContainerState.RUNNING]
        for c in containers:
            try:
                out[c.pod.uid].containers[c.name] = await self._container(c.id, resource)
            except (NotFound, CgroupGone):
                continue  # gone meanwhile: it uses nothing now
            except Exception as exc:  # a gap, not a failed round
                log.debug("container usage unavailable", container=c.id[:12], error=str(exc))
        if resource == EPHEMERAL_STORAGE:
            for uid in wanted:
                out[uid].volumes_disk = await asyncio.to_thread(
                    _du, self.pods_dir / uid / "volumes" / EMPTY_DIR)
        return out

    async def _container(self, container_id: str, resource: str) -> ContainerUsage:
        if resource == MEMORY:
            sample = await asyncio.to_thread(self._reader().read, container_id)
            return ContainerUsage(memory=sample.memory_working_set or 0)
        if resource == EPHEMERAL_STORAGE:
            info = await self.runtime.engine.call(
                f"inspect container {container_id[:12]} size", "GET",
                f"containers/{container_id}/json", params={"size": "1"})
            log_size = 0
            if info.get("LogPath"):
                try:
                    log_size = os.path.getsize(info["LogPath"])
                except OSError:
                    pass
            return ContainerUsage(disk=int(info.get("SizeRw") or 0) + log_size)
        sample = await asyncio.to_thread(self._reader().read, container_id)
        return ContainerUsage(processes=sample.pids or 0)

    def _reader(self) -> CgroupReader:
        if self._cgroups is None:
            self._cgroups = CgroupReader()
        return self._cgroups
