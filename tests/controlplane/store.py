"""In-memory object storage with one global, monotonically increasing resourceVersion
(like etcd's revision), an event history for watches, and compaction.

Stored objects are never mutated after they are stored: every write stores a new dict,
so readers can serialise them without copying."""

from __future__ import annotations

import asyncio
import copy
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable

Predicate = Callable[[dict], bool]


@dataclass(frozen=True)
class StoredEvent:
    rv: int
    storage: str
    type: str  # ADDED, MODIFIED, DELETED
    obj: dict
    old: dict | None


class TooOldResourceVersion(Exception):
    def __init__(self, requested: int, oldest: int) -> None:
        super().__init__(f"too old resource version: {requested} ({oldest})")
        self.requested = requested
        self.oldest = oldest


class Watcher:
    """One watch stream's view: filters events and queues them for the HTTP writer."""

    CLOSED = object()

    def __init__(self, storage: str, namespace: str | None, predicate: Predicate,
                 buffer: int) -> None:
        self.storage = storage
        self.namespace = namespace
        self.predicate = predicate
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=buffer)
        self.closed = False
        self.overflowed = False

    def _in_scope(self, obj: dict | None) -> bool:
        if obj is None:
            return False
        if self.namespace is not None and (obj.get("metadata") or {}).get("namespace") != self.namespace:
            return False
        return self.predicate(obj)

    def translate(self, event: StoredEvent) -> tuple[str, dict] | None:
        """The event this watcher sees: an object entering the selection is ADDED, one
        leaving it is DELETED, as the API server's watch filtering does."""
        new_in = self._in_scope(event.obj)
        if event.type == "ADDED":
            return ("ADDED", event.obj) if new_in else None
        if event.type == "DELETED":
            return ("DELETED", event.obj) if new_in else None
        old_in = self._in_scope(event.old)
        if new_in and old_in:
            return ("MODIFIED", event.obj)
        if new_in:
            return ("ADDED", event.obj)
        if old_in:
            return ("DELETED", event.obj)
        return None

    def offer(self, item: object) -> None:
        if self.closed:
            return
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            # A watcher that cannot keep up is terminated, like the watch cache does;
            # the client resumes from its last resourceVersion.
            self.overflowed = True
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.queue.put_nowait(Watcher.CLOSED)
        except asyncio.QueueFull:
            # Make room for the sentinel; the stream ends either way.
            try:
                self.queue.get_nowait()
            except asyncio.QueueEmpty:
                pass
            self.queue.put_nowait(Watcher.CLOSED)


class Store:
    def __init__(self, history_limit: int = 10_000, watcher_buffer: int = 10_000) -> None:
        self.rv = 1
        self._objects: dict[str, dict[tuple[str, str], dict]] = {}
        self._history: deque[StoredEvent] = deque()
        self.history_limit = history_limit
        self.watcher_buffer = watcher_buffer
        # Watches may start from any resourceVersion >= floor_rv.
        self.floor_rv = 0
        self.watchers: set[Watcher] = set()
        self.listeners: list[Callable[[StoredEvent], None]] = []

    # --- reads --------------------------------------------------------------------------

    def get(self, storage: str, namespace: str | None, name: str) -> dict | None:
        return self._objects.get(storage, {}).get((namespace or "", name))

    def list(self, storage: str, namespace: str | None = None) -> list[dict]:
        bucket = self._objects.get(storage, {})
        keys = sorted(k for k in bucket if namespace is None or k[0] == namespace)
        return [bucket[k] for k in keys]

    def count(self, storage: str) -> int:
        return len(self._objects.get(storage, {}))

    def snapshot(self, storage: str, namespace: str | None = None) -> list[dict]:
        """Deep copies, for test assertions."""
        return copy.deepcopy(self.list(storage, namespace))

    # --- writes -------------------------------------------------------------------------

    def _record(self, event: StoredEvent) -> None:
        self._history.append(event)
        while len(self._history) > self.history_limit:
            dropped = self._history.popleft()
            self.floor_rv = max(self.floor_rv, dropped.rv)
        for watcher in list(self.watchers):
            if watcher.storage == event.storage:
                translated = watcher.translate(event)
                if translated is not None:
                    watcher.offer(translated)
        for listener in list(self.listeners):
            listener(event)

    @staticmethod
    def _key(obj: dict) -> tuple[str, str]:
        meta = obj["metadata"]
        return meta.get("namespace") or "", meta["name"]

    def put(self, storage: str, obj: dict) -> dict:
        """Store a new version (the caller's dict is taken over); returns it."""
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        bucket = self._objects.setdefault(storage, {})
        key = self._key(obj)
        old = bucket.get(key)
        bucket[key] = obj
        self._record(StoredEvent(self.rv, storage, "MODIFIED" if old else "ADDED", obj, old))
        return obj

    def remove(self, storage: str, obj: dict) -> dict:
        bucket = self._objects.get(storage, {})
        key = self._key(obj)
        old = bucket.pop(key, None)
        if old is None:
            raise KeyError(key)
        self.rv += 1
        final = dict(obj)
        final["metadata"] = dict(obj["metadata"], resourceVersion=str(self.rv))
        self._record(StoredEvent(self.rv, storage, "DELETED", final, old))
        return final

    # --- watch support ----------------------------------------------------------------

    def events_since(self, storage: str, rv: int) -> Iterable[StoredEvent]:
        if rv < self.floor_rv:
            raise TooOldResourceVersion(rv, self.floor_rv + 1)
        return [e for e in self._history if e.rv > rv and e.storage == storage]

    def compact(self, rv: int | None = None) -> int:
        """Forget history up to rv (default: everything); watches from older versions get 410."""
        target = self.rv if rv is None else min(rv, self.rv)
        while self._history and self._history[0].rv <= target:
            self._history.popleft()
        self.floor_rv = max(self.floor_rv, target)
        return self.floor_rv

    def add_watcher(self, watcher: Watcher) -> None:
        self.watchers.add(watcher)

    def remove_watcher(self, watcher: Watcher) -> None:
        self.watchers.discard(watcher)

    def close_watchers(self) -> int:
        watchers = list(self.watchers)
        for w in watchers:
            w.close()
        self.watchers.clear()
        return len(watchers)
