"""ConfigMaps, Secrets and service-account tokens for pods, read from the API.

``ClusterEnvSources`` is the cluster-mode ``EnvSources`` of ``containerconfig`` and
``VolumeManager``. The kubelet core calls ``await prefetch(pod)`` before it builds
containers or (re)writes volumes; the synchronous lookups that follow
(``config_map``, ``secret``, ``service_account_token``) then only read memory.

How objects are kept current — chosen by cost:

* **One watch per referenced object** (``fieldSelector=metadata.name=<name>``), like
  kubelet's default ``Watch`` change-detection strategy. It is the only way to watch that
  also works under the Node authorizer, which lets a node read just the ConfigMaps and
  Secrets its own pods reference (listing a namespace is forbidden). Cost: one list and
  one long-lived connection per distinct object (a namespace's ``kube-root-ca.crt`` is
  shared by all its pods), and an update reaches the node within a second.
* Each watch holds an HTTP/1.1 connection of the client, whose pool is bounded
  (``KubeClient(connection_limit=64)``): beyond ``max_watches`` objects, and whenever
  ``run()`` is not running, objects are **polled** instead — a GET when a pod needs one
  and the cached answer is older than ``cache_ttl``, and a GET of every polled object each
  ``poll_interval`` (kubelet's ``Cache`` strategy; updates then take up to that long).
  Namespace-wide informers were rejected: they cache every Secret of the namespace
  (memory, and secrets the node has no business holding) and are forbidden on real
  clusters.

What the lookups answer: the object's data (ConfigMap ``data`` as text plus
``binaryData`` as bytes; Secret ``data`` decoded from base64 to bytes), ``None`` when the
API says the object does not exist (containerconfig/volumes turn that into kubelet's
``configmap "x" not found`` unless the reference is optional), or a ``ConfigError``
(``failed to sync configmap cache: ...``) when no answer could be had yet — the kubelet
shows it as CreateContainerConfigError / FailedMount and retries. Stale data is served
while the API is unreachable, as kubelet does.

Changes seen by a watch or poll call ``on_change(kind, namespace, name)`` (kind
"ConfigMap" or "Secret"); ``pods_referencing(kind, namespace, name)`` says which pods to
kick, whose next sync rewrites their volumes atomically (environment variables of running
containers never change, as in Kubernetes). A pod's references are forgotten on
``release_pod(uid)`` or when it has not been prefetched for ``registration_ttl``.

Service-account tokens (projected ``serviceAccountToken`` sources) come from the
TokenRequest API (``serviceaccounts/<name>/token``) with the projection's audience and
``expirationSeconds`` (3600 when unset — the API server's default; ServiceAccount
admission writes 3607 into ``kube-api-access-*`` volumes), bound to the pod. Like
kubelet's token manager, a token is renewed once older than 80% of its lifetime or than
24 h (minus up to 10 s of jitter); a renewal that fails keeps the old token until it
expires.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, NamedTuple

import structlog

from nodeagent.kubelet.containerconfig import ConfigError
from nodeagent.kube import ApiConnectionError, ApiError, KubeClient, Reflector
from nodeagent.kube import resources as R
from nodeagent.api.podspec import DEFAULT_NAMESPACE

log = structlog.get_logger(__name__)

CONFIG_MAP = "ConfigMap"
SECRET = "Secret"
_RESOURCES = {CONFIG_MAP: R.CONFIGMAPS, SECRET: R.SECRETS}
# kubelet's error wording uses the singular lower-case resource: configmap "x" not found.
_LABELS = {CONFIG_MAP: "configmap", SECRET: "secret"}

DEFAULT_TOKEN_EXPIRATION = 3600
TOKEN_REFRESH_FRACTION = 0.8
TOKEN_MAX_AGE = 24 * 3600.0
TOKEN_MAX_JITTER = 10.0
CONTAINER_LISTS = ("initContainers", "containers", "ephemeralContainers")

OnChange = Callable[[str, str, str], object]


class ObjectRef(NamedTuple):
    kind: str  # CONFIG_MAP or SECRET
    namespace: str
    name: str


class TokenKey(NamedTuple):
    pod_uid: str
    service_account: str
    audience: str
    expiration_seconds: int


# --- what a pod references -------------------------------------------------------------


def _namespace(pod: dict) -> str:
    return (pod.get("metadata") or {}).get("namespace") or DEFAULT_NAMESPACE


def pod_references(pod: dict) -> set[ObjectRef]:
    """Every ConfigMap and Secret the pod's env, envFrom, volumes (including projected
    sources) and imagePullSecrets name, optional or not, in all container lists."""
    ns = _namespace(pod)
    spec = pod.get("spec") or {}
    refs: set[ObjectRef] = set()

    def add(kind: str, ref: object, key: str = "name") -> None:
        if isinstance(ref, dict) and isinstance(ref.get(key), str) and ref[key]:
            refs.add(ObjectRef(kind, ns, ref[key]))

    for list_name in CONTAINER_LISTS:
        for container in spec.get(list_name) or []:
            for src in container.get("envFrom") or []:
                add(CONFIG_MAP, src.get("configMapRef"))
                add(SECRET, src.get("secretRef"))
            for var in container.get("env") or []:
                value_from = var.get("valueFrom") or {}
                add(CONFIG_MAP, value_from.get("configMapKeyRef"))
                add(SECRET, value_from.get("secretKeyRef"))
    for pull_secret in spec.get("imagePullSecrets") or []:
        add(SECRET, pull_secret)
    for volume in spec.get("volumes") or []:
        add(CONFIG_MAP, volume.get("configMap"))
        add(SECRET, volume.get("secret"), "secretName")
        for src in (volume.get("projected") or {}).get("sources") or []:
            add(CONFIG_MAP, src.get("configMap"))
            add(SECRET, src.get("secret"))
    return refs


def token_projections(pod: dict) -> list[dict]:
    """The ``serviceAccountToken`` sources of the pod's projected volumes."""
    found = []
    for volume in (pod.get("spec") or {}).get("volumes") or []:
        for src in (volume.get("projected") or {}).get("sources") or []:
            if isinstance(src.get("serviceAccountToken"), dict):
                found.append(src["serviceAccountToken"])
    return found


