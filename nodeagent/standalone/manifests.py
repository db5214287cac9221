"""The manifest-directory pod source (kubelet's static pods).

inotify wakes the source when the directory changes; a periodic re-scan stays as a
safety net (kubelet does the same with fsnotify plus a periodic resync). A scan costs a
stat per file; files are re-parsed only when their (inode, size, mtime) changes.

Bad input never takes down what already runs: a file that stops parsing keeps its
last good pods, and an invalid edit of a pod keeps the previous version running.
Errors are logged once per change, naming the file and the field.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import structlog
import yaml

from nodeagent.standalone.dirwatch import DirectoryWatch
from nodeagent.api.podspec import FieldError, apply_defaults, static_pod_uid, validate_pod

log = structlog.get_logger(__name__)

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
SUPPORTED_KINDS = ("Pod", "Service")
CONFIG_SOURCE_ANNOTATION = "kubernetes.io/config.source"
CONFIG_HASH_ANNOTATION = "kubernetes.io/config.hash"
CONFIG_SEEN_ANNOTATION = "kubernetes.io/config.seen"
MANIFEST_FILE_ANNOTATION = "nodeagent.io/manifest-file"


@dataclass
class ManifestSnapshot:
    """Everything the directory currently asks for."""

    pods: dict[str, dict] = field(default_factory=dict)  # uid -> defaulted pod
    # uid -> reason message, for pods that exist but must not run (invalid spec).
    rejected: dict[str, str] = field(default_factory=dict)
    services: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass
class _FileState:
    stamp: tuple[int, int, int]
    pods: list[dict]  # accepted pods (uid set)
    rejected: dict[str, tuple[dict, str]]  # uid -> (pod, message)
    services: list[dict]
    errors: list[str]
    # Order in which the file first appeared: on a name clash the earlier file wins,
    # so adding a duplicate never disturbs a running pod.
    seq: int = 0


class ManifestError(Exception):
    def __init__(self, path: str, field_path: str, message: str) -> None:
        super().__init__(f"{path}: {field_path}: {message}" if field_path else f"{path}: {message}")
        self.path = path
        self.field = field_path


def _load_documents(path: Path, text: str) -> list[object]:
    if path.suffix == ".json":
        try:
            return [json.loads(text)]
        except json.JSONDecodeError as exc:
            raise ManifestError(str(path), "", f"not valid JSON: {exc}") from None
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ManifestError(str(path), "", f"not valid YAML{where}: {problem}") from None


def _is_image_error(err: FieldError) -> bool:
    # An invalid (but present) image is reported the kubelet way, as the container's
    # waiting reason InvalidImageName, instead of rejecting the whole pod.
    return err.field.endswith(".image") and "Required value" not in err.message


class ManifestSource:
    def __init__(
        self,
        directory: str | os.PathLike,
        node_name: str,
        on_change: Callable[[ManifestSnapshot], None],
        *,
        poll_period: float = 1.0,
    ) -> None:
        self.directory = Path(directory)
        self.node_name = node_name
        self.on_change = on_change
        self.poll_period = poll_period
        self._files: dict[str, _FileState] = {}
        self._last_snapshot_key: object = None
        self._dir_error: str | None = None
        self._next_seq = 0
        self.synced = asyncio.Event()

    async def run(self) -> None:
        watch = DirectoryWatch(str(self.directory))
        watching = watch.start()
        try:
            await self._loop(watch if watching else None)
        finally:
            watch.close()

    async def _loop(self, watch: "DirectoryWatch | None") -> None:
        while True:
            # Reading a few small files per change; the parse cost is measured in
            # microseconds, but a slow filesystem must not stall the loop.
            snapshot = await asyncio.to_thread(self.scan)
            key = (
                sorted(snapshot.pods),
                sorted(snapshot.rejected),
                json.dumps(snapshot.services, sort_keys=True),
            )
            if key != self._last_snapshot_key or not self.synced.is_set():
                self._last_snapshot_key = key
                self.on_change(snapshot)
            self.synced.set()
            if watch is None:
                await asyncio.sleep(self.poll_period)
                continue
            # inotify wakes us at once; the poll stays as a safety net (a directory
            # replaced underneath the watch, an event queue overflow).
            try:
                async with asyncio.timeout(max(self.poll_period, 5.0)):
                    await watch.changed.wait()
            except TimeoutError:
                pass
            watch.changed.clear()

    def scan(self) -> ManifestSnapshot:
        try:
            entries = sorted(
                p
                for p in self.directory.iterdir()
                if p.suffix in MANIFEST_SUFFIXES and not p.name.startswith(".") and p.is_file()
            )
            if self._dir_error:
                log.info("manifest directory readable again", directory=str(self.directory))
            self._dir_error = None
        except OSError as exc:
            msg = f"{self.directory}: cannot read manifest directory: {exc.strerror}"
            if msg != self._dir_error:
                log.error("manifest directory unreadable; keeping current pods", error=msg)
            self._dir_error = msg
            return self._snapshot()

        seen = set()
        for path in entries:
            key = str(path)
            seen.add(key)
            try:
                st = path.stat()
            except OSError:
                continue
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            old = self._files.get(key)
            if old is not None and old.stamp == stamp:
                continue
            state = self._parse_file(path, stamp, old)
            if old is not None:
                state.seq = old.seq
            else:
                state.seq = self._next_seq
                self._next_seq += 1
            self._files[key] = state
            self._report_duplicates_across_files(path, state)
        for gone in set(self._files) - seen:
            log.info("manifest removed", file=gone)
            del self._files[gone]
        return self._snapshot()

    def _snapshot(self) -> ManifestSnapshot:
        snap = ManifestSnapshot()
        owners: dict[tuple[str, str], str] = {}
        for key in sorted(self._files, key=lambda k: self._files[k].seq):
            state = self._files[key]
            snap.errors.extend(state.errors)
            candidates = [(p, None) for p in state.pods] + list(state.rejected.values())
            for pod, reason in candidates:
                ident = (pod["metadata"]["namespace"], pod["metadata"]["name"])
                if ident in owners:
                    # Reported once when the file was parsed; the first file wins.
                    continue
                owners[ident] = key
                uid = pod["metadata"]["uid"]
                snap.pods[uid] = pod
                if reason is not None:
                    snap.rejected[uid] = reason
            snap.services.extend(state.services)
        return snap

    def _parse_file(self, path: Path, stamp: tuple[int, int, int], old: _FileState | None) -> _FileState:
        try:
            text = path.read_text()
            docs = _load_documents(path, text)
        except (OSError, UnicodeDecodeError) as exc:
            err = ManifestError(str(path), "", f"cannot read: {exc}")
            return self._keep_old(path, stamp, old, err)
        except ManifestError as err:
            return self._keep_old(path, stamp, old, err)

        previous = {
            (p["metadata"]["namespace"], p["metadata"]["name"]): p for p in (old.pods if old else [])
        }
        state = _FileState(stamp=stamp, pods=[], rejected={}, services=[], errors=[])
        names_here: set[tuple[str, str, str]] = set()
        for index, doc in enumerate(docs):
            where = f"{path}" if len(docs) == 1 else f"{path} (document {index + 1})"
            if not isinstance(doc, dict):
                self._error(state, ManifestError(where, "", "a manifest must be a mapping (a Kubernetes object)"))
                continue
            kind = doc.get("kind")
            if kind not in SUPPORTED_KINDS:
                self._error(
                    state,
                    ManifestError(where, "kind", f"unsupported kind {kind!r}: a manifest holds a Pod or a Service"),
                )
                continue
            meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
            ident = (kind, meta.get("namespace") or "default", str(meta.get("name")))
            if ident in names_here:
                self._error(state, ManifestError(where, "metadata.name", f"duplicate {kind} {ident[1]}/{ident[2]} in this file"))
                continue
            names_here.add(ident)
            if kind == "Service":
                svc = copy.deepcopy(doc)
                svc.setdefault("metadata", {}).setdefault("namespace", "default")
                svc["metadata"].setdefault("annotations", {})[MANIFEST_FILE_ANNOTATION] = str(path)
                state.services.append(svc)
                continue
            self._add_pod(state, where, str(path), doc, previous)
        if not state.errors:
            log.info("manifest loaded", file=str(path), pods=len(state.pods), services=len(state.services))
        return state

    def _add_pod(self, state: _FileState, where: str, path: str, doc: dict, previous: dict) -> None:
        pod = apply_defaults(doc)
        problems = validate_pod(pod)
        identity_fields = ("kind", "apiVersion", "metadata.name", "metadata.namespace")
        fatal = [e for e in problems if e.field in identity_fields]
        if fatal:
            for e in fatal:
                self._error(state, ManifestError(where, e.field, e.message))
            return
        blocking = [e for e in problems if not _is_image_error(e)]
        for e in problems:
            if e not in blocking:
                log.warning("invalid image reference; the container will wait with InvalidImageName",
                            file=where, field=e.field, error=e.message)
        meta = pod["metadata"]
        ident = (meta["namespace"], f"{meta['name']}-{self.node_name}")
        if blocking and ident in previous:
            for e in blocking:
                self._error(state, ManifestError(where, e.field, e.message + " (keeping the previous version running)"))
            state.pods.append(previous[ident])
            return
        self._finish_pod(pod, path)
        if blocking:
            for e in blocking:
                self._error(state, ManifestError(where, e.field, e.message))
            message = "; ".join(str(e) for e in blocking)
            state.rejected[pod["metadata"]["uid"]] = (pod, f"invalid manifest {where}: {message}")
            return
        state.pods.append(pod)

    def _finish_pod(self, pod: dict, path: str) -> None:
        meta = pod["metadata"]
        # kubelet names static pods <name>-<node> so their mirror pods cannot collide
        # across nodes; the source name stays visible in the manifest-file annotation.
        uid = static_pod_uid(pod, self.node_name, path)
        meta["name"] = f"{meta['name']}-{self.node_name}"
        meta["uid"] = uid
        meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        annotations = meta.setdefault("annotations", {})
        annotations[CONFIG_SOURCE_ANNOTATION] = "file"
        annotations[CONFIG_HASH_ANNOTATION] = uid
        annotations[CONFIG_SEEN_ANNOTATION] = time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime())
        annotations[MANIFEST_FILE_ANNOTATION] = path
        pod["spec"]["nodeName"] = self.node_name

    def _report_duplicates_across_files(self, path: Path, state: _FileState) -> None:
        def idents(st: _FileState) -> set[tuple[str, str]]:
            pods = st.pods + [p for p, _ in st.rejected.values()]
            return {(p["metadata"]["namespace"], p["metadata"]["name"]) for p in pods}

        mine = idents(state)
        for other_key, other in self._files.items():
            if other_key == str(path) or other.seq > state.seq:
                continue
            for ns, name in sorted(mine & idents(other)):
                self._error(
                    state,
                    ManifestError(str(path), "metadata.name",
                                  f"duplicate pod {ns}/{name}: already defined in {other_key}; ignoring this one"),
                )

    def _keep_old(self, path: Path, stamp, old: _FileState | None, err: ManifestError) -> _FileState:
        kept = old.pods if old else []
        suffix = f" (keeping {len(kept)} pod(s) from its last good version)" if kept else ""
        log.error("bad manifest" + suffix, file=err.path, field=err.field or None, error=str(err))
        return _FileState(
            stamp=stamp,
            pods=kept,
            rejected=old.rejected if old else {},
            services=old.services if old else [],
            errors=[str(err)],
        )

    @staticmethod
    def _error(state: _FileState, err: ManifestError) -> None:
        log.error("bad manifest", file=err.path, field=err.field or None, error=str(err))
        state.errors.append(str(err))
