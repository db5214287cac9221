"""The HTTPS front end of the test control plane (aiohttp) and the ControlPlane object
tests and `python -m tests.controlplane` use."""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import datetime as dt
import ipaddress
import json
import os
import random
import shutil
import ssl
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import structlog
import aiohttp
import yaml
from aiohttp import web

from . import openapi, patch as patching, protobuf, resources, tables
from .api import ADMIN, Api, Options, RecordedWrite, UserInfo, now_time
from .auth import ANONYMOUS, Authenticator, Unauthorized, authorize
from .errors import ApiStatusError, expired
from .pki import CertificateAuthority, CSRSigningError, csr_subject
from .resources import ResourceType
from . import persist
from .store import Store, TooOldResourceVersion, Watcher
from .tokens import (BOOTSTRAP_SECRET_PREFIX, BOOTSTRAP_SECRET_TYPE, BOOTSTRAP_TOKEN, ServiceAccountSigner,
                     detached_jws, new_bootstrap_token)

log = structlog.get_logger(__name__)

KUBERNETES_VERSION = {"major": "1", "minor": "32", "gitVersion": "v1.32.0",
                      "gitCommit": "0000000000000000000000000000000000000000",
                      "gitTreeState": "clean", "buildDate": "2024-12-11T00:00:00Z",
                      "goVersion": "go1.23.3", "compiler": "gc", "platform": "linux/amd64"}

SYSTEM_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
MAX_BODY = 3 * 1024 * 1024 + 4096


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _status_response(err: ApiStatusError, warnings: list[str] | None = None) -> web.Response:
    return web.Response(body=_dumps(err.status()).encode(), status=err.code,
                        content_type="application/json")