def token_key(pod: dict, projection: dict) -> TokenKey:
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    return TokenKey(
        pod_uid=meta.get("uid") or "",
        service_account=spec.get("serviceAccountName") or spec.get("serviceAccount") or "default",
        audience=projection.get("audience") or "",
        expiration_seconds=int(projection.get("expirationSeconds") or DEFAULT_TOKEN_EXPIRATION),
    )


# --- decoding ----------------------------------------------------------------------------


def _b64(value: object, where: str) -> bytes:
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError):
        log.warning("undecodable base64 value from the API; treating it as absent", where=where)
        raise


def config_map_data(obj: dict) -> dict[str, str | bytes]:
    """``data`` as text and ``binaryData`` decoded to bytes."""
    name = (obj.get("metadata") or {}).get("name")
    data: dict[str, str | bytes] = {str(k): str(v) for k, v in (obj.get("data") or {}).items()}
    for key, value in (obj.get("binaryData") or {}).items():
        try:
            data[str(key)] = _b64(value, f"configmap {name} binaryData[{key}]")
        except (binascii.Error, ValueError):
            continue
    return data


def secret_data(obj: dict) -> dict[str, bytes]:
    """``data`` decoded from base64 (``stringData`` is write-only and never read back)."""
    name = (obj.get("metadata") or {}).get("name")
    data: dict[str, bytes] = {}
    for key, value in (obj.get("data") or {}).items():
        try:
            data[str(key)] = _b64(value, f"secret {name} data[{key}]")
        except (binascii.Error, ValueError):
            continue
    return data


# --- cache entries ---------------------------------------------------------------------


@dataclass(eq=False)
class _Entry:
    ref: ObjectRef
    users: dict[str, float] = field(default_factory=dict)  # pod uid -> when last prefetched
    synced: bool = False  # an authoritative answer is known (data, or None for absent)
    data: dict | None = None
    resource_version: str = ""
    error: str = ""  # why there is no answer yet
    fetched_at: float = float("-inf")  # monotonic time of the last successful GET
    fetch: asyncio.Task | None = None  # in-flight GET of a polled entry
    reflector: Reflector | None = None
    task: asyncio.Task | None = None

    @property
    def watched(self) -> bool:
        return self.reflector is not None

    @property
    def has_answer(self) -> bool:
        return self.synced or (self.reflector is not None and self.reflector.synced.is_set())


@dataclass(eq=False)
class _Token:
    token: bytes = b""
    expires: float = 0.0  # wall-clock time on the node
    ttl: int = 0
    jitter: float = 0.0
    error: str = ""


@dataclass
class RefStats:
    gets: int = 0
    watches_started: int = 0
    token_requests: int = 0
    token_failures: int = 0
    changes: int = 0


