"""core/v1 Events posted to the API the way kubelet's event recorder (client-go
tools/record) posts them.

``event()`` / ``node_event()`` build the Event at once and put it on a bounded queue
(``queue_size``, 1000 like client-go's broadcaster); when the queue is full the event is
dropped and counted — recording never blocks or fails pod work. ``run()`` drains the queue
through a correlator, in client-go's order:

1. **Aggregation**: events that differ only in their message (same source, object, type,
   reason) are counted per 10-minute window; from the 10th distinct message on, the event
   is replaced by one whose message is ``(combined from similar events): <message>`` and
   which is itself deduplicated, so a flood of similar messages becomes one Event.
2. **Deduplication**: an event identical to one already posted (same source, object and
   fieldPath, type, reason, message) is not created again: the existing Event is PATCHed
   (strategic merge) with ``count`` + 1, the new ``lastTimestamp`` and the message.
   A PATCH that finds the Event gone (TTL) creates it again.
3. **Spam filter**: a token bucket per source + involved object, 25 events of burst and
   one more every 5 minutes (client-go's EventSourceObjectSpamFilter defaults), so an
   object that is always unhealthy cannot flood the API.

Posting: an unreachable API is retried up to 12 times, 10 s apart (the first pause
randomised so nodes do not retry in step) — meanwhile new events queue up and, past the
bound, are dropped. An API error answer (4xx, or 5xx after the client's own retries)
drops the event with a log line. Nothing propagates out of ``run()`` but cancellation.

Event shape (what kubelet writes): name ``<object name>.<unix nanoseconds in hex>``,
the object's namespace (``default`` for the Node), ``involvedObject`` with kind,
namespace, name, uid, apiVersion, resourceVersion and fieldPath (the Node's reference is
``{kind: Node, name: <node>, uid: <node>}`` as kubelet makes it), ``source`` {component
kubelet, host <node>}, ``reportingComponent`` kubelet, ``reportingInstance`` <node>,
``firstTimestamp``/``lastTimestamp`` (seconds, RFC 3339), ``count`` and ``type``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

import structlog

from nodeagent.kubelet.events import NORMAL, WARNING
from nodeagent.kube import ApiConnectionError, ApiError, KubeClient, PatchType
from nodeagent.kube import resources as R
from nodeagent.api.podspec import DEFAULT_NAMESPACE

log = structlog.get_logger(__name__)

COMPONENT = "kubelet"
MAX_QUEUED_EVENTS = 1000
LRU_CACHE_ENTRIES = 4096
AGGREGATE_MAX_EVENTS = 10
AGGREGATE_INTERVAL = 600.0
SPAM_BURST = 25
SPAM_QPS = 1.0 / 300.0
MAX_TRIES_PER_EVENT = 12
RETRY_INTERVAL = 10.0
AGGREGATE_PREFIX = "(combined from similar events): "

K = TypeVar("K")
V = TypeVar("V")


class _LRU(Generic[K, V]):
    """A bounded mapping that forgets the least recently used key."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def _timestamp(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def _source_and_object(ev: dict) -> tuple[str, ...]:
    src = ev.get("source") or {}
    obj = ev.get("involvedObject") or {}
    return (src.get("component", ""), src.get("host", ""), obj.get("kind", ""), obj.get("namespace", ""),
            obj.get("name", ""), obj.get("uid", ""), obj.get("apiVersion", ""))


def event_key(ev: dict) -> tuple[str, ...]:
    """What makes two events the same occurrence (client-go getEventKey)."""
    obj = ev.get("involvedObject") or {}
    return (*_source_and_object(ev), obj.get("fieldPath", ""), ev.get("type", ""), ev.get("reason", ""),
            ev.get("message", ""))


def spam_key(ev: dict) -> tuple[str, ...]:
    """The spam filter's bucket: source + involved object (client-go getSpamKey)."""
    return _source_and_object(ev)


def aggregate_key(ev: dict) -> tuple[str, ...]:
    """Events alike but for their message (client-go EventAggregatorByReasonFunc)."""
    return (*_source_and_object(ev), ev.get("type", ""), ev.get("reason", ""),
            ev.get("reportingComponent", ""), ev.get("reportingInstance", ""))


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class _Aggregate:
    messages: set[str]
    last: float


@dataclass
class _Observation:
    count: int
    first_timestamp: str
    name: str
    resource_version: str


@dataclass
class Correlated:
    event: dict
    key: tuple[str, ...]
    patch: dict | None  # set when an existing Event is to be PATCHed
    skip: bool = False
    aggregated: bool = False


