"""A thin asyncio client for the Kubernetes API on aiohttp.

TLS is always verified (CA from the kubeconfig), authentication by client certificate
or bearer token (a token file is re-read when it changes, as projected/rotated tokens
do), requests pass a token-bucket limiter (QPS/burst, default 50/100 like kubelet), and
transient failures (connection errors, 429, 5xx) are retried with jittered exponential
back-off honouring Retry-After. Nothing here blocks the event loop once constructed."""

from __future__ import annotations

import asyncio
import collections
import email.utils
import json
import os
import random
import ssl
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any, AsyncIterator, Mapping

import aiohttp
import structlog

from nodeagent.backoff import Delay

from .kubeconfig import KubeConfig
from .resources import Resource

log = structlog.get_logger(__name__)

DEFAULT_USER_AGENT = "nodeagent/0.1.0 (linux/amd64)"
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
_SAFE_METHODS = frozenset({"GET", "HEAD"})


class PatchType(str, Enum):
    JSON = "application/json-patch+json"
    MERGE = "application/merge-patch+json"
    STRATEGIC_MERGE = "application/strategic-merge-patch+json"
    APPLY = "application/apply-patch+yaml"


class ApiError(Exception):
    """An error answer from the API server (a metav1.Status)."""

    def __init__(self, status: int, reason: str, message: str, body: Any = None,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.body = body
        self.retry_after = retry_after

    @classmethod
    def from_body(cls, status: int, raw: bytes | str | dict | None,
                  retry_after: float | None = None) -> "ApiError":
        body: Any = raw
        if isinstance(raw, (bytes, str)):
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError):
                body = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        if isinstance(body, dict) and body.get("kind") == "Status":
            code = body.get("code")
            return cls(code if isinstance(code, int) and not isinstance(code, bool) and code else status,
                       str(body.get("reason") or ""), str(body.get("message") or ""), body, retry_after)
        text = body if isinstance(body, str) else json.dumps(body) if body is not None else ""
        return cls(status, _REASONS.get(status, "Unknown"), text.strip()[:500], body, retry_after)

    @property
    def is_not_found(self) -> bool:
        return self.status == 404

    @property
    def is_conflict(self) -> bool:
        return self.status == 409 and self.reason != "AlreadyExists"

    @property
    def is_already_exists(self) -> bool:
        return self.status == 409 and self.reason == "AlreadyExists"

    @property
    def is_gone(self) -> bool:
        """410: the requested resourceVersion is too old (reason Expired or Gone)."""
        return self.status == 410

    @property
    def is_forbidden(self) -> bool:
        return self.status == 403

    @property
    def is_unauthorized(self) -> bool:
        return self.status == 401

    @property
    def is_invalid(self) -> bool:
        return self.status == 422

    @property
    def is_too_many_requests(self) -> bool:
        return self.status == 429


_REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
            405: "MethodNotAllowed", 406: "NotAcceptable", 409: "Conflict", 410: "Expired",
            415: "UnsupportedMediaType", 422: "Invalid", 429: "TooManyRequests",
            500: "InternalError", 503: "ServiceUnavailable", 504: "Timeout"}


class ApiConnectionError(ConnectionError):
    """The API server could not be reached (after retries), or TLS verification failed."""

    def __init__(self, message: str, *, tls: bool = False) -> None:
        super().__init__(message)
        self.tls = tls


# --- rate limiting and back-off ----------------------------------------------------------

class RateLimiter:
    """Token bucket (qps refill, burst capacity). Waiters reserve tokens in arrival order
    and sleep asynchronously; a cancelled waiter gives its token back."""

    def __init__(self, qps: float, burst: int, clock=time.monotonic) -> None:
        if qps > 0 and burst < 1:
            raise ValueError(f"burst must be >= 1 when qps is limited, got {burst}")
        self.qps = qps
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()

    def reserve(self) -> float:
        """Take a token; returns how long to wait before using it."""
        if self.qps <= 0:
            return 0.0
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.qps)
        self._last = now
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self.qps

    def _give_back(self) -> None:
        self._tokens = min(float(self.burst), self._tokens + 1.0)

    async def acquire(self) -> None:
        delay = self.reserve()
        if delay <= 0:
            return
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            self._give_back()
            raise


# The API client's retries use the node's one back-off (jittered by default).
def Backoff(initial: float = 0.5, maximum: float = 30.0, factor: float = 2.0,
            jitter: float = 0.5, rng=random.random) -> Delay:
    return Delay(initial, maximum, factor, jitter, rng)


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# --- credentials ------------------------------------------------------------------------

