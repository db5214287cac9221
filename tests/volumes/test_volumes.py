"""VolumeManager against the real kernel: tmpfs mounts, device nodes, sockets.

Everything lives under pytest's per-test temporary directory; a finalizer unmounts
whatever a failing test may have left mounted there.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from pathlib import Path

import pytest

from nodeagent.kubelet.containerconfig import ConfigError, NodeResources
from nodeagent.api.podspec import apply_defaults
from nodeagent.kubelet.volumes import (
    DATA_DIR_NAME,
    VolumeManager,
    list_mounts,
    memory_volume_size,
    mounts_under,
    unmount,
    write_atomic_dir,
)

MiB = 2**20
NODE = NodeResources(cpu_millicores=2000, memory_bytes=512 * MiB, ephemeral_storage_bytes=10 * 2**30)


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "agent"
    root.mkdir()
    yield root
    for mount_point in mounts_under(tmp_path):
        unmount(mount_point)


@pytest.fixture
def manager(root):
    return VolumeManager(root, node=NODE)


def make_pod(volumes, uid="pod-uid-1", containers=None, labels=None):
    return apply_defaults({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "vol", "namespace": "team", "uid": uid, "labels": labels or {"app": "vol"}},
        "spec": {"containers": containers or [{"name": "c", "image": "busybox:1.35"}], "volumes": volumes},
    })


def tmpfs_mounts(path: Path) -> list[str]:
    real = os.path.realpath(path)
    return [mp for mp, fs in list_mounts() if mp == real and fs == "tmpfs"]


def tmpfs_size(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


class FakeSources:
    def __init__(self):
        self.config_maps = {}
        self.secrets = {}

    def config_map(self, namespace, name):
        return self.config_maps.get((namespace, name))

    def secret(self, namespace, name):
        return self.secrets.get((namespace, name))


# --- emptyDir ----------------------------------------------------------------------------


async def test_empty_dir_on_disk_is_idempotent(manager, root):
    pod = make_pod([{"name": "scratch", "emptyDir": {}}])
    paths = await manager.setup(pod)
    path = Path(paths["scratch"])
    assert path == root / "pods" / "pod-uid-1" / "volumes" / "kubernetes.io~empty-dir" / "scratch"
    assert path.is_dir() and stat.S_IMODE(path.stat().st_mode) == 0o777
    assert tmpfs_mounts(path) == []
    (path / "keep").write_text("data")
    assert await manager.setup(pod) == paths
    assert (path / "keep").read_text() == "data"


@pytest.mark.root
async def test_memory_empty_dir_mounts_tmpfs_once_with_size_limit(manager):
    pod = make_pod([{"name": "cache", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}}])
    path = Path((await manager.setup(pod))["cache"])
    assert len(tmpfs_mounts(path)) == 1
    assert tmpfs_size(path) == 16 * MiB
    (path / "f").write_bytes(b"x" * 1024)
    # Repeated and concurrent syncs must not stack mounts or lose data.
    await asyncio.gather(manager.setup(pod), manager.setup(pod), manager.setup(pod))
    assert len(tmpfs_mounts(path)) == 1
    assert (path / "f").read_bytes() == b"x" * 1024


@pytest.mark.root
async def test_memory_empty_dir_sized_by_pod_limit(manager):
    containers = [{"name": "a", "image": "busybox:1.35", "resources": {"limits": {"memory": "24Mi"}}},
                  {"name": "b", "image": "busybox:1.35", "resources": {"limits": {"memory": "8Mi"}}}]
    pod = make_pod([{"name": "cache", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}], containers=containers)
    path = Path((await manager.setup(pod))["cache"])
    assert tmpfs_size(path) == 32 * MiB  # the pod's limit is below the sizeLimit


def _limited(name, limit, **extra):
    return {"name": name, "image": "x", "resources": {"limits": {"memory": limit}} if limit else {}, **extra}


def _sized_pod(*limits, init=()):
    return {"metadata": {"uid": "u"}, "spec": {
        "containers": [_limited(f"a{i}", limit) for i, limit in enumerate(limits)],
        "initContainers": [_limited(f"i{i}", limit, **extra) for i, (limit, extra) in enumerate(init)]}}


def test_memory_volume_size_rules():
    node = 512 * MiB
    assert memory_volume_size(_sized_pod(None), None, node) == node
    assert memory_volume_size(_sized_pod("64Mi"), None, node) == 64 * MiB
    assert memory_volume_size(_sized_pod("64Mi", None), None, node) == node  # not every container is limited
    assert memory_volume_size(_sized_pod("64Mi"), "16Mi", node) == 16 * MiB
    assert memory_volume_size(_sized_pod("64Mi"), "128Mi", node) == 64 * MiB
    assert memory_volume_size(_sized_pod("1Gi"), None, node) == node
    assert memory_volume_size(_sized_pod("1Gi"), "0", node) == node
    # An init container may need more than the app containers; sidecars add up.
    assert memory_volume_size(_sized_pod("10Mi", init=[("100Mi", {})]), None, node) == 100 * MiB
    sidecar = ("5Mi", {"restartPolicy": "Always"})
    assert memory_volume_size(_sized_pod("10Mi", init=[sidecar]), None, node) == 15 * MiB
    assert memory_volume_size(_sized_pod("10Mi", init=[sidecar, ("20Mi", {})]), None, node) == 25 * MiB


async def test_unsupported_medium(manager):
    with pytest.raises(ConfigError, match="HugePages"):
        await manager.setup(make_pod([{"name": "h", "emptyDir": {"medium": "HugePages"}}]))


# --- hostPath ------------------------------------------------------------------------------


async def test_host_path_unchecked_type_returns_path(manager, tmp_path):
    missing = tmp_path / "not-there"
    paths = await manager.setup(make_pod([{"name": "h", "hostPath": {"path": str(missing)}}]))
    assert paths == {"h": str(missing)} and not missing.exists()


async def test_host_path_directory_or_create(manager, tmp_path):
    target = tmp_path / "a" / "b"
    paths = await manager.setup(make_pod([{"name": "h", "hostPath": {"path": str(target), "type": "DirectoryOrCreate"}}]))
    assert paths["h"] == str(target)
    assert target.is_dir() and stat.S_IMODE(target.stat().st_mode) == 0o755
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        await manager.setup(make_pod([{"name": "h", "hostPath": {"path": str(tmp_path / "file"),
                                                                 "type": "DirectoryOrCreate"}}]))


async def test_host_path_file_or_create(manager, tmp_path):
    target = tmp_path / "state.db"
    await manager.setup(make_pod([{"name": "h", "hostPath": {"path": str(target), "type": "FileOrCreate"}}]))
    assert target.is_file() and target.read_bytes() == b""
    assert stat.S_IMODE(target.stat().st_mode) == 0o644 & ~_umask()
    target.write_text("kept")
    await manager.setup(make_pod([{"name": "h", "hostPath": {"path": str(target), "type": "FileOrCreate"}}]))
    assert target.read_text() == "kept"
    with pytest.raises(ConfigError, match="parent directory does not exist"):
        await manager.setup(make_pod([{"name": "h", "hostPath": {"path": str(tmp_path / "no" / "f"),
                                                                 "type": "FileOrCreate"}}]))
    with pytest.raises(ConfigError, match="is a directory"):
        await manager.setup(make_pod([{"name": "h", "hostPath": {"path": str(tmp_path), "type": "FileOrCreate"}}]))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.root
async def test_host_path_type_checks(manager, tmp_path):
    regular = tmp_path / "regular"
    regular.write_text("x")
    sock_path = tmp_path / "app.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    char_dev = tmp_path / "null"
    os.mknod(char_dev, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    block_dev = tmp_path / "loop"
    os.mknod(block_dev, 0o600 | stat.S_IFBLK, os.makedev(7, 0))
    try:
        good = {"Directory": tmp_path, "File": regular, "Socket": sock_path, "CharDevice": char_dev,
                "BlockDevice": block_dev}
        for kind, path in good.items():
            paths = await manager.setup(make_pod([{"name": "h", "hostPath": {"path": str(path), "type": kind}}]))
            assert paths == {"h": str(path)}, kind
        for kind, path in good.items():
            wrong = regular if kind != "File" else tmp_path
            with pytest.raises(ConfigError, match=f"type {kind}") as info:
                await manager.setup(make_pod([{"name": "h", "hostPath": {"path": str(wrong), "type": kind}}]))
            assert "'h'" in str(info.value) and str(wrong) in str(info.value)
            with pytest.raises(ConfigError, match="does not exist"):
                await manager.setup(make_pod([{"name": "h", "hostPath": {"path": str(tmp_path / "nope"),
                                                                         "type": kind}}]))
    finally:
        sock.close()


# --- content volumes -------------------------------------------------------------------------


async def test_config_map_and_secret_need_cluster_mode(manager, root):
    for volume in ({"name": "c", "configMap": {"name": "cfg"}}, {"name": "s", "secret": {"secretName": "sec"}},
                   {"name": "p", "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}}):
        with pytest.raises(ConfigError, match="cluster mode"):
            await manager.setup(make_pod([volume]))
    assert not (root / "pods" / "pod-uid-1" / "volumes").exists()


async def test_config_map_volume_content_and_update(root):
    sources = FakeSources()
    sources.config_maps[("team", "cfg")] = {"app.conf": "v1", "extra": "e"}
    manager = VolumeManager(root, sources=sources, node=NODE)
    pod = make_pod([{"name": "c", "configMap": {"name": "cfg"}}])
    path = Path((await manager.setup(pod))["c"])
    assert path.parent.name == "kubernetes.io~configmap"
    assert (path / "app.conf").read_text() == "v1" and (path / "extra").read_text() == "e"
    assert os.readlink(path / "app.conf") == f"{DATA_DIR_NAME}/app.conf"
    assert stat.S_IMODE((path / "app.conf").stat().st_mode) == 0o644
    first_ts = os.readlink(path / DATA_DIR_NAME)

    # Unchanged content: nothing rewritten.
    await manager.setup(pod)
    assert os.readlink(path / DATA_DIR_NAME) == first_ts

    sources.config_maps[("team", "cfg")] = {"app.conf": "v2"}
    await manager.setup(pod)
    assert (path / "app.conf").read_text() == "v2"
    assert not os.path.lexists(path / "extra")
    assert os.readlink(path / DATA_DIR_NAME) != first_ts and not (path / first_ts).exists()
    await manager.teardown("pod-uid-1")
    assert not (root / "pods" / "pod-uid-1").exists()


async def test_config_map_items_optional_and_missing(root):
    sources = FakeSources()
    sources.config_maps[("team", "cfg")] = {"a": "A", "b": "B"}
    manager = VolumeManager(root, sources=sources, node=NODE)
    pod = make_pod([{"name": "c", "configMap": {"name": "cfg", "defaultMode": 0o600,
                                                "items": [{"key": "a", "path": "dir/a.txt", "mode": 0o400}, {"key": "b", "path": "b"}]}}])
    path = Path((await manager.setup(pod))["c"])
    assert (path / "dir" / "a.txt").read_text() == "A"
    assert os.readlink(path / "dir") == f"{DATA_DIR_NAME}/dir"
    assert stat.S_IMODE((path / "dir" / "a.txt").stat().st_mode) == 0o400
    assert stat.S_IMODE((path / "b").stat().st_mode) == 0o600

    missing = make_pod([{"name": "c", "configMap": {"name": "nope"}}], uid="pod-uid-2")
    with pytest.raises(ConfigError, match='configmap "nope" not found'):
        await manager.setup(missing)
    optional = make_pod([{"name": "c", "configMap": {"name": "nope", "optional": True}}], uid="pod-uid-3")
    optional_path = Path((await manager.setup(optional))["c"])
    assert os.path.islink(optional_path / DATA_DIR_NAME)  # an empty but valid volume
    assert [p for p in os.listdir(optional_path) if not p.startswith("..")] == []
    bad_key = make_pod([{"name": "c", "configMap": {"name": "cfg", "items": [{"key": "zz", "path": "z"}]}}],
                       uid="pod-uid-4")
    with pytest.raises(ConfigError, match="no key 'zz'"):
        await manager.setup(bad_key)


@pytest.mark.root
async def test_secret_volume_lives_on_tmpfs(root):
    sources = FakeSources()
    sources.secrets[("team", "sec")] = {"password": b"s3cret\x00\xff"}
    manager = VolumeManager(root, sources=sources, node=NODE)
    pod = make_pod([{"name": "s", "secret": {"secretName": "sec", "defaultMode": 0o400}}])
    path = Path((await manager.setup(pod))["s"])
    assert path.parent.name == "kubernetes.io~secret"
    assert len(tmpfs_mounts(path)) == 1
    assert (path / "password").read_bytes() == b"s3cret\x00\xff"
    assert stat.S_IMODE((path / "password").stat().st_mode) == 0o400
    await manager.setup(pod)
    assert len(tmpfs_mounts(path)) == 1
    await manager.teardown("pod-uid-1")
    assert tmpfs_mounts(path) == [] and not path.exists()


async def test_downward_api_volume(manager):
    containers = [{"name": "c", "image": "busybox:1.35", "resources": {"limits": {"memory": "64Mi"}}}]
    pod = make_pod([{"name": "info", "downwardAPI": {"items": [
        {"path": "name", "fieldRef": {"fieldPath": "metadata.name"}},
        {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
        {"path": "tier", "fieldRef": {"fieldPath": "metadata.labels['tier']"}},
        {"path": "mem", "resourceFieldRef": {"containerName": "c", "resource": "limits.memory", "divisor": "1Mi"}},
        {"path": "cpu", "resourceFieldRef": {"containerName": "c", "resource": "limits.cpu", "divisor": "1m"}},
    ]}}], containers=containers, labels={"app": "vol", "tier": 'front "end"'})
    path = Path((await manager.setup(pod))["info"])
    assert path.parent.name == "kubernetes.io~downward-api"
    assert (path / "name").read_text() == "vol"
    assert (path / "labels").read_text() == 'app="vol"\ntier="front \\"end\\""'
    assert (path / "tier").read_text() == 'front "end"'
    assert (path / "mem").read_text() == "64"
    assert (path / "cpu").read_text() == "2000"  # no limit: node capacity


@pytest.mark.root
async def test_projected_volume(root):
    sources = FakeSources()
    sources.config_maps[("team", "kube-root-ca.crt")] = {"ca.crt": "PEM"}
    manager = VolumeManager(root, sources=sources, node=NODE)
    pod = make_pod([{"name": "api", "projected": {"sources": [
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}},
    ]}}])
    path = Path((await manager.setup(pod))["api"])
    assert (path / "ca.crt").read_text() == "PEM" and (path / "namespace").read_text() == "team"
    assert len(tmpfs_mounts(path)) == 1


# --- teardown and orphans ------------------------------------------------------------------


@pytest.mark.root
async def test_teardown_unmounts_and_keeps_host_data(manager, root, tmp_path):
    host_dir = tmp_path / "host-data"
    host_dir.mkdir()
    (host_dir / "precious").write_text("keep me")
    pod = make_pod([{"name": "mem", "emptyDir": {"medium": "Memory"}}, {"name": "disk", "emptyDir": {}},
                    {"name": "host", "hostPath": {"path": str(host_dir), "type": "Directory"}}])
    paths = await manager.setup(pod)
    (Path(paths["mem"]) / "f").write_text("x")
    assert len(tmpfs_mounts(Path(paths["mem"]))) == 1
    await manager.teardown("pod-uid-1")
    assert not (root / "pods" / "pod-uid-1").exists()
    assert mounts_under(root) == []
    assert (host_dir / "precious").read_text() == "keep me"
    await manager.teardown("pod-uid-1")  # again: nothing to do


@pytest.mark.root
async def test_cleanup_orphans(manager, root):
    live = make_pod([{"name": "m", "emptyDir": {"medium": "Memory"}}], uid="live-1")
    gone = make_pod([{"name": "m", "emptyDir": {"medium": "Memory"}}], uid="gone-1")
    gone_disk = make_pod([{"name": "d", "emptyDir": {}}], uid="gone-2")
    for pod in (live, gone, gone_disk):
        await manager.setup(pod)
    removed = await manager.cleanup_orphans({"live-1"})
    assert sorted(removed) == ["gone-1", "gone-2"]
    assert sorted(os.listdir(root / "pods")) == ["live-1"]
    assert [os.path.basename(m) for m in mounts_under(root)] == ["m"]
    assert await manager.cleanup_orphans({"live-1"}) == []


async def test_cleanup_orphans_without_pods_dir(manager):
    assert await manager.cleanup_orphans(set()) == []


@pytest.mark.parametrize("uid", ["../x", "..", "", "a/b", None, ".hidden"])
async def test_unsafe_uids_rejected(manager, uid):
    with pytest.raises(ConfigError, match="invalid pod uid"):
        await manager.teardown(uid)
    with pytest.raises(ConfigError, match="invalid pod uid"):
        await manager.setup(make_pod([], uid=uid))


# --- the atomic writer -------------------------------------------------------------------------


def test_atomic_writer_layout(tmp_path):
    target = tmp_path / "vol"
    assert write_atomic_dir(target, {"a": (b"1", 0o644), "sub/b": (b"2", 0o600), "sub/deeper/c": (b"3", 0o755)})
    ts = os.readlink(target / DATA_DIR_NAME)
    assert ts.startswith("..") and (target / ts).is_dir()
    assert sorted(os.listdir(target)) == sorted([DATA_DIR_NAME, ts, "a", "sub"])
    assert os.readlink(target / "a") == "..data/a" and os.readlink(target / "sub") == "..data/sub"
    assert (target / "sub" / "deeper" / "c").read_bytes() == b"3"
    assert stat.S_IMODE((target / "sub" / "b").stat().st_mode) == 0o600
    assert stat.S_IMODE((target / "sub" / "deeper" / "c").stat().st_mode) == 0o755
    assert not os.path.lexists(target / "..data_tmp")


def test_atomic_writer_no_op_and_swap(tmp_path):
    target = tmp_path / "vol"
    write_atomic_dir(target, {"a": (b"1", 0o644), "b": (b"x", 0o644)})
    old = os.readlink(target / DATA_DIR_NAME)
    assert write_atomic_dir(target, {"a": (b"1", 0o644), "b": (b"x", 0o644)}) is False
    assert os.readlink(target / DATA_DIR_NAME) == old
    assert write_atomic_dir(target, {"a": (b"1", 0o600), "b": (b"x", 0o644)}) is True  # mode change counts
    new = os.readlink(target / DATA_DIR_NAME)
    assert new != old and not (target / old).exists()
    write_atomic_dir(target, {"c": (b"3", 0o644)})
    assert sorted(p for p in os.listdir(target) if not p.startswith("..")) == ["c"]
    write_atomic_dir(target, {})
    assert [p for p in os.listdir(target) if not p.startswith("..")] == []


def test_atomic_writer_reader_sees_old_or_new(tmp_path):
    # An open handle on the old data keeps reading old content; a fresh open sees new.
    target = tmp_path / "vol"
    write_atomic_dir(target, {"f": (b"old", 0o644)})
    with open(target / "f", "rb") as before:
        write_atomic_dir(target, {"f": (b"new", 0o644)})
        assert before.read() == b"old"
    assert (target / "f").read_bytes() == b"new"


@pytest.mark.parametrize("bad", ["/abs", "../up", "a/../../b", "..data", "..hidden/x", "", "."])
def test_atomic_writer_rejects_bad_paths(tmp_path, bad):
    with pytest.raises(ValueError):
        write_atomic_dir(tmp_path / "vol", {bad: (b"x", 0o644)})
    assert not (tmp_path / "up").exists()


def test_atomic_writer_rejects_file_and_dir_conflict(tmp_path):
    with pytest.raises(ValueError, match="is a file and a directory"):
        write_atomic_dir(tmp_path / "vol", {"a": (b"1", 0o644), "a/b": (b"2", 0o644)})


def test_atomic_writer_refuses_to_replace_foreign_file(tmp_path):
    target = tmp_path / "vol"
    target.mkdir()
    (target / "a").write_text("not ours")
    with pytest.raises(OSError):
        write_atomic_dir(target, {"a": (b"1", 0o644)})
    assert (target / "a").read_text() == "not ours"
