"""Pod events (Pulling, Pulled, Created, Started, Killing, BackOff, Failed...).

The kubelet core reports through ``EventSink`` and never waits on it: recording must
not block pod work. Standalone, events go to the log; in cluster mode a recorder
posts them to the API (aggregated and rate-limited).
"""

from __future__ import annotations

from typing import Protocol

import structlog

log = structlog.get_logger("nodeagent.kubelet.events")

NORMAL = "Normal"
WARNING = "Warning"


class EventSink(Protocol):
    def event(self, pod: dict, type_: str, reason: str, message: str,
              *, field_path: str | None = None) -> None:
        """Record an event about ``pod``; returns at once."""


class LogEventSink:
    def event(self, pod: dict, type_: str, reason: str, message: str,
              *, field_path: str | None = None) -> None:
        meta = pod.get("metadata", {})
        emit = log.warning if type_ == WARNING else log.debug
        emit("pod event", pod=f"{meta.get('namespace', 'default')}/{meta.get('name')}",
             type=type_, reason=reason, message=message, field_path=field_path)


def container_field_path(kind: str, name: str, pod: dict) -> str:
    """The involvedObject.fieldPath kubelet uses, e.g. spec.containers{app}."""
    key = "initContainers" if kind in ("init", "sidecar") else "containers"
    return f"spec.{key}{{{name}}}"


class RecentEvents:
    """An EventSink that remembers the last warnings (for the status page) and passes
    every event on to ``inner``."""

    def __init__(self, inner: EventSink, keep: int = 50) -> None:
        import collections
        import time

        self.inner = inner
        self._clock = time.time
        self.warnings: collections.deque[dict] = collections.deque(maxlen=keep)

    def event(self, pod: dict, type_: str, reason: str, message: str,
              *, field_path: str | None = None) -> None:
        if type_ == WARNING:
            meta = pod.get("metadata", {})
            self.warnings.append({"time": self._clock(), "namespace": meta.get("namespace", "default"),
                                  "pod": meta.get("name", ""), "reason": reason, "message": message})
        self.inner.event(pod, type_, reason, message, field_path=field_path)
