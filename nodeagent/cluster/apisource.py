"""The API pod source: pods bound to this node (``spec.nodeName``), all namespaces.

An Informer (list, then watch with bookmarks; resume after drops, relist on 410 with
synthetic deletes) feeds three kinds of callbacks:

* ``on_pod(pod)`` when a pod the node runs is new or changed in a way that matters to
  the kubelet (metadata or spec, including deletionTimestamp, or a condition someone
  else owns, such as a readiness gate) — other status-only changes,
  most of them our own status patches, do not wake the pod's worker (as kubelet's
  config source compares pods semantically);
* ``on_pod_removed(pod)`` when it is gone from the API;
* ``on_api_copy(pod)`` for every change, so the status manager has the API's copy;
* ``on_mirror(event, pod)`` for mirror pods (annotation ``kubernetes.io/config.mirror``),
  which are the API's copies of static pods and never run from here.
"""

from __future__ import annotations

from typing import Callable

import structlog

from nodeagent.cluster.mirror import is_mirror_pod
from nodeagent.kube import Informer, KubeClient
from nodeagent.kube import resources as R
from nodeagent.kubelet.podstatus import KUBELET_CONDITIONS

log = structlog.get_logger(__name__)

_VOLATILE_METADATA = ("resourceVersion", "managedFields", "generation")


def _foreign_conditions(pod: dict) -> list[tuple]:
    """Conditions others own (readiness gates): the kubelet's Ready depends on them."""
    return [(c.get("type"), c.get("status")) for c in (pod.get("status") or {}).get("conditions") or []
            if c.get("type") not in KUBELET_CONDITIONS]


def semantically_equal(a: dict, b: dict) -> bool:
    """Same spec and metadata (resourceVersion and managed fields aside), and the same
    conditions of other owners."""
    if a.get("spec") != b.get("spec"):
        return False
    if _foreign_conditions(a) != _foreign_conditions(b):
        return False
    ma, mb = a.get("metadata") or {}, b.get("metadata") or {}
    keys = (set(ma) | set(mb)) - set(_VOLATILE_METADATA)
    return all(ma.get(k) == mb.get(k) for k in keys)


class ApiPodSource:
    def __init__(
        self,
        client: KubeClient,
        node_name: str,
        *,
        on_pod: Callable[[dict], None],
        on_pod_removed: Callable[[dict], None],
        on_api_copy: Callable[[dict], None],
        on_mirror: Callable[[str, dict], None],
        watch_idle_timeout: float | None = None,
    ) -> None:
        self.node_name = node_name
        self._on_pod = on_pod
        self._on_pod_removed = on_pod_removed
        self._on_api_copy = on_api_copy
        self._on_mirror = on_mirror
        self.informer = Informer(client, R.PODS, field_selector=f"spec.nodeName={node_name}",
                                 name="pods", watch_idle_timeout=watch_idle_timeout)
        self.informer.add_handler(self._handle)
        self.events = 0

    @property
    def synced(self) -> bool:
        return self.informer.synced.is_set()

    async def run(self) -> None:
        await self.informer.run()

    def pods(self) -> list[dict]:
        return [p for p in self.informer.list() if not is_mirror_pod(p)]

    def _handle(self, event: str, pod: dict, old: dict | None) -> None:
        self.events += 1
        if is_mirror_pod(pod) or (old is not None and is_mirror_pod(old)):
            self._on_mirror(event, pod)
            return
        if event == "DELETED":
            self._on_pod_removed(pod)
            return
        self._on_api_copy(pod)
        if old is None or not semantically_equal(old, pod):
            self._on_pod(pod)
