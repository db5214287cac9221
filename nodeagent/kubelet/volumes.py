"""Pod volumes on the node: kubelet's volume manager, for the sources a node can
serve by itself.

Layout (kubelet's): ``<root>/pods/<uid>/volumes/kubernetes.io~<plugin>/<name>``.

- ``emptyDir``: a directory (mode 0777); ``medium: Memory`` mounts a tmpfs there,
  sized like kubelet does (sizeLimit, else the pod's memory limit, else node memory).
- ``hostPath``: the host's path itself, after the ``type`` check (and creation for the
  ``*OrCreate`` types).
- ``downwardAPI``: files rendered from the pod.
- ``configMap`` / ``secret`` / ``projected``: content from an ``EnvSources`` (the API
  client's cache in cluster mode); without one they fail with "needs cluster mode".
  Secret and projected volumes live on tmpfs so secrets never touch the disk.

Content volumes are written with ``write_atomic_dir`` (kubelet's AtomicWriter): files go
to a fresh timestamped directory and a ``..data`` symlink is swapped to it by rename,
so a reader never sees half an update.

``setup`` is idempotent: it runs on every sync, never remounts a tmpfs and rewrites
content only when it changed. Mount and filesystem work runs in a thread.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import os
import re
import shutil
import stat
import tempfile
import time
from decimal import ROUND_CEILING
from pathlib import Path
from typing import Iterable

import structlog

from nodeagent.kubelet.containerconfig import (
    ConfigError,
    EnvSources,
    NodeResources,
    pod_field_value,
    resource_field_value,
)
from nodeagent.api.podspec import DEFAULT_FILE_MODE, DEFAULT_NAMESPACE, container_limits, iter_containers
from nodeagent.api.quantity import QuantityError, memory_bytes
from nodeagent.kubelet.security import apply_fs_group

log = structlog.get_logger(__name__)

PLUGIN_DIRS = {
    "emptyDir": "kubernetes.io~empty-dir",
    "configMap": "kubernetes.io~configmap",
    "secret": "kubernetes.io~secret",
    "downwardAPI": "kubernetes.io~downward-api",
    "projected": "kubernetes.io~projected",
}
CONTENT_SOURCES = ("configMap", "secret", "downwardAPI", "projected")
# Sources whose files may hold secrets: kept in memory like kubelet does.
MEMORY_BACKED_CONTENT = ("secret", "projected")

DATA_DIR_NAME = "..data"
DATA_TMP_NAME = "..data_tmp"
EMPTY_DIR_MODE = 0o777
HOST_PATH_DIR_MODE = 0o755
HOST_PATH_FILE_MODE = 0o644

_MNT_DETACH = 2
_SAFE_UID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# --- mounts --------------------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)


def _unescape_mount_path(text: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def list_mounts() -> list[tuple[str, str]]:
    """``(mount point, fstype)`` for every mount this process sees."""
    mounts = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            before, sep, after = line.partition(" - ")
            fields = before.split()
            if not sep or len(fields) < 5:
                continue
            mounts.append((_unescape_mount_path(fields[4]), after.split()[0] if after.split() else ""))
    return mounts


def mounts_under(path: str | os.PathLike) -> list[str]:
    """Mount points at or below ``path``, deepest first (the order to unmount them)."""
    base = os.path.realpath(path)
    found = {mp for mp, _fs in list_mounts() if mp == base or mp.startswith(base.rstrip("/") + "/")}
    return sorted(found, key=lambda p: (p.count("/"), len(p)), reverse=True)


def is_mount_point(path: str | os.PathLike) -> bool:
    real = os.path.realpath(path)
    return any(mp == real for mp, _fs in list_mounts())


def mount_tmpfs(target: str | os.PathLike, size_bytes: int | None) -> None:
    options = f"size={size_bytes}".encode() if size_bytes else None
    if _libc.mount(b"tmpfs", os.fsencode(target), b"tmpfs", 0, options) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount tmpfs on {target}: {os.strerror(err)}")


def unmount(target: str | os.PathLike) -> None:
    path = os.fsencode(target)
    if _libc.umount2(path, 0) == 0:
        return
    err = ctypes.get_errno()
    if err == errno.EBUSY:
        # A process still has it open (a container being torn down); detach so the
        # directory can go now and the kernel frees the tmpfs when the last user leaves.
        if _libc.umount2(path, _MNT_DETACH) == 0:
            return
        err = ctypes.get_errno()
    if err == errno.EINVAL and not is_mount_point(target):
        return  # already gone
    raise OSError(err, f"unmount {os.fsdecode(path)}: {os.strerror(err)}")


# --- the atomic writer ---------------------------------------------------------------


def _clean_payload_path(rel: str) -> str:
    if not isinstance(rel, str) or not rel:
        raise ValueError(f"invalid path {rel!r}: must not be empty")
    if rel.startswith("/"):
        raise ValueError(f"invalid path {rel!r}: must be relative")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if not parts:
        raise ValueError(f"invalid path {rel!r}: must name a file")
    if ".." in parts:
        raise ValueError(f"invalid path {rel!r}: must not contain '..'")
    if parts[0].startswith(".."):
        raise ValueError(f"invalid path {rel!r}: must not start with '..' (reserved for the writer)")
    return "/".join(parts)


def _read_payload(directory: Path) -> dict[str, tuple[bytes, int]]:
    found: dict[str, tuple[bytes, int]] = {}
    for dirpath, _dirs, files in os.walk(directory):
        for name in files:
            full = Path(dirpath) / name
            st = full.lstat()
            if stat.S_ISREG(st.st_mode):
                rel = full.relative_to(directory).as_posix()
                found[rel] = (full.read_bytes(), stat.S_IMODE(st.st_mode))
    return found


def write_atomic_dir(target_dir: str | os.PathLike, files: dict[str, tuple[bytes, int]]) -> bool:
    """Make ``target_dir`` show exactly ``files`` (relative path -> (content, mode)),
    switching from the previous content in one atomic rename. Returns False when the
    content was already current (nothing written).

    Layout: ``..<timestamp>/`` holds the files, ``..data`` links to it, and each
    top-level entry is a symlink through ``..data`` (``key -> ..data/key``).
    """
    target = Path(target_dir)
    payload: dict[str, tuple[bytes, int]] = {}
    for rel, (content, mode) in files.items():
        clean = _clean_payload_path(rel)
        if not 0 <= int(mode) <= 0o7777:
            raise ValueError(f"invalid mode {mode!r} for {rel!r}")
        payload[clean] = (bytes(content), int(mode))
    for rel in payload:  # "a" as a file and "a/b" as a file cannot both exist
        parent = rel.rpartition("/")[0]
        while parent:
            if parent in payload:
                raise ValueError(f"invalid paths: {parent!r} is a file and a directory of {rel!r}")
            parent = parent.rpartition("/")[0]

    target.mkdir(parents=True, exist_ok=True)
    data_link = target / DATA_DIR_NAME
    old_ts: str | None = os.readlink(data_link) if data_link.is_symlink() else None
    old_payload: dict[str, tuple[bytes, int]] = {}
    if old_ts is not None and (target / old_ts).is_dir():
        old_payload = _read_payload(target / old_ts)
        if old_payload == payload:
            return False

    ts_dir = Path(tempfile.mkdtemp(prefix=time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime()), dir=target))
    try:
        os.chmod(ts_dir, 0o755)
        for rel, (content, mode) in sorted(payload.items()):
            path = ts_dir / rel
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                view = memoryview(content)
                while view:
                    view = view[os.write(fd, view):]
                os.fchmod(fd, mode)  # after writing, so the umask plays no part
            finally:
                os.close(fd)
        tmp_link = target / DATA_TMP_NAME
        if os.path.lexists(tmp_link):
            tmp_link.unlink()
        os.symlink(ts_dir.name, tmp_link)
        os.rename(tmp_link, data_link)  # the atomic switch
    except BaseException:
        shutil.rmtree(ts_dir, ignore_errors=True)
        raise

    new_top = {rel.split("/", 1)[0] for rel in payload}
    for top in sorted(new_top):
        link = target / top
        want = f"{DATA_DIR_NAME}/{top}"
        if link.is_symlink():
            if os.readlink(link) == want:
                continue
            link.unlink()
        elif os.path.lexists(link):
            raise OSError(errno.EEXIST, f"{link} exists and is not a symlink written by the atomic writer")
        os.symlink(want, link)
    for top in {rel.split("/", 1)[0] for rel in old_payload} - new_top:
        link = target / top
        if link.is_symlink():
            link.unlink()
    if old_ts is not None and old_ts != ts_dir.name and old_ts.startswith(".."):
        shutil.rmtree(target / old_ts, ignore_errors=True)
    return True


# --- sizing --------------------------------------------------------------------------


def pod_memory_limit(pod: dict) -> int | None:
    """The pod-level memory limit kubelet derives (None unless every container has
    one): app containers and sidecars together, or an init container plus the sidecars
    started before it, whichever is larger."""
    sidecars = 0
    init_peak = 0
    apps = 0
    for kind, c in iter_containers(pod):
        limit = container_limits(c).get("memory")
        if limit is None or limit <= 0:
            return None
        amount = int(limit.to_integral_value(rounding=ROUND_CEILING))
        if kind == "sidecar":
            sidecars += amount
        elif kind == "init":
            init_peak = max(init_peak, amount + sidecars)
        else:
            apps += amount
    return max(apps + sidecars, init_peak) or None


def memory_volume_size(pod: dict, size_limit: object, node_memory: int) -> int:
    """tmpfs size for a memory-backed volume: the smallest of node memory, the pod's
    memory limit and the volume's sizeLimit (each only when positive)."""
    size = node_memory
    pod_limit = pod_memory_limit(pod)
    if pod_limit and 0 < pod_limit <= size:
        size = pod_limit
    if size_limit not in (None, ""):
        limit = memory_bytes(size_limit)
        if 0 < limit <= size:
            size = limit
    return size


