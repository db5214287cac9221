"""The status manager: pod statuses from the kubelet to ``pods/status`` in the API.

The kubelet hands over every status it publishes (``set_status``, synchronous, never
waits). Per pod only the newest status is kept; a few worker tasks send them, each pod
serialised, all writes through a token bucket, so a burst of pod starts or an API
outage never blocks a pod worker and never piles up stale writes.

A status is sent only when it differs from what the API holds (condition transition
times and probe times aside), as a strategic merge patch of the fields kubelet owns,
carrying ``metadata.uid`` as a precondition. Details kubelet's status manager also has:
* the API's PodScheduled condition and startTime are kept; a condition whose status did
  not change keeps the API's lastTransitionTime (stable across agent restarts);
* a terminal phase in the API is never left;
* 404: the pod is gone, its state is dropped; 409: the pod is re-read and the patch
  recomputed from the fresh object; other errors retry with back-off;
* the statuses of static pods go to their mirror pods (``resolve`` maps the uid).

Deletion: once the kubelet has stopped every container of a pod whose API copy has a
deletionTimestamp (``mark_terminated``), its final status is sent with a terminal phase,
then the pod is deleted with grace period 0 and a UID precondition.
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any, Callable

import structlog

from nodeagent.backoff import Delay
from nodeagent.kube import ApiConnectionError, ApiError, KubeClient, RateLimiter
from nodeagent.kube import resources as R
from nodeagent.kubelet.podstatus import get_phase

log = structlog.get_logger(__name__)

OWNED_KEYS = ("phase", "conditions", "message", "reason", "hostIP", "hostIPs", "podIP",
              "podIPs", "startTime", "initContainerStatuses", "containerStatuses",
              "ephemeralContainerStatuses", "qosClass")
TERMINAL_PHASES = ("Succeeded", "Failed")
_REPLACED_LISTS = ("podIPs", "hostIPs")  # merge-keyed by ip: a change must replace them
_RETRY = (0.5, 10.0)


def _clean(value: Any) -> Any:
    """Drop None values (the API stores none), recursively."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _condition_key(cond: dict | None) -> tuple | None:
    if cond is None:
        return None
    return (cond.get("status"), cond.get("reason") or "", cond.get("message") or "")


def _rv(obj: dict | None) -> int:
    value = ((obj or {}).get("metadata") or {}).get("resourceVersion") or ""
    return int(value) if value.isdigit() else -1


def terminal_phase(pod: dict, status: dict) -> str:
    """The phase of a pod that will run nothing again (deleted, containers stopped)."""
    by_name = {cs["name"]: cs for cs in (status.get("initContainerStatuses") or [])
               + (status.get("containerStatuses") or [])}
    phase = get_phase(pod, by_name, pod_is_terminal=True)
    if phase not in TERMINAL_PHASES:
        # Containers that never ran (waiting): kubelet reports such a pod Failed.
        phase = "Failed"
    return phase


def build_status_patch(api_pod: dict, status: dict) -> dict | None:
    """The strategic merge patch that brings ``api_pod``'s status to ``status`` (the
    kubelet's), or None when they already agree."""
    current = api_pod.get("status") or {}
    desired = {k: copy.deepcopy(v) for k, v in status.items() if k in OWNED_KEYS}
    api_conditions = {c.get("type"): c for c in current.get("conditions") or []}

    conditions = []
    changed_conditions = False
    for cond in desired.get("conditions") or []:
        cond = _clean(cond)
        kind = cond.get("type")
        old = api_conditions.get(kind)
        if kind == "PodScheduled" and old is not None:
            continue  # the scheduler's (or the API's) condition stays
        if old is not None and old.get("status") == cond.get("status") and old.get("lastTransitionTime"):
            cond["lastTransitionTime"] = old["lastTransitionTime"]
        if _condition_key(cond) != _condition_key(old):
            changed_conditions = True
        conditions.append(cond)
    desired["conditions"] = conditions

    if current.get("startTime"):
        desired["startTime"] = current["startTime"]
    if current.get("phase") in TERMINAL_PHASES and desired.get("phase") != current["phase"]:
        # The API refuses to leave a terminal phase, and so does kubelet.
        desired["phase"] = current["phase"]
        for key in ("reason", "message"):
            desired[key] = current.get(key)

    patch: dict[str, Any] = {}
    for key in OWNED_KEYS:
        if key == "conditions":
            if changed_conditions:
                patch["conditions"] = conditions
            continue
        want = _clean(desired.get(key))
        have = _clean(current.get(key))
        if want == have or (want in (None, [], "") and have in (None, [], "")):
            continue
        if key in _REPLACED_LISTS and have and want:
            patch[key] = [{"$patch": "replace"}] + want
        else:
            patch[key] = want
    if not patch:
        return None
    return {"metadata": {"uid": api_pod["metadata"]["uid"]}, "status": patch}


