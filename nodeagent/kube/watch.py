"""List+watch with an in-memory cache: the Reflector (and Informer, which adds start/stop
and several handlers).

Contract: handlers see every change exactly as the cache sees it, in order:
  * a list fills the cache; each object new to the cache is ADDED, each changed one
    MODIFIED, and each cached object the list no longer has is a synthetic DELETED
    (carrying the last known state) — so a relist after 410 Gone or an outage loses
    nothing, it only compresses what happened meanwhile;
  * the watch starts at the list's resourceVersion with bookmarks on, and after a drop
    resumes from the last resourceVersion seen (events and bookmarks advance it);
  * 410 Gone (or Expired) triggers a relist at once; an unreachable API backs off with
    jitter and then resumes the watch from where it stopped."""

from __future__ import annotations

import asyncio
import inspect
import random
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping

import structlog

from nodeagent.backoff import Delay

from .client import ApiConnectionError, ApiError, Backoff, KubeClient, WatchEventUnreadable
from .resources import Resource

log = structlog.get_logger(__name__)

ObjectKey = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped objects
# handler(event_type, object, previous_object_or_None)
EventHandler = Callable[[str, dict, "dict | None"], "Awaitable[None] | None"]


def _meta_str(obj: Mapping[str, Any] | None, field: str) -> str:
    # Objects come from the network: a field of the wrong type reads as absent.
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    value = meta.get(field) if isinstance(meta, Mapping) else None
    return value if isinstance(value, str) else ""


def object_key(obj: Mapping[str, Any]) -> ObjectKey:
    return _meta_str(obj, "namespace"), _meta_str(obj, "name")


def _rv(obj: Mapping[str, Any] | None) -> str:
    return _meta_str(obj, "resourceVersion")


def _uid(obj: Mapping[str, Any] | None) -> str:
    return _meta_str(obj, "uid")


@dataclass
class ReflectorStats:
    lists: int = 0
    relists_after_gone: int = 0
    watches: int = 0
    watch_drops: int = 0
    events: int = 0
    bookmarks: int = 0
    synthetic_deletes: int = 0
    connection_errors: int = 0
    unreadable_events: int = 0
    last_error: str = ""
    extra: dict[str, int] = field(default_factory=dict)


