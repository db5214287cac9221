"""The thin Kubernetes API client (nodeagent.kube) against the test control plane."""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path

import pytest
import yaml

from nodeagent.kube import (ApiConnectionError, ApiError, Backoff, Informer, KubeClient, KubeConfigError,
                            RateLimiter, Reflector, load_kubeconfig)
from nodeagent.kube import resources as R
from nodeagent.kube.client import parse_retry_after
from tests.controlplane.pki import CertificateAuthority, make_csr


def configmap(name: str, ns: str = "default", **data: str) -> dict:
    return {"metadata": {"name": name, "namespace": ns}, "data": data}


def pod(name: str, node: str = "node-a", ns: str = "default") -> dict:
    return {"metadata": {"name": name, "namespace": ns},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox:1.35"}]}}


FAST = dict(initial=0.05, maximum=0.5)


# --- kubeconfig ------------------------------------------------------------------------

def test_kubeconfig_variants(controlplane, tmp_path):
    embedded = load_kubeconfig(controlplane.admin_kubeconfig)
    assert embedded.server == controlplane.url and embedded.ca_data == controlplane.ca.cert_pem
    assert embedded.client_cert_data and embedded.client_key_data and embedded.token is None

    cert, key = controlplane.issue_client_cert("system:node:n1", ["system:nodes"])
    files = controlplane.make_kubeconfig(cert=(cert, key), embed=False, user="n1")
    cfg = load_kubeconfig(files)
    assert cfg.ca_file == str(controlplane.ca_path) and cfg.client_cert_file == str(cert)

    # Relative paths are relative to the kubeconfig's directory.
    doc = yaml.safe_load(files.read_text())
    (tmp_path / "rel").mkdir()
    for src, name in ((controlplane.ca_path, "ca.crt"), (cert, "c.crt"), (key, "c.key")):
        (tmp_path / "rel" / name).write_bytes(Path(src).read_bytes())
    (tmp_path / "rel" / "c.key").chmod(0o600)  # world-readable keys are refused
    doc["clusters"][0]["cluster"]["certificate-authority"] = "ca.crt"
    doc["users"][0]["user"] = {"client-certificate": "c.crt", "client-key": "c.key"}
    doc["contexts"].append({"name": "other", "context": {"cluster": "nodeagent-test", "user": "n1",
                                                        "namespace": "kube-system"}})
    rel = tmp_path / "rel" / "config"
    rel.write_text(yaml.safe_dump(doc))
    cfg = load_kubeconfig(rel)
    assert cfg.ca_file == str(tmp_path / "rel" / "ca.crt") and cfg.namespace == "default"
    assert load_kubeconfig(rel, context="other").namespace == "kube-system"

    token_file = tmp_path / "token"
    token_file.write_text("abc\n")
    cfg = load_kubeconfig(controlplane.make_kubeconfig(token_file=token_file))
    assert cfg.token_file == str(token_file) and not cfg.has_client_cert


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["clusters"][0]["cluster"].update({"insecure-skip-tls-verify": True}),
     "insecure-skip-tls-verify: true is refused"),
    (lambda d: d["clusters"][0]["cluster"].update({"server": "http://127.0.0.1:8080"}),
     "plain http server http://127.0.0.1:8080 is refused"),
    (lambda d: d["clusters"][0]["cluster"].update({"server": ""}),
     "clusters[name=nodeagent-test].cluster.server is empty"),
    (lambda d: d["users"][0]["user"].pop("client-key-data"),
     "needs both the certificate and the key"),
    (lambda d: d["users"][0]["user"].update({"client-key-data": "!!notbase64"}),
     "client-key-data is not valid base64"),
    (lambda d: d["clusters"][0]["cluster"].update({"certificate-authority-data": None,
                                                    "certificate-authority": "/nonexistent/ca.crt"}),
     "certificate-authority: file /nonexistent/ca.crt does not exist"),
    (lambda d: d.update({"current-context": "missing"}), "no context named 'missing'"),
    (lambda d: d["users"][0]["user"].update({"exec": {"command": "x"}}), ".exec is not supported"),
])
def test_kubeconfig_errors_name_the_field(controlplane, tmp_path, mutate, message):
    doc = yaml.safe_load(controlplane.admin_kubeconfig.read_text())
    mutate(doc)
    path = tmp_path / "bad.kubeconfig"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(KubeConfigError) as exc:
        load_kubeconfig(path)
    assert message in str(exc.value) and str(path) in str(exc.value)