class StatusManager:
    def __init__(
        self,
        client: KubeClient,
        *,
        resolve: Callable[[str], str | None],
        concurrency: int = 4,
        qps: float = 40.0,
        burst: int = 80,
    ) -> None:
        self.client = client
        # kubelet uid -> uid of the API pod that shows its status (a static pod's
        # status goes to its mirror pod), or None while there is none.
        self._resolve = resolve
        self._concurrency = concurrency
        self._limiter = RateLimiter(qps, burst)
        self._objects: dict[str, dict] = {}  # API uid -> freshest API copy
        self._pending: dict[str, dict] = {}  # kubelet uid -> newest status
        self._terminated: dict[str, dict] = {}  # kubelet uid -> pod to delete when synced
        self._deleted: set[str] = set()
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()
        self._busy: set[str] = set()
        self._again: set[str] = set()
        self._retry_delay: dict[str, Delay] = {}  # per pod, while its writes fail
        self._rejected: dict[str, dict] = {}  # uid -> the kubelet status the API refused
        self.stats = {"patches": 0, "skipped": 0, "conflicts": 0, "deletes": 0, "errors": 0}

    # --- inputs (synchronous, cheap) --------------------------------------------------

    def set_status(self, uid: str, status: dict) -> None:
        """The kubelet's on_status hook: newest status wins; returns at once."""
        self._pending[uid] = status
        self._enqueue(uid)

    def observe(self, api_pod: dict) -> None:
        """The API's copy of a pod (from the informer); kept if it is the newest."""
        uid = api_pod["metadata"]["uid"]
        old = self._objects.get(uid)
        if old is None or _rv(api_pod) >= _rv(old) or _rv(api_pod) < 0:
            self._objects[uid] = api_pod

    def forget_object(self, api_uid: str) -> None:
        self._objects.pop(api_uid, None)

    def forget(self, uid: str) -> None:
        """The kubelet is done with the pod."""
        self._pending.pop(uid, None)
        self._terminated.pop(uid, None)
        self._deleted.discard(uid)
        self._retry_delay.pop(uid, None)
        self._rejected.pop(uid, None)

    def mark_terminated(self, uid: str, pod: dict) -> None:
        """Every container of ``pod`` (deletionTimestamp set) is stopped: send the final
        status, then delete the pod from the API."""
        if uid not in self._terminated and uid not in self._deleted:
            self._terminated[uid] = pod
            self._enqueue(uid)

    def kick(self, uid: str) -> None:
        """Something the sync of ``uid`` waits for appeared (e.g. its mirror pod)."""
        if uid in self._pending or uid in self._terminated:
            self._enqueue(uid)

    def pending_count(self) -> int:
        return len(self._queued) + len(self._busy)

    # --- queue -----------------------------------------------------------------------

    def _enqueue(self, uid: str) -> None:
        if uid in self._queued:
            return
        if uid in self._busy:
            self._again.add(uid)
            return
        self._queued.add(uid)
        self._queue.put_nowait(uid)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for i in range(self._concurrency):
                tg.create_task(self._worker(), name=f"status-manager-{i}")

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            uid = await self._queue.get()
            self._queued.discard(uid)
            self._busy.add(uid)
            try:
                await self._sync(uid)
                self._retry_delay.pop(uid, None)
            except asyncio.CancelledError:
                raise
            except (ApiConnectionError, ApiError) as exc:
                self.stats["errors"] += 1
                delay = self._retry_delay.setdefault(uid, Delay(*_RETRY)).next()
                if isinstance(exc, ApiError) and exc.retry_after:
                    delay = max(delay, exc.retry_after)
                log.warning("pod status update failed; will retry", pod_uid=uid,
                            error=str(exc), retry_in=delay)
                loop.call_later(delay, self._enqueue, uid)
            except Exception:  # a bug here must not stop status reporting for others
                self.stats["errors"] += 1
                log.exception("pod status sync crashed", pod_uid=uid)
            finally:
                self._busy.discard(uid)
                if uid in self._again:
                    self._again.discard(uid)
                    self._enqueue(uid)

    # --- one pod ---------------------------------------------------------------------

    async def _sync(self, uid: str) -> None:
        api_uid = self._resolve(uid)
        if api_uid is None:
            return  # no API pod to write to yet; kick() brings us back
        status = self._pending.get(uid)
        terminated = self._terminated.get(uid)
        if status is not None and self._rejected.get(uid) is not status:
            to_send = status
            if terminated is not None and status.get("phase") not in TERMINAL_PHASES:
                to_send = dict(status, phase=terminal_phase(terminated, status))
            if not await self._send_status(uid, api_uid, status, to_send):
                return
        if terminated is not None and uid not in self._deleted:
            await self._delete(uid, api_uid)

    async def _send_status(self, uid: str, api_uid: str, original: dict, status: dict) -> bool:
        """Patch until the API agrees; False when the pod is gone."""
        for _attempt in range(4):
            obj = self._objects.get(api_uid)
            if obj is None:
                return False
            patch = build_status_patch(obj, status)
            if patch is None:
                self.stats["skipped"] += 1
                return True
            meta = obj["metadata"]
            await self._limiter.acquire()
            try:
                new = await self.client.patch(R.PODS, meta["name"], patch, meta.get("namespace"),
                                              subresource="status")
            except ApiError as exc:
                if exc.is_not_found:
                    log.info("pod is gone from the API; dropping its status", pod_uid=uid,
                             pod=f"{meta.get('namespace')}/{meta['name']}")
                    self._objects.pop(api_uid, None)
                    return False
                if exc.is_conflict:
                    self.stats["conflicts"] += 1
                    if not await self._refetch(api_uid, meta):
                        return False
                    continue
                if exc.status in (400, 403, 422):
                    log.error("the API refused a pod status", pod_uid=uid,
                              pod=f"{meta.get('namespace')}/{meta['name']}", error=str(exc))
                    self._rejected[uid] = original  # not again until a new status comes
                    return True
                raise
            self.stats["patches"] += 1
            self.observe(new)
            return True
        raise ApiError(409, "Conflict", f"pod {api_uid}: status kept conflicting")

    async def _refetch(self, api_uid: str, meta: dict) -> bool:
        try:
            fresh = await self.client.get(R.PODS, meta["name"], meta.get("namespace"))
        except ApiError as exc:
            if exc.is_not_found:
                self._objects.pop(api_uid, None)
                return False
            raise
        if fresh["metadata"].get("uid") != api_uid:
            self._objects.pop(api_uid, None)  # the name now belongs to another pod
            return False
        self._objects[api_uid] = fresh
        return True

    async def _delete(self, uid: str, api_uid: str) -> None:
        obj = self._objects.get(api_uid)
        if obj is None or not obj["metadata"].get("deletionTimestamp"):
            return
        meta = obj["metadata"]
        await self._limiter.acquire()
        try:
            await self.client.delete(R.PODS, meta["name"], meta.get("namespace"),
                                     grace_period_seconds=0, preconditions={"uid": api_uid})
        except ApiError as exc:
            if not (exc.is_not_found or exc.is_conflict):
                raise
        self.stats["deletes"] += 1
        self._deleted.add(uid)
        log.info("pod deleted from the API after its containers stopped",
                 pod=f"{meta.get('namespace')}/{meta['name']}", pod_uid=api_uid)