# --- fsGroup -------------------------------------------------------------------------


def _fs_group(pod: dict) -> int | None:
    value = ((pod.get("spec") or {}).get("securityContext") or {}).get("fsGroup")
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _fs_group_policy(pod: dict) -> str | None:
    return ((pod.get("spec") or {}).get("securityContext") or {}).get("fsGroupChangePolicy")


# --- the manager -----------------------------------------------------------------------


class VolumeManager:
    def __init__(
        self,
        root_dir: str | os.PathLike,
        *,
        sources: EnvSources | None = None,
        node: NodeResources | None = None,
    ) -> None:
        self.root_dir = Path(root_dir)
        # configMap/secret content (cluster mode); None on a standalone node.
        self.sources = sources
        self._node = node
        self._locks: dict[str, asyncio.Lock] = {}

    @property
    def node(self) -> NodeResources:
        return self._node or NodeResources.detect()

    def pod_dir(self, uid: str) -> Path:
        if not isinstance(uid, str) or not _SAFE_UID.match(uid) or ".." in uid:
            raise ConfigError(f"invalid pod uid {uid!r}: not usable as a directory name")
        return self.root_dir / "pods" / uid

    def volume_dir(self, uid: str, source: str, name: str) -> Path:
        return self.pod_dir(uid) / "volumes" / PLUGIN_DIRS[source] / name

    def _lock(self, uid: str) -> asyncio.Lock:
        return self._locks.setdefault(uid, asyncio.Lock())

    async def setup(self, pod: dict) -> dict[str, str]:
        """Make every volume of ``pod`` ready; ``{volume name: host path}``."""
        uid = (pod.get("metadata") or {}).get("uid")
        self.pod_dir(uid)  # validates the uid before any filesystem work
        async with self._lock(uid):
            return await asyncio.to_thread(self._setup_sync, pod)

    async def teardown(self, pod_uid: str) -> None:
        """Unmount the pod's tmpfs volumes and remove its directory (hostPath data stays)."""
        self.pod_dir(pod_uid)
        lock = self._lock(pod_uid)
        async with lock:
            await asyncio.to_thread(self._teardown_sync, pod_uid)
        if not lock.locked():  # nobody queued behind us: forget the pod
            self._locks.pop(pod_uid, None)

    async def cleanup_orphans(self, live_uids: Iterable[str]) -> list[str]:
        """Tear down volume directories of pods that no longer exist; returns their uids."""
        live = set(live_uids)
        pods_dir = self.root_dir / "pods"

        def list_uids() -> list[str]:
            try:
                return sorted(p.name for p in pods_dir.iterdir() if p.is_dir() and not p.is_symlink())
            except FileNotFoundError:
                return []

        removed = []
        for uid in await asyncio.to_thread(list_uids):
            if uid in live or not _SAFE_UID.match(uid):
                continue
            try:
                await self.teardown(uid)
            except OSError as exc:
                log.warning("cannot clean up volumes of a gone pod", pod_uid=uid, error=str(exc))
                continue
            log.info("removed volumes of a gone pod", pod_uid=uid)
            removed.append(uid)
        return removed

    # --- work done in a thread -------------------------------------------------------

    def _setup_sync(self, pod: dict) -> dict[str, str]:
        uid = pod["metadata"]["uid"]
        paths: dict[str, str] = {}
        for volume in (pod.get("spec") or {}).get("volumes") or []:
            name = volume["name"]
            source = next((k for k in ("emptyDir", "hostPath", *CONTENT_SOURCES) if volume.get(k) is not None), None)
            try:
                if source == "emptyDir":
                    paths[name] = self._setup_empty_dir(pod, uid, name, volume["emptyDir"])
                elif source == "hostPath":
                    paths[name] = self._setup_host_path(name, volume["hostPath"])
                elif source in CONTENT_SOURCES:
                    paths[name] = self._setup_content(pod, uid, name, source, volume[source])
                else:
                    others = [k for k in volume if k != "name"]
                    raise ConfigError(f"volume {name!r}: unsupported volume type {', '.join(others) or 'none'}")
            except OSError as exc:
                raise ConfigError(f"volume {name!r}: {exc.strerror or exc}") from None
        return paths

    def _setup_empty_dir(self, pod: dict, uid: str, name: str, body: dict) -> str:
        path = self.volume_dir(uid, "emptyDir", name)
        medium = body.get("medium") or ""
        if medium not in ("", "Memory"):
            raise ConfigError(f"volume {name!r}: emptyDir medium {medium!r} is not supported on this node")
        created = not path.is_dir()
        if created:
            path.mkdir(parents=True, exist_ok=True)
            os.chmod(path, EMPTY_DIR_MODE)  # any container user may write, like kubelet
        if medium == "Memory" and not is_mount_point(path):
            try:
                size = memory_volume_size(pod, body.get("sizeLimit"), self.node.memory_bytes)
            except QuantityError as exc:
                raise ConfigError(f"volume {name!r}: sizeLimit: {exc}") from None
            mount_tmpfs(path, size)
            os.chmod(path, EMPTY_DIR_MODE)
            created = True
            log.info("mounted tmpfs for emptyDir", volume=name, pod_uid=uid, size=size)
        fs_group = _fs_group(pod)
        if fs_group is not None and created:
            apply_fs_group(path, fs_group, read_only=False, change_policy=_fs_group_policy(pod))
        return str(path)

    def _setup_host_path(self, name: str, body: dict) -> str:
        path = body.get("path")
        kind = body.get("type") or ""
        if not isinstance(path, str) or not path.startswith("/"):
            raise ConfigError(f"volume {name!r}: hostPath path {path!r} must be an absolute path")
        where = f"volume {name!r}: hostPath type check failed for {path!r}"
        try:
            st: os.stat_result | None = os.stat(path)
        except FileNotFoundError:
            st = None
        if kind == "":
            return path
        if kind == "DirectoryOrCreate":
            if st is None:
                os.makedirs(path, mode=HOST_PATH_DIR_MODE, exist_ok=True)
                os.chmod(path, HOST_PATH_DIR_MODE)
                return path
            kind = "Directory"
        if kind == "FileOrCreate":
            if st is None:
                if not os.path.isdir(os.path.dirname(path)):
                    raise ConfigError(f"{where}: its parent directory does not exist (FileOrCreate does not create it)")
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, HOST_PATH_FILE_MODE)
                os.close(fd)
                return path
            if stat.S_ISDIR(st.st_mode):
                raise ConfigError(f"{where}: it is a directory, not a file (type FileOrCreate)")
            return path
        expected = {
            "Directory": (stat.S_ISDIR, "a directory"),
            "File": (stat.S_ISREG, "a regular file"),
            "Socket": (stat.S_ISSOCK, "a socket"),
            "CharDevice": (stat.S_ISCHR, "a character device"),
            "BlockDevice": (stat.S_ISBLK, "a block device"),
        }.get(kind)
        if expected is None:
            raise ConfigError(f"volume {name!r}: unsupported hostPath type {kind!r}")
        check, what = expected
        if st is None:
            raise ConfigError(f"{where}: it does not exist (type {kind} needs {what})")
        if not check(st.st_mode):
            raise ConfigError(f"{where}: it is not {what} (type {kind})")
        return path

    def _setup_content(self, pod: dict, uid: str, name: str, source: str, body: dict) -> str:
        # Gather first: a missing ConfigMap must not leave an empty directory behind.
        files = self._content_payload(pod, name, source, body)
        path = self.volume_dir(uid, source, name)
        if not path.is_dir():
            path.mkdir(parents=True, exist_ok=True)
            # kubelet backs content volumes with an emptyDir: the directory is 0777 (a
            # tmpfs root, for secret/projected, is 1777 by itself).
            os.chmod(path, EMPTY_DIR_MODE)
        if source in MEMORY_BACKED_CONTENT and not is_mount_point(path):
            mount_tmpfs(path, memory_volume_size(pod, None, self.node.memory_bytes))
        fs_group = _fs_group(pod)
        if fs_group is not None:
            # Group-readable up front, so an unchanged payload compares equal next time.
            files = {rel: (content, int(mode) | 0o440) for rel, (content, mode) in files.items()}
        try:
            changed = write_atomic_dir(path, files)
        except ValueError as exc:
            raise ConfigError(f"volume {name!r}: {exc}") from None
        if fs_group is not None and (changed or os.stat(path).st_gid != fs_group):
            apply_fs_group(path, fs_group, read_only=True)
        if changed:
            log.info("wrote volume content", volume=name, source=source, pod_uid=uid, files=len(files))
        return str(path)

    # --- content (the hook for cluster-mode sources) ----------------------------------

    def _content_payload(self, pod: dict, name: str, source: str, body: dict) -> dict[str, tuple[bytes, int]]:
        default_mode = body.get("defaultMode", DEFAULT_FILE_MODE)
        if source in ("configMap", "secret"):
            return self._object_files(pod, name, source, body, default_mode, top_level=True)
        if source == "downwardAPI":
            return self._downward_files(pod, name, body, default_mode)
        files: dict[str, tuple[bytes, int]] = {}
        for src in body.get("sources") or []:
            if src.get("configMap") is not None:
                part = self._object_files(pod, name, "configMap", src["configMap"], default_mode, top_level=False)
            elif src.get("secret") is not None:
                part = self._object_files(pod, name, "secret", src["secret"], default_mode, top_level=False)
            elif src.get("downwardAPI") is not None:
                part = self._downward_files(pod, name, src["downwardAPI"], default_mode)
            elif src.get("serviceAccountToken") is not None:
                part = self._token_file(pod, name, src["serviceAccountToken"], default_mode)
            else:
                kinds = ", ".join(k for k in src) or "nothing"
                raise ConfigError(f"volume {name!r}: unsupported projected source ({kinds})")
            files.update(part)
        return files

    def _token_file(self, pod: dict, name: str, body: dict, default_mode: int) -> dict[str, tuple[bytes, int]]:
        # Cluster mode: sources with service_account_token(pod, projection) -> bytes
        # (ClusterEnvSources, backed by the TokenRequest API).
        lookup = getattr(self.sources, "service_account_token", None)
        if lookup is None:
            raise ConfigError(f"volume {name!r}: serviceAccountToken projections need cluster mode "
                              "(this node runs without an API server)")
        try:
            token = lookup(pod, body)
        except ConfigError as exc:
            raise ConfigError(f"volume {name!r}: {exc}") from None
        return {body.get("path") or "token": (token, default_mode)}

    def _object_files(
        self, pod: dict, name: str, kind: str, body: dict, default_mode: int, *, top_level: bool
    ) -> dict[str, tuple[bytes, int]]:
        label = "configMap" if kind == "configMap" else "secret"
        object_name = body.get("secretName") if (kind == "secret" and top_level) else body.get("name")
        optional = bool(body.get("optional"))
        if self.sources is None:
            raise ConfigError(f"volume {name!r}: {label} volumes need cluster mode "
                              f"(this node runs without an API server to read {label} {object_name!r})")
        namespace = (pod.get("metadata") or {}).get("namespace") or DEFAULT_NAMESPACE
        data = self.sources.config_map(namespace, object_name) if kind == "configMap" else self.sources.secret(
            namespace, object_name
        )
        if data is None:
            if optional:
                return {}
            # kubelet's wording: configmap "x" not found / secret "x" not found
            raise ConfigError(f'volume {name!r}: {label.lower()} "{object_name}" not found')

        def raw(value: str | bytes) -> bytes:
            return value if isinstance(value, bytes) else str(value).encode()

        items = body.get("items")
        if not items:
            return {key: (raw(value), default_mode) for key, value in data.items()}
        files = {}
        for item in items:
            key = item.get("key")
            if key not in data:
                if optional:
                    continue
                raise ConfigError(f"volume {name!r}: {label} {namespace}/{object_name} has no key {key!r}")
            files[item["path"]] = (raw(data[key]), item.get("mode", default_mode))
        return files

    def _downward_files(self, pod: dict, name: str, body: dict, default_mode: int) -> dict[str, tuple[bytes, int]]:
        files = {}
        for item in body.get("items") or []:
            try:
                if item.get("fieldRef") is not None:
                    value = pod_field_value(pod, item["fieldRef"].get("fieldPath", ""), pod_ip=None, host_ip=None,
                                            node_name=(pod.get("spec") or {}).get("nodeName") or "")
                else:
                    value = resource_field_value(pod, item.get("resourceFieldRef") or {}, None, self.node)
            except ConfigError as exc:
                raise ConfigError(f"volume {name!r} item {item.get('path')!r}: {exc}") from None
            files[item["path"]] = (value.encode(), item.get("mode", default_mode))
        return files

    def _teardown_sync(self, uid: str) -> None:
        pod_dir = self.pod_dir(uid)
        if not os.path.lexists(pod_dir):
            return
        for mount_point in mounts_under(pod_dir):
            unmount(mount_point)
            log.info("unmounted pod volume", pod_uid=uid, path=mount_point)
        left = mounts_under(pod_dir)
        if left:
            # Removing files under a live mount would delete data that is not ours to
            # delete; leave the directory for the next cleanup.
            raise OSError(errno.EBUSY, f"pod {uid}: still mounted: {', '.join(left)}")
        shutil.rmtree(pod_dir)
