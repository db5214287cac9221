"""ImageService over the Docker Engine: presence checks and pulls per pull policy.

Pulls run under their own deadline (``pull_timeout``, not the runtime's call
timeout), may carry registry credentials, and concurrent requests for the same
reference share one pull (110 pods on one image pull it once). At most
``max_parallel_pulls`` different images are pulled at once (kubelet's
``maxParallelImagePulls``; 1 is its default ``serializeImagePulls``, 0 is no limit);
progress is logged every few seconds while a pull runs.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Mapping
import time
from dataclasses import dataclass

import structlog

from runtime.docker import DockerRuntime
from runtime.engine import EngineError, iter_json_lines, stream_error
from runtime.imageref import ImageRef, parse_image_ref
from runtime.types import (
    ImageNeverPull,
    ImagePullError,
    NotFound,
    PullPolicy,
    RuntimeTimeout,
    RuntimeUnavailable,
)

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class RegistryAuth:
    """Credentials for one registry, sent to Docker as ``X-Registry-Auth``."""

    username: str = ""
    password: str = ""
    identity_token: str = ""

    def header(self, registry: str) -> str:
        payload: dict[str, str] = {"serveraddress": registry}
        if self.identity_token:
            payload["identitytoken"] = self.identity_token
        else:
            payload["username"] = self.username
            payload["password"] = self.password
        return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode()


@dataclass(frozen=True)
class PullInfo:
    """What kubelet's ``Pulled`` event reports about the last pull of an image."""

    seconds: float  # the pull itself
    seconds_with_wait: float  # including the wait for a parallel-pull slot
    size_bytes: int


PROGRESS_LOG_PERIOD = 5.0
# kubelet reports at most this many images in Node status.images (nodeStatusMaxImages).
NODE_STATUS_MAX_IMAGES = 50
# How long a found image is taken as present without asking Docker again: the span
# of a burst of pod starts. An image removed meanwhile fails the create, which the
# pod worker retries.
PRESENT_TTL = 2.0
_PRESENT_MAX = 256


