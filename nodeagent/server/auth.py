"""Who may call the node API (kubelet's webhook authentication and authorization).

Authentication: a client certificate the TLS layer verified against the client CA
(CN = user, O = groups), else a bearer token checked with a TokenReview, else
anonymous (system:anonymous) only when anonymous-auth is on; otherwise 401.
Authorization: a SubjectAccessReview per request with kubelet's mapping of path to
`nodes/<subresource>`. Both answers are cached briefly (kubelet's defaults: tokens 2
min; allowed 5 min, denied 30 s). Without an API server (standalone mode) every
verified client is allowed and nobody else is.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class User:
    name: str
    groups: tuple[str, ...] = ()
    uid: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


ANONYMOUS = User("system:anonymous", ("system:unauthenticated",))


class ReviewClient(Protocol):
    async def request(self, method: str, path: str, *, body: Any = None, **kw: Any) -> Any: ...


def user_from_peercert(peercert: dict | None) -> User | None:
    if not peercert:
        return None
    cn, orgs = "", []
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                cn = value
            elif key == "organizationName":
                orgs.append(value)
    return User(cn, tuple(orgs) + ("system:authenticated",)) if cn else None


def _is_subpath(path: str, prefix: str) -> bool:
    prefix = prefix.rstrip("/")
    return path == prefix or (path.startswith(prefix) and path[len(prefix)] == "/")


VERBS = {"GET": "get", "HEAD": "get", "POST": "create", "PUT": "update", "PATCH": "patch",
         "DELETE": "delete"}


def subresources_for(path: str) -> list[str]:
    """kubelet's GetRequestAttributes: the nodes subresources checked for a path; with
    fine-grained authorization /pods and /healthz try their own subresource first and
    fall back to proxy."""
    if _is_subpath(path, "/stats"):
        return ["stats"]
    if _is_subpath(path, "/metrics"):
        return ["metrics"]
    if _is_subpath(path, "/logs"):
        return ["log"]
    if _is_subpath(path, "/checkpoint"):
        return ["checkpoint"]
    if _is_subpath(path, "/pods") or _is_subpath(path, "/runningpods"):
        return ["pods", "proxy"]
    if _is_subpath(path, "/healthz"):
        return ["healthz", "proxy"]
    if _is_subpath(path, "/configz"):
        return ["configz", "proxy"]
    return ["proxy"]


class _TTLCache:
    def __init__(self, max_entries: int = 4096) -> None:
        self._data: dict[Any, tuple[float, Any]] = {}
        self._max = max_entries

    def get(self, key: Any) -> Any:
        hit = self._data.get(key)
        if hit is None:
            return None
        if hit[0] < time.monotonic():
            self._data.pop(key, None)
            return None
        return hit[1]

    def put(self, key: Any, value: Any, ttl: float) -> None:
        if ttl <= 0:
            return
        if len(self._data) >= self._max:
            now = time.monotonic()
            self._data = {k: v for k, v in self._data.items() if v[0] >= now}
            if len(self._data) >= self._max:
                self._data.pop(next(iter(self._data)))
        self._data[key] = (time.monotonic() + ttl, value)


class Unauthenticated(Exception):
    pass


class NodeAuth:
    def __init__(self, node_name: str, client: ReviewClient | None, *, anonymous: bool = False,
                 token_ttl: float = 120.0, token_fail_ttl: float = 10.0,
                 allow_ttl: float = 300.0, deny_ttl: float = 30.0) -> None:
        self.node_name = node_name
        self.client = client
        self.anonymous = anonymous
        self._tokens = _TTLCache()
        self._decisions = _TTLCache()
        self._token_ttl, self._token_fail_ttl = token_ttl, token_fail_ttl
        self._allow_ttl, self._deny_ttl = allow_ttl, deny_ttl
        self.reviews = 0  # API round trips, for tests of the caches

    async def authenticate(self, peercert: dict | None, authorization: str | None) -> User:
        user = user_from_peercert(peercert)
        if user is not None:
            return user
        if authorization and authorization[:7].lower() == "bearer ":
            token = authorization[7:].strip()
            if token:
                return await self._token_user(token)
        if self.anonymous:
            return ANONYMOUS
        raise Unauthenticated("no credentials")

    async def _token_user(self, token: str) -> User:
        if self.client is None:
            raise Unauthenticated("bearer tokens need an API server")
        key = hashlib.sha256(token.encode()).digest()
        cached = self._tokens.get(key)
        if cached is not None:
            if isinstance(cached, User):
                return cached
            raise Unauthenticated("invalid bearer token")
        self.reviews += 1
        try:
            review = await self.client.request("POST", "/apis/authentication.k8s.io/v1/tokenreviews", body={
                "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": {"token": token}}, retry=False)
        except Exception as exc:  # the API is down: not cached, the caller retries later
            log.warning("TokenReview failed", error=str(exc))
            raise Unauthenticated("token review failed") from exc
        status = (review or {}).get("status") or {}
        if not status.get("authenticated"):
            self._tokens.put(key, False, self._token_fail_ttl)
            raise Unauthenticated(status.get("error") or "invalid bearer token")
        info = status.get("user") or {}
        user = User(info.get("username", ""), tuple(info.get("groups") or ()), info.get("uid", ""),
                    dict(info.get("extra") or {}))
        self._tokens.put(key, user, self._token_ttl)
        return user

    async def authorize(self, user: User, method: str, path: str) -> tuple[bool, str]:
        """(allowed, the 403 message when not)."""
        verb = VERBS.get(method.upper(), "")
        subs = subresources_for(path)
        for sub in subs:
            if await self._allowed(user, verb, sub):
                return True, ""
        shown = f"subresource={subs[0]}" if len(subs) == 1 else f"subresource(s)=[{' '.join(subs)}]"
        return False, f"Forbidden (user={user.name}, verb={verb}, resource=nodes, {shown})"

    async def _allowed(self, user: User, verb: str, sub: str) -> bool:
        if self.client is None:
            # Standalone: the client CA is the whole policy.
            return user is not ANONYMOUS and "system:unauthenticated" not in user.groups
        key = (user.name, user.groups, user.uid, verb, sub)
        cached = self._decisions.get(key)
        if cached is not None:
            return cached
        self.reviews += 1
        spec: dict[str, Any] = {
            "user": user.name, "groups": list(user.groups),
            "resourceAttributes": {"verb": verb, "group": "", "version": "v1", "resource": "nodes",
                                   "subresource": sub, "name": self.node_name}}
        if user.uid:
            spec["uid"] = user.uid
        if user.extra:
            spec["extra"] = user.extra
        try:
            review = await self.client.request(
                "POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews",
                body={"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                      "spec": spec}, retry=False)
        except Exception as exc:  # fail closed, uncached
            log.warning("SubjectAccessReview failed", error=str(exc))
            return False
        allowed = bool(((review or {}).get("status") or {}).get("allowed"))
        self._decisions.put(key, allowed, self._allow_ttl if allowed else self._deny_ttl)
        return allowed