class EventCorrelator:
    """client-go's EventCorrelator: aggregate, deduplicate, then spam-filter."""

    def __init__(self, *, clock: Callable[[], float] = time.time, cache_size: int = LRU_CACHE_ENTRIES,
                 spam_burst: int = SPAM_BURST, spam_qps: float = SPAM_QPS,
                 aggregate_max_events: int = AGGREGATE_MAX_EVENTS,
                 aggregate_interval: float = AGGREGATE_INTERVAL) -> None:
        self.clock = clock
        self.spam_burst = spam_burst
        self.spam_qps = spam_qps
        self.aggregate_max_events = aggregate_max_events
        self.aggregate_interval = aggregate_interval
        self._spam: _LRU[tuple, _Bucket] = _LRU(cache_size)
        self._aggregates: _LRU[tuple, _Aggregate] = _LRU(cache_size)
        self._observed: _LRU[tuple, _Observation] = _LRU(cache_size)

    def correlate(self, ev: dict) -> Correlated:
        ev, key, aggregated = self._aggregate(ev)
        ev, patch = self._observe(ev, key)
        return Correlated(ev, key, patch, skip=not self._allow(ev), aggregated=aggregated)

    def _aggregate(self, ev: dict) -> tuple[dict, tuple[str, ...], bool]:
        now = self.clock()
        agg_key = aggregate_key(ev)
        record = self._aggregates.get(agg_key)
        if record is None or now - record.last > self.aggregate_interval:
            record = _Aggregate(set(), now)
        record.messages.add(ev.get("message", ""))
        record.last = now
        self._aggregates.put(agg_key, record)
        if len(record.messages) < self.aggregate_max_events:
            return ev, event_key(ev), False
        record.messages.pop()  # keep the set bounded, as client-go does
        stamp = _timestamp(now)
        combined = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": _event_name(ev["involvedObject"].get("name", ""), now),
                         "namespace": ev["metadata"]["namespace"]},
            "involvedObject": ev["involvedObject"],
            "reason": ev.get("reason", ""),
            "message": AGGREGATE_PREFIX + ev.get("message", ""),
            "source": ev.get("source"),
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
            "type": ev.get("type"),
            "reportingComponent": ev.get("reportingComponent"),
            "reportingInstance": ev.get("reportingInstance"),
        }
        return combined, agg_key, True

    def _observe(self, ev: dict, key: tuple[str, ...]) -> tuple[dict, dict | None]:
        last = self._observed.get(key)
        patch = None
        if last is not None and last.count > 0:
            ev = {**ev, "metadata": {**ev["metadata"], "name": last.name}}
            if last.resource_version:
                ev["metadata"]["resourceVersion"] = last.resource_version
            ev["firstTimestamp"] = last.first_timestamp
            ev["count"] = last.count + 1
            # What client-go's two-way merge patch of these fields amounts to.
            patch = {"count": ev["count"], "lastTimestamp": ev["lastTimestamp"], "message": ev.get("message", "")}
        self._observed.put(key, _Observation(int(ev.get("count") or 1), ev["firstTimestamp"],
                                             ev["metadata"]["name"],
                                             ev["metadata"].get("resourceVersion", "")))
        return ev, patch

    def _allow(self, ev: dict) -> bool:
        now = self.clock()
        key = spam_key(ev)
        bucket = self._spam.get(key)
        if bucket is None:
            bucket = _Bucket(float(self.spam_burst), now)
        else:
            bucket.tokens = min(float(self.spam_burst), bucket.tokens + (now - bucket.updated) * self.spam_qps)
            bucket.updated = now
        self._spam.put(key, bucket)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return True
        return False

    def update_state(self, key: tuple[str, ...], stored: dict) -> None:
        """Remember what the server holds (name, resourceVersion, count) for later PATCHes."""
        meta = stored.get("metadata") or {}
        self._observed.put(key, _Observation(int(stored.get("count") or 1),
                                             stored.get("firstTimestamp") or "",
                                             meta.get("name", ""), meta.get("resourceVersion", "")))


_last_name_ns = 0


def _event_name(object_name: str, when: float) -> str:
    # client-go: <name>.<UnixNano in hex>. Two events in the same nanosecond would
    # collide (AlreadyExists), so the clock is made strictly increasing.
    global _last_name_ns
    ns = max(int(when * 1e9), _last_name_ns + 1)
    _last_name_ns = ns
    return f"{object_name}.{ns:x}"


@dataclass
class EventStats:
    queued: int = 0
    dropped: int = 0  # queue full
    invalid: int = 0  # bad type: never queued
    created: int = 0
    patched: int = 0
    spam_filtered: int = 0
    aggregated: int = 0
    rejected: int = 0  # API answered with an error: dropped
    gave_up: int = 0  # unreachable for every try: dropped
    retries: int = 0


