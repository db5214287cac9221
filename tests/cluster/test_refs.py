"""ClusterEnvSources against the test control plane: env and volumes from ConfigMaps,
Secrets and TokenRequest, missing references, updates reaching mounted files."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from nodeagent.cluster.refs import CONFIG_MAP, SECRET, ClusterEnvSources, pod_references
from nodeagent.kubelet.containerconfig import ConfigError, NodeResources, build_container_config, make_environment
from nodeagent.kube import KubeClient, load_kubeconfig
from nodeagent.kube import resources as R
from nodeagent.kubelet.volumes import DATA_DIR_NAME, VolumeManager, list_mounts
from tests.controlplane import Options

NODE = "node-refs"
NS = "team"
NODE_RESOURCES = NodeResources(cpu_millicores=2000, memory_bytes=8 << 30, ephemeral_storage_bytes=100 << 30)


def b64(value: bytes | str) -> str:
    return base64.b64encode(value.encode() if isinstance(value, str) else value).decode()


@pytest.fixture
async def cp(make_controlplane):
    cp = await make_controlplane(options=Options(record_writes=True, service_account_admission=False))
    cp.api.create(cp_rt("namespaces"), None, {"metadata": {"name": NS}})
    yield cp
    # Every object the node wrote (TokenRequests here) passes the official schema.
    assert cp.schema_problems_in_recorded_writes() == []


def cp_rt(plural: str):
    from tests.controlplane import RESOURCES
    return next(rt for rt in RESOURCES if rt.plural == plural and rt.group == "")


@pytest.fixture
async def node_client(cp):
    client = KubeClient(load_kubeconfig(cp.make_kubeconfig(f"system:node:{NODE}", ["system:nodes"])),
                        qps=0, max_retries=1)
    yield client
    await client.close()


@pytest.fixture
async def admin(cp):
    client = KubeClient(load_kubeconfig(cp.admin_kubeconfig), qps=0)
    yield client
    await client.close()


@pytest.fixture
def changes() -> list[tuple[str, str, str]]:
    return []


@pytest.fixture
async def sources(node_client, changes):
    src = ClusterEnvSources(node_client, node_name=NODE, on_change=lambda *a: changes.append(a),
                            sync_timeout=3.0)
    yield src
    await src.close()


@pytest.fixture
async def running(sources):
    """The sources with run() active (watches)."""
    task = asyncio.create_task(sources.run())
    await asyncio.sleep(0)
    yield sources
    task.cancel()
    await asyncio.wait([task])


async def create_pod(admin: KubeClient, name: str, *, containers=None, volumes=None, labels=None,
                     service_account: str | None = None) -> dict:
    spec = {"nodeName": NODE, "containers": containers or [{"name": "app", "image": "busybox:1.35"}]}
    if volumes:
        spec["volumes"] = volumes
    if service_account:
        spec["serviceAccountName"] = service_account
    body = {"metadata": {"name": name, "namespace": NS, "labels": labels or {"app": name}}, "spec": spec}
    return await admin.create(R.PODS, body, NS)


async def create_cm(admin, name, data=None, binary=None) -> dict:
    body = {"metadata": {"name": name, "namespace": NS}, "data": data or {}}
    if binary:
        body["binaryData"] = {k: b64(v) for k, v in binary.items()}
    return await admin.create(R.CONFIGMAPS, body, NS)


async def create_secret(admin, name, data) -> dict:
    body = {"metadata": {"name": name, "namespace": NS}, "data": {k: b64(v) for k, v in data.items()}}
    return await admin.create(R.SECRETS, body, NS)


async def wait_until(predicate, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def env_of(pod: dict, sources) -> dict[str, str]:
    container = pod["spec"]["containers"][0]
    return make_environment(pod, container, pod_ip="10.244.0.9", host_ip="192.0.2.2", node_name=NODE,
                            env_sources=sources, node=NODE_RESOURCES)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def jwt_claims(token: bytes) -> dict:
    payload = token.split(b".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))


# --- env ----------------------------------------------------------------------------------


async def test_env_from_config_map_and_secret_keys(cp, admin, sources):
    await create_cm(admin, "cfg", {"mode": "fast", "LEVEL": "3"}, binary={"blob": b"\x00\x01"})
    await create_secret(admin, "creds", {"password": "s3cret", "user": "bob"})
    pod = await create_pod(admin, "env-pod", containers=[{
        "name": "app", "image": "busybox:1.35",
        "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"},
                    {"secretRef": {"name": "creds"}},
                    {"configMapRef": {"name": "absent", "optional": True}}],
        "env": [
            {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "mode"}}},
            {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
            {"name": "GONE", "valueFrom": {"configMapKeyRef": {"name": "absent", "key": "x", "optional": True}}},
            {"name": "NOKEY", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "nope", "optional": True}}},
            {"name": "BLOB", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "blob", "optional": True}}},
            {"name": "COMBINED", "value": "$(MODE)-$(CFG_LEVEL)"},
        ]}])
    assert pod_references(pod) == {(CONFIG_MAP, NS, "cfg"), (CONFIG_MAP, NS, "absent"), (SECRET, NS, "creds")}
    await sources.prefetch(pod)
    # binaryData never becomes env (kubelet reads a ConfigMap's text data only).
    assert env_of(pod, sources) == {
        "CFG_mode": "fast", "CFG_LEVEL": "3", "password": "s3cret", "user": "bob",
        "MODE": "fast", "PW": "s3cret", "COMBINED": "fast-3",
    }
    assert sources.config_map(NS, "absent") is None
    assert sources.secret(NS, "creds") == {"password": b"s3cret", "user": b"bob"}
    assert sources.config_map(NS, "cfg") == {"mode": "fast", "LEVEL": "3", "blob": b"\x00\x01"}


@pytest.mark.parametrize("watching", [False, True])
async def test_missing_required_reference_waits_then_resolves(cp, admin, sources, changes, watching):
    task = asyncio.create_task(sources.run()) if watching else None
    try:
        await asyncio.sleep(0)
        pod = await create_pod(admin, "late-pod", containers=[{
            "name": "app", "image": "busybox:1.35",
            "env": [{"name": "A", "valueFrom": {"configMapKeyRef": {"name": "late", "key": "a"}}},
                    {"name": "B", "valueFrom": {"secretKeyRef": {"name": "late-secret", "key": "b"}}}]}])
        await sources.prefetch(pod)
        assert sources.watched_count == (2 if watching else 0)
        with pytest.raises(ConfigError) as info:
            build_container_config(pod, pod["spec"]["containers"][0], kind="app", attempt=0, pod_ip=None,
                                   host_ip="192.0.2.2", node_name=NODE, volume_paths={}, env_sources=sources,
                                   node=NODE_RESOURCES)
        assert info.value.reason == "CreateContainerConfigError"
        assert 'configmap "late" not found' in str(info.value)

        await create_cm(admin, "late", {"a": "1"})
        if watching:  # the watch reports the creation, naming the pods to kick
            await wait_until(lambda: (CONFIG_MAP, NS, "late") in changes, what="on_change for the configmap")
            assert sources.pods_referencing(CONFIG_MAP, NS, "late") == {pod["metadata"]["uid"]}
        else:
            sources.cache_ttl = 0  # polled: the kubelet's retry re-reads
        await sources.prefetch(pod)
        with pytest.raises(ConfigError, match='secret "late-secret" not found'):
            env_of(pod, sources)

        await create_secret(admin, "late-secret", {"b": "2"})
        if watching:
            await wait_until(lambda: (SECRET, NS, "late-secret") in changes, what="on_change for the secret")
        await sources.prefetch(pod)
        assert env_of(pod, sources) == {"A": "1", "B": "2"}
    finally:
        if task is not None:
            task.cancel()
            await asyncio.wait([task])


async def test_unreachable_api_is_a_sync_error_then_stale_data_is_served(cp, admin, node_client):
    sources = ClusterEnvSources(node_client, node_name=NODE, sync_timeout=0.5, cache_ttl=0)
    await create_cm(admin, "known", {"k": "v"})
    pod_a = await create_pod(admin, "a", volumes=[{"name": "c", "configMap": {"name": "known"}}])
    pod_b = await create_pod(admin, "b", volumes=[{"name": "c", "configMap": {"name": "other"}}])
    await sources.prefetch(pod_a)
    await cp.stop_serving()
    try:
        started = time.monotonic()
        await sources.prefetch(pod_a)
        await sources.prefetch(pod_b)
        assert time.monotonic() - started < 3.0  # bounded by sync_timeout, never hangs
        assert sources.config_map(NS, "known") == {"k": "v"}  # stale but known
        with pytest.raises(ConfigError, match="failed to sync configmap cache"):
            sources.config_map(NS, "other")
    finally:
        await cp.start_serving()
    await sources.prefetch(pod_b)
    assert sources.config_map(NS, "other") is None  # now an authoritative "absent"
    with pytest.raises(ConfigError, match="not registered"):
        sources.secret(NS, "never-prefetched")
    await sources.close()


# --- volumes -------------------------------------------------------------------------------


@pytest.fixture
def volume_root(tmp_path):
    root = tmp_path / "kubelet"
    yield root
    for mount_point, _fs in list_mounts():  # in case a test failed before teardown
        if mount_point.startswith(str(root)):
            os.system(f"umount -l {mount_point!r}")


@pytest.mark.root
async def test_config_map_and_secret_volumes_layout_and_modes(cp, admin, sources, volume_root):
    await create_cm(admin, "app-config", {"app.conf": "x=1\n", "log.level": "debug"}, binary={"logo.bin": b"\x89PNG"})
    await create_secret(admin, "tls", {"tls.crt": "CERT", "tls.key": "KEY", "unused": "u"})
    pod = await create_pod(admin, "vol-pod", volumes=[
        {"name": "config", "configMap": {"name": "app-config", "defaultMode": 0o640}},
        {"name": "config-items", "configMap": {"name": "app-config", "items": [
            {"key": "app.conf", "path": "conf/app.conf", "mode": 0o600}, {"key": "log.level", "path": "level"}]}},
        {"name": "certs", "secret": {"secretName": "tls", "defaultMode": 0o400, "items": [
            {"key": "tls.crt", "path": "tls.crt", "mode": 0o444}, {"key": "tls.key", "path": "private/tls.key"}]}},
        {"name": "maybe", "secret": {"secretName": "not-there", "optional": True}},
    ])
    uid = pod["metadata"]["uid"]
    manager = VolumeManager(volume_root, sources=sources, node=NODE_RESOURCES)
    await sources.prefetch(pod)
    paths = {k: Path(v) for k, v in (await manager.setup(pod)).items()}
    base = volume_root / "pods" / uid / "volumes"
    assert paths["config"] == base / "kubernetes.io~configmap" / "config"
    assert paths["certs"] == base / "kubernetes.io~secret" / "certs"

    config = paths["config"]
    assert mode(config) == 0o777  # emptyDir-backed, as kubelet makes it
    entries = sorted(os.listdir(config))
    data_target = os.readlink(config / DATA_DIR_NAME)
    assert data_target.startswith("..") and (config / data_target).is_dir() and mode(config / data_target) == 0o755
    assert entries == sorted([DATA_DIR_NAME, data_target, "app.conf", "log.level", "logo.bin"])
    for key in ("app.conf", "log.level", "logo.bin"):
        assert os.readlink(config / key) == f"{DATA_DIR_NAME}/{key}"
        assert mode(config / data_target / key) == 0o640
    assert (config / "app.conf").read_text() == "x=1\n"
    assert (config / "logo.bin").read_bytes() == b"\x89PNG"

    items = paths["config-items"]
    assert sorted(p for p in os.listdir(items) if not p.startswith("..")) == ["conf", "level"]
    assert os.readlink(items / "conf") == f"{DATA_DIR_NAME}/conf"
    assert (items / "conf" / "app.conf").read_text() == "x=1\n"
    assert mode(items / DATA_DIR_NAME / "conf" / "app.conf") == 0o600
    assert mode(items / DATA_DIR_NAME / "level") == 0o644  # defaultMode defaulted by the API: 420

    certs = paths["certs"]
    tmpfs = [mp for mp, fs in list_mounts() if mp == str(certs) and fs == "tmpfs"]
    assert tmpfs, "secret volumes live on tmpfs"
    assert stat.S_IMODE(certs.stat().st_mode) == 0o1777  # a tmpfs root, as on a kubelet node
    assert sorted(p for p in os.listdir(certs) if not p.startswith("..")) == ["private", "tls.crt"]
    assert (certs / "tls.crt").read_text() == "CERT" and mode(certs / DATA_DIR_NAME / "tls.crt") == 0o444
    assert (certs / "private" / "tls.key").read_text() == "KEY"
    assert mode(certs / DATA_DIR_NAME / "private" / "tls.key") == 0o400
    maybe = paths["maybe"]
    assert os.path.islink(maybe / DATA_DIR_NAME) and [p for p in os.listdir(maybe) if not p.startswith("..")] == []

    # A missing required object fails the mount with kubelet's wording.
    bad = await create_pod(admin, "bad-vol", volumes=[{"name": "c", "configMap": {"name": "nope"}}])
    await sources.prefetch(bad)
    with pytest.raises(ConfigError, match='configmap "nope" not found'):
        await manager.setup(bad)
    await manager.teardown(uid)
    assert not (volume_root / "pods" / uid).exists()


@pytest.mark.root
async def test_projected_volume_with_token_request(cp, admin, sources, volume_root):
    ca_pem = (await admin.get(R.CONFIGMAPS, "kube-root-ca.crt", NS))["data"]["ca.crt"]  # per-namespace controller
    await create_secret(admin, "extra", {"key": "value"})
    pod = await create_pod(admin, "proj-pod", labels={"app": "proj", "tier": "web"}, volumes=[
        {"name": "all", "projected": {"defaultMode": 0o440, "sources": [
            {"serviceAccountToken": {"audience": "vault", "expirationSeconds": 7200, "path": "token"}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {"secret": {"name": "extra", "items": [{"key": "key", "path": "secret/key", "mode": 0o400}]}},
            {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}},
                                       {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}},
        ]}},
        {"name": "default-token", "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}},
    ])
    uid = pod["metadata"]["uid"]
    manager = VolumeManager(volume_root, sources=sources, node=NODE_RESOURCES)
    await sources.prefetch(pod)
    paths = {k: Path(v) for k, v in (await manager.setup(pod)).items()}
    path = paths["all"]
    assert path.parent.name == "kubernetes.io~projected"
    assert [mp for mp, fs in list_mounts() if mp == str(path) and fs == "tmpfs"]
    assert sorted(p for p in os.listdir(path) if not p.startswith("..")) == [
        "ca.crt", "labels", "namespace", "secret", "token"]
    assert (path / "ca.crt").read_text() == ca_pem
    assert (path / "secret" / "key").read_text() == "value"
    assert (path / "namespace").read_text() == NS
    assert (path / "labels").read_text() == 'app="proj"\ntier="web"'
    assert mode(path / DATA_DIR_NAME / "token") == 0o440 and mode(path / DATA_DIR_NAME / "secret" / "key") == 0o400

    token = (path / "token").read_bytes()
    claims = jwt_claims(token)
    assert claims["aud"] == ["vault"]
    assert claims["sub"] == f"system:serviceaccount:{NS}:default"
    assert claims["kubernetes.io"]["pod"] == {"name": "proj-pod", "uid": uid}
    assert claims["exp"] - claims["iat"] == 7200

    # What the node sent: the TokenRequest bodies, bound to the pod.
    requests = [w.request for w in cp.recorded_writes if w.resource == "serviceaccounts/token"]
    assert len(requests) == 2
    bound = {"apiVersion": "v1", "kind": "Pod", "name": "proj-pod", "uid": uid}
    assert {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"audiences": ["vault"], "expirationSeconds": 7200, "boundObjectRef": bound}} in requests
    default_request = next(r for r in requests if r["spec"]["audiences"] == [])
    assert default_request["spec"]["expirationSeconds"] == 3600  # the API's default lifetime
    assert jwt_claims((paths["default-token"] / "token").read_bytes())["aud"] == [
        "https://kubernetes.default.svc.cluster.local"]

    # Fresh tokens are not requested again on the next sync.
    await sources.prefetch(pod)
    assert sources.stats.token_requests == 2
    await manager.teardown(uid)


async def test_admission_api_access_volume_uses_3607_seconds(make_controlplane, tmp_path):
    cp = await make_controlplane(options=Options(record_writes=True))
    async with KubeClient(load_kubeconfig(cp.admin_kubeconfig), qps=0) as admin, \
            KubeClient(load_kubeconfig(cp.make_kubeconfig(f"system:node:{NODE}", ["system:nodes"])),
                       qps=0) as node:
        pod = await admin.create(R.PODS, {"metadata": {"name": "sa-pod", "namespace": "default"},
                                          "spec": {"nodeName": NODE, "containers": [{"name": "a", "image": "i"}]}},
                                 "default")
        sources = ClusterEnvSources(node, node_name=NODE)
        await sources.prefetch(pod)
        volume = next(v for v in pod["spec"]["volumes"] if v["name"].startswith("kube-api-access-"))
        projection = volume["projected"]["sources"][0]["serviceAccountToken"]
        token = sources.service_account_token(pod, projection)
        assert jwt_claims(token)["exp"] - jwt_claims(token)["iat"] == 3607
        assert sources.config_map("default", "kube-root-ca.crt")["ca.crt"].startswith("-----BEGIN CERTIFICATE")
    assert cp.schema_problems_in_recorded_writes() == []


async def test_token_renewed_after_80_percent_and_kept_through_outage(cp, admin, node_client):
    now = [time.time()]
    sources = ClusterEnvSources(node_client, node_name=NODE, clock=lambda: now[0], sync_timeout=1.0)
    projection = {"expirationSeconds": 1000, "path": "token"}
    pod = await create_pod(admin, "tok", volumes=[{"name": "t", "projected": {"sources": [
        {"serviceAccountToken": projection}]}}])
    await sources.prefetch(pod)
    first = sources.service_account_token(pod, projection)
    now[0] += 700  # 70% of the lifetime: still fresh
    await sources.prefetch(pod)
    assert sources.stats.token_requests == 1
    now[0] += 111  # past 80% (plus the at most 10 s of jitter)
    await sources.prefetch(pod)
    assert sources.stats.token_requests == 2
    second = sources.service_account_token(pod, projection)
    assert second != first and jwt_claims(second)["jti"] != jwt_claims(first)["jti"]

    await cp.stop_serving()
    try:
        now[0] += 900  # due again, but the API is down: the old token stays while valid
        await sources.prefetch(pod)
        assert sources.stats.token_failures == 1
        assert sources.service_account_token(pod, projection) == second
        now[0] += 300  # expired (issued ~1200 s ago for 1000 s)
        with pytest.raises(ConfigError, match="failed to fetch token"):
            sources.service_account_token(pod, projection)
    finally:
        await cp.start_serving()
    await sources.prefetch(pod)
    assert sources.service_account_token(pod, projection) not in (first, second)
    sources.release_pod(pod["metadata"]["uid"])
    with pytest.raises(ConfigError, match="failed to fetch token"):
        sources.service_account_token(pod, projection)


# --- updates ---------------------------------------------------------------------------


def _reader(path: Path, allowed: set[bytes], stop: threading.Event, seen: list, bad: list) -> None:
    # Reads as a container would, through the top-level symlink, as fast as it can.
    while not stop.is_set():
        for name in ("a", "b"):
            try:
                content = (path / name).read_bytes()
            except FileNotFoundError as exc:
                bad.append(f"{name}: {exc}")
                continue
            seen.append(content)
            if content not in allowed:
                bad.append(f"{name}: {content!r}")


@pytest.mark.root
async def test_config_map_update_reaches_files_atomically(cp, admin, running, changes, volume_root):
    sources = running
    versions = [{"a": f"A{i}" * 2000, "b": f"B{i}" * 2000} for i in range(6)]
    await create_cm(admin, "live", versions[0])
    pod = await create_pod(admin, "live-pod", volumes=[{"name": "cfg", "configMap": {"name": "live"}},
                                                       {"name": "sec", "secret": {"secretName": "live-secret",
                                                                                  "optional": True}}])
    manager = VolumeManager(volume_root, sources=sources, node=NODE_RESOURCES)
    await sources.prefetch(pod)
    paths = {k: Path(v) for k, v in (await manager.setup(pod)).items()}
    path = paths["cfg"]
    assert sources.watched_count == 2

    allowed = {v[k].encode() for v in versions for k in ("a", "b")}
    stop, seen, bad = threading.Event(), [], []
    reader = threading.Thread(target=_reader, args=(path, allowed, stop, seen, bad), daemon=True)
    reader.start()
    try:
        for i, version in enumerate(versions[1:], start=1):
            old_target = os.readlink(path / DATA_DIR_NAME)
            changes.clear()
            await admin.patch(R.CONFIGMAPS, "live", {"data": version}, NS)
            await wait_until(lambda: (CONFIG_MAP, NS, "live") in changes, what=f"on_change for version {i}")
            # What the agent does on on_change: kick the pod, whose sync rewrites volumes.
            assert sources.pods_referencing(CONFIG_MAP, NS, "live") == {pod["metadata"]["uid"]}
            await sources.prefetch(pod)
            await manager.setup(pod)
            assert (path / "a").read_text() == version["a"] and (path / "b").read_text() == version["b"]
            new_target = os.readlink(path / DATA_DIR_NAME)
            assert new_target != old_target and not os.path.lexists(path / old_target)
    finally:
        stop.set()
        await asyncio.to_thread(reader.join, 5)
    assert bad == [], f"a reader saw a partial or missing file: {bad[:3]}"
    assert len(seen) > 10

    # The secret appearing later (optional until then) reaches its volume too.
    changes.clear()
    await create_secret(admin, "live-secret", {"token": "t1"})
    await wait_until(lambda: (SECRET, NS, "live-secret") in changes, what="on_change for the secret")
    await sources.prefetch(pod)
    await manager.setup(pod)
    assert (paths["sec"] / "token").read_text() == "t1"
    await manager.teardown(pod["metadata"]["uid"])


async def test_polled_secret_update_triggers_on_change(cp, admin, node_client):
    changes: list = []
    sources = ClusterEnvSources(node_client, node_name=NODE, on_change=lambda *a: changes.append(a),
                                max_watches=1, poll_interval=0.2)
    await create_secret(admin, "s1", {"k": "1"})
    await create_secret(admin, "s2", {"k": "1"})
    task = asyncio.create_task(sources.run())
    try:
        await asyncio.sleep(0)
        pod = await create_pod(admin, "poll", containers=[{"name": "app", "image": "busybox:1.35", "envFrom": [
            {"secretRef": {"name": "s1"}}, {"secretRef": {"name": "s2"}}]}])
        await sources.prefetch(pod)
        assert sources.watched_count == 1  # the cap: the other one is polled
        assert env_of(pod, sources) == {"k": "1"}
        gets_before = sources.stats.gets
        for name in ("s1", "s2"):
            await admin.patch(R.SECRETS, name, {"data": {"k": b64("2")}}, NS)
        await wait_until(lambda: {(SECRET, NS, "s1"), (SECRET, NS, "s2")} <= set(changes), what="both changes")
        assert sources.stats.gets > gets_before
        await sources.prefetch(pod)
        assert sources.secret(NS, "s1") == {"k": b"2"} and sources.secret(NS, "s2") == {"k": b"2"}

        # A released pod takes its watches and cache entries with it.
        sources.release_pod(pod["metadata"]["uid"])
        assert sources.watched_count == 0
        assert sources.pods_referencing(SECRET, NS, "s1") == set()
        with pytest.raises(ConfigError, match="not registered"):
            sources.secret(NS, "s1")
    finally:
        task.cancel()
        await asyncio.wait([task])
    await sources.close()


async def test_forgotten_pods_are_collected(cp, admin, node_client):
    sources = ClusterEnvSources(node_client, node_name=NODE, poll_interval=0.05, registration_ttl=0.2)
    await create_cm(admin, "c", {"x": "1"})
    pod = await create_pod(admin, "gc", volumes=[{"name": "c", "configMap": {"name": "c"}}])
    task = asyncio.create_task(sources.run())
    try:
        await sources.prefetch(pod)
        await wait_until(lambda: sources.watched_count == 1, what="the watch")
        await wait_until(lambda: sources.watched_count == 0 and not sources.pods_referencing(CONFIG_MAP, NS, "c"),
                         what="garbage collection of an unused registration")
    finally:
        task.cancel()
        await asyncio.wait([task])


# --- end to end: the kubelet core with cluster sources and Docker --------------------------


class HostNetworkOnly:
    """A PodNetwork for hostNetwork pods: nothing to set up, nothing sent anywhere."""

    async def start(self) -> None: ...

    async def reserve(self, pod_uid):
        raise AssertionError("hostNetwork pods reserve no address")

    async def setup_pod(self, pod_uid, netns_path):
        raise AssertionError("hostNetwork pods need no pod network")

    async def teardown_pod(self, pod_uid, netns_path) -> None: ...

    async def pod_status(self, pod_uid):
        return None

    async def garbage_collect(self, live_pod_uids):
        return []


async def docker_exec(container_id: str, *cmd: str) -> str:
    proc = await asyncio.create_subprocess_exec("docker", "exec", container_id, *cmd,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, f"docker exec {cmd}: {err.decode()}"
    return out.decode()


@pytest.mark.docker
@pytest.mark.root
async def test_kubelet_runs_a_pod_with_cluster_references(cp, admin, node_client, volume_root):
    import uuid

    from nodeagent.backoff import Backoff
    from nodeagent.kubelet.kubelet import Kubelet
    from runtime.docker import DockerRuntime
    from runtime.images import DockerImageService
    from runtime.pause_image import PAUSE_IMAGE, ensure_pause_image
    from tests.runtime.conftest import remove_node_objects

    docker_node = f"refs-{uuid.uuid4().hex[:12]}"  # labels every Docker object of this test
    runtime = DockerRuntime(docker_node, call_timeout=20.0)
    changes: list = []
    sources = ClusterEnvSources(node_client, node_name=NODE, on_change=lambda *a: changes.append(a))
    watcher = asyncio.create_task(sources.run())

    async def sandbox_image() -> str:
        await ensure_pause_image(runtime.docker, PAUSE_IMAGE)
        return PAUSE_IMAGE

    kubelet = Kubelet(node_name=NODE, runtime=runtime, images=DockerImageService(runtime, pull_timeout=60.0),
                      network=HostNetworkOnly(), volumes=VolumeManager(volume_root, sources=sources,
                                                                       node=NODE_RESOURCES),
                      backoff=Backoff(base=1.0, cap=8.0), pull_backoff=Backoff(base=1.0, cap=8.0),
                      sandbox_image=sandbox_image, host_ip="127.0.0.1", env_sources=sources)
    try:
        await create_cm(admin, "files", {"key": "v1"})
        pod = await admin.create(R.PODS, {
            "metadata": {"name": "e2e", "namespace": NS},
            "spec": {"nodeName": NODE, "hostNetwork": True, "terminationGracePeriodSeconds": 1,
                     "containers": [{
                         "name": "app", "image": "busybox:1.35", "imagePullPolicy": "Never",
                         "command": ["sh", "-c", "while true; do sleep 1; done"],
                         "env": [{"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings",
                                                                                    "key": "mode"}}}],
                         "volumeMounts": [{"name": "files", "mountPath": "/etc/files"}]}],
                     "volumes": [{"name": "files", "configMap": {"name": "files"}}]}}, NS)
        uid = pod["metadata"]["uid"]
        kubelet.set_desired(pod)
        await kubelet.sync_pod(pod)
        waiting = kubelet.pods[uid].status["containerStatuses"][0]["state"]["waiting"]
        assert waiting["reason"] == "CreateContainerConfigError"
        assert 'configmap "settings" not found' in waiting["message"]

        await create_cm(admin, "settings", {"mode": "fast"})
        await kubelet.sync_pod(pod)  # the kubelet's retry
        status = kubelet.pods[uid].status["containerStatuses"][0]
        assert "running" in status["state"], status
        [container] = [c for c in await runtime.list_containers(uid) if c.name == "app"]
        assert (await docker_exec(container.id, "sh", "-c", "echo \"$MODE\"")).strip() == "fast"
        assert await docker_exec(container.id, "cat", "/etc/files/key") == "v1"

        changes.clear()
        await admin.patch(R.CONFIGMAPS, "files", {"data": {"key": "v2"}}, NS)
        await wait_until(lambda: (CONFIG_MAP, NS, "files") in changes, what="on_change")
        await kubelet.sync_pod(pod)  # what the agent's kick does
        assert await docker_exec(container.id, "cat", "/etc/files/key") == "v2"
        await admin.patch(R.CONFIGMAPS, "settings", {"data": {"mode": "slow"}}, NS)
        await kubelet.sync_pod(pod)
        assert (await docker_exec(container.id, "sh", "-c", "echo \"$MODE\"")).strip() == "fast"  # env never changes
        await kubelet.terminate_pod(uid, pod)
    finally:
        watcher.cancel()
        await asyncio.wait([watcher])
        await runtime.close()
        await asyncio.to_thread(remove_node_objects, docker_node)