class _TokenSource:
    """Bearer token, static or from a file re-read when it changes (checked at most once
    per `check_interval`, and at once after a 401)."""

    def __init__(self, config: KubeConfig, check_interval: float = 1.0) -> None:
        self._static = config.token
        self._file = config.token_file
        self._interval = check_interval
        self._token: str | None = None
        self._mtime: float | None = None
        self._checked = 0.0
        if self._file:
            self._reload(force=True)

    def _reload(self, force: bool = False) -> None:
        assert self._file is not None
        try:
            st = os.stat(self._file)
        except OSError as exc:
            if self._token is None:
                raise ApiConnectionError(f"token file {self._file}: {exc.strerror}") from exc
            return  # keep the last good token while the file is being replaced
        if force or st.st_mtime != self._mtime:
            with open(self._file, encoding="utf-8") as fh:
                token = fh.read().strip()
            if token:
                self._token, self._mtime = token, st.st_mtime

    def current(self) -> str | None:
        if self._static:
            return self._static
        if not self._file:
            return None
        now = time.monotonic()
        if now - self._checked >= self._interval:
            self._checked = now
            self._reload()
        return self._token

    def invalidate(self) -> bool:
        """After a 401: re-read the file now. True if a token file is in use."""
        if not self._file:
            return False
        self._checked = time.monotonic()
        self._reload(force=True)
        return True


# --- watch ------------------------------------------------------------------------------

@dataclass(frozen=True)
class WatchEvent:
    type: str  # ADDED, MODIFIED, DELETED, BOOKMARK
    object: dict

    @property
    def resource_version(self) -> str:
        return (self.object.get("metadata") or {}).get("resourceVersion") or ""


# Longest watch event line held in memory. The API server stores objects of at most
# ~1.5 MiB (etcd's request limit) and refuses requests over 3 MiB.
MAX_WATCH_EVENT_BYTES = 16 * 1024 * 1024


class WatchEventUnreadable(Exception):
    """The watch stream carried an event that could not be read (not JSON, not an
    object, over the size limit). The events before it were delivered; the watcher's
    cache may now miss a change, so it must relist."""


class WatchStream:
    """One watch request: `async with client.watch(...) as stream: async for ev in stream`.
    ERROR events raise ApiError (410 for an expired resourceVersion); a broken stream
    raises ApiConnectionError; an unreadable event raises WatchEventUnreadable after the
    events before it; a stream the server ends cleanly just stops iterating."""

    def __init__(self, client: "KubeClient", resource: Resource, path: str,
                 params: dict[str, str], read_timeout: float | None) -> None:
        self._client = client
        self._resource = resource
        self._path = path
        self._params = params
        self._read_timeout = read_timeout
        self._response: aiohttp.ClientResponse | None = None
        self._buffer = b""
        self._dropping = 0  # bytes of an over-long line being discarded (0: not dropping)
        self._pending: collections.deque[WatchEvent | WatchEventUnreadable] = collections.deque()
        self._eof = False

    async def __aenter__(self) -> "WatchStream":
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._client.timeout,
                                        sock_read=self._read_timeout)
        self._response = await self._client._send(
            "GET", self._path, params=self._params, timeout=timeout, retry=False,
            count_as=("watch", self._resource.plural), stream=True)

    async def close(self) -> None:
        if self._response is not None:
            self._response.close()
            self._response = None

    def __aiter__(self) -> AsyncIterator[WatchEvent]:
        return self

    async def __anext__(self) -> WatchEvent:
        while not self._pending:
            if self._eof or self._response is None:
                raise StopAsyncIteration
            try:
                chunk = await self._response.content.readany()
            except (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError) as exc:
                raise ApiConnectionError(
                    f"watch {self._path} broke: {exc.__class__.__name__}: {exc}") from exc
            if not chunk:
                self._eof = True
                self._parse(final=True)
            else:
                self._feed(chunk)
        event = self._pending.popleft()
        if isinstance(event, WatchEventUnreadable):
            raise event
        observer = self._client.observer
        if observer is not None:
            try:
                observer.watch_event(self._resource.plural, event.type)
            except Exception:
                pass
        if event.type == "ERROR":
            code = event.object.get("code")
            raise ApiError.from_body(code if isinstance(code, int) and 100 <= code <= 599 else 500, event.object)
        return event

    def _feed(self, chunk: bytes) -> None:
        if self._dropping:
            newline = chunk.find(b"\n")
            if newline < 0:
                self._dropping += len(chunk)
                return
            self._unreadable(f"event of more than {self._dropping + newline} bytes, over the limit of "
                             f"{MAX_WATCH_EVENT_BYTES}")
            self._dropping = 0
            chunk = chunk[newline + 1:]
        self._buffer += chunk
        self._parse(final=False)
        if len(self._buffer) > MAX_WATCH_EVENT_BYTES:  # the unfinished line is too long
            self._dropping = len(self._buffer)
            self._buffer = b""

    def _unreadable(self, why: str) -> None:
        log.warning("kube.watch_event_unreadable", path=self._path, reason=why)
        self._pending.append(WatchEventUnreadable(f"watch {self._path}: unreadable event: {why}"))

    def _parse(self, final: bool) -> None:
        lines = self._buffer.split(b"\n")
        self._buffer = b"" if final else lines.pop()
        for line in lines:
            line = line.strip()
            if not line:
                continue
            try:
                doc = json.loads(line)
            except (ValueError, RecursionError) as exc:
                self._unreadable(f"not JSON ({exc.__class__.__name__}: {str(exc)[:200]})")
                continue
            obj = doc.get("object") if isinstance(doc, dict) else None
            event_type = doc.get("type") if isinstance(doc, dict) else None
            if not isinstance(obj, dict) or not isinstance(event_type, str):
                self._unreadable(f"not a watch event: {line[:200]!r}")
                continue
            meta = obj.get("metadata")
            if event_type != "ERROR" and meta is not None and not isinstance(meta, dict):
                self._unreadable(f"{event_type} object with metadata {str(meta)[:100]!r}")
                continue
            if event_type != "ERROR" and self._resource.kind:
                obj.setdefault("kind", self._resource.kind)
                obj.setdefault("apiVersion", self._resource.api_version)
            self._pending.append(WatchEvent(event_type, obj))


