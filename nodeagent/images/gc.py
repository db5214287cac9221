"""Image garbage collection, as kubelet's image GC manager:

* every ``period`` the images and the containers using them are listed; an image's
  ``first_detected`` and ``last_used`` times are kept in memory (lost on restart, which
  only delays collection by ``min_age``, as in kubelet);
* when the image filesystem is at least ``high`` % used, unused images are removed,
  least recently used first (then oldest detected), until usage is below ``low`` %;
* never removed: an image any container uses (running or not; Docker refuses anyway),
  an image a pod on the node asks for (even before its container exists), the pause
  image, or one detected less than ``min_age`` ago; and nothing at all before every pod
  source has reported (until then what the pods need is unknown).

``delete_unused`` removes every unused image at once: eviction's reclaim step.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import structlog

log = structlog.get_logger(__name__)


@dataclass
class ImageRecord:
    id: str
    size: int
    tags: list[str]
    first_detected: float
    last_used: float


class ImageRuntime(Protocol):
    async def list_images_raw(self) -> list[dict]:
        """Docker's GET /images/json."""

    async def images_in_use(self) -> set[str]:
        """Image ids of every container on the engine (any state)."""

    async def remove_image(self, image_id: str) -> bool:
        """Remove one image; False when the engine refused (in use, gone)."""


class ImageGC:
    def __init__(
        self,
        runtime: ImageRuntime,
        *,
        image_dir: Callable[[], str | None],
        pinned: Callable[[], set[str]],
        needed: Callable[[], set[str]],
        high: int = 85,
        low: int = 80,
        min_age: float = 120.0,
        period: float = 300.0,
        disk_usage: Callable[[str], tuple[int, int]] | None = None,
        clock: Callable[[], float] = time.time,
        ready: Callable[[], bool] = lambda: True,
    ) -> None:
        if not 0 <= low <= high <= 100:
            raise ValueError(f"image GC thresholds must satisfy 0 <= low ({low}) <= high ({high}) <= 100")
        self.runtime = runtime
        self._image_dir = image_dir
        self._pinned = pinned  # references (tags) never removed: the pause image
        self._needed = needed  # references the node's pods ask for
        self.high, self.low = high, low
        self.min_age, self.period = min_age, period
        self._disk_usage = disk_usage or _disk_usage
        self._clock = clock
        # Until every pod source has reported, what pods need is not known yet: no
        # image is removed before that.
        self._ready = ready
        self.images: dict[str, ImageRecord] = {}
        self.removed: list[str] = []  # ids removed by this process (bounded)

    async def detect(self) -> None:
        """Refresh the image records: new images get first_detected, used ones last_used."""
        now = self._clock()
        raw = await self.runtime.list_images_raw()
        in_use = await self.runtime.images_in_use()
        current = {}
        for img in raw:
            image_id = img.get("Id", "")
            if not image_id:
                continue
            record = self.images.get(image_id) or ImageRecord(
                id=image_id, size=int(img.get("Size") or 0), tags=[], first_detected=now, last_used=0.0)
            record.tags = [t for t in (img.get("RepoTags") or []) + (img.get("RepoDigests") or [])
                           if "<none>" not in t]
            if image_id in in_use:
                record.last_used = now
            current[image_id] = record
        self.images = current

    def _protected(self) -> set[str]:
        refs = self._pinned() | self._needed()
        normalized = {_with_tag(r) for r in refs}
        return {i.id for i in self.images.values() if normalized & {_with_tag(t) for t in i.tags}}

    def _candidates(self, in_use: set[str]) -> list[ImageRecord]:
        now = self._clock()
        protected = self._protected()
        out = [i for i in self.images.values()
               if i.id not in in_use and i.id not in protected and now - i.first_detected >= self.min_age]
        return sorted(out, key=lambda i: (i.last_used, i.first_detected))

    async def _free(self, bytes_to_free: int | None) -> int:
        """Remove unused images (all when None) until ``bytes_to_free`` are freed."""
        await self.detect()
        if not self._ready():
            return 0
        in_use = await self.runtime.images_in_use()
        freed = 0
        for image in self._candidates(in_use):
            if bytes_to_free is not None and freed >= bytes_to_free:
                break
            if await self.runtime.remove_image(image.id):
                freed += image.size
                self.images.pop(image.id, None)
                self.removed = (self.removed + [image.id])[-100:]
                log.info("removed unused image", image_id=image.id, tags=image.tags, size_bytes=image.size)
        return freed

    async def garbage_collect(self) -> int:
        """One round of the high/low policy; returns the bytes freed."""
        path = self._image_dir()
        if not path:
            await self.detect()
            return 0
        capacity, available = await asyncio.to_thread(self._disk_usage, path)
        if capacity <= 0:
            await self.detect()
            return 0
        used_pct = 100 * (capacity - available) / capacity
        if used_pct < self.high:
            await self.detect()
            return 0
        to_free = int(capacity - available - capacity * self.low / 100)
        log.info("image filesystem above the GC threshold", used_percent=round(used_pct, 1),
                 high=self.high, low=self.low, bytes_to_free=to_free)
        freed = await self._free(to_free)
        if freed < to_free:
            log.warning("image GC could not free enough space", freed=freed, wanted=to_free)
        return freed

    async def delete_unused(self) -> int:
        """Eviction's reclaim: every unused image that may go."""
        return await self._free(None)

    async def run(self) -> None:
        while True:
            try:
                await self.garbage_collect()
            except Exception as exc:  # never fatal: try again next period
                log.warning("image garbage collection failed", error=str(exc))
            await asyncio.sleep(self.period)


def _with_tag(ref: str) -> str:
    """One spelling per image reference (``busybox`` = ``docker.io/library/busybox:latest``)."""
    from runtime.imageref import normalize_image

    try:
        return normalize_image(ref)
    except Exception:  # not a valid reference: compare as written
        return ref


def _disk_usage(path: str) -> tuple[int, int]:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize


class DockerImageRuntime:
    """``ImageRuntime`` over the shim's engine client."""

    def __init__(self, engine) -> None:
        self.engine = engine

    async def list_images_raw(self) -> list[dict]:
        return await self.engine.call("list images", "GET", "images/json") or []

    async def images_in_use(self) -> set[str]:
        containers = await self.engine.call("list all containers", "GET", "containers/json",
                                            params={"all": "1"}) or []
        return {c.get("ImageID", "") for c in containers}

    async def remove_image(self, image_id: str) -> bool:
        from runtime.engine import EngineError
        from runtime.types import NotFound

        try:
            await self.engine.call(f"remove image {image_id[:19]}", "DELETE", f"images/{image_id}")
            return True
        except (EngineError, NotFound) as exc:
            log.info("image not removed", image_id=image_id, reason=str(exc))
            return False


__all__ = ["ImageGC", "DockerImageRuntime", "ImageRecord"]
