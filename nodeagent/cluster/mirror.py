"""Mirror pods: the API's read-only copies of the node's static (manifest) pods.

As kubelet's mirror client does it: for every static pod a pod of the same name and
namespace is created in the API, annotated ``kubernetes.io/config.mirror`` with the
static pod's config hash and owned (controller) by the Node. A mirror whose hash no
longer matches (the manifest changed), that is being deleted (someone ran ``kubectl
delete`` on it) or whose static pod is gone is deleted with grace period 0 and a UID
precondition, and recreated when the static pod still exists.

Reconciliation runs on every change of either side and every ``resync`` seconds, only
once the API pod informer has synced (so existing mirrors are known) and the Node is
registered (its uid is the owner).
"""

from __future__ import annotations

import asyncio
import copy
from typing import Callable

import structlog

from nodeagent.kube import ApiConnectionError, ApiError, KubeClient
from nodeagent.kube import resources as R
from nodeagent.standalone.manifests import CONFIG_HASH_ANNOTATION

log = structlog.get_logger(__name__)

MIRROR_ANNOTATION = "kubernetes.io/config.mirror"
_DROPPED_METADATA = ("uid", "resourceVersion", "creationTimestamp", "generation", "managedFields",
                     "selfLink", "deletionTimestamp", "deletionGracePeriodSeconds", "ownerReferences")

Key = tuple[str, str]


def is_mirror_pod(pod: dict) -> bool:
    return MIRROR_ANNOTATION in ((pod.get("metadata") or {}).get("annotations") or {})


def config_hash(static_pod: dict) -> str:
    meta = static_pod["metadata"]
    return (meta.get("annotations") or {}).get(CONFIG_HASH_ANNOTATION) or meta["uid"]


def _key(pod: dict) -> Key:
    meta = pod["metadata"]
    return meta.get("namespace") or "default", meta["name"]


def mirror_pod_for(static_pod: dict, node_name: str, node_uid: str) -> dict:
    """The mirror pod to create for ``static_pod``."""
    pod = copy.deepcopy(static_pod)
    pod.pop("status", None)
    meta = pod.setdefault("metadata", {})
    for key in _DROPPED_METADATA:
        meta.pop(key, None)
    annotations = dict(meta.get("annotations") or {})
    annotations[MIRROR_ANNOTATION] = config_hash(static_pod)
    meta["annotations"] = annotations
    meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "Node", "name": node_name,
                                "uid": node_uid, "controller": True}]
    pod["apiVersion"], pod["kind"] = "v1", "Pod"
    pod["spec"]["nodeName"] = node_name
    return pod


class MirrorManager:
    def __init__(
        self,
        client: KubeClient,
        *,
        node_name: str,
        node_uid: Callable[[], str | None],
        api_synced: Callable[[], bool],
        on_mirror_ready: Callable[[str], None] | None = None,
        resync: float = 30.0,
    ) -> None:
        self.client = client
        self.node_name = node_name
        self._node_uid = node_uid
        self._api_synced = api_synced
        self._on_mirror_ready = on_mirror_ready
        self.resync = resync
        self._static: dict[Key, dict] = {}  # desired: static pods by (namespace, name)
        self._mirrors: dict[Key, dict] = {}  # what the API holds
        self._failed: dict[Key, str] = {}  # key -> hash the API refused (422): not retried
        self._wake = asyncio.Event()
        self.stats = {"created": 0, "deleted": 0}

    # --- inputs --------------------------------------------------------------------

    def set_static_pods(self, pods: dict[str, dict]) -> None:
        """The static pods the node runs (uid -> pod)."""
        self._static = {_key(p): p for p in pods.values()}
        self._wake.set()

    def mirror_event(self, event: str, pod: dict) -> None:
        key = _key(pod)
        if event == "DELETED":
            current = self._mirrors.get(key)
            if current is not None and current["metadata"].get("uid") == pod["metadata"].get("uid"):
                del self._mirrors[key]
        else:
            self._mirrors[key] = pod
            static = self._static.get(key)
            if (static is not None and self._on_mirror_ready is not None
                    and self._matches(pod, static)):
                self._on_mirror_ready(static["metadata"]["uid"])
        self._wake.set()

    def kick(self) -> None:
        self._wake.set()

    # --- lookups -------------------------------------------------------------------

    def mirror_uid(self, static_pod: dict) -> str | None:
        """The uid of the current mirror of ``static_pod``, if it exists and matches."""
        mirror = self._mirrors.get(_key(static_pod))
        if mirror is None or not self._matches(mirror, static_pod):
            return None
        return mirror["metadata"]["uid"]

    @staticmethod
    def _matches(mirror: dict, static_pod: dict) -> bool:
        meta = mirror["metadata"]
        return (not meta.get("deletionTimestamp")
                and (meta.get("annotations") or {}).get(MIRROR_ANNOTATION) == config_hash(static_pod))

    # --- reconciliation ------------------------------------------------------------

    async def run(self) -> None:
        wait = self.resync
        while True:
            try:
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            wait = self.resync
            try:
                if not await self.reconcile():
                    wait = 0.5  # the Node or the pod list is not there yet: look again soon
            except (ApiError, ApiConnectionError) as exc:
                log.warning("mirror pod sync failed; will retry", error=str(exc))
                wait = 1.0

    async def reconcile(self) -> bool:
        """One round; False when it cannot run yet (no Node uid, pods not listed)."""
        node_uid = self._node_uid()
        if node_uid is None or not self._api_synced():
            return False
        for key, mirror in list(self._mirrors.items()):
            static = self._static.get(key)
            if static is not None and self._matches(mirror, static):
                continue
            await self._delete(mirror)
        for key, static in list(self._static.items()):
            mirror = self._mirrors.get(key)
            if mirror is not None and self._matches(mirror, static):
                continue
            if self._failed.get(key) == config_hash(static):
                continue
            await self._create(static, node_uid)
        return True

    async def _delete(self, mirror: dict) -> None:
        meta = mirror["metadata"]
        try:
            await self.client.delete(R.PODS, meta["name"], meta["namespace"],
                                     grace_period_seconds=0, preconditions={"uid": meta["uid"]})
        except ApiError as exc:
            if not (exc.is_not_found or exc.is_conflict):
                raise
        self.stats["deleted"] += 1
        log.info("mirror pod deleted", pod=f"{meta['namespace']}/{meta['name']}",
                 hash=(meta.get("annotations") or {}).get(MIRROR_ANNOTATION))
        current = self._mirrors.get(_key(mirror))
        if current is not None and current["metadata"].get("uid") == meta["uid"]:
            del self._mirrors[_key(mirror)]

    async def _create(self, static: dict, node_uid: str) -> None:
        key = _key(static)
        body = mirror_pod_for(static, self.node_name, node_uid)
        try:
            created = await self.client.create(R.PODS, body, key[0])
        except ApiError as exc:
            if exc.is_already_exists:
                return  # the informer shows it; the next round compares hashes
            if exc.status in (400, 403, 404, 422):
                log.error("the API refused a mirror pod", pod=f"{key[0]}/{key[1]}", error=str(exc))
                self._failed[key] = config_hash(static)
                return
            raise
        self.stats["created"] += 1
        self._failed.pop(key, None)
        log.info("mirror pod created", pod=f"{key[0]}/{key[1]}", uid=created["metadata"]["uid"])
        self.mirror_event("ADDED", created)