def test_insecure_allowed_only_explicitly(controlplane, tmp_path):
    doc = yaml.safe_load(controlplane.admin_kubeconfig.read_text())
    doc["clusters"][0]["cluster"]["insecure-skip-tls-verify"] = True
    path = tmp_path / "insecure.kubeconfig"
    path.write_text(yaml.safe_dump(doc))
    cfg = load_kubeconfig(path, allow_insecure=True)
    assert cfg.insecure_skip_tls_verify is True


# --- requests, errors, authentication ---------------------------------------------------------

async def test_crud_and_typed_errors(admin_client):
    created = await admin_client.create(R.CONFIGMAPS, configmap("a", k="v"))
    assert created["kind"] == "ConfigMap" and created["data"] == {"k": "v"}
    with pytest.raises(ApiError) as exc:
        await admin_client.create(R.CONFIGMAPS, configmap("a"))
    assert (exc.value.status, exc.value.reason) == (409, "AlreadyExists")
    assert exc.value.is_already_exists and not exc.value.is_conflict
    stale = dict(created, data={"k": "w"})
    await admin_client.update(R.CONFIGMAPS, stale)
    with pytest.raises(ApiError) as exc:
        await admin_client.update(R.CONFIGMAPS, dict(created, data={"k": "x"}))
    assert exc.value.is_conflict and exc.value.body["reason"] == "Conflict"
    with pytest.raises(ApiError) as exc:
        await admin_client.delete(R.CONFIGMAPS, "a", "default", preconditions={"resourceVersion": "1"})
    assert exc.value.is_conflict
    await admin_client.delete(R.CONFIGMAPS, "a", "default")
    with pytest.raises(ApiError) as exc:
        await admin_client.get(R.CONFIGMAPS, "a", "default")
    assert exc.value.is_not_found and exc.value.message == 'configmaps "a" not found'
    with pytest.raises(ValueError):
        await admin_client.get(R.CONFIGMAPS, "a")  # namespaced resource without a namespace


async def test_tls_verification_failure_is_clear_and_not_retried(controlplane, tmp_path):
    other_ca = CertificateAuthority.generate("some-other-ca")
    doc = yaml.safe_load(controlplane.admin_kubeconfig.read_text())
    doc["clusters"][0]["cluster"]["certificate-authority-data"] = base64.b64encode(other_ca.cert_pem).decode()
    path = tmp_path / "wrong-ca.kubeconfig"
    path.write_text(yaml.safe_dump(doc))
    started = time.monotonic()
    async with KubeClient(load_kubeconfig(path)) as client:
        with pytest.raises(ApiConnectionError) as exc:
            await client.list(R.NAMESPACES)
        assert client.request_counts[("list", "namespaces")] == 1
    assert exc.value.tls is True
    text = str(exc.value)
    assert f"TLS verification of {controlplane.url} failed" in text
    assert "certificate verify failed" in text and str(path) in text
    assert time.monotonic() - started < 2.0


async def test_client_certificate_and_bootstrap_token_auth(controlplane):
    node_cfg = load_kubeconfig(controlplane.make_kubeconfig("system:node:n7", ["system:nodes"]))
    token = controlplane.create_bootstrap_token()
    boot_cfg = load_kubeconfig(controlplane.make_kubeconfig(token=token))
    _, csr_pem = make_csr("system:node:n7", ["system:nodes"])
    body = {"spec": {"request": base64.b64encode(csr_pem).decode(),
                     "signerName": "kubernetes.io/kube-apiserver-client-kubelet",
                     "usages": ["digital signature", "client auth"]}}
    async with KubeClient(node_cfg) as node, KubeClient(boot_cfg) as boot:
        by_node = await node.create(R.CERTIFICATESIGNINGREQUESTS, {**body, "metadata": {"name": "by-node"}})
        by_boot = await boot.create(R.CERTIFICATESIGNINGREQUESTS, {**body, "metadata": {"name": "by-boot"}})
        with pytest.raises(ApiError) as exc:
            await boot.list(R.SECRETS, "kube-system")
        assert exc.value.is_forbidden
    assert by_node["spec"]["username"] == "system:node:n7"
    assert by_node["spec"]["groups"] == ["system:nodes", "system:authenticated"]
    assert by_boot["spec"]["username"] == f"system:bootstrap:{token.split('.')[0]}"