# --- the client -------------------------------------------------------------------------

def _selector(value: str | Mapping[str, str] | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return ",".join(f"{k}={v}" for k, v in value.items())


class KubeClient:
    def __init__(self, config: KubeConfig, *, qps: float = 50.0, burst: int = 100,
                 user_agent: str = DEFAULT_USER_AGENT, timeout: float = 30.0,
                 max_retries: int = 4, retry_backoff: Delay | None = None,
                 connection_limit: int = 64, request_timeout: float = 90.0) -> None:
        self.config = config
        self.timeout = timeout
        # Total time one call may take, retries and rate limiting included (streams:
        # until the response starts); the per-socket timeouts alone let a trickling
        # answer or a long retry series hold a caller for ever.
        self.request_timeout = request_timeout
        self.user_agent = user_agent
        self.max_retries = max_retries
        self._retry_backoff = retry_backoff or Backoff(initial=0.2, maximum=5.0)
        self.limiter = RateLimiter(qps, burst)
        self._ssl = config.ssl_context()
        self._tokens = _TokenSource(config)
        self._connection_limit = connection_limit
        self._session: aiohttp.ClientSession | None = None
        self._retired_sessions: list[tuple[float, aiohttp.ClientSession]] = []
        self.request_counts: collections.Counter[tuple[str, str]] = collections.Counter()
        # Optional metrics hook: .api_request(method, resource, code, seconds) per
        # attempt and .watch_event(resource, type) per watch event.
        self.observer: Any = None

    @classmethod
    def from_kubeconfig(cls, path: str | os.PathLike, context: str | None = None,
                        **kwargs: Any) -> "KubeClient":
        """load_kubeconfig + KubeClient (blocking file reads: call at startup)."""
        from .kubeconfig import load_kubeconfig  # noqa: PLC0415

        return cls(load_kubeconfig(path, context), **kwargs)

    async def __aenter__(self) -> "KubeClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        for _, retired in self._retired_sessions:
            await retired.close()
        self._retired_sessions.clear()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl, limit=self._connection_limit,
                                             enable_cleanup_closed=True)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout,
                                              sock_read=self.timeout),
                headers={"User-Agent": self.user_agent},
                json_serialize=json.dumps,
            )
        return self._session

    async def reload_tls(self) -> None:
        """Rebuild the TLS context (after the client certificate file was rotated); new
        requests use it, in-flight ones finish on the old connections."""
        self._ssl = await asyncio.to_thread(self.config.ssl_context)
        old, self._session = self._session, None
        if old is not None:
            # Not closed now: watches opened on it keep streaming until they end on their
            # own (timeoutSeconds), so a certificate rotation causes no relist; its idle
            # connections close by keep-alive expiry. close() closes it.
            now = time.monotonic()
            for when, retired in [r for r in self._retired_sessions if now - r[0] > 3600.0]:
                self._retired_sessions.remove((when, retired))  # its watches are long over
                await retired.close()
            self._retired_sessions.append((now, old))

    # --- transport ----------------------------------------------------------------------

    def _headers(self, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        token = self._tokens.current()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    def _tls_error(self, exc: Exception) -> ApiConnectionError:
        ca = "certificate-authority-data" if self.config.ca_data else (
            f"certificate-authority {self.config.ca_file}" if self.config.ca_file else "the system trust store")
        return ApiConnectionError(
            f"TLS verification of {self.config.server} failed ({exc}); the server certificate "
            f"is not trusted by {ca} from kubeconfig {self.config.source or '<memory>'}", tls=True)

    async def _send(self, method: str, path: str, *, params: Mapping[str, str] | None = None,
                    data: bytes | None = None, content_type: str | None = None,
                    timeout: aiohttp.ClientTimeout | None = None, retry: bool = True,
                    count_as: tuple[str, str] = ("", ""), stream: bool = False) -> Any:
        """One API call with rate limiting and retries, within ``request_timeout``.
        Returns the decoded JSON body, or the open response when `stream` is set
        (status already checked)."""
        try:
            async with asyncio.timeout(self.request_timeout):
                return await self._send_with_retries(
                    method, path, params=params, data=data, content_type=content_type,
                    timeout=timeout, retry=retry, count_as=count_as, stream=stream)
        except TimeoutError:
            raise ApiConnectionError(f"{method} {self.config.server + path}: no complete answer "
                                     f"within {self.request_timeout:g}s") from None

    async def _send_with_retries(self, method: str, path: str, *, params: Mapping[str, str] | None,
                                 data: bytes | None, content_type: str | None,
                                 timeout: aiohttp.ClientTimeout | None, retry: bool,
                                 count_as: tuple[str, str], stream: bool) -> Any:
        url = self.config.server + path
        attempts = (self.max_retries if retry else 0) + 1
        backoff = self._retry_backoff.copy()
        reauthenticated = False
        attempt = 0
        while True:
            attempt += 1
            await self.limiter.acquire()
            self.request_counts[count_as] += 1
            session = self._get_session()
            sent = time.monotonic()
            try:
                try:
                    response = await session.request(method, url, params=params, data=data,
                                                     headers=self._headers(content_type),
                                                     timeout=timeout or aiohttp.helpers.sentinel)
                except BaseException:
                    self._observe(method, count_as, "<error>", sent)
                    raise
                self._observe(method, count_as, str(response.status), sent)
            except aiohttp.ClientConnectorCertificateError as exc:
                raise self._tls_error(exc.certificate_error) from exc
            except (aiohttp.ClientSSLError, ssl.SSLError) as exc:
                raise self._tls_error(exc) from exc
            except aiohttp.ClientConnectorError as exc:
                # Nothing was sent: safe to retry any method.
                if attempt < attempts:
                    await asyncio.sleep(backoff.next())
                    continue
                raise ApiConnectionError(f"{method} {url}: cannot connect: {exc.os_error or exc}") from exc
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
                if method in _SAFE_METHODS and attempt < attempts:
                    await asyncio.sleep(backoff.next())
                    continue
                raise ApiConnectionError(f"{method} {url}: {exc.__class__.__name__}: {exc}") from exc
            if response.status < 300 and stream:
                return response
            try:
                raw = await response.read()
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
                response.close()
                if method in _SAFE_METHODS and attempt < attempts:
                    await asyncio.sleep(backoff.next())
                    continue
                raise ApiConnectionError(f"{method} {url}: reading the answer failed: {exc}") from exc
            finally:
                response.release()
            if response.status < 300:
                if not raw:
                    return {}
                try:
                    return json.loads(raw)
                except (ValueError, RecursionError) as exc:
                    raise ApiError(response.status, "InternalError",
                                   f"undecodable answer from {url}: {exc}", raw) from exc
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            error = ApiError.from_body(response.status, raw, retry_after)
            if response.status == 401 and not reauthenticated and self._tokens.invalidate():
                reauthenticated = True
                continue
            if response.status in RETRYABLE_STATUS and attempt < attempts:
                delay = backoff.next()
                if retry_after is not None:
                    delay = min(max(retry_after, 0.0), 60.0) * (1.0 + 0.1 * random.random())
                log.debug("kube.retry", method=method, path=path, status=response.status,
                          delay=round(delay, 3))
                await asyncio.sleep(delay)
                continue
            raise error

    def _observe(self, method: str, count_as: tuple[str, str], code: str, sent: float) -> None:
        if self.observer is not None:
            try:
                self.observer.api_request(method, count_as[1], code, time.monotonic() - sent)
            except Exception:
                pass  # metrics never break a request

    @staticmethod
    def _params(**values: Any) -> dict[str, str]:
        out = {}
        for key, value in values.items():
            if value is None or value is False:
                continue
            out[key] = "true" if value is True else str(value)
        return out

    async def request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                      body: Any = None, content_type: str = "application/json",
                      retry: bool = True) -> Any:
        """A raw API call (path relative to the server, e.g. /api/v1/nodes)."""
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await self._send(method, path, params=self._params(**(params or {})), data=data,
                                content_type=content_type if data is not None else None,
                                retry=retry, count_as=(method.lower(), path))

    # --- verbs --------------------------------------------------------------------------

    @staticmethod
    def _namespace_of(resource: Resource, obj: Mapping[str, Any] | None,
                      namespace: str | None) -> str | None:
        if not resource.namespaced:
            return None
        ns = namespace or ((obj or {}).get("metadata") or {}).get("namespace")
        if not ns:
            raise ValueError(f"{resource.plural}: a namespace is required")
        return ns

    async def get(self, resource: Resource, name: str, namespace: str | None = None, *,
                  subresource: str | None = None, retry: bool = True) -> dict:
        path = resource.path(self._namespace_of(resource, None, namespace), name, subresource)
        obj = await self._send("GET", path, retry=retry, count_as=("get", resource.plural))
        return obj

    async def list(self, resource: Resource, namespace: str | None = None, *,
                   label_selector: str | Mapping[str, str] | None = None,
                   field_selector: str | Mapping[str, str] | None = None,
                   resource_version: str | None = None, resource_version_match: str | None = None,
                   limit: int | None = None, continue_token: str | None = None,
                   retry: bool = True) -> dict:
        """One list request (a page when `limit` is set); items get kind/apiVersion filled."""
        ns = namespace if resource.namespaced else None
        params = self._params(labelSelector=_selector(label_selector),
                              fieldSelector=_selector(field_selector),
                              resourceVersion=resource_version,
                              resourceVersionMatch=resource_version_match, limit=limit,
                              **{"continue": continue_token})
        result = await self._send("GET", resource.path(ns), params=params, retry=retry,
                                  count_as=("list", resource.plural))
        for item in result.get("items") or []:
            item.setdefault("kind", resource.kind)
            item.setdefault("apiVersion", resource.api_version)
        return result

    async def list_all(self, resource: Resource, namespace: str | None = None, *,
                       page_size: int = 500, retry: bool = True, **selectors: Any) -> dict:
        """All pages of a list; metadata.resourceVersion is the consistent list version."""
        first = await self.list(resource, namespace, limit=page_size, retry=retry, **selectors)
        items = list(first.get("items") or [])
        token = (first.get("metadata") or {}).get("continue")
        while token:
            page = await self.list(resource, namespace, limit=page_size, continue_token=token,
                                   retry=retry, **selectors)
            items.extend(page.get("items") or [])
            token = (page.get("metadata") or {}).get("continue")
        first["items"] = items
        (first.get("metadata") or {}).pop("continue", None)
        return first

    async def create(self, resource: Resource, obj: Mapping[str, Any], namespace: str | None = None, *,
                     name: str | None = None, subresource: str | None = None,
                     field_manager: str | None = None, field_validation: str | None = None,
                     dry_run: bool = False) -> dict:
        """POST an object (or a subresource request such as serviceaccounts/token, pods/
        binding or pods/eviction, which need `name`)."""
        ns = self._namespace_of(resource, obj, namespace)
        path = resource.path(ns, name, subresource) if subresource else resource.path(ns)
        params = self._params(fieldManager=field_manager, fieldValidation=field_validation,
                              dryRun="All" if dry_run else None)
        return await self._send("POST", path, params=params, data=json.dumps(obj).encode(),
                                content_type="application/json",
                                count_as=("create", resource.plural + (f"/{subresource}" if subresource else "")))

    async def update(self, resource: Resource, obj: Mapping[str, Any], namespace: str | None = None, *,
                     subresource: str | None = None, field_manager: str | None = None,
                     field_validation: str | None = None, dry_run: bool = False) -> dict:
        """PUT; include metadata.resourceVersion for optimistic concurrency (409 if stale)."""
        name = (obj.get("metadata") or {}).get("name")
        if not name:
            raise ValueError(f"{resource.plural}: update needs metadata.name")
        path = resource.path(self._namespace_of(resource, obj, namespace), name, subresource)
        params = self._params(fieldManager=field_manager, fieldValidation=field_validation,
                              dryRun="All" if dry_run else None)
        return await self._send("PUT", path, params=params, data=json.dumps(obj).encode(),
                                content_type="application/json",
                                count_as=("update", resource.plural + (f"/{subresource}" if subresource else "")))

    async def patch(self, resource: Resource, name: str, patch: Any, namespace: str | None = None, *,
                    patch_type: PatchType | str = PatchType.STRATEGIC_MERGE,
                    subresource: str | None = None, field_manager: str | None = None,
                    force: bool | None = None, field_validation: str | None = None,
                    dry_run: bool = False) -> dict:
        ptype = PatchType(patch_type)
        if ptype is PatchType.APPLY and not field_manager:
            raise ValueError("server-side apply needs a field_manager")
        if isinstance(patch, (bytes, str)):
            data = patch.encode() if isinstance(patch, str) else patch
        else:
            data = json.dumps(patch).encode()
        path = resource.path(self._namespace_of(resource, None, namespace), name, subresource)
        params = self._params(fieldManager=field_manager, force=force,
                              fieldValidation=field_validation, dryRun="All" if dry_run else None)
        return await self._send("PATCH", path, params=params, data=data, content_type=ptype.value,
                                count_as=("patch", resource.plural + (f"/{subresource}" if subresource else "")))

    async def delete(self, resource: Resource, name: str, namespace: str | None = None, *,
                     grace_period_seconds: int | None = None,
                     preconditions: Mapping[str, str] | None = None,
                     propagation_policy: str | None = None, dry_run: bool = False) -> dict:
        """DELETE with DeleteOptions. `preconditions` may hold uid and/or resourceVersion.
        Returns the object (pods, pending deletions) or a Status."""
        body: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if grace_period_seconds is not None:
            body["gracePeriodSeconds"] = int(grace_period_seconds)
        if preconditions:
            body["preconditions"] = dict(preconditions)
        if propagation_policy:
            body["propagationPolicy"] = propagation_policy
        if dry_run:
            body["dryRun"] = ["All"]
        path = resource.path(self._namespace_of(resource, None, namespace), name)
        return await self._send("DELETE", path, data=json.dumps(body).encode(),
                                content_type="application/json", count_as=("delete", resource.plural))

    def watch(self, resource: Resource, namespace: str | None = None, *,
              resource_version: str | None = None,
              label_selector: str | Mapping[str, str] | None = None,
              field_selector: str | Mapping[str, str] | None = None,
              allow_bookmarks: bool = True, timeout_seconds: int | None = None,
              send_initial_events: bool = False, idle_timeout: float | None = None) -> WatchStream:
        """Open a watch (use as `async with`). `idle_timeout` bounds the silence between
        two reads: by default 150 s with bookmarks (the API server sends one about every
        minute, so only a dead connection stays quiet that long), else the watch's own
        timeoutSeconds + 60 s."""
        ns = namespace if resource.namespaced else None
        params = self._params(watch="true", resourceVersion=resource_version,
                              labelSelector=_selector(label_selector),
                              fieldSelector=_selector(field_selector),
                              allowWatchBookmarks=allow_bookmarks,
                              timeoutSeconds=timeout_seconds,
                              sendInitialEvents=send_initial_events or None,
                              resourceVersionMatch="NotOlderThan" if send_initial_events else None)
        if idle_timeout is None:
            if allow_bookmarks:
                idle_timeout = 150.0
            elif timeout_seconds:
                idle_timeout = float(timeout_seconds) + 60.0
        return WatchStream(self, resource, resource.path(ns), params, idle_timeout)
