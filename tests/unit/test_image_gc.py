"""Image GC policy against a fake runtime: high/low thresholds, LRU order, what is
never removed (in use, needed by a pod, pinned, too young), and eviction's reclaim."""

from __future__ import annotations

import pytest

from nodeagent.images.gc import ImageGC

MiB = 1 << 20


class FakeRuntime:
    def __init__(self, images: dict[str, tuple[int, list[str]]]) -> None:
        self.images = dict(images)  # id -> (size, tags)
        self.in_use: set[str] = set()
        self.refuse: set[str] = set()
        self.removed: list[str] = []

    async def list_images_raw(self):
        return [{"Id": i, "Size": size, "RepoTags": tags} for i, (size, tags) in self.images.items()]

    async def images_in_use(self):
        return set(self.in_use)

    async def remove_image(self, image_id):
        if image_id in self.refuse:
            return False
        self.images.pop(image_id)
        self.removed.append(image_id)
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(runtime, clock, *, used_bytes, capacity=1000 * MiB, needed=(), pinned=("nodeagent/pause:1",)):
    state = {"used": used_bytes}

    def disk_usage(path):
        freed = sum(s for i, (s, _) in ORIGINAL.items() if i in runtime.removed)
        return capacity, capacity - (state["used"] - freed)
    ORIGINAL = dict(runtime.images)
    return ImageGC(runtime, image_dir=lambda: "/", pinned=lambda: set(pinned),
                   needed=lambda: set(needed), high=85, low=80, min_age=120, period=1,
                   disk_usage=disk_usage, clock=clock)


async def test_below_high_threshold_nothing_goes():
    rt, clock = FakeRuntime({"a": (50 * MiB, ["old:1"])}), Clock()
    gc = make(rt, clock, used_bytes=840 * MiB)
    await gc.detect()
    clock.now += 1000
    assert await gc.garbage_collect() == 0 and rt.removed == []


async def test_lru_down_to_low_threshold_and_protections():
    rt = FakeRuntime({
        "pause": (1 * MiB, ["nodeagent/pause:1"]),
        "running": (30 * MiB, ["busybox:1.35"]),
        "wanted": (30 * MiB, ["127.0.0.1:5000/app:v2"]),
        "old": (40 * MiB, ["old:1"]),
        "older": (40 * MiB, ["older:1"]),
        "recent": (40 * MiB, ["recent:1"]),
    })
    clock = Clock()
    gc = make(rt, clock, used_bytes=900 * MiB, needed={"127.0.0.1:5000/app:v2"})
    rt.in_use = {"running", "older", "old", "recent"}
    await gc.detect()  # all detected at t=1000, used now
    clock.now += 100
    rt.in_use = {"running", "old", "recent"}
    await gc.detect()  # 'older' last used at 1000, the others at 1100
    clock.now += 100
    rt.in_use = {"running", "recent"}
    await gc.detect()  # 'old' last used at 1100, 'recent' at 1200
    clock.now += 100
    rt.in_use = {"running"}
    # 90 % used, low is 80 %: 100 MiB must go, least recently used first.
    freed = await gc.garbage_collect()
    assert rt.removed == ["older", "old", "recent"]
    assert freed == 120 * MiB
    assert {"pause", "running", "wanted"} <= set(rt.images)


async def test_young_images_wait_for_min_age_and_refusals_are_skipped():
    rt, clock = FakeRuntime({"young": (100 * MiB, ["young:1"]), "stuck": (100 * MiB, ["stuck:1"]),
                             "ok": (100 * MiB, ["ok:1"])}), Clock()
    gc = make(rt, clock, used_bytes=950 * MiB)
    await gc.detect()
    clock.now += 60
    assert await gc.garbage_collect() == 0  # everything detected 60 s ago: too young
    rt.refuse = {"stuck"}
    clock.now += 100
    await gc.garbage_collect()
    assert "stuck" in rt.images and "stuck" not in rt.removed
    assert set(rt.removed) == {"young", "ok"}


async def test_delete_unused_for_eviction_ignores_thresholds():
    rt, clock = FakeRuntime({"a": (1, ["a:1"]), "b": (1, ["b:1"]), "c": (1, ["nodeagent/pause:1"])}), Clock()
    gc = make(rt, clock, used_bytes=0)
    await gc.detect()
    clock.now += 500
    rt.in_use = {"b"}
    await gc.delete_unused()
    assert rt.removed == ["a"]


def test_thresholds_are_checked():
    with pytest.raises(ValueError):
        ImageGC(FakeRuntime({}), image_dir=lambda: "/", pinned=set, needed=set, high=70, low=80)


async def test_nothing_goes_before_the_pod_sources_reported():
    rt, clock = FakeRuntime({"a": (1, ["a:1"])}), Clock()
    ready = {"value": False}
    gc = ImageGC(rt, image_dir=lambda: "/", pinned=set, needed=set, high=0, low=0, min_age=0,
                 disk_usage=lambda path: (100, 10), clock=clock, ready=lambda: ready["value"])
    assert await gc.garbage_collect() == 0 and await gc.delete_unused() == 0 and rt.removed == []
    ready["value"] = True
    await gc.garbage_collect()
    assert rt.removed == ["a"]