async def test_token_file_is_reread_after_rotation(controlplane, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(controlplane.create_bootstrap_token())
    cfg = load_kubeconfig(controlplane.make_kubeconfig(token_file=token_file))
    async with KubeClient(cfg) as client:
        with pytest.raises(ApiError) as exc:
            await client.list(R.PODS)
        assert exc.value.is_forbidden
        token_file.write_text(controlplane.admin_token + "\n")
        # Picked up at the next check (at most one second) without a restart.
        deadline = time.monotonic() + 3
        while True:
            try:
                result = await client.list(R.PODS)
                break
            except ApiError:
                assert time.monotonic() < deadline, "rotated token not picked up"
                await asyncio.sleep(0.1)
        assert result["kind"] == "PodList"
        # An invalid token (401) makes the client re-read the file at once.
        token_file.write_text("invalid-token")
        await asyncio.sleep(1.1)
        os_mtime_bump = token_file.stat().st_mtime
        with pytest.raises(ApiError) as exc:
            await client.list(R.PODS)
        assert exc.value.is_unauthorized
        token_file.write_text(controlplane.admin_token)
        assert token_file.stat().st_mtime >= os_mtime_bump
        assert (await client.list(R.PODS))["kind"] == "PodList"


# --- retries and rate limiting ------------------------------------------------------------

async def test_retries_on_5xx_and_429_with_retry_after(controlplane):
    cfg = load_kubeconfig(controlplane.admin_kubeconfig)
    async with KubeClient(cfg, retry_backoff=Backoff(0.01, 0.05)) as client:
        controlplane.inject_errors(503, 2)
        assert (await client.list(R.NAMESPACES))["kind"] == "NamespaceList"
        assert client.request_counts[("list", "namespaces")] == 3

        controlplane.inject_errors(429, 1, retry_after=0.6)
        started = time.monotonic()
        await client.create(R.CONFIGMAPS, configmap("after-429"))
        assert time.monotonic() - started >= 0.6
        assert client.request_counts[("create", "configmaps")] == 2

        controlplane.inject_errors(500, 10)
        with pytest.raises(ApiError) as exc:
            await client.get(R.NAMESPACES, "default")
        assert exc.value.status == 500 and client.request_counts[("get", "namespaces")] == 5
        controlplane._faults.clear()

        # 4xx other than 429 is not retried.
        with pytest.raises(ApiError):
            await client.get(R.NAMESPACES, "nope")
        assert client.request_counts[("get", "namespaces")] == 6


async def test_connection_refused_is_retried_then_reported(controlplane):
    cfg = load_kubeconfig(controlplane.admin_kubeconfig)
    async with KubeClient(cfg, max_retries=3, retry_backoff=Backoff(0.05, 0.1)) as client:
        await controlplane.stop_serving()

        async def come_back():
            await asyncio.sleep(0.2)
            await controlplane.start_serving()

        back = asyncio.create_task(come_back())
        result = await client.get(R.NAMESPACES, "default")  # retried until the server returns
        await back
        assert result["metadata"]["name"] == "default"
        assert client.request_counts[("get", "namespaces")] >= 2
        await controlplane.stop_serving()
        with pytest.raises(ApiConnectionError) as exc:
            await client.get(R.NAMESPACES, "default")
        assert "cannot connect" in str(exc.value)
        await controlplane.start_serving()


def test_retry_after_parsing():
    assert parse_retry_after("2") == 2.0 and parse_retry_after("0.5") == 0.5
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    later = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= parse_retry_after(later) <= 31


def test_rate_limiter_token_bucket():
    now = [0.0]
    limiter = RateLimiter(qps=10, burst=3, clock=lambda: now[0])
    assert [limiter.reserve() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.reserve() == pytest.approx(0.1)
    assert limiter.reserve() == pytest.approx(0.2)
    now[0] = 1.0  # refill: 10 tokens/s, capped at the burst
    assert [limiter.reserve() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.reserve() == pytest.approx(0.1)
    assert RateLimiter(qps=0, burst=0).reserve() == 0.0
    backoff = Backoff(initial=1, maximum=4, jitter=0.5, rng=lambda: 1.0)
    assert [backoff.next() for _ in range(4)] == [1.5, 3.0, 6.0, 6.0]
    backoff.reset()
    assert backoff.next() == 1.5


async def test_qps_limit_bounds_request_rate_without_blocking_the_loop(controlplane):
    cfg = load_kubeconfig(controlplane.admin_kubeconfig)
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker():
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    async with KubeClient(cfg, qps=20, burst=5) as client:
        tick = asyncio.create_task(ticker())
        started = time.monotonic()
        await asyncio.gather(*(client.get(R.NAMESPACES, "default") for _ in range(25)))
        elapsed = time.monotonic() - started
        stop.set()
        await tick
    # 5 at once, then 20 more at 20/s: about one second, never much faster.
    assert 0.9 <= elapsed < 2.0, elapsed
    assert max(gaps) < 0.25, max(gaps)


async def test_cancelled_waiter_returns_its_token():
    limiter = RateLimiter(qps=1, burst=1)
    await limiter.acquire()
    waiter = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0.05)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert limiter.reserve() == pytest.approx(1.0, abs=0.1)  # not 2s: the token came back


# --- reflector / informer --------------------------------------------------------------------

class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []
        self.state: dict[str, dict] = {}

    def __call__(self, event_type: str, obj: dict, old: dict | None) -> None:
        name = obj["metadata"]["name"]
        self.events.append((event_type, name, obj["metadata"].get("resourceVersion", "")))
        if event_type == "DELETED":
            self.state.pop(name, None)
        else:
            self.state[name] = obj


def server_state(cp, plural: str, ns: str = "default") -> dict[str, str]:
    return {o["metadata"]["name"]: o["metadata"]["resourceVersion"] for o in cp.objects(plural, ns)}


async def test_watch_resumes_after_server_drops_without_missing_events(controlplane, admin_client):
    rec = Recorder()
    informer = Informer(admin_client, R.CONFIGMAPS, namespace="default", backoff=Backoff(**FAST))
    informer.add_handler(rec)
    async with informer:
        await informer.wait_synced(5)
        for round_ in range(5):
            for i in range(6):
                name = f"cm{i}"
                if round_ == 0:
                    await admin_client.create(R.CONFIGMAPS, configmap(name, v=str(round_)))
                elif i >= round_:  # cm0..cm{round-1} are deleted already
                    await admin_client.patch(R.CONFIGMAPS, name, {"data": {"v": str(round_)}}, "default")
            controlplane.drop_watches()
            await admin_client.delete(R.CONFIGMAPS, f"cm{round_}", "default")
        expected = server_state(controlplane, "configmaps")
        await controlplane.wait_for(
            lambda: {n: o["metadata"]["resourceVersion"] for n, o in rec.state.items()} == expected,
            10, what="the informer to catch up")
    assert informer.stats.lists == 1 and informer.stats.relists_after_gone == 0
    assert informer.stats.watches >= 6
    # Every write was seen, in order: cm5 was created and modified four times.
    cm5 = [e for e in rec.events if e[1] == "cm5"]
    assert [e[0] for e in cm5] == ["ADDED"] + ["MODIFIED"] * 4
    assert [int(e[2]) for e in cm5] == sorted(int(e[2]) for e in cm5)
    deleted = sorted(e[1] for e in rec.events if e[0] == "DELETED")
    assert deleted == ["cm0", "cm1", "cm2", "cm3", "cm4"]


async def test_relist_after_410_delivers_synthetic_deletes(controlplane, admin_client):
    for name in ("keep", "vanish", "change"):
        await admin_client.create(R.PODS, pod(name))
    rec = Recorder()
    reflector = Reflector(admin_client, R.PODS, rec, field_selector="spec.nodeName=node-a",
                          backoff=Backoff(**FAST))
    task = asyncio.create_task(reflector.run())
    try:
        await asyncio.wait_for(reflector.synced.wait(), 5)
        assert sorted(rec.state) == ["change", "keep", "vanish"]
        await controlplane.stop_serving()
        # While the agent cannot see it: one pod deleted, one changed, one created, and the
        # history compacted so the watch cannot resume.
        api, pods_rt = controlplane.api, _rt("pods")
        api.delete(pods_rt, "default", "vanish", {"gracePeriodSeconds": 0})
        api.patch(pods_rt, "default", "change", "application/merge-patch+json", b'{"metadata":{"labels":{"v":"2"}}}')
        api.create(pods_rt, "default", pod("new"))
        api.create(pods_rt, "default", pod("elsewhere", node="node-b"))
        controlplane.compact()
        await controlplane.start_serving()
        expected = server_state(controlplane, "pods")
        expected.pop("elsewhere")
        await controlplane.wait_for(
            lambda: {n: o["metadata"]["resourceVersion"] for n, o in rec.state.items()} == expected,
            10, what="the relist")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert reflector.stats.relists_after_gone == 1 and reflector.stats.lists == 2
    assert reflector.stats.synthetic_deletes == 1
    assert ("DELETED", "vanish") in [(e[0], e[1]) for e in rec.events]
    assert [e[0] for e in rec.events if e[1] == "change"] == ["ADDED", "MODIFIED"]
    assert [e[0] for e in rec.events if e[1] == "new"] == ["ADDED"]
    assert reflector.get("keep", "default") is not None and reflector.get("vanish", "default") is None


def _rt(plural: str):
    from tests.controlplane.resources import RESOURCES
    return next(r for r in RESOURCES if r.plural == plural and r.group == "")


async def test_bookmarks_advance_resource_version(make_controlplane):
    cp = await make_controlplane(bookmark_interval=0.2)
    async with KubeClient(load_kubeconfig(cp.admin_kubeconfig)) as client:
        rec = Recorder()
        reflector = Reflector(client, R.PODS, rec, backoff=Backoff(**FAST))
        task = asyncio.create_task(reflector.run())
        try:
            await asyncio.wait_for(reflector.synced.wait(), 5)
            listed_rv = int(reflector.resource_version)
            for i in range(5):  # other resources move the global resourceVersion
                await client.create(R.CONFIGMAPS, configmap(f"b{i}"))
            target = str(cp.store.rv)
            await cp.wait_for(lambda: reflector.resource_version == target, 5, what="a bookmark")
            assert int(target) > listed_rv and rec.events == []
            assert reflector.stats.bookmarks >= 1
            # Thanks to the bookmark the watch resumes even though history before it is gone.
            cp.compact()
            cp.drop_watches()
            await client.create(R.PODS, pod("after"))
            await cp.wait_for(lambda: "after" in rec.state, 5, what="the pod after the drop")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert reflector.stats.lists == 1 and reflector.stats.relists_after_gone == 0


async def test_outage_then_catch_up(controlplane, admin_client):
    rec = Recorder()
    informer = Informer(admin_client, R.PODS, field_selector="spec.nodeName=node-a",
                        backoff=Backoff(initial=0.1, maximum=1.0))
    informer.add_handler(rec)
    async with informer:
        await informer.wait_synced(5)
        await admin_client.create(R.PODS, pod("before"))
        await controlplane.wait_for(lambda: "before" in rec.state, 5)
        outage = asyncio.create_task(controlplane.outage(3.0))
        await asyncio.sleep(0.3)
        for i in range(10):  # written by others while the node cannot reach the API
            controlplane.api.create(_rt("pods"), "default", pod(f"during{i}"))
        controlplane.api.delete(_rt("pods"), "default", "before", {"gracePeriodSeconds": 0})
        await outage
        resumed = time.monotonic()
        await controlplane.wait_for(lambda: sorted(rec.state) == [f"during{i}" for i in range(10)], 10,
                                    what="catch-up after the outage")
        caught_up = time.monotonic() - resumed
    assert informer.stats.connection_errors >= 1
    assert informer.stats.lists == 1  # resumed from its resourceVersion: no relist needed
    assert caught_up < 2.5


async def test_watch_http_errors_surface(controlplane):
    anon = load_kubeconfig(controlplane.make_kubeconfig())
    async with KubeClient(anon) as client:
        with pytest.raises(ApiError) as exc:
            async with client.watch(R.PODS) as stream:
                async for _ in stream:
                    pass
        assert exc.value.is_forbidden


async def test_silent_partition_is_detected_by_the_idle_timeout(controlplane):
    cfg = load_kubeconfig(controlplane.admin_kubeconfig)
    async with KubeClient(cfg, timeout=1.0) as client:
        rec = Recorder()
        reflector = Reflector(client, R.CONFIGMAPS, rec, namespace="default", watch_idle_timeout=1.0,
                              backoff=Backoff(initial=0.1, maximum=0.3))
        task = asyncio.create_task(reflector.run())
        try:
            await asyncio.wait_for(reflector.synced.wait(), 5)
            await controlplane.stop_serving(mode="hang")
            controlplane.api.create(_rt("configmaps"), "default", configmap("in-partition"))
            await controlplane.wait_for(lambda: reflector.stats.connection_errors >= 1, 5,
                                        what="the idle watch to be noticed")
            assert "in-partition" not in rec.state
            await controlplane.start_serving()
            await controlplane.wait_for(lambda: "in-partition" in rec.state, 5, what="catch-up")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert reflector.stats.lists == 1


async def test_request_has_a_total_timeout_even_when_the_answer_trickles():
    """A server that keeps sending one byte at a time never trips the per-socket read
    timeout; the request's total deadline ends the call anyway."""
    from nodeagent.kube.kubeconfig import KubeConfig

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
        try:
            for _ in range(200):  # bounded: 20 s at most
                writer.write(b" ")
                await writer.drain()
                await asyncio.sleep(0.1)
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(trickle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = KubeClient(KubeConfig(server=f"http://127.0.0.1:{port}"), qps=0, timeout=0.5,
                        request_timeout=1.0, max_retries=0)
    try:
        started = time.monotonic()
        with pytest.raises(ApiConnectionError, match="no complete answer within 1s"):
            await client.get(R.CONFIGMAPS, "x", "default")
        assert time.monotonic() - started < 3.0
    finally:
        await client.close()
        server.close()
        await server.wait_closed()
