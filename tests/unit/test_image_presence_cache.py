"""DockerImageService answers a burst of "is this image here?" with one inspect."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from runtime import images as images_module
from runtime.images import DockerImageService
from runtime.types import NotFound


class CountingEngine:
    def __init__(self, present: set[str]) -> None:
        self.present = present
        self.inspects: list[str] = []

    async def inspect_image(self, what: str, name: str) -> dict:
        self.inspects.append(name)
        await asyncio.sleep(0.01)  # in flight long enough for a burst to pile up
        if name not in self.present:
            raise NotFound(what)
        return {"Id": f"sha256:{name.split(':')[0]}"}


def service(present: set[str]) -> tuple[DockerImageService, CountingEngine]:
    engine = CountingEngine(present)
    return DockerImageService(SimpleNamespace(engine=engine)), engine


async def test_a_burst_shares_one_inspect_and_its_answer():
    images, engine = service({"busybox:1.35"})
    ids = await asyncio.gather(*(images.image_present("busybox:1.35") for _ in range(50)))
    assert set(ids) == {"sha256:busybox"}
    assert len(engine.inspects) == 1
    await images.image_present("busybox:1.35")  # still within the burst window
    assert len(engine.inspects) == 1


async def test_the_answer_expires(monkeypatch):
    monkeypatch.setattr(images_module, "PRESENT_TTL", 0.0)
    images, engine = service({"busybox:1.35"})
    await images.image_present("busybox:1.35")
    await images.image_present("busybox:1.35")
    assert len(engine.inspects) == 2


async def test_absence_is_never_remembered():
    images, engine = service(set())
    assert await asyncio.gather(*(images.image_present("busybox:1.35") for _ in range(5))) == [None] * 5
    assert len(engine.inspects) == 1  # the in-flight look is shared...
    engine.present.add("busybox:1.35")
    assert await images.image_present("busybox:1.35") is not None  # ...but not kept
    assert len(engine.inspects) == 2