class ClusterEnvSources:
    """ConfigMap/Secret/token source for env and volumes, backed by the API (see module doc)."""

    def __init__(
        self,
        client: KubeClient,
        *,
        node_name: str,
        on_change: OnChange | None = None,
        max_watches: int = 40,
        sync_timeout: float = 10.0,
        cache_ttl: float = 60.0,
        poll_interval: float = 60.0,
        registration_ttl: float = 600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.node_name = node_name
        self.on_change = on_change
        self.max_watches = max_watches
        self.sync_timeout = sync_timeout
        self.cache_ttl = cache_ttl
        self.poll_interval = poll_interval
        self.registration_ttl = registration_ttl
        self._clock = clock  # wall clock, for token lifetimes
        self._entries: dict[ObjectRef, _Entry] = {}
        self._pod_refs: dict[str, set[ObjectRef]] = {}
        self._pod_seen: dict[str, float] = {}
        self._tokens: dict[TokenKey, _Token] = {}
        self._token_fetches: dict[TokenKey, asyncio.Task] = {}
        self._tg: asyncio.TaskGroup | None = None
        self.stats = RefStats()

    # --- registration ------------------------------------------------------------------

    async def prefetch(self, pod: dict) -> None:
        """Fetch (or wait for the watch of) every ConfigMap/Secret the pod references and
        every projected token it needs. Never raises for API trouble: the lookups report
        it. Waits at most ``sync_timeout`` for anything new."""
        uid = (pod.get("metadata") or {}).get("uid") or ""
        now = time.monotonic()
        refs = pod_references(pod)
        for ref in self._pod_refs.get(uid, set()) - refs:
            self._unregister(uid, ref)
        self._pod_refs[uid] = refs
        self._pod_seen[uid] = now
        waits = []
        for ref in sorted(refs):
            entry = self._entries.get(ref)
            if entry is None:
                entry = self._entries[ref] = _Entry(ref)
            entry.users[uid] = now
            self._maybe_watch(entry)
            waits.append(self._ensure_fresh(entry))
        for projection in token_projections(pod):
            waits.append(self._ensure_token(pod, projection))
        if waits:
            await asyncio.gather(*waits)

    def release_pod(self, uid: str) -> None:
        """Forget a pod that left the node: its references (stopping watches nobody else
        needs) and its tokens."""
        for ref in self._pod_refs.pop(uid, set()):
            self._unregister(uid, ref)
        self._pod_seen.pop(uid, None)
        for key in [k for k in self._tokens if k.pod_uid == uid]:
            del self._tokens[key]
        for key in [k for k in self._token_fetches if k.pod_uid == uid]:
            self._token_fetches.pop(key).cancel()

    def pods_referencing(self, kind: str, namespace: str, name: str) -> set[str]:
        """UIDs of the registered pods that reference the object."""
        entry = self._entries.get(ObjectRef(kind, namespace, name))
        return set(entry.users) if entry else set()

    def _unregister(self, uid: str, ref: ObjectRef) -> None:
        entry = self._entries.get(ref)
        if entry is None:
            return
        entry.users.pop(uid, None)
        if not entry.users:
            self._drop(entry)

    def _drop(self, entry: _Entry) -> None:
        self._entries.pop(entry.ref, None)
        self._stop_watch(entry)
        if entry.fetch is not None and not entry.fetch.done():
            entry.fetch.cancel()

    # --- lookups (synchronous, after prefetch) -------------------------------------------

    def config_map(self, namespace: str, name: str) -> dict[str, str | bytes] | None:
        return self._lookup(CONFIG_MAP, namespace, name)

    def secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        return self._lookup(SECRET, namespace, name)

    def _lookup(self, kind: str, namespace: str, name: str) -> dict | None:
        entry = self._entries.get(ObjectRef(kind, namespace, name))
        label = _LABELS[kind]
        if entry is None:
            # The caller skipped prefetch: a bug, reported like kubelet's managers do.
            raise ConfigError(f'{label} "{name}": object "{namespace}"/"{name}" not registered')
        if not entry.has_answer:
            raise ConfigError(f"failed to sync {label} cache: {entry.error or 'timed out waiting for the condition'}")
        return None if entry.data is None else dict(entry.data)

    def service_account_token(self, pod: dict, source: dict) -> bytes:
        """The current token for a projected ``serviceAccountToken`` source."""
        state = self._tokens.get(token_key(pod, source))
        if state is None or not state.token:
            reason = state.error if state is not None and state.error else "no token was requested for this pod yet"
            raise ConfigError(f"failed to fetch token: {reason}")
        if self._clock() >= state.expires:
            raise ConfigError(f"failed to fetch token: {state.error or 'the token expired and was not renewed'}")
        return state.token

    # --- objects: watch or poll ----------------------------------------------------------

    @property
    def watched_count(self) -> int:
        return sum(1 for e in self._entries.values() if e.watched)

    def _maybe_watch(self, entry: _Entry) -> None:
        if self._tg is None or entry.watched or not entry.users or self.watched_count >= self.max_watches:
            return
        kind, namespace, name = entry.ref
        reflector = Reflector(
            self.client, _RESOURCES[kind],
            lambda event_type, obj, _old, entry=entry: self._on_watch_event(entry, event_type, obj),
            namespace=namespace, field_selector=f"metadata.name={name}",
            name=f"{_LABELS[kind]} {namespace}/{name}",
        )
        try:
            task = self._tg.create_task(self._watch(reflector), name=f"watch-{_LABELS[kind]}-{namespace}-{name}")
        except RuntimeError:  # the group is shutting down: stay polled
            return
        entry.reflector, entry.task = reflector, task
        self.stats.watches_started += 1

    @staticmethod
    async def _watch(reflector: Reflector) -> None:
        # The reflector handles API trouble itself; anything else is a bug that must not
        # take the other watches (one TaskGroup) down with it.
        while True:
            try:
                await reflector.run()
            except Exception:  # noqa: BLE001
                log.exception("watch of a referenced object failed; restarting", watch=reflector.name)
                await asyncio.sleep(5.0)

    def _stop_watch(self, entry: _Entry) -> None:
        task, entry.task, entry.reflector = entry.task, None, None
        if task is not None and not task.done():
            task.cancel()

    def _on_watch_event(self, entry: _Entry, event_type: str, obj: dict) -> None:
        if event_type == "DELETED":
            self._update(entry, None, "")
        else:
            self._update(entry, obj, (obj.get("metadata") or {}).get("resourceVersion") or "")

    def _update(self, entry: _Entry, obj: dict | None, resource_version: str) -> None:
        """Store a new authoritative answer; report it when it differs from a previous one."""
        had_answer = entry.has_answer
        before = (entry.data is not None, entry.resource_version)
        if obj is None:
            entry.data = None
        else:
            entry.data = config_map_data(obj) if entry.ref.kind == CONFIG_MAP else secret_data(obj)
        entry.resource_version = resource_version
        entry.synced = True
        entry.error = ""
        if had_answer and before != (entry.data is not None, resource_version):
            self._notify(entry.ref)

    def _notify(self, ref: ObjectRef) -> None:
        self.stats.changes += 1
        log.info("referenced object changed", kind=ref.kind, namespace=ref.namespace, name=ref.name)
        if self.on_change is None:
            return
        try:
            self.on_change(ref.kind, ref.namespace, ref.name)
        except Exception:  # a callback bug must not stop the watch
            log.exception("on_change callback failed", kind=ref.kind, namespace=ref.namespace, name=ref.name)

    async def _ensure_fresh(self, entry: _Entry) -> None:
        if entry.watched:
            if entry.has_answer:
                return
            assert entry.reflector is not None
            try:
                await asyncio.wait_for(entry.reflector.synced.wait(), self.sync_timeout)
            except asyncio.TimeoutError:
                entry.error = entry.reflector.stats.last_error or "timed out waiting for the condition"
            return
        if entry.synced and time.monotonic() - entry.fetched_at < self.cache_ttl:
            return
        # asyncio.wait neither cancels the GET on timeout (a slow answer still lands in
        # the cache for the next try) nor raises when the GET was cancelled.
        done, _ = await asyncio.wait({self._start_fetch(entry)}, timeout=self.sync_timeout)
        if not done and not entry.synced:
            entry.error = "timed out waiting for the condition"

    def _start_fetch(self, entry: _Entry) -> asyncio.Task:
        if entry.fetch is None or entry.fetch.done():
            entry.fetch = asyncio.create_task(self._fetch(entry), name=f"get-{entry.ref.kind}-{entry.ref.name}")
        return entry.fetch

    async def _fetch(self, entry: _Entry) -> None:
        kind, namespace, name = entry.ref
        self.stats.gets += 1
        try:
            obj = await self.client.get(_RESOURCES[kind], name, namespace)
        except ApiError as exc:
            if not exc.is_not_found:
                entry.error = f"{exc.reason or exc.status}: {exc.message}"
                log.warning("cannot read referenced object", kind=kind, namespace=namespace, name=name,
                            status=exc.status, error=exc.message)
                return
            obj = None
        except ApiConnectionError as exc:
            entry.error = str(exc)
            log.warning("cannot read referenced object", kind=kind, namespace=namespace, name=name, error=str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - an odd answer must not escape a background task
            entry.error = f"{exc.__class__.__name__}: {exc}"
            log.exception("reading referenced object failed", kind=kind, namespace=namespace, name=name)
            return
        if entry.watched:
            return  # a watch took over meanwhile and is authoritative
        entry.fetched_at = time.monotonic()
        self._update(entry, obj, ((obj or {}).get("metadata") or {}).get("resourceVersion") or "")

    # --- tokens ----------------------------------------------------------------------

    def _token_needs_refresh(self, state: _Token) -> bool:
        now = self._clock()
        if not state.token or now >= state.expires:
            return True
        issued = state.expires - state.ttl
        if now > issued + TOKEN_MAX_AGE - state.jitter:
            return True
        return now > issued + state.ttl * TOKEN_REFRESH_FRACTION - state.jitter

    async def _ensure_token(self, pod: dict, projection: dict) -> None:
        key = token_key(pod, projection)
        state = self._tokens.get(key)
        if state is not None and not self._token_needs_refresh(state):
            return
        task = self._token_fetches.get(key)
        if task is None or task.done():
            task = asyncio.create_task(self._request_token(pod, key), name=f"token-{key.pod_uid}")
            self._token_fetches[key] = task
        done, _ = await asyncio.wait({task}, timeout=self.sync_timeout)
        if not done:
            state = self._tokens.setdefault(key, _Token())
            if not state.token:
                state.error = "timed out waiting for the TokenRequest"

    async def _request_token(self, pod: dict, key: TokenKey) -> None:
        meta = pod.get("metadata") or {}
        namespace = _namespace(pod)
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                # Empty means "the API server's own audiences", as kubelet sends it.
                "audiences": [key.audience] if key.audience else [],
                "expirationSeconds": key.expiration_seconds,
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta.get("name", ""),
                                   "uid": key.pod_uid},
            },
        }
        self.stats.token_requests += 1
        # Lifetimes are measured on the node's clock from the moment of asking: never later
        # than the server's view, and immune to clock skew between node and API server.
        asked_at = self._clock()
        try:
            result = await self.client.create(R.SERVICEACCOUNTS, body, namespace, name=key.service_account,
                                              subresource="token")
            token = str(result["status"]["token"])
            ttl = int((result.get("spec") or {}).get("expirationSeconds") or key.expiration_seconds)
            expires = asked_at + ttl
        except (ApiError, ApiConnectionError, KeyError, TypeError, ValueError) as exc:
            self.stats.token_failures += 1
            message = f"{exc.reason}: {exc.message}" if isinstance(exc, ApiError) else str(exc)
            state = self._tokens.setdefault(key, _Token())
            state.error = message
            log.warning("TokenRequest failed", pod=f"{namespace}/{meta.get('name')}",
                        service_account=key.service_account, error=message,
                        keeping_old_token=bool(state.token) and self._clock() < state.expires)
            return
        if key.pod_uid not in self._pod_seen:
            return  # released while the request was in flight
        self._tokens[key] = _Token(token=token.encode(), expires=expires, ttl=ttl,
                                   jitter=random.uniform(0.0, TOKEN_MAX_JITTER))
        log.debug("service account token issued", pod=f"{namespace}/{meta.get('name')}",
                  service_account=key.service_account, expires_in=round(expires - self._clock()))

    # --- background --------------------------------------------------------------------

    async def run(self) -> None:
        """Watch referenced objects (up to ``max_watches``), poll the rest every
        ``poll_interval`` and forget pods not seen for ``registration_ttl``. Cancel to stop;
        afterwards the cache keeps working by GETs."""
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                for entry in list(self._entries.values()):
                    self._maybe_watch(entry)
                while True:
                    await asyncio.sleep(self.poll_interval)
                    self._collect_garbage()
                    for entry in list(self._entries.values()):
                        self._maybe_watch(entry)
                    polled = [self._start_fetch(e) for e in self._entries.values() if not e.watched and e.users]
                    if polled:
                        await asyncio.wait(polled)
        finally:
            self._tg = None
            for entry in self._entries.values():
                self._stop_watch(entry)
                entry.fetched_at = float("-inf")  # unwatched now: the next prefetch re-reads

    def _collect_garbage(self) -> None:
        cutoff = time.monotonic() - self.registration_ttl
        for uid in [u for u, seen in self._pod_seen.items() if seen < cutoff]:
            log.debug("forgetting references of a pod not seen for a while", pod_uid=uid)
            self.release_pod(uid)

    async def close(self) -> None:
        """Cancel in-flight GETs and token requests (watches stop with ``run()``)."""
        tasks: Iterable[asyncio.Task | None] = [e.fetch for e in self._entries.values()]
        pending = [t for t in [*tasks, *self._token_fetches.values()] if t is not None and not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