def _bool_param(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes")


class _InjectedFault:
    def __init__(self, status: int, count: int, retry_after: float | None, path_prefix: str) -> None:
        self.status, self.count, self.retry_after, self.path_prefix = status, count, retry_after, path_prefix


class ControlPlane:
    """A Kubernetes API server for tests: HTTPS on 127.0.0.1, in-memory storage.

    `options` switches behaviour (see api.Options); `bookmark_interval` is how often watches
    with allowWatchBookmarks get a BOOKMARK (the real server: about a minute);
    `history_limit` is the number of events kept for watch resumption (older ones answer
    410 Expired); `min_request_timeout` bounds watches without timeoutSeconds (random in
    [t, 2t) like the real server)."""

    def __init__(self, state_dir: str | os.PathLike | None = None, *, host: str = "127.0.0.1",
                 port: int = 0, options: Options | None = None, bookmark_interval: float = 60.0,
                 min_request_timeout: float = 1800.0, history_limit: int = 10_000,
                 watcher_buffer: int = 10_000, admin_token: str | None = None) -> None:
        self._own_state_dir = state_dir is None
        self.state_dir = Path(state_dir or tempfile.mkdtemp(prefix="controlplane-"))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port
        self.options = options or Options()
        self.bookmark_interval = bookmark_interval
        self.min_request_timeout = min_request_timeout
        # A given state dir is kept across restarts: CA, signing key, admin token and the
        # object store (tests/controlplane/persist.py), so joined nodes stay joined.
        self._persistent = not self._own_state_dir
        if self._persistent:
            self.ca = persist.load_or_create_ca(self.state_dir)
            self.sa_signer = ServiceAccountSigner(persist.load_or_create_sa_key(self.state_dir))
        else:
            self.ca = CertificateAuthority.generate()
            self.sa_signer = ServiceAccountSigner()
        self.store = Store(history_limit=history_limit, watcher_buffer=watcher_buffer)
        self.restored = self._persistent and persist.load_store(self.store, self.state_dir)
        self._store_dirty = asyncio.Event()
        self.api = Api(self.store, self.options, ca_pem=self.ca.cert_pem, sign_csr=self._sign_csr,
                       token_signer=self.sa_signer)
        self.admin_token = admin_token or base64.b32encode(os.urandom(20)).decode().lower()
        if self._persistent:
            self.admin_token = persist.load_or_create_admin_token(self.state_dir, admin_token, self.admin_token)
        self.authenticator = Authenticator(self.store, {self.admin_token: ADMIN}, self.sa_signer)
        self.request_counts: collections.Counter[tuple[str, str, str]] = collections.Counter()
        # RBAC-like bindings tests add: subject (user or group) -> {resource: verbs}.
        self.grants: dict[str, dict[str, set[str]]] = {}
        self._faults: list[_InjectedFault] = []
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._ssl: ssl.SSLContext | None = None
        self._kubelet_client_ssl: ssl.SSLContext | None = None
        self._answering = asyncio.Event()
        self._answering.set()
        self._serving = False
        self._watch_tasks: set[asyncio.Task] = set()
        self._controller_queue: asyncio.Queue = asyncio.Queue()
        self._background: list[asyncio.Task] = []
        self.ca_path = self.state_dir / "ca.crt"
        self.admin_kubeconfig = self.state_dir / "admin.kubeconfig"

    # --- lifecycle ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def recorded_writes(self) -> list[RecordedWrite]:
        return self.api.recorded

    def _ensure_master_service(self) -> None:
        """The API server's own Service, `default/kubernetes` on the first address of
        the service range (port 443, as kube-apiserver creates it); in-cluster clients
        find the API through it (KUBERNETES_SERVICE_HOST)."""
        services = resources.find("", "v1", "services")
        if self.store.get("/services", "default", "kubernetes") is not None:
            return
        first = str(ipaddress.ip_network(self.options.service_cidr).network_address + 1)
        self.api.create(services, "default", {  # type: ignore[arg-type]
            "metadata": {"name": "kubernetes", "labels": {"component": "apiserver", "provider": "kubernetes"}},
            "spec": {"type": "ClusterIP", "clusterIP": first, "sessionAffinity": "None",
                     "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}]}})

    async def start(self) -> "ControlPlane":
        self._write_pki()
        self.store.listeners.append(self._controller_queue.put_nowait)
        for ns in SYSTEM_NAMESPACES:
            if self.store.get("/namespaces", None, ns) is None:
                self.api.create(resources.find("", "v1", "namespaces"), None,  # type: ignore[arg-type]
                                {"metadata": {"name": ns}})
                self.api._populate_namespace(ns)
        self._ensure_master_service()
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await self._start_site()
        self.api.server_url = self.url
        self._write_admin_kubeconfig()
        self._update_cluster_info()
        self._background = [asyncio.create_task(self._controllers(), name="controlplane-controllers"),
                            asyncio.create_task(self._namespace_loop(), name="controlplane-namespaces")]
        if self._persistent:
            self.store.listeners.append(lambda _event: self._store_dirty.set())
            self._background.append(asyncio.create_task(self._save_loop(), name="controlplane-persist"))
            persist.save_store(self.store, self.state_dir)
        log.info("controlplane.started", url=self.url, state_dir=str(self.state_dir))
        return self

    async def _save_loop(self) -> None:
        while True:
            await self._store_dirty.wait()
            await asyncio.sleep(0.5)  # coalesce bursts of writes
            self._store_dirty.clear()
            persist.save_store(self.store, self.state_dir)

    async def _start_site(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self._ssl,
                                 reuse_address=True, backlog=512)
        await self._site.start()
        if self.port == 0:
            server = self._site._server  # the listening socket tells the random port
            assert server is not None and server.sockets
            self.port = server.sockets[0].getsockname()[1]
        self._serving = True

    async def stop(self) -> None:
        self._answering.set()  # release requests parked by stop_serving(mode="hang")
        for task in self._background:
            task.cancel()
        for task in self._background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._background = []
        if self._persistent:
            persist.save_store(self.store, self.state_dir)
        self.store.close_watchers()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._serving = False
        if self._own_state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    async def __aenter__(self) -> "ControlPlane":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- fault injection ----------------------------------------------------------------

    def drop_watches(self) -> int:
        """End every open watch stream (a server-side drop); returns how many."""
        return self.store.close_watchers()

    def compact(self, rv: int | None = None) -> int:
        """Compact the event history: watches from older resourceVersions get 410 Expired."""
        return self.store.compact(rv)

    async def stop_serving(self, mode: str = "refuse") -> None:
        """Simulate an unreachable API server; state is kept.

        mode="refuse": close the listener (new connections are refused), end the watches
        and cut open connections. mode="hang": keep accepting connections but answer
        nothing, and let open watches go silent (a network partition); clients notice
        only through their own timeouts."""
        if mode not in ("refuse", "hang"):
            raise ValueError(f"stop_serving mode must be 'refuse' or 'hang', not {mode!r}")
        if mode == "hang":
            self._answering.clear()
            return
        if not self._serving:
            return
        self._serving = False
        assert self._site is not None and self._runner is not None
        await self._site.stop()
        self.store.close_watchers()
        server = self._runner.server
        if server is not None:
            for conn in server.connections:
                conn.force_close()

    async def start_serving(self) -> None:
        self._answering.set()
        if not self._serving:
            await self._start_site()

    async def outage(self, seconds: float, mode: str = "refuse") -> None:
        await self.stop_serving(mode)
        try:
            await asyncio.sleep(seconds)
        finally:
            await self.start_serving()

    def inject_errors(self, status: int, count: int = 1, *, retry_after: float | None = None,
                      path_prefix: str = "/api") -> None:
        """Answer the next `count` requests under path_prefix with `status` (e.g. 500, 429)."""
        self._faults.append(_InjectedFault(status, count, retry_after, path_prefix))

    # --- credentials ----------------------------------------------------------------------

    def _write_pki(self) -> None:
        self.ca_path.write_bytes(self.ca.cert_pem)
        key_pem, cert_pem = self.ca.issue("kube-apiserver", client=False, server=True,
                                          dns_names=["localhost", "kubernetes", "kubernetes.default"],
                                          ip_addresses=["127.0.0.1", "::1"])
        cert_path, key_path = self.state_dir / "apiserver.crt", self.state_dir / "apiserver.key"
        cert_path.write_bytes(cert_pem)
        key_path.write_bytes(key_pem)
        key_path.chmod(0o600)
        (self.state_dir / "ca.key").write_bytes(self.ca.key_pem)
        (self.state_dir / "ca.key").chmod(0o600)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(cert_path, key_path)
        ctx.load_verify_locations(cadata=self.ca.cert_pem.decode())
        ctx.verify_mode = ssl.CERT_OPTIONAL
        self._ssl = ctx

    def grant(self, subject: str, resource: str, verbs: list[str] | tuple[str, ...]) -> None:
        """Allow `subject` (a user or group name) `verbs` on `resource` ("nodes/proxy")."""
        self.grants.setdefault(subject, {}).setdefault(resource, set()).update(verbs)

    def issue_client_cert(self, user: str, groups: list[str] | tuple[str, ...] = (), *,
                          validity: dt.timedelta = dt.timedelta(days=1)) -> tuple[Path, Path]:
        """Write a client certificate/key for `user` (CN) and `groups` (O); returns paths."""
        key_pem, cert_pem = self.ca.issue(user, list(groups), client=True, validity=validity)
        safe = user.replace(":", "_").replace("/", "_")
        cert_path = self.state_dir / f"client-{safe}.crt"
        key_path = self.state_dir / f"client-{safe}.key"
        cert_path.write_bytes(cert_pem)
        key_path.write_bytes(key_pem)
        key_path.chmod(0o600)
        return cert_path, key_path

    def make_kubeconfig(self, user: str | None = None, groups: list[str] | tuple[str, ...] = (), *,
                        token: str | None = None, cert: tuple[Path, Path] | None = None,
                        path: str | os.PathLike | None = None, embed: bool = True,
                        token_file: str | os.PathLike | None = None) -> Path:
        """A kubeconfig for this server. Credentials: `token`, `token_file`, an explicit
        `cert` (cert_path, key_path), or a fresh client certificate for `user`/`groups`.
        With none of them the kubeconfig is anonymous."""
        cluster: dict[str, Any] = {"server": self.url}
        if embed:
            cluster["certificate-authority-data"] = base64.b64encode(self.ca.cert_pem).decode()
        else:
            cluster["certificate-authority"] = str(self.ca_path)
        auth: dict[str, Any] = {}
        name = user or "anonymous"
        if token is not None:
            auth["token"] = token
            name = user or "token-user"
        elif token_file is not None:
            auth["tokenFile"] = str(token_file)
            name = user or "token-file-user"
        else:
            if cert is None and user is not None:
                cert = self.issue_client_cert(user, groups)
            if cert is not None:
                cert_path, key_path = cert
                if embed:
                    auth["client-certificate-data"] = base64.b64encode(Path(cert_path).read_bytes()).decode()
                    auth["client-key-data"] = base64.b64encode(Path(key_path).read_bytes()).decode()
                else:
                    auth["client-certificate"] = str(cert_path)
                    auth["client-key"] = str(key_path)
        config = {
            "apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": "nodeagent-test", "cluster": cluster}],
            "users": [{"name": name, "user": auth}],
            "contexts": [{"name": f"{name}@nodeagent-test",
                          "context": {"cluster": "nodeagent-test", "user": name}}],
            "current-context": f"{name}@nodeagent-test",
        }
        if path is None:
            safe = name.replace(":", "_").replace("/", "_")
            path = self.state_dir / f"{safe}.kubeconfig"
        out = Path(path)
        out.write_text(yaml.safe_dump(config, sort_keys=False))
        out.chmod(0o600)
        return out

    def _write_admin_kubeconfig(self) -> None:
        self.make_kubeconfig("kubernetes-admin", ["system:masters"], path=self.admin_kubeconfig)

    def create_bootstrap_token(self, token: str | None = None, *,
                               ttl: dt.timedelta | None = dt.timedelta(hours=24),
                               extra_groups: str = "system:bootstrappers:kubeadm:default-node-token",
                               signing: bool = True) -> str:
        """Create the kube-system Secret for a bootstrap token (like `kubeadm token create`)."""
        token = token or new_bootstrap_token()
        m = BOOTSTRAP_TOKEN.match(token)
        if not m:
            raise ValueError(f"bootstrap token {token!r} does not match [a-z0-9]{{6}}.[a-z0-9]{{16}}")
        data = {"token-id": m.group(1), "token-secret": m.group(2),
                "usage-bootstrap-authentication": "true",
                "usage-bootstrap-signing": "true" if signing else "false",
                "auth-extra-groups": extra_groups}
        if ttl is not None:
            data["expiration"] = (dt.datetime.now(dt.timezone.utc) + ttl).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.api.create(resources.find("", "v1", "secrets"), "kube-system", {  # type: ignore[arg-type]
            "metadata": {"name": BOOTSTRAP_SECRET_PREFIX + m.group(1), "namespace": "kube-system"},
            "type": BOOTSTRAP_SECRET_TYPE,
            "stringData": data,
        })
        self._update_cluster_info()
        return token

    def cluster_info_kubeconfig(self) -> str:
        config = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "", "cluster": {
                "certificate-authority-data": base64.b64encode(self.ca.cert_pem).decode(),
                "server": self.url}}],
            "contexts": None, "current-context": "", "preferences": {}, "users": None,
        }
        return yaml.safe_dump(config, sort_keys=True)

    def _update_cluster_info(self) -> None:
        """The bootstrap signer: cluster-info's kubeconfig plus one JWS per signing token."""
        if not self.port:
            return
        kubeconfig = self.cluster_info_kubeconfig()
        data = {"kubeconfig": kubeconfig}
        for secret in self.store.list("/secrets", "kube-system"):
            if secret.get("type") != BOOTSTRAP_SECRET_TYPE:
                continue
            fields = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
            if fields.get("usage-bootstrap-signing") != "true":
                continue
            expiration = fields.get("expiration")
            if expiration and dt.datetime.fromisoformat(expiration.replace("Z", "+00:00")) < \
                    dt.datetime.now(dt.timezone.utc):
                continue
            token_id, token_secret = fields.get("token-id", ""), fields.get("token-secret", "")
            data[f"jws-kubeconfig-{token_id}"] = detached_jws(kubeconfig, token_id, token_secret)
        configmaps = resources.find("", "v1", "configmaps")
        assert configmaps is not None
        current = self.store.get("/configmaps", "kube-public", "cluster-info")
        if current is None:
            self.api.create(configmaps, "kube-public",
                            {"metadata": {"name": "cluster-info"}, "data": data})
        elif current.get("data") != data:
            self.api.update(configmaps, "kube-public", "cluster-info",
                            dict(current, data=data))

    def _sign_csr(self, csr: dict) -> str:
        spec = csr.get("spec") or {}
        try:
            pem = base64.b64decode(spec.get("request", ""))
            cn, orgs = csr_subject(pem)
        except ValueError as exc:
            raise CSRSigningError(f"invalid CSR: {exc}") from exc
        signer = spec.get("signerName")
        usages = list(spec.get("usages") or [])
        if signer == "kubernetes.io/kube-apiserver-client-kubelet":
            if not cn.startswith("system:node:") or orgs != ["system:nodes"]:
                raise CSRSigningError("subject must be CN=system:node:<name>, O=system:nodes")
            if not set(usages) <= {"digital signature", "key encipherment", "client auth"} \
                    or "client auth" not in usages:
                raise CSRSigningError(f"usages {usages} not allowed for a kubelet client certificate")
        elif signer == "kubernetes.io/kubelet-serving":
            if not cn.startswith("system:node:") or orgs != ["system:nodes"]:
                raise CSRSigningError("subject must be CN=system:node:<name>, O=system:nodes")
            if "server auth" not in usages:
                raise CSRSigningError("kubelet serving certificates need the server auth usage")
        elif signer != "kubernetes.io/kube-apiserver-client":
            raise CSRSigningError(f"signer {signer!r} is not handled by this control plane")
        seconds = spec.get("expirationSeconds")
        validity = dt.timedelta(seconds=int(seconds)) if seconds else dt.timedelta(days=365)
        if self.options.signing_duration is not None:
            validity = min(validity, dt.timedelta(seconds=self.options.signing_duration))
        cert = self.ca.sign_csr(pem, usages, validity=validity)
        return base64.b64encode(cert).decode()

    def approve_csr(self, name: str, reason: str = "ApprovedByTest") -> dict:
        csrs = resources.find("certificates.k8s.io", "v1", "certificatesigningrequests")
        assert csrs is not None
        current = self.api.get(csrs, None, name)
        status = dict(current.get("status") or {})
        status["conditions"] = list(status.get("conditions") or []) + [{
            "type": "Approved", "status": "True", "reason": reason, "message": "approved by the test",
            "lastUpdateTime": now_time(), "lastTransitionTime": now_time()}]
        return self.api.update(csrs, None, name, dict(current, status=status),
                               subresource="approval").obj

    def deny_csr(self, name: str, reason: str = "DeniedByTest",
                 message: str = "denied by the test") -> dict:
        csrs = resources.find("certificates.k8s.io", "v1", "certificatesigningrequests")
        assert csrs is not None
        current = self.api.get(csrs, None, name)
        status = dict(current.get("status") or {})
        status["conditions"] = list(status.get("conditions") or []) + [{
            "type": "Denied", "status": "True", "reason": reason, "message": message,
            "lastUpdateTime": now_time(), "lastTransitionTime": now_time()}]
        return self.api.update(csrs, None, name, dict(current, status=status),
                               subresource="approval").obj

    # --- conveniences for tests -----------------------------------------------------------

    def objects(self, plural: str, namespace: str | None = None, group: str = "") -> list[dict]:
        rt = next((r for r in resources.RESOURCES if r.plural == plural and r.group == group), None)
        if rt is None:
            raise KeyError(f"unknown resource {group}/{plural}")
        return [self.api.to_external(rt, o) for o in self.store.snapshot(rt.storage_key, namespace)]

    def object(self, plural: str, name: str, namespace: str | None = None, group: str = "") -> dict | None:
        for obj in self.objects(plural, namespace, group):
            if obj["metadata"]["name"] == name:
                return obj
        return None

    def schema_problems_in_recorded_writes(self) -> list[tuple[RecordedWrite, list[str]]]:
        """Every recorded non-admin write that fails the official schema, with its problems
        (needs Options(record_writes=True))."""
        from .schema import validate_object  # noqa: PLC0415

        bad = []
        for write in self.api.recorded:
            if write.object.get("kind") == "Status":
                continue
            problems = validate_object(write.object)
            if problems:
                bad.append((write, problems))
        return bad

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 10.0,
                       interval: float = 0.02, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
            await asyncio.sleep(interval)

    # --- controllers ----------------------------------------------------------------------

    async def _controllers(self) -> None:
        while True:
            event = await self._controller_queue.get()
            try:
                self.api.on_event(event)
                meta = event.obj.get("metadata") or {}
                if (event.storage == "/secrets" and meta.get("namespace") == "kube-system"
                        and meta.get("name", "").startswith(BOOTSTRAP_SECRET_PREFIX)):
                    self._update_cluster_info()
            except Exception:  # a controller bug must not stop the API
                log.exception("controlplane.controller_failed", storage=event.storage)

    async def _namespace_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            try:
                self.api.namespace_controller_step()
            except Exception:
                log.exception("controlplane.namespace_controller_failed")

    # --- HTTP ---------------------------------------------------------------------------

    def _authenticate(self, request: web.Request) -> UserInfo:
        header = request.headers.get("Authorization", "")
        if header.lower().startswith("bearer "):
            return self.authenticator.from_token(header[7:].strip())
        peercert = request.transport.get_extra_info("peercert") if request.transport else None
        user = self.authenticator.from_certificate(peercert)
        return user or ANONYMOUS

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        await self._answering.wait()
        try:
            try:
                user = self._authenticate(request)
            except Unauthorized:
                raise ApiStatusError("Unauthorized", "Unauthorized") from None
            for fault in self._faults:
                if fault.count > 0 and request.path.startswith(fault.path_prefix):
                    fault.count -= 1
                    headers = {}
                    if fault.retry_after is not None:
                        headers["Retry-After"] = str(int(fault.retry_after)) if fault.retry_after >= 1 \
                            else str(fault.retry_after)
                    reason = {429: "TooManyRequests", 503: "ServiceUnavailable"}.get(fault.status, "InternalError")
                    err = ApiStatusError(reason, f"injected fault {fault.status}", code=fault.status)
                    return web.Response(body=_dumps(err.status()).encode(), status=fault.status,
                                        content_type="application/json", headers=headers)
            self._faults = [f for f in self._faults if f.count > 0]
            return await self._dispatch(request, user)
        except ApiStatusError as err:
            return _status_response(err)

    async def _dispatch(self, request: web.Request, user: UserInfo) -> web.StreamResponse:
        path = request.path.rstrip("/") or "/"
        method = request.method
        if path in ("/healthz", "/livez", "/readyz") or path.startswith(("/healthz/", "/livez/", "/readyz/")):
            return web.Response(text="ok")
        if path == "/version":
            self._authorize(user, "get", None, None, None, None, path)
            return web.json_response(KUBERNETES_VERSION)
        if path.startswith("/openapi"):
            self._authorize(user, "get", None, None, None, None, path)
            return self._openapi(request, path)
        if path == "/api":
            self._authorize(user, "get", None, None, None, None, path)
            return web.json_response({
                "kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0",
                                                "serverAddress": f"{self.host}:{self.port}"}]})
        if path == "/apis":
            self._authorize(user, "get", None, None, None, None, path)
            return web.json_response(self._group_list())
        parts = [p for p in path.split("/") if p]
        if parts[0] == "api" and len(parts) >= 2:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[0] == "apis" and len(parts) >= 2:
            if len(parts) == 2:
                self._authorize(user, "get", None, None, None, None, path)
                groups = {g["name"]: g for g in self._group_list()["groups"]}
                if parts[1] not in groups:
                    raise ApiStatusError("NotFound", "the server could not find the requested resource")
                return web.json_response(dict(groups[parts[1]], kind="APIGroup", apiVersion="v1"))
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise ApiStatusError("NotFound", "the server could not find the requested resource")
        if group not in resources.groups() or version not in resources.groups()[group]:
            raise ApiStatusError("NotFound", "the server could not find the requested resource")
        if not rest:
            self._authorize(user, "get", None, None, None, None, path)
            return web.json_response(self._resource_list(group, version))
        return await self._resource_request(request, user, method, group, version, rest)

    def _authorize(self, user: UserInfo, verb: str, rt: ResourceType | None, sub: str | None,
                   namespace: str | None, name: str | None, path: str) -> None:
        if not authorize(user, verb, rt.plural if rt else None, sub, namespace, name, path, self.grants):
            if rt is None:
                raise ApiStatusError("Forbidden", f'forbidden: User "{user.name}" cannot {verb} path "{path}"')
            from .errors import forbidden  # noqa: PLC0415
            raise forbidden(user.name, verb, rt.group, rt.plural, namespace, name, sub)

    # --- discovery ------------------------------------------------------------------------

    @staticmethod
    def _group_list() -> dict:
        groups = []
        for group in resources.GROUP_ORDER:
            if not group:
                continue
            versions = resources.groups().get(group, [])
            if not versions:
                continue
            gvs = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
            groups.append({"name": group, "versions": gvs, "preferredVersion": gvs[0]})
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}

    @staticmethod
    def _resource_list(group: str, version: str) -> dict:
        items = []
        for rt in resources.RESOURCES:
            if rt.group != group or rt.version != version:
                continue
            entry: dict[str, Any] = {"name": rt.plural, "singularName": rt.singular_name,
                                     "namespaced": rt.namespaced, "kind": rt.kind,
                                     "verbs": list(rt.verbs)}
            if rt.short_names:
                entry["shortNames"] = list(rt.short_names)
            if rt.categories:
                entry["categories"] = list(rt.categories)
            items.append(entry)
            for sub in rt.subresources:
                kind, verbs = resources.SUBRESOURCE_KINDS.get((rt.plural, sub),
                                                              (rt.kind, ("get", "patch", "update")))
                if sub == "approval":
                    verbs = ("get", "patch", "update")
                items.append({"name": f"{rt.plural}/{sub}", "singularName": "",
                              "namespaced": rt.namespaced, "kind": kind, "verbs": list(verbs)})
        gv = f"{group}/{version}" if group else version
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": items}

    def _openapi(self, request: web.Request, path: str) -> web.Response:
        accept = request.headers.get("Accept", "")
        if path == "/openapi/v2":
            if "json" not in accept and "*/*" not in accept and accept:
                raise ApiStatusError("NotAcceptable",
                                     "only application/json is served for /openapi/v2", code=406)
            return web.Response(body=openapi.swagger_v2(), content_type="application/json")
        if path == "/openapi/v3":
            return web.Response(body=openapi.root_document(), content_type="application/json")
        doc = openapi.lookup(path[len("/openapi/v3/"):])
        if doc is None:
            raise ApiStatusError("NotFound", "the server could not find the requested resource")
        if "protobuf" in accept and "json" not in accept:
            raise ApiStatusError("NotAcceptable", "only application/json is served", code=406)
        headers = {"Cache-Control": "public, immutable"} if "hash" in request.query else {}
        return web.Response(body=doc, content_type="application/json", headers=headers)

    # --- resources --------------------------------------------------------------------------

    async def _read_body(self, request: web.Request) -> Any:
        raw = await request.read()
        if not raw:
            return None
        content_type = request.headers.get("Content-Type", "application/json").split(";")[0].strip()
        if content_type == "application/vnd.kubernetes.protobuf":
            try:
                return protobuf.decode_k8s(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                raise ApiStatusError("BadRequest", f"error decoding protobuf body: {exc}") from exc
        try:
            if content_type in ("application/yaml", patching.APPLY_PATCH):
                return yaml.safe_load(raw)
            return json.loads(raw)
        except (ValueError, yaml.YAMLError) as exc:
            raise ApiStatusError("BadRequest", f"error decoding request body: {exc}") from exc

    async def _resource_request(self, request: web.Request, user: UserInfo, method: str,
                                group: str, version: str, rest: list[str]) -> web.StreamResponse:
        namespace: str | None = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            candidate = resources.find(group, version, rest[2])
            if candidate is not None and candidate.namespaced:
                namespace, rest = rest[1], rest[2:]
        rt = resources.find(group, version, rest[0])
        proxy_path = ""
        if rt is not None and rt.kind == "Node" and len(rest) > 3 and rest[2] == "proxy":
            proxy_path, rest = "/" + "/".join(rest[3:]), rest[:3]
        if rt is None or len(rest) > 3:
            raise ApiStatusError("NotFound", "the server could not find the requested resource")
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if sub is not None and sub not in rt.subresources:
            raise ApiStatusError("NotFound", "the server could not find the requested resource")
        if rt.kind == "Namespace" and name is not None:
            namespace = None
        q = request.query
        if method == "GET":
            if name is None:
                verb = "watch" if _bool_param(q.get("watch")) else "list"
            else:
                verb = "get"
        elif method == "POST":
            verb = "create"
        elif method == "PUT":
            verb = "update"
        elif method == "PATCH":
            verb = "patch"
        elif method == "DELETE":
            verb = "delete" if name is not None else "deletecollection"
        else:
            raise ApiStatusError("MethodNotAllowed", f"{method} is not supported", code=405)
        if sub in ("exec", "attach", "portforward"):
            # Like the real server (since the WebSocket GET fix), opening a stream is "create".
            self.request_counts[(user.name, "create", f"{rt.plural}/{sub}")] += 1
            self._authorize(user, "create", rt, sub, namespace, name, request.path)
            return await self._kubelet_stream(request, rt, namespace or "default", name or "", sub)
        if sub in ("log", "proxy"):
            verb = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch",
                    "DELETE": "delete"}.get(method, verb)
            self.request_counts[(user.name, verb, f"{rt.plural}/{sub}")] += 1
            self._authorize(user, verb, rt, sub, namespace, name, request.path)
            return await self._kubelet_proxy(request, rt, namespace, name or "", sub, proxy_path)
        if verb not in rt.verbs and not (sub and verb in ("get", "update", "patch", "create")):
            raise ApiStatusError("MethodNotAllowed", "the server does not allow this method on the "
                                 "requested resource", code=405)
        self.request_counts[(user.name, verb, rt.plural + (f"/{sub}" if sub else ""))] += 1
        self._authorize(user, verb, rt, sub, namespace, name, request.path)
        if rt.namespaced and namespace is None and verb not in ("list", "watch") and rt.kind != "Namespace":
            if verb == "create" and name is None:
                namespace = "default"
            else:
                raise ApiStatusError("NotFound", "the server could not find the requested resource")
        field_validation = q.get("fieldValidation", "Warn")
        if field_validation not in ("Ignore", "Warn", "Strict"):
            raise ApiStatusError("BadRequest", f"fieldValidation must be one of Ignore, Warn or "
                                 f"Strict, got {field_validation!r}")
        dry_run = q.get("dryRun") == "All"
        api = self.api

        if verb == "watch":
            return await self._watch(request, rt, namespace)
        if verb == "list":
            return self._list(request, rt, namespace)
        if verb == "get":
            assert name is not None
            obj = api.get(rt, namespace, name)
            return self._respond_object(request, rt, obj)
        if verb == "create":
            body = await self._read_body(request)
            if sub == "binding":
                return self._json(api.bind(namespace or "", name or "", body or {}, user), 201)
            if sub == "token":
                return self._json(api.token_request(namespace or "", name or "", body or {}, user), 201)
            if sub == "eviction":
                result = api.delete(rt, namespace, name or "", (body or {}).get("deleteOptions"), user)
                del result
                return self._json({"kind": "Status", "apiVersion": "v1", "metadata": {},
                                   "status": "Success", "code": 201}, 201)
            if rt.kind == "TokenReview":
                return self._json(self._token_review(body or {}), 201)
            if rt.kind == "SubjectAccessReview":
                return self._json(self._subject_access_review(body or {}), 201)
            if rt.kind == "SelfSubjectAccessReview":
                spec = dict((body or {}).get("spec") or {}, user=user.name, groups=list(user.groups))
                review = self._subject_access_review({"spec": spec})
                review["kind"] = "SelfSubjectAccessReview"
                review["spec"] = (body or {}).get("spec") or {}
                return self._json(review, 201)
            if rt.kind == "SelfSubjectReview":
                return self._json({"kind": "SelfSubjectReview", "apiVersion": "authentication.k8s.io/v1",
                                   "metadata": {"creationTimestamp": None},
                                   "status": {"userInfo": user.to_dict()}}, 201)
            if name is not None:
                raise ApiStatusError("MethodNotAllowed", "POST to an object is not allowed", code=405)
            result = api.create(rt, namespace, body, user, field_validation=field_validation,
                                dry_run=dry_run)
            return self._json(result.obj, result.code, result.warnings)
        if verb == "update":
            body = await self._read_body(request)
            result = api.update(rt, namespace, name or "", body, user, subresource=sub,
                                field_validation=field_validation, dry_run=dry_run)
            return self._json(result.obj, result.code, result.warnings)
        if verb == "patch":
            content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
            raw = await request.read()
            result = api.patch(rt, namespace, name or "", content_type, raw, user, subresource=sub,
                               field_validation=field_validation, dry_run=dry_run,
                               force=_bool_param(q.get("force")))
            return self._json(result.obj, result.code, result.warnings)
        if verb == "delete":
            body = await self._read_body(request) or {}
            if "gracePeriodSeconds" in q:
                body["gracePeriodSeconds"] = int(q["gracePeriodSeconds"])
            if "propagationPolicy" in q:
                body["propagationPolicy"] = q["propagationPolicy"]
            result = api.delete(rt, namespace, name or "", body, user, dry_run=dry_run)
            return self._json(result.obj, result.code)
        body = await self._read_body(request) or {}
        return self._json(api.delete_collection(rt, namespace, body, user,
                                                label_selector=q.get("labelSelector"),
                                                field_selector=q.get("fieldSelector")), 200)

    async def _kubelet_proxy(self, request: web.Request, rt: ResourceType, namespace: str | None,
                             name: str, sub: str, proxy_path: str) -> web.StreamResponse:
        """pods/log and nodes/proxy: forwarded to the node's kubelet API like the real
        server does (its daemonEndpoints port, the first InternalIP), authenticated with
        the apiserver's kubelet client certificate. The kubelet's serving certificate is
        not verified (the real default without --kubelet-certificate-authority)."""
        if sub == "log":
            pod_obj = self.api.get(rt, namespace, name)
            containers = [c["name"] for c in (pod_obj.get("spec") or {}).get("containers") or []]
            container = request.query.get("container")
            if not container:
                if len(containers) != 1:
                    raise ApiStatusError("BadRequest", f"a container name must be specified for pod {name}, "
                                         f"choose one of: [{' '.join(containers)}]")
                container = containers[0]
            spec = pod_obj.get("spec") or {}
            if container not in containers + [c["name"] for k in ("initContainers", "ephemeralContainers")
                                              for c in spec.get(k) or []]:
                raise ApiStatusError("BadRequest", f"container {container} is not valid for pod {name}")
            node_name = (pod_obj.get("spec") or {}).get("nodeName")
            if not node_name:
                raise ApiStatusError("BadRequest", f"pod {name} does not have a host assigned")
            target = f"/containerLogs/{namespace}/{name}/{container}"
            query = {k: v for k, v in request.query.items() if k != "container"}
        else:
            node_name, target, query = name, proxy_path or "/", dict(request.query)
        host, port = self._kubelet_address(node_name)
        url = f"https://{f'[{host}]' if ':' in host else host}:{port}{target}"
        ssl_ctx = self._kubelet_ssl()
        body = await request.read()
        try:
            async with aiohttp.ClientSession() as session:
                async with session.request(request.method, url, params=query, data=body or None,
                                           ssl=ssl_ctx,
                                           timeout=aiohttp.ClientTimeout(total=None, sock_connect=5)) as upstream:
                    response = web.StreamResponse(status=upstream.status, headers={
                        "Content-Type": upstream.headers.get("Content-Type", "text/plain")})
                    await response.prepare(request)
                    async for chunk in upstream.content.iter_any():
                        await response.write(chunk)
                    await response.write_eof()
                    return response
        except (aiohttp.ClientError, OSError) as exc:
            raise ApiStatusError("ServiceUnavailable", f"error trying to reach the kubelet at {url}: {exc}",
                                 code=503) from exc

    async def _kubelet_stream(self, request: web.Request, rt: ResourceType, namespace: str, name: str,
                              sub: str) -> web.StreamResponse:
        """pods/exec, pods/attach, pods/portforward: see tests/controlplane/streaming.py."""
        from . import streaming  # noqa: PLC0415

        pod_obj = self.api.get(rt, namespace, name)
        spec = pod_obj.get("spec") or {}
        container = request.query.get("container") or ""
        names = [c["name"] for c in spec.get("containers") or []]
        if sub != "portforward":
            if not container:
                if len(names) != 1:
                    raise ApiStatusError("BadRequest", f"a container name must be specified for pod {name}, "
                                         f"choose one of: [{' '.join(names)}]")
                container = names[0]
            elif container not in names + [c["name"] for c in spec.get("initContainers") or []]:
                raise ApiStatusError("BadRequest", f"container {container} is not valid for pod {name}")
        phase = (pod_obj.get("status") or {}).get("phase")
        if phase in ("Succeeded", "Failed"):
            raise ApiStatusError("BadRequest", f"cannot {sub} into a container in a completed pod; "
                                 f"current phase is {phase}")
        node_name = spec.get("nodeName")
        if not node_name:
            raise ApiStatusError("BadRequest", f"pod {name} does not have a host assigned")
        host, port = self._kubelet_address(node_name)
        return await streaming.serve(request, sub, namespace, name, container, host, port, self._kubelet_ssl())

    def _kubelet_address(self, node_name: str) -> tuple[str, int]:
        node = self.store.get("/nodes", None, node_name)
        if node is None:
            raise ApiStatusError("NotFound", f'nodes "{node_name}" not found')
        status = node.get("status") or {}
        port = ((status.get("daemonEndpoints") or {}).get("kubeletEndpoint") or {}).get("Port")
        addresses = status.get("addresses") or []
        address = next((a["address"] for a in addresses if a.get("type") == "InternalIP"),
                       addresses[0]["address"] if addresses else None)
        if not port or not address:
            raise ApiStatusError("ServiceUnavailable", f"node {node_name} has no kubelet address/port",
                                 code=503)
        if not any(ipaddress.ip_address(address) in ipaddress.ip_network(net)
                   for net in self.options.kubelet_proxy_networks):
            raise ApiStatusError("ServiceUnavailable",
                                 f"refusing to proxy to node address {address}: outside "
                                 f"{list(self.options.kubelet_proxy_networks)} (test network safety)", code=503)
        return address, int(port)

    def _kubelet_ssl(self) -> ssl.SSLContext:
        if self._kubelet_client_ssl is None:
            key_pem, cert_pem = self.ca.issue("kube-apiserver-kubelet-client", ["system:masters"])
            cert_file, key_file = self.state_dir / "apiserver-kubelet-client.crt", self.state_dir / "apiserver-kubelet-client.key"
            cert_file.write_bytes(cert_pem)
            key_file.write_bytes(key_pem)
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            ctx.load_cert_chain(cert_file, key_file)
            self._kubelet_client_ssl = ctx
        return self._kubelet_client_ssl

    def _token_review(self, body: dict) -> dict:
        token = (body.get("spec") or {}).get("token", "")
        try:
            user = self.authenticator.from_token(token)
            status = {"authenticated": True, "user": user.to_dict(),
                      "audiences": (body.get("spec") or {}).get("audiences") or []}
        except Unauthorized as exc:
            status = {"authenticated": False, "error": str(exc)}
        return {"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"creationTimestamp": None}, "spec": body.get("spec") or {},
                "status": status}

    def _subject_access_review(self, body: dict) -> dict:
        spec = body.get("spec") or {}
        user = UserInfo(spec.get("user", ""), tuple(spec.get("groups") or []))
        attrs = spec.get("resourceAttributes")
        if attrs:
            allowed = authorize(user, attrs.get("verb", ""), attrs.get("resource"),
                                attrs.get("subresource") or None, attrs.get("namespace") or None,
                                attrs.get("name") or None, "", self.grants)
        else:
            non = spec.get("nonResourceAttributes") or {}
            allowed = authorize(user, non.get("verb", ""), None, None, None, None, non.get("path", ""))
        return {"kind": "SubjectAccessReview", "apiVersion": "authorization.k8s.io/v1",
                "metadata": {"creationTimestamp": None}, "spec": spec,
                "status": {"allowed": allowed}}

    @staticmethod
    def _json(obj: Any, status: int = 200, warnings: list[str] | None = None) -> web.Response:
        response = web.Response(body=_dumps(obj).encode(), status=status,
                                content_type="application/json")
        for warning in warnings or []:
            escaped = warning.replace("\\", "\\\\").replace('"', '\\"')
            response.headers.add("Warning", f'299 - "{escaped}"')
        return response

    @staticmethod
    def _table_requested(request: web.Request) -> bool:
        accept = request.headers.get("Accept", "")
        first = accept.split(",")[0]
        return "as=Table" in first

    def _respond_object(self, request: web.Request, rt: ResourceType, obj: dict) -> web.Response:
        accept = request.headers.get("Accept", "")
        if self._table_requested(request):
            table = tables.to_table(rt.kind, [obj], resource_version=obj["metadata"].get("resourceVersion", ""),
                                    include_object=request.query.get("includeObject", "Metadata"),
                                    api_version=rt.api_version)
            return self._json(table)
        if accept and "json" not in accept and "*/*" not in accept and "yaml" not in accept:
            raise ApiStatusError("NotAcceptable", "only application/json is served", code=406)
        return self._json(obj)

    def _list(self, request: web.Request, rt: ResourceType, namespace: str | None) -> web.Response:
        q = request.query
        limit = int(q["limit"]) if q.get("limit") else None
        items, rv, token = self.api.list(rt, namespace, label_selector=q.get("labelSelector"),
                                         field_selector=q.get("fieldSelector"), limit=limit,
                                         continue_token=q.get("continue"))
        if self._table_requested(request):
            return self._json(tables.to_table(rt.kind, items, resource_version=rv,
                                              include_object=q.get("includeObject", "Metadata"),
                                              continue_token=token, api_version=rt.api_version))
        meta: dict[str, Any] = {"resourceVersion": rv}
        if token:
            meta["continue"] = token
        # Typed list encoding leaves kind/apiVersion out of the items.
        stripped = [{k: v for k, v in item.items() if k not in ("kind", "apiVersion")} for item in items]
        return self._json({"kind": rt.list_kind, "apiVersion": rt.api_version, "metadata": meta,
                           "items": stripped})

    # --- watch ------------------------------------------------------------------------------

    async def _watch(self, request: web.Request, rt: ResourceType, namespace: str | None) -> web.StreamResponse:
        q = request.query
        bookmarks = _bool_param(q.get("allowWatchBookmarks"))
        timeout = float(q["timeoutSeconds"]) if q.get("timeoutSeconds") else \
            self.min_request_timeout * (1 + random.random())
        send_initial = _bool_param(q.get("sendInitialEvents"))
        if send_initial and (not bookmarks or q.get("resourceVersionMatch") != "NotOlderThan"):
            raise ApiStatusError("Invalid", "sendInitialEvents requires allowWatchBookmarks=true and "
                                 "resourceVersionMatch=NotOlderThan", code=422)
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json",
                                                           "Cache-Control": "no-cache, private"})
        response.enable_chunked_encoding()
        try:
            setup = self.api.open_watch(rt, namespace, resource_version=q.get("resourceVersion"),
                                        label_selector=q.get("labelSelector"),
                                        field_selector=q.get("fieldSelector"),
                                        send_initial_events=send_initial)
        except TooOldResourceVersion as exc:
            # Like the watch cache: the watch is established, then ends with an ERROR event.
            await response.prepare(request)
            status = expired(str(exc)).status()
            await response.write((_dumps({"type": "ERROR", "object": status}) + "\n").encode())
            await response.write_eof()
            return response
        watcher = setup.watcher
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        next_bookmark = loop.time() + self.bookmark_interval
        task = asyncio.current_task()
        if task is not None:
            self._watch_tasks.add(task)
        try:
            await response.prepare(request)
            as_table = self._table_requested(request)
            include = q.get("includeObject", "Metadata")

            def line(event_type: str, obj: dict) -> str:
                return self._event_line(rt, event_type, obj, as_table, include)

            lines = [line(t, o) for t, o in setup.initial]
            if setup.send_initial_end_bookmark:
                lines.append(self._bookmark_line(rt, initial_end=True))
            if lines:
                await response.write("".join(lines).encode())
            while True:
                now = loop.time()
                if now >= deadline:
                    break
                # Wake up at least every few seconds to notice a client that went away.
                wait = min(deadline, next_bookmark if bookmarks else deadline, now + 5.0) - now
                try:
                    item = await asyncio.wait_for(watcher.queue.get(), timeout=max(wait, 0.0))
                except asyncio.TimeoutError:
                    if request.transport is None or request.transport.is_closing():
                        break
                    if not self._answering.is_set():
                        continue
                    if bookmarks and loop.time() >= next_bookmark:
                        await response.write(self._bookmark_line(rt).encode())
                        next_bookmark = loop.time() + self.bookmark_interval
                    continue
                if item is Watcher.CLOSED:
                    break
                if not self._answering.is_set():
                    await self._answering.wait()
                batch = [line(*item)]
                closed = False
                while not watcher.queue.empty() and len(batch) < 256:
                    more = watcher.queue.get_nowait()
                    if more is Watcher.CLOSED:
                        closed = True
                        break
                    batch.append(line(*more))
                await response.write("".join(batch).encode())
                if closed:
                    break
            with contextlib.suppress(ConnectionError, RuntimeError):
                await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            # Client went away or the server is stopping.
            if asyncio.current_task() is not None and asyncio.current_task().cancelling():  # type: ignore[union-attr]
                raise
        finally:
            self.store.remove_watcher(watcher)
            watcher.closed = True
            if task is not None:
                self._watch_tasks.discard(task)
        return response

    def _event_line(self, rt: ResourceType, event_type: str, obj: dict, as_table: bool = False,
                    include_object: str = "Metadata") -> str:
        external = self.api.to_external(rt, obj)
        if as_table:
            # `kubectl get -w` asks for watch events whose objects are one-row Tables.
            external = tables.to_table(rt.kind, [external],
                                       resource_version=external["metadata"].get("resourceVersion", ""),
                                       include_object=include_object, api_version=rt.api_version)
        return _dumps({"type": event_type, "object": external}) + "\n"

    def _bookmark_line(self, rt: ResourceType, initial_end: bool = False) -> str:
        meta: dict[str, Any] = {"resourceVersion": str(self.store.rv)}
        if initial_end:
            meta["annotations"] = {"k8s.io/initial-events-end": "true"}
        return _dumps({"type": "BOOKMARK", "object": {"kind": rt.kind, "apiVersion": rt.api_version,
                                                      "metadata": meta}}) + "\n"


async def run_forever(cp: ControlPlane, ready: Callable[[ControlPlane], Awaitable[None] | None] | None = None) -> None:
    await cp.start()
    try:
        if ready is not None:
            result = ready(cp)
            if asyncio.iscoroutine(result):
                await result
        await asyncio.Event().wait()
    finally:
        await cp.stop()
