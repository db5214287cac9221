"""The node API's authentication and authorization matrix, against the test control
plane's TokenReview and SubjectAccessReview, with an in-process node API whose runtime
records every call (refused callers must never reach it); and fuzzing of its paths."""

from __future__ import annotations

import asyncio
import datetime as dt
import http.client
import ssl
import threading
from pathlib import Path

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from nodeagent.kube import KubeClient, load_kubeconfig
from nodeagent.server.auth import NodeAuth, subresources_for
from nodeagent.server.nodeapi import NodeApiServer
from nodeagent.server.tlscert import ensure_serving_cert, server_context
from tests.controlplane.api import UserInfo
from tests.controlplane.pki import CertificateAuthority

NODE = "n1"


class RecordingRuntime:
    """Stands in for Docker: every use is recorded."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def list_containers(self, pod_uid=None):
        self.calls.append(f"list_containers {pod_uid}")
        return []

    async def list_pod_sandboxes(self, pod_uid=None):
        self.calls.append(f"list_pod_sandboxes {pod_uid}")
        return []

    @property
    def docker(self):
        self.calls.append("docker")
        raise AssertionError("the node API reached Docker")


POD = {"apiVersion": "v1", "kind": "Pod",
       "metadata": {"name": "p", "namespace": "default", "uid": "uid-1"},
       "spec": {"containers": [{"name": "c", "image": "busybox:1.35"}]}}


async def make_server(tmp_path: Path, auth: NodeAuth, client_ca: bytes, runtime) -> NodeApiServer:
    cert, key = ensure_serving_cert(None, None, root_dir=str(tmp_path / "root"), node_name=NODE,
                                    addresses=["127.0.0.1"])
    server = NodeApiServer("127.0.0.1", 0, node_name=NODE, auth=auth,
                           ssl_context=server_context(cert, key, client_ca), pods=lambda: [POD],
                           runtime=runtime, checks={"ping": lambda: (True, "ok")})
    await server.start()
    return server


def client_ssl(cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the self-signed serving certificate
    if cert is not None:
        ctx.load_cert_chain(*cert)
    return ctx


async def call(port: int, path: str, *, cert=None, token: str | None = None, method: str = "GET"):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session:
        async with session.request(method, f"https://127.0.0.1:{port}{path}", headers=headers,
                                   ssl=client_ssl(cert)) as resp:
            return resp.status, await resp.text()


def test_path_to_subresource_mapping():
    assert subresources_for("/stats/summary") == ["stats"]
    assert subresources_for("/stats") == ["stats"]
    assert subresources_for("/statsx") == ["proxy"]
    assert subresources_for("/metrics/cadvisor") == ["metrics"]
    assert subresources_for("/logs/syslog") == ["log"]
    assert subresources_for("/pods") == ["pods", "proxy"]
    assert subresources_for("/healthz") == ["healthz", "proxy"]
    for path in ("/exec/a/b/c", "/attach/a/b/c", "/portForward/a/b", "/run/a/b/c", "/containerLogs/a/b/c"):
        assert subresources_for(path) == ["proxy"]


async def test_authn_authz_matrix(controlplane, tmp_path):
    cp = controlplane
    node_client = KubeClient(load_kubeconfig(cp.make_kubeconfig(f"system:node:{NODE}", ["system:nodes"])), qps=0)
    auth = NodeAuth(NODE, node_client, anonymous=False)
    runtime = RecordingRuntime()
    server = await make_server(tmp_path, auth, cp.ca.cert_pem, runtime)
    port = server.bound_port
    logs = "/containerLogs/default/missing/c"
    try:
        # Self-signed serving certificate, kept under the root directory.
        assert (tmp_path / "root" / "pki" / "kubelet.crt").is_file()

        # Anonymous: 401 (anonymous-auth off).
        assert await call(port, logs) == (401, "Unauthorized")
        # An invalid bearer token: 401.
        assert (await call(port, logs, token="not-a-token"))[0] == 401

        # Certificates from another CA, and expired ones from the cluster CA: the TLS
        # handshake fails, nothing is read.
        other = CertificateAuthority.generate("someone-else")
        key_pem, cert_pem = other.issue("mallory", ["system:masters"])
        (tmp_path / "m.crt").write_bytes(cert_pem)
        (tmp_path / "m.key").write_bytes(key_pem)
        with pytest.raises(aiohttp.ClientError):
            await call(port, logs, cert=(tmp_path / "m.crt", tmp_path / "m.key"))
        expired = cp.issue_client_cert("old-admin", ["system:masters"], validity=dt.timedelta(minutes=-1))
        with pytest.raises(aiohttp.ClientError):
            await call(port, logs, cert=expired)

        # A valid certificate without permissions: 403 in kubelet's words, per subresource.
        alice = cp.issue_client_cert("alice", ["devs"])
        cases = {logs: "subresource=proxy", "/stats/summary": "subresource=stats",
                 "/metrics": "subresource=metrics", "/logs/": "subresource=log",
                 "/pods": "subresource(s)=[pods proxy]", "/healthz": "subresource(s)=[healthz proxy]"}
        for path, shown in cases.items():
            status, text = await call(port, path, cert=alice)
            assert (status, text) == (403, f"Forbidden (user=alice, verb=get, resource=nodes, {shown})"), path
        status, text = await call(port, "/exec/default/p/c?command=ls&output=1", cert=alice, method="POST")
        assert (status, text) == (403, "Forbidden (user=alice, verb=create, resource=nodes, subresource=proxy)")

        # Grants (like RBAC bindings) open exactly their subresource. Denials are cached
        # for a while, so use fresh identities.
        cp.grant("bob", "nodes/proxy", ["get"])
        bob = cp.issue_client_cert("bob")
        assert await call(port, logs, cert=bob) == (404, 'pod "missing" does not exist\n')
        assert (await call(port, "/stats/summary", cert=bob))[0] == 403
        assert (await call(port, "/pods", cert=bob))[0] == 200  # proxy is the fallback
        cp.grant("stats-readers", "nodes/stats", ["get"])
        carol = cp.issue_client_cert("carol", ["stats-readers"])
        assert (await call(port, "/stats/summary", cert=carol))[0] == 404  # authorized; not served here
        assert (await call(port, logs, cert=carol))[0] == 403
        cp.grant("dave", "nodes/pods", ["get"])
        dave = cp.issue_client_cert("dave")
        status, body = await call(port, "/pods", cert=dave)
        assert status == 200 and '"name": "p"' in body

        # Bearer tokens through TokenReview: allowed and denied.
        cp.authenticator.static_tokens["tok-erin"] = UserInfo("erin", ("system:authenticated",))
        cp.grant("erin", "nodes/metrics", ["get"])
        assert (await call(port, "/metrics", token="tok-erin"))[0] == 404
        assert await call(port, logs, token="tok-erin") == (
            403, "Forbidden (user=erin, verb=get, resource=nodes, subresource=proxy)")

        # The API server's own kubelet client certificate (system:masters) may do all.
        apiserver = (cp.state_dir / "apiserver-kubelet-client.crt", cp.state_dir / "apiserver-kubelet-client.key")
        cp._kubelet_ssl()
        assert await call(port, "/healthz", cert=apiserver) == (200, "ok")
        assert await call(port, "/containerLogs/default/p/nope", cert=apiserver) == (
            404, 'container "nope" not found in pod "p"\n')
        status, text = await call(port, "/containerLogs/default/p/c?tailLines=-1", cert=apiserver)
        assert (status, text) == (400, "tailLines: Invalid value: must be greater than or equal to 0")

        # Decisions and tokens are cached: repeating costs no more reviews.
        before = auth.reviews
        for _ in range(3):
            await call(port, "/metrics", token="tok-erin")
            await call(port, logs, cert=alice)
        assert auth.reviews == before

        # Nothing above reached Docker: only allowed log requests for an existing pod
        # looked up its containers.
        assert "docker" not in runtime.calls
        assert all(c == "list_containers uid-1" for c in runtime.calls)
    finally:
        await server.stop()
        await node_client.close()


async def test_standalone_mode_allows_only_verified_clients(tmp_path):
    ca = CertificateAuthority.generate()
    key_pem, cert_pem = ca.issue("ops")
    (tmp_path / "ops.crt").write_bytes(cert_pem)
    (tmp_path / "ops.key").write_bytes(key_pem)
    runtime = RecordingRuntime()
    server = await make_server(tmp_path, NodeAuth(NODE, None), ca.cert_pem, runtime)
    try:
        assert await call(server.bound_port, "/healthz") == (401, "Unauthorized")
        assert (await call(server.bound_port, "/healthz", token="x"))[0] == 401
        assert await call(server.bound_port, "/healthz", cert=(tmp_path / "ops.crt", tmp_path / "ops.key")) == (200, "ok")
    finally:
        await server.stop()
    server = await make_server(tmp_path, NodeAuth(NODE, None, anonymous=True), ca.cert_pem, runtime)
    try:
        assert (await call(server.bound_port, "/healthz"))[0] == 403
    finally:
        await server.stop()


# --- fuzzing ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def threaded_node_api(tmp_path_factory):
    """A node API on its own event loop thread, for synchronous Hypothesis tests."""
    tmp = tmp_path_factory.mktemp("fuzz")
    ca = CertificateAuthority.generate()
    key_pem, cert_pem = ca.issue("ops")
    (tmp / "ops.crt").write_bytes(cert_pem)
    (tmp / "ops.key").write_bytes(key_pem)
    loop = asyncio.new_event_loop()
    runtime = RecordingRuntime()
    started = threading.Event()
    holder: dict = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        holder["server"] = loop.run_until_complete(make_server(tmp, NodeAuth(NODE, None), ca.cert_pem, runtime))
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10)
    ctx = client_ssl((tmp / "ops.crt", tmp / "ops.key"))
    yield holder["server"].bound_port, ctx, runtime
    asyncio.run_coroutine_threadsafe(holder["server"].stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


SEGMENT = st.one_of(st.sampled_from(["..", ".", "%2F", "%2e%2e", "p", "c", "default", "%00", "a" * 300, ""]),
                    st.text(alphabet="abc-./%2Fe_~", min_size=0, max_size=12))
QUERY_KEYS = st.sampled_from(["tailLines", "limitBytes", "sinceSeconds", "sinceTime", "follow", "previous",
                              "timestamps", "command", "input", "tty", "x"])
QUERY_VALUES = st.one_of(st.sampled_from(["-1", "0", "1", "true", "9" * 40, "2026-01-01T00:00:00Z", "nan",
                                          "x" * 5000, "%00", "1e9"]), st.text(max_size=8))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["containerLogs", "exec", "attach", "portForward", "stats", "pods", "x"]),
       segments=st.lists(SEGMENT, min_size=0, max_size=5),
       query=st.lists(st.tuples(QUERY_KEYS, QUERY_VALUES), max_size=4),
       method=st.sampled_from(["GET", "POST"]))
def test_fuzzed_paths_and_queries_are_refused_cleanly(threaded_node_api, kind, segments, query, method):
    port, ctx, runtime = threaded_node_api
    from urllib.parse import quote

    path = "/" + kind + "".join("/" + s for s in segments)
    qs = "&".join(f"{k}={quote(v, safe='')}" for k, v in query)
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    try:
        conn.request(method, path + ("?" + qs if qs else ""))
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    # Never a server error, never a crash; only the one real pod ever reaches the runtime.
    assert resp.status in (200, 400, 404, 405, 414), (resp.status, path, qs, body[:200])
    assert "docker" not in runtime.calls
    assert all(c.endswith("uid-1") for c in runtime.calls)


async def test_stream_limit_and_idle_timeout(tmp_path):
    """At most node-api-max-streams sessions at once (429 beyond); an idle session is
    closed by the node."""
    from types import SimpleNamespace

    from tests.controlplane.streaming import dial_upgrade

    class SandboxRuntime(RecordingRuntime):
        async def list_pod_sandboxes(self, pod_uid=None):
            return [SimpleNamespace(netns_path="/proc/self/ns/net", created_at=1.0)]

    ca = CertificateAuthority.generate()
    key_pem, cert_pem = ca.issue("ops")
    (tmp_path / "ops.crt").write_bytes(cert_pem)
    (tmp_path / "ops.key").write_bytes(key_pem)
    server = await make_server(tmp_path, NodeAuth(NODE, None), ca.cert_pem, SandboxRuntime())
    server.streams.limit = 1
    server.idle_timeout = 1.0
    ctx = client_ssl((tmp_path / "ops.crt", tmp_path / "ops.key"))
    try:
        first = await dial_upgrade("127.0.0.1", server.bound_port, ctx, "/portForward/default/p",
                                   ["portforward.k8s.io"])
        assert first[0] == 101
        second = await dial_upgrade("127.0.0.1", server.bound_port, ctx, "/portForward/default/p",
                                    ["portforward.k8s.io"])
        assert second[0] == 429
        # Wrong protocol: 403 with both lists, like kubelet's handshake.
        third = await dial_upgrade("127.0.0.1", server.bound_port, ctx, "/portForward/default/p", ["v9.example"])
        assert third[0] in (403, 429)
        # The idle session is closed by the node within about the idle timeout.
        reader = first[3]
        start = asyncio.get_running_loop().time()
        async def until_eof() -> None:
            while await reader.read(65536):
                pass
        await asyncio.wait_for(until_eof(), 5)
        assert asyncio.get_running_loop().time() - start < 4
        assert server.streams.active == 0
        again = await dial_upgrade("127.0.0.1", server.bound_port, ctx, "/portForward/default/p",
                                   ["portforward.k8s.io"])
        assert again[0] == 101
        again[4].close()
    finally:
        await server.stop()


def test_wiring_standalone_off_without_client_ca_and_settings_checked(tmp_path):
    from types import SimpleNamespace

    from nodeagent.config import ConfigError, Settings, build_settings
    from nodeagent.server.wiring import build_node_api

    settings = Settings(manifest_dir=str(tmp_path), root_dir=str(tmp_path / "root"), node_name=NODE,
                        node_api_address="127.0.0.1:0")
    agent = SimpleNamespace(settings=settings, cluster=None, host_ip="127.0.0.1", pod_list=lambda: [],
                            runtime=RecordingRuntime(), server=SimpleNamespace(_checks={}))
    assert build_node_api(agent) is None
    ca = CertificateAuthority.generate()
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    settings.client_ca_file = str(tmp_path / "ca.crt")
    server = build_node_api(agent)
    assert server is not None and server.auth.client is None and (server.host, server.port) == ("127.0.0.1", 0)
    assert (tmp_path / "root" / "pki" / "kubelet.key").stat().st_mode & 0o777 == 0o600
    with pytest.raises(ConfigError, match="node-api-address"):
        build_settings(None, {"manifest-dir": str(tmp_path), "node-api-address": "nope"})
    settings.tls_cert_file = str(tmp_path / "missing.crt")
    settings.tls_private_key_file = str(tmp_path / "missing.key")
    with pytest.raises(ValueError, match="does not exist"):
        build_node_api(agent)