class Reflector:
    def __init__(self, client: KubeClient, resource: Resource,
                 handler: EventHandler | None = None, *, namespace: str | None = None,
                 label_selector: str | Mapping[str, str] | None = None,
                 field_selector: str | Mapping[str, str] | None = None,
                 page_size: int = 500, min_watch_timeout: float = 300.0,
                 watch_idle_timeout: float | None = None,
                 backoff: "Delay | None" = None, name: str | None = None) -> None:
        self.client = client
        self.resource = resource
        self.namespace = namespace
        self.label_selector = label_selector
        self.field_selector = field_selector
        self.page_size = page_size
        self.min_watch_timeout = min_watch_timeout
        self.watch_idle_timeout = watch_idle_timeout
        self.backoff = backoff or Backoff(initial=0.5, maximum=10.0)
        self.name = name or resource.plural
        self.handlers: list[EventHandler] = [handler] if handler else []
        self.store: dict[ObjectKey, dict] = {}
        self.resource_version = ""
        self.synced = asyncio.Event()
        self.stats = ReflectorStats()
        self._log = log.bind(reflector=self.name)

    # --- cache access -------------------------------------------------------------------

    def get(self, name: str, namespace: str | None = None) -> dict | None:
        return self.store.get((namespace or "", name))

    def list(self) -> list[dict]:
        return list(self.store.values())

    # --- delivery -----------------------------------------------------------------------

    async def _deliver(self, event_type: str, obj: dict, old: dict | None) -> None:
        self.stats.events += 1
        for handler in self.handlers:
            try:
                result = handler(event_type, obj, old)
                if inspect.isawaitable(result):
                    await result
            except asyncio.CancelledError:
                raise
            except Exception:  # a handler bug must not stop the cache
                self._log.exception("reflector.handler_failed", event=event_type,
                                    object=object_key(obj))

    async def _apply(self, event_type: str, obj: dict) -> None:
        key = object_key(obj)
        old = self.store.get(key)
        if event_type == "DELETED":
            if old is None:
                return
            del self.store[key]
            await self._deliver("DELETED", obj, old)
            return
        if old is not None and _uid(old) and _uid(obj) and _uid(old) != _uid(obj):
            # Same name, new object: the old one is gone.
            del self.store[key]
            await self._deliver("DELETED", old, old)
            old = None
        if old is not None and _rv(old) == _rv(obj):
            return
        self.store[key] = obj
        await self._deliver("MODIFIED" if old is not None else "ADDED", obj, old)

    # --- list and watch -----------------------------------------------------------------

    async def _list(self) -> None:
        try:
            result = await self.client.list_all(
                self.resource, self.namespace, page_size=self.page_size, retry=False,
                label_selector=self.label_selector, field_selector=self.field_selector)
        except ApiError as exc:
            if not exc.is_gone:
                raise
            # The continue token expired between pages: one unpaginated list instead.
            result = await self.client.list(
                self.resource, self.namespace, retry=False,
                label_selector=self.label_selector, field_selector=self.field_selector)
        self.stats.lists += 1
        items = result.get("items") if isinstance(result, dict) else None
        listed = {}
        for item in items if isinstance(items, list) else []:
            if not isinstance(item, dict) or not object_key(item)[1]:
                self._log.warning("reflector.unreadable_item", item=str(item)[:200])
                continue
            listed[object_key(item)] = item
        for key in [k for k in self.store if k not in listed]:
            old = self.store.pop(key)
            self.stats.synthetic_deletes += 1
            await self._deliver("DELETED", old, old)
        for item in listed.values():
            await self._apply("ADDED", item)
        self.resource_version = _rv(result) if isinstance(result, dict) else ""
        self.synced.set()
        self._log.debug("reflector.listed", count=len(listed), resource_version=self.resource_version)

    async def _watch(self) -> int:
        """Watch until the stream ends; returns the number of events and bookmarks seen."""
        timeout = int(self.min_watch_timeout * (1.0 + random.random()))
        self.stats.watches += 1
        seen = 0
        async with self.client.watch(
                self.resource, self.namespace, resource_version=self.resource_version,
                label_selector=self.label_selector, field_selector=self.field_selector,
                allow_bookmarks=True, timeout_seconds=timeout,
                idle_timeout=self.watch_idle_timeout) as stream:
            async for event in stream:
                seen += 1
                rv = event.resource_version
                if event.type == "BOOKMARK":
                    self.stats.bookmarks += 1
                elif event.type in ("ADDED", "MODIFIED", "DELETED"):
                    if not object_key(event.object)[1]:
                        raise WatchEventUnreadable(f"{event.type} event for an object without a name")
                    await self._apply(event.type, event.object)
                else:
                    self._log.warning("reflector.unknown_event", type=event.type)
                    continue
                if rv:
                    self.resource_version = rv
        return seen

    async def run(self) -> None:
        """List, then watch forever (until cancelled)."""
        need_list = True
        while True:
            try:
                if need_list:
                    await self._list()
                    need_list = False
                started = time.monotonic()
                seen = await self._watch()
                self.stats.watch_drops += 1
                if seen:
                    self.backoff.reset()
                elif time.monotonic() - started < 1.0:
                    # A stream that ends at once with nothing in it: do not spin.
                    await asyncio.sleep(self.backoff.next())
            except ApiError as exc:
                self.stats.last_error = str(exc)
                if exc.is_gone:
                    self.stats.relists_after_gone += 1
                    self._log.info("reflector.resource_version_expired",
                                   resource_version=self.resource_version, message=exc.message)
                    need_list = True
                    continue
                delay = self.backoff.next()
                if exc.retry_after is not None:
                    delay = max(delay, exc.retry_after)
                self._log.warning("reflector.api_error", status=exc.status, reason=exc.reason,
                                  message=exc.message, retry_in=round(delay, 2))
                await asyncio.sleep(delay)
            except ApiConnectionError as exc:
                self.stats.connection_errors += 1
                self.stats.last_error = str(exc)
                delay = self.backoff.next()
                self._log.warning("reflector.unreachable", error=str(exc), retry_in=round(delay, 2))
                await asyncio.sleep(delay)
            except WatchEventUnreadable as exc:
                # A change may be lost with the event: the cache is rebuilt by a list.
                self.stats.unreadable_events += 1
                self.stats.last_error = str(exc)
                need_list = True
                delay = self.backoff.next()
                self._log.warning("reflector.relist_after_unreadable_event", error=str(exc), retry_in=round(delay, 2))
                await asyncio.sleep(delay)
            except Exception as exc:  # never end the reflector (and with it its task group)
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                need_list = True
                delay = self.backoff.next()
                self._log.exception("reflector.failed", retry_in=round(delay, 2))
                await asyncio.sleep(delay)


class Informer(Reflector):
    """A Reflector run in its own task, with several handlers."""

    def __init__(self, client: KubeClient, resource: Resource, **kwargs: Any) -> None:
        super().__init__(client, resource, None, **kwargs)
        self._task: asyncio.Task | None = None

    def add_handler(self, handler: EventHandler) -> None:
        self.handlers.append(handler)

    def start(self) -> asyncio.Task:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(), name=f"informer-{self.name}")
        return self._task

    async def wait_synced(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self.synced.wait(), timeout)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            # wait() does not raise the task's CancelledError, so a cancellation of the
            # caller itself still propagates.
            await asyncio.wait([task])

    async def __aenter__(self) -> "Informer":
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