class ApiEventRecorder:
    """An ``EventSink`` that posts core/v1 Events (see the module doc)."""

    def __init__(self, client: KubeClient, *, node_name: str, host_ip: str, queue_size: int = MAX_QUEUED_EVENTS,
                 max_tries: int = MAX_TRIES_PER_EVENT, retry_interval: float = RETRY_INTERVAL,
                 clock: Callable[[], float] = time.time, **correlator_options: Any) -> None:
        self.client = client
        self.node_name = node_name
        # Core Events carry no address; kept for log context and for callers' symmetry.
        self.host_ip = host_ip
        self.max_tries = max_tries
        self.retry_interval = retry_interval
        self.clock = clock
        self.correlator = EventCorrelator(clock=clock, **correlator_options)
        self.stats = EventStats()
        self._queue: asyncio.Queue[dict] = asyncio.Queue(maxsize=queue_size)
        self._source = {"component": COMPONENT, "host": node_name}
        self._log = log.bind(node=node_name)

    # --- recording (synchronous, never blocks) -------------------------------------------

    def event(self, pod: dict, type_: str, reason: str, message: str, *, field_path: str | None = None) -> None:
        meta = pod.get("metadata") or {}
        ref = {
            "kind": "Pod",
            "namespace": meta.get("namespace") or DEFAULT_NAMESPACE,
            "name": meta.get("name", ""),
            "uid": meta.get("uid", ""),
            "apiVersion": "v1",
            "resourceVersion": meta.get("resourceVersion", ""),
            "fieldPath": field_path or "",
        }
        self.record({k: v for k, v in ref.items() if v}, type_, reason, message)

    def node_event(self, type_: str, reason: str, message: str) -> None:
        """An event about this node (Starting, NodeReady, NodeNotReady, ...)."""
        # kubelet's node reference: the node name doubles as its uid.
        self.record({"kind": "Node", "name": self.node_name, "uid": self.node_name}, type_, reason, message)

    def record(self, involved: dict, type_: str, reason: str, message: str) -> None:
        """Queue an event about any object reference; drops (and counts) when full."""
        if type_ not in (NORMAL, WARNING):
            self.stats.invalid += 1
            self._log.error("unsupported event type; event not recorded", type=type_, reason=reason)
            return
        now = self.clock()
        stamp = _timestamp(now)
        ev = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": _event_name(involved.get("name", ""), now),
                         "namespace": involved.get("namespace") or DEFAULT_NAMESPACE},
            "involvedObject": involved,
            "reason": reason,
            "message": message,
            "source": dict(self._source),
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
            "type": type_,
            "reportingComponent": COMPONENT,
            "reportingInstance": self.node_name,
        }
        try:
            self._queue.put_nowait(ev)
        except asyncio.QueueFull:
            self.stats.dropped += 1
            if self.stats.dropped == 1 or self.stats.dropped % 100 == 0:
                self._log.warning("event queue full; dropping events", dropped=self.stats.dropped,
                                  reason=reason, object=f"{involved.get('kind')}/{involved.get('name')}")
            return
        self.stats.queued += 1

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    async def wait_idle(self) -> None:
        """Until every queued event has been posted or dropped."""
        await self._queue.join()

    # --- posting ---------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            ev = await self._queue.get()
            try:
                await self._process(ev)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a bug here must not stop event recording
                self._log.exception("recording an event failed", reason=ev.get("reason"))
            finally:
                self._queue.task_done()

    async def _process(self, ev: dict) -> None:
        result = self.correlator.correlate(ev)
        if result.aggregated:
            self.stats.aggregated += 1
        if result.skip:
            self.stats.spam_filtered += 1
            return
        tries = 0
        while True:
            if await self._post(result):
                return
            tries += 1
            if tries >= self.max_tries:
                self.stats.gave_up += 1
                self._log.error("cannot write event: retry limit exceeded", reason=ev.get("reason"),
                                object=result.event["involvedObject"].get("name"), tries=tries)
                return
            delay = self.retry_interval
            if tries == 1:
                delay *= random.random()
            self.stats.retries += 1
            await asyncio.sleep(delay)

    async def _post(self, result: Correlated) -> bool:
        """One attempt; True when done (written or dropped for good), False to retry."""
        ev = result.event
        namespace = ev["metadata"]["namespace"]
        try:
            stored = None
            if result.patch is not None:
                try:
                    stored = await self.client.patch(R.EVENTS, ev["metadata"]["name"], result.patch, namespace,
                                                     patch_type=PatchType.STRATEGIC_MERGE)
                    self.stats.patched += 1
                except ApiError as exc:
                    if not exc.is_not_found:
                        raise
            if stored is None:
                body = {**ev, "metadata": {k: v for k, v in ev["metadata"].items() if k != "resourceVersion"}}
                stored = await self.client.create(R.EVENTS, body, namespace)
                self.stats.created += 1
        except ApiConnectionError as exc:
            self._log.warning("cannot write event; will retry", error=str(exc), reason=ev.get("reason"))
            return False
        except ApiError as exc:
            self.stats.rejected += 1
            emit = self._log.debug if exc.is_already_exists else self._log.warning
            emit("server rejected event; not retrying", status=exc.status, error=exc.message,
                 reason=ev.get("reason"), object=ev["involvedObject"].get("name"))
            return True
        self.correlator.update_state(result.key, stored)
        return True
