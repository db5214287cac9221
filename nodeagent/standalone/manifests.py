"""The manifest-directory pod source (kubelet's static pods).

inotify wakes the source when the directory changes; a periodic re-scan stays as a
safety net (kubelet does the same with fsnotify plus a periodic resync). A scan costs a
stat per file; files are re-parsed only when their (inode, size, mtime) changes.

Bad input never takes down what already runs: a file that stops parsing keeps its
last good pods, and an invalid edit of a pod keeps the previous version running.
Errors are logged once per change, naming the file and the field.

The parsing boundary: ``manifestfile`` reads and parses a file within fixed budgets
(size, depth, aliases, documents; regular files only), ``api.shape`` holds every
document to plain JSON, ``podspec``/``servicespec`` check types and the API server's
limits before anything reads a field, and any exception left while handling one file
is caught here, per file, and reported with its name: it never reaches the agent.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import structlog

from nodeagent.api.podspec import FieldError, apply_defaults, static_pod_uid, validate_pod
from nodeagent.api.servicespec import validate_service_types
from nodeagent.api.shape import check_shape
from nodeagent.standalone.dirwatch import DirectoryWatch
from nodeagent.standalone.manifestfile import (
    ManifestReadError,
    decode_text,
    display_name,
    load_documents,
    read_manifest_bytes,
)

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
    stamp: tuple[int, ...]
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


def _text(value: object) -> str:
    """A value used in an identity or message before its type is known to be right."""
    return value if isinstance(value, str) else repr(value)


# Errors on these fields leave no pod that could even be shown (with a status) safely.
_IDENTITY_FIELDS = ("", "kind", "apiVersion", "metadata", "metadata.name", "metadata.namespace",
                    "metadata.labels", "metadata.annotations", "spec")


def _is_identity_error(err: FieldError) -> bool:
    return err.field in _IDENTITY_FIELDS or err.field.startswith(("metadata.labels[", "metadata.annotations["))


def _is_image_error(err: FieldError) -> bool:
    # An invalid (but present) image is reported the kubelet way, as the container's
    # waiting reason InvalidImageName, instead of rejecting the whole pod.
    return err.field.endswith(".image") and "Required value" not in err.message


def _displayable(pod: dict) -> dict:
    """What of an invalid pod is kept to show it (phase Failed, reason InvalidManifest):
    its metadata (valid: identity errors are not shown at all) and, per container, a
    name and image that are strings. Nothing else of an invalid spec may reach code
    that reads fields by their type (status, termination, proxy, mirror pods)."""
    spec = pod["spec"]
    shown: dict = {"nodeName": spec.get("nodeName")}
    for key in ("initContainers", "containers"):
        items = spec.get(key)
        containers = [
            {"name": c["name"], "image": c["image"] if isinstance(c.get("image"), str) else ""}
            for c in (items if isinstance(items, list) else [])
            if isinstance(c, dict) and isinstance(c.get("name"), str)
        ]
        if containers or key == "containers":
            shown[key] = containers
    for key, ok in (("restartPolicy", lambda v: v in ("Always", "OnFailure", "Never")),
                    ("terminationGracePeriodSeconds",
                     lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 2**31)):
        if ok(spec.get(key)):
            shown[key] = spec[key]
    return {**pod, "spec": shown}


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
            try:
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
            except Exception:  # never end the source (and with it the agent); retry next pass
                log.exception("manifest scan failed; retrying")
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

    def problems(self) -> list[str]:
        """Why files of the directory are not (fully) loaded, one line per problem."""
        out = [self._dir_error] if self._dir_error else []
        for key in sorted(self._files, key=lambda k: self._files[k].seq):
            out.extend(self._files[key].errors)
        return out

    def health(self) -> tuple[bool, str]:
        """For /healthz?verbose: always healthy (a bad file does not make the node
        unhealthy), but says which files are not loaded and why."""
        problems = self.problems()
        if not problems:
            return True, "ok"
        shown = "; ".join(p if len(p) <= 300 else p[:297] + "..." for p in problems[:20])
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        return True, f"{len(problems)} manifest problem(s): {shown}{more}"

    def scan(self) -> ManifestSnapshot:
        try:
            # Every entry that looks like a manifest, whatever it is: a directory, FIFO,
            # device or dangling symlink named *.yaml is reported, not silently skipped.
            entries = sorted(
                p
                for p in self.directory.iterdir()
                if p.suffix in MANIFEST_SUFFIXES and not p.name.startswith(".")
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
                try:
                    st = path.stat()
                except OSError:
                    st = path.lstat()  # a dangling or looping symlink: reported by its own stamp
            except OSError:
                continue  # gone since the listing
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns, stat.S_IFMT(st.st_mode))
            old = self._files.get(key)
            if old is not None and old.stamp == stamp:
                continue
            try:
                state = self._parse_file(path, stamp, old)
            except Exception as exc:  # the file boundary: nothing reaches the agent
                log.exception("manifest handling failed", file=display_name(path))
                err = ManifestError(display_name(path), "", f"cannot be handled ({type(exc).__name__}: {exc})")
                state = self._keep_old(path, stamp, old, err)
            if old is not None:
                state.seq = old.seq
            else:
                state.seq = self._next_seq
                self._next_seq += 1
            self._files[key] = state
            self._report_duplicates_across_files(path, state)
        for gone in set(self._files) - seen:
            log.info("manifest removed", file=display_name(gone))
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

    def _parse_file(self, path: Path, stamp: tuple[int, ...], old: _FileState | None) -> _FileState:
        shown = display_name(path)
        try:
            if shown != str(path):
                # Its name would reach labels, annotations and JSON answers.
                raise ManifestReadError("the file name is not valid UTF-8; rename the file")
            text = decode_text(read_manifest_bytes(path))
            docs = load_documents(text, json_file=path.suffix == ".json")
        except ManifestReadError as exc:
            return self._keep_old(path, stamp, old, ManifestError(shown, "", str(exc)))

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
            shape = check_shape(doc)
            if shape:
                self._refuse_document(state, where, doc, shape, previous)
                continue
            kind = doc.get("kind")
            if kind not in SUPPORTED_KINDS:
                self._error(
                    state,
                    ManifestError(where, "kind", f"unsupported kind {_text(kind)[:80]}: a manifest holds a Pod "
                                  "or a Service"),
                )
                continue
            meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
            ident = (kind, _text(meta.get("namespace") or "default"), _text(meta.get("name")))
            if ident in names_here:
                self._error(state, ManifestError(where, "metadata.name", f"duplicate {kind} {ident[1]}/{ident[2]} in this file"))
                continue
            names_here.add(ident)
            if kind == "Service":
                problems = validate_service_types(doc)
                if problems:
                    for e in problems:
                        self._error(state, ManifestError(where, e.field, e.message))
                    continue
                svc = copy.deepcopy(doc)
                svc_meta = svc["metadata"]
                if not svc_meta.get("namespace"):
                    svc_meta["namespace"] = "default"
                if svc_meta.get("annotations") is None:  # absent or null
                    svc_meta["annotations"] = {}
                svc_meta["annotations"][MANIFEST_FILE_ANNOTATION] = str(path)
                state.services.append(svc)
                continue
            try:
                self._add_pod(state, where, str(path), doc, previous)
            except Exception as exc:  # one document's surprise must not cost the others
                log.exception("pod manifest handling failed", file=where)
                self._error(state, ManifestError(where, "", f"cannot be handled ({type(exc).__name__}: {exc})"))
        if not state.errors:
            log.info("manifest loaded", file=shown, pods=len(state.pods), services=len(state.services))
        return state

    def _refuse_document(self, state: _FileState, where: str, doc: dict, shape: list[tuple[str, str]],
                         previous: dict) -> None:
        """A document that is not plain JSON. An edit that breaks a running pod this
        way keeps the previous version running, like any other invalid edit."""
        meta = doc.get("metadata")
        name = meta.get("name") if isinstance(meta, dict) else None
        namespace = (meta.get("namespace") or "default") if isinstance(meta, dict) else None
        kept = None
        if doc.get("kind") == "Pod" and isinstance(name, str) and isinstance(namespace, str):
            kept = previous.get((namespace, f"{name}-{self.node_name}"))
        suffix = " (keeping the previous version running)" if kept is not None else ""
        for field_path, message in shape:
            self._error(state, ManifestError(where, field_path, message + suffix))
        if kept is not None:
            state.pods.append(kept)

    def _add_pod(self, state: _FileState, where: str, path: str, doc: dict, previous: dict) -> None:
        pod = apply_defaults(doc)
        problems = validate_pod(pod)
        fatal = [e for e in problems if _is_identity_error(e)]
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
            state.rejected[pod["metadata"]["uid"]] = (_displayable(pod), f"invalid manifest {where}: {message}")
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
        if meta.get("annotations") is None:  # absent or null
            meta["annotations"] = {}
        annotations = meta["annotations"]
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

    def _keep_old(self, path: Path, stamp: tuple[int, ...], old: _FileState | None, err: ManifestError) -> _FileState:
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