class DockerImageService:
    """ImageService sharing ``runtime``'s Docker client.

    ``auths`` maps a registry host (``docker.io``, ``127.0.0.1:5000``) to credentials
    used for every pull from it; ``ensure_image(..., auth=)`` overrides per call.
    """

    def __init__(
        self,
        runtime: DockerRuntime,
        pull_timeout: float = 300.0,
        auths: Mapping[str, RegistryAuth] | None = None,
        max_parallel_pulls: int = 0,
    ) -> None:
        if pull_timeout <= 0:
            raise ValueError(f"pull_timeout must be positive, got {pull_timeout!r}")
        if max_parallel_pulls < 0:
            raise ValueError(f"max_parallel_pulls must be >= 0, got {max_parallel_pulls!r}")
        self._pull_slots = asyncio.Semaphore(max_parallel_pulls) if max_parallel_pulls else None
        self.last_pull: dict[str, PullInfo] = {}
        self.runtime = runtime
        self.pull_timeout = pull_timeout
        self.auths = dict(auths or {})
        self._pulls: dict[tuple[str, RegistryAuth | None], asyncio.Task[str]] = {}
        # name -> (answer good until, the inspect): see _inspect_id.
        self._present: dict[str, tuple[float, asyncio.Future[str | None]]] = {}

    async def list_images(self) -> list[dict]:
        """Node ``status.images``: names (digests, then tags) and size, largest first."""
        images = await self.runtime.engine.call("list images", "GET", "images/json")
        out = []
        for img in images or []:
            names = [n for n in (img.get("RepoDigests") or []) if "<none>" not in n]
            names += [n for n in (img.get("RepoTags") or []) if "<none>" not in n]
            if names:
                out.append({"names": names, "sizeBytes": int(img.get("Size") or 0)})
        out.sort(key=lambda i: i["sizeBytes"], reverse=True)
        return out[:NODE_STATUS_MAX_IMAGES]

    async def image_present(self, image: str) -> str | None:
        ref = parse_image_ref(image)
        return await self._inspect_id(str(ref), image)

    async def ensure_image(
        self, image: str, policy: PullPolicy, auth: RegistryAuth | None = None
    ) -> str:
        ref = parse_image_ref(image)  # InvalidImageName
        policy = PullPolicy(policy)
        if policy != PullPolicy.ALWAYS:
            image_id = await self._inspect_id(str(ref), image)
            if image_id is not None:
                return image_id
            if policy == PullPolicy.NEVER:
                raise ImageNeverPull(
                    f'Container image "{image}" is not present with pull policy of Never'
                )
        return await self._shared_pull(ref, image, auth)

    # --- internals -----------------------------------------------------------------

    async def _inspect_id(self, name: str, image: str) -> str | None:
        """The image's id, or None when it is not present. A burst of pod starts asks
        for the same few images: one inspect answers everyone asking while it is in
        flight and, when the image was there, for PRESENT_TTL after (a pull of the
        name forgets the answer). Absence is never remembered."""
        now = time.monotonic()
        entry = self._present.get(name)
        if entry is None or (entry[1].done() and now >= entry[0]):
            if len(self._present) >= _PRESENT_MAX:
                self._present = {k: v for k, v in self._present.items() if not v[1].done() or now < v[0]}
            entry = (now + PRESENT_TTL, asyncio.ensure_future(self._inspect_now(name, image)))
            self._present[name] = entry
            entry[1].add_done_callback(lambda done: self._inspected(name, done))
        return await asyncio.shield(entry[1])

    def _inspected(self, name: str, done: asyncio.Future[str | None]) -> None:
        if done.cancelled() or done.exception() is not None or done.result() is None:
            current = self._present.get(name)
            if current is not None and current[1] is done:
                del self._present[name]

    async def _inspect_now(self, name: str, image: str) -> str | None:
        try:
            info = await self.runtime.engine.inspect_image(f"inspect image {image!r}", name)
        except NotFound:
            return None
        return str(info["Id"])

    async def _shared_pull(self, ref: ImageRef, image: str, auth: RegistryAuth | None) -> str:
        key = (ref.pull_reference(), auth)
        task = self._pulls.get(key)
        if task is None:
            task = asyncio.create_task(self._pull(ref, image, auth), name=f"pull {image}")
            self._pulls[key] = task
            task.add_done_callback(lambda done: self._pull_finished(key, done))
        # One waiter giving up (its pod was deleted) must not abort the others' pull.
        return await asyncio.shield(task)

    def _pull_finished(self, key: tuple[str, RegistryAuth | None], task: asyncio.Task[str]) -> None:
        self._pulls.pop(key, None)
        self._present.clear()  # a pull may have moved any tag
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have left already

    async def _pull(self, ref: ImageRef, image: str, auth: RegistryAuth | None) -> str:
        waited_from = time.monotonic()
        if self._pull_slots is None:
            return await self._pull_now(ref, image, auth, waited_from)
        async with self._pull_slots:
            return await self._pull_now(ref, image, auth, waited_from)

    async def _pull_now(self, ref: ImageRef, image: str, auth: RegistryAuth | None,
                        waited_from: float) -> str:
        normalized = ref.normalized()
        registry = normalized.registry or ""
        params = {"fromImage": normalized.name, "tag": normalized.digest or normalized.tag or "latest"}
        headers = {}
        credentials = auth or self.auths.get(registry)
        if credentials is not None:
            headers["X-Registry-Auth"] = credentials.header(registry)
        what = f"pull image {image!r}"
        started = time.monotonic()
        log.info("pulling image", image=image, reference=ref.pull_reference())
        progress = _Progress(image)
        try:
            async with asyncio.timeout(self.pull_timeout):
                response = await self.runtime.engine.open_stream(
                    what, "POST", "images/create", params=params, headers=headers,
                    timeout=self.pull_timeout,
                )
                try:
                    async for message in iter_json_lines(response, what):
                        error = stream_error(message)
                        if error:
                            raise ImagePullError(f"Failed to pull image {image!r}: {error}")
                        progress.update(message)
                finally:
                    response.close()
        except TimeoutError:
            raise ImagePullError(
                f"Failed to pull image {image!r}: not finished within {self.pull_timeout:g}s"
            ) from None
        except RuntimeTimeout as exc:
            raise ImagePullError(f"Failed to pull image {image!r}: {exc}") from None
        except RuntimeUnavailable:
            raise
        except NotFound as exc:
            raise ImagePullError(f"Failed to pull image {image!r}: {exc}") from None
        except EngineError as exc:  # the engine or the registry said no
            raise ImagePullError(f"Failed to pull image {image!r}: {exc}") from None
        try:
            info = await self.runtime.engine.call(
                f"inspect image {image!r}", "GET", f"images/{ref.pull_reference()}/json")
        except NotFound:
            raise ImagePullError(f"Failed to pull image {image!r}: not present after the pull") from None
        image_id = str(info["Id"])
        done = time.monotonic()
        if len(self.last_pull) >= 256:  # read (popped) by the kubelet; bound it anyway
            self.last_pull.pop(next(iter(self.last_pull)))
        self.last_pull[image] = PullInfo(seconds=done - started, seconds_with_wait=done - waited_from,
                                         size_bytes=int(info.get("Size") or 0))
        log.info("image pulled", image=image, image_id=image_id, seconds=round(done - started, 3),
                 size_bytes=self.last_pull[image].size_bytes)
        return image_id


class _Progress:
    """Bytes downloaded of a pull, from Docker's per-layer progress messages, logged at
    most every PROGRESS_LOG_PERIOD seconds."""

    def __init__(self, image: str) -> None:
        self.image = image
        self.layers: dict[str, tuple[int, int]] = {}
        self.next_log = time.monotonic() + PROGRESS_LOG_PERIOD

    def update(self, message: dict) -> None:
        detail = message.get("progressDetail")
        layer = message.get("id")
        if isinstance(detail, dict) and isinstance(layer, str) and message.get("status") == "Downloading":
            current, total = detail.get("current"), detail.get("total")
            if isinstance(current, int) and isinstance(total, int):
                self.layers[layer] = (current, total)
        now = time.monotonic()
        if now >= self.next_log and self.layers:
            self.next_log = now + PROGRESS_LOG_PERIOD
            log.info("pulling image: progress", image=self.image, layers=len(self.layers),
                     downloaded_bytes=sum(c for c, _ in self.layers.values()),
                     total_bytes=sum(t for _, t in self.layers.values()))


__all__ = ["DockerImageService", "PullInfo", "RegistryAuth"]
