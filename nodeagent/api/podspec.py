"""Pod specs as the node sees them: validation, API-server defaulting, QoS, identity.

Pods are plain dicts in Kubernetes JSON form. ``validate_pod`` never raises on odd
shapes (a list where a mapping belongs, a number where a string belongs): every
problem becomes a ``FieldError`` naming the field the way ``kubectl`` does
(``spec.containers[0].resources.limits.memory``) and quoting the bad value, and all of
them are reported at once so a manifest is fixed in one edit.

``apply_defaults`` mirrors the API server's SetDefaults_* functions for core/v1 so a
pod read from a manifest looks like one read from the API (same container hashes,
same status). It runs before validation and tolerates invalid input.
"""

from __future__ import annotations

import copy
import hashlib
import ipaddress
import json
import posixpath
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Iterator

from nodeagent.api.quantity import QuantityError, parse_quantity
from nodeagent.api.shape import check_shape

try:  # the runtime side owns Docker's reference grammar; reuse it when present
    from runtime.imageref import parse_image_ref as _parse_image_ref
    from runtime.types import InvalidImageName as _InvalidImageName
except ImportError:  # pragma: no cover - only when the runtime package is absent
    _parse_image_ref = None
    _InvalidImageName = ValueError


@dataclass(eq=False)
class FieldError:
    """One problem in a pod, e.g. ``spec.containers[0].image``: "invalid image reference 'Foo'"."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


# --- names and small grammars ------------------------------------------------------

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUALIFIED_NAME_PART = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_CONFIG_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_HTTP_HEADER_NAME = re.compile(r"^[-!#$%&'*+.^_`|~0-9A-Za-z]+$")
_IANA_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_SUBSCRIPTED_FIELD = re.compile(r"^metadata\.(labels|annotations)\['(.*)'\]$")

DNS1123_LABEL_MAX = 63
DNS1123_SUBDOMAIN_MAX = 253

RESTART_POLICIES = ("Always", "OnFailure", "Never")
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
PROTOCOLS = ("TCP", "UDP", "SCTP")
DNS_POLICIES = ("ClusterFirst", "ClusterFirstWithHostNet", "Default", "None")
TERMINATION_MESSAGE_POLICIES = ("File", "FallbackToLogsOnError")
MOUNT_PROPAGATIONS = ("None", "HostToContainer", "Bidirectional")
HOST_PATH_TYPES = ("", "DirectoryOrCreate", "Directory", "FileOrCreate", "File", "Socket", "CharDevice", "BlockDevice")
EMPTY_DIR_MEDIA = ("", "Memory")

SUPPORTED_VOLUME_SOURCES = ("emptyDir", "hostPath", "configMap", "secret", "downwardAPI", "projected")
# Every volume source core/v1 knows; the ones outside SUPPORTED_VOLUME_SOURCES are
# rejected by name rather than ignored, so a pod never runs without its data.
KNOWN_VOLUME_SOURCES = SUPPORTED_VOLUME_SOURCES + (
    "persistentVolumeClaim", "ephemeral", "csi", "image", "nfs", "iscsi", "rbd", "cephfs", "glusterfs",
    "fc", "flexVolume", "cinder", "flocker", "gitRepo", "gcePersistentDisk", "awsElasticBlockStore",
    "azureFile", "azureDisk", "vsphereVolume", "quobyte", "photonPersistentDisk", "portworxVolume",
    "scaleIO", "storageos",
)

# fieldRef paths an environment variable may use (kubelet resolves them at start).
ENV_FIELD_PATHS = (
    "metadata.name", "metadata.namespace", "metadata.uid", "spec.nodeName", "spec.serviceAccountName",
    "status.podIP", "status.podIPs", "status.hostIP", "status.hostIPs",
)
# fieldRef paths a downwardAPI volume file may use.
VOLUME_FIELD_PATHS = ("metadata.name", "metadata.namespace", "metadata.uid", "metadata.labels", "metadata.annotations")

RESOURCE_FIELD_REFS = (
    "limits.cpu", "limits.memory", "limits.ephemeral-storage",
    "requests.cpu", "requests.memory", "requests.ephemeral-storage",
)
_CPU_DIVISORS = (Decimal("0.001"), Decimal(1))
_BYTE_DIVISORS = tuple(Decimal(10) ** e for e in (0, 3, 6, 9, 12, 15, 18)) + tuple(
    Decimal(2) ** e for e in (10, 20, 30, 40, 50, 60)
)
NATIVE_RESOURCES = ("cpu", "memory", "ephemeral-storage")
QOS_RESOURCES = ("cpu", "memory")

DEFAULT_NAMESPACE = "default"
DEFAULT_GRACE_PERIOD = 30
DEFAULT_FILE_MODE = 0o644  # 420, what the API server writes for configMap/secret/... volumes
DEFAULT_TOKEN_EXPIRATION = 3600
# API server limits (REFERENCE.md "API validation limits").
MAX_ANNOTATIONS_BYTES = 256 * 1024  # all keys and values of one object together
MAX_ID = 2**31 - 1  # runAsUser, runAsGroup, fsGroup, supplemental groups
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1  # spec.priority


def is_dns1123_label(value: object) -> bool:
    return isinstance(value, str) and len(value) <= DNS1123_LABEL_MAX and bool(_DNS1123_LABEL.match(value))


def is_dns1123_subdomain(value: object) -> bool:
    return (
        isinstance(value, str)
        and len(value) <= DNS1123_SUBDOMAIN_MAX
        and bool(_DNS1123_SUBDOMAIN.match(value))
    )


def is_qualified_name(value: object) -> bool:
    """Label/annotation keys: ``[prefix/]name``, prefix a DNS subdomain, name <= 63 chars."""
    if not isinstance(value, str) or not value:
        return False
    prefix, sep, name = value.rpartition("/")
    if sep and not (prefix and is_dns1123_subdomain(prefix)):
        return False
    return len(name) <= 63 and bool(_QUALIFIED_NAME_PART.match(name))


def is_label_value(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 63 and bool(_LABEL_VALUE.match(value))


def is_env_var_name(value: object) -> bool:
    """Kubernetes 1.32 rule (RelaxedEnvironmentVariableValidation, on by default):
    printable ASCII except '='."""
    return (
        isinstance(value, str)
        and bool(value)
        and all(" " <= ch <= "~" for ch in value)
        and "=" not in value
    )


def is_config_key(value: object) -> bool:
    return (
        isinstance(value, str)
        and len(value) <= DNS1123_SUBDOMAIN_MAX
        and value not in (".", "..")
        and bool(_CONFIG_KEY.match(value))
    )


def is_iana_svc_name(value: object) -> bool:
    return (
        isinstance(value, str)
        and 1 <= len(value) <= 15
        and bool(_IANA_SVC_NAME.match(value))
        and "--" not in value
        and any(ch.isalpha() for ch in value)
    )


def _list(value: object) -> list:
    return value if isinstance(value, list) else []


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _has_backsteps(path: str) -> bool:
    return ".." in path.split("/")


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --- validation --------------------------------------------------------------------


class _Collector:
    def __init__(self) -> None:
        self.errors: list[FieldError] = []

    def add(self, field: str, message: str) -> None:
        self.errors.append(FieldError(field, message))

    def mapping(self, field: str, value: object, *, required: bool = False) -> dict | None:
        if value is None:
            if required:
                self.add(field, "Required value")
            return None
        if not isinstance(value, dict):
            self.add(field, f"must be a mapping (an object), got {_show(value)}")
            return None
        return value

    def sequence(self, field: str, value: object) -> list | None:
        if value is None:
            return None
        if not isinstance(value, list):
            self.add(field, f"must be a list, got {_show(value)}")
            return None
        return value

    def string(self, field: str, value: object) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str):
            self.add(field, f"must be a string, got {_show(value)} (quote it in YAML)")
            return None
        return value

    def boolean(self, field: str, value: object) -> None:
        if value is not None and not isinstance(value, bool):
            self.add(field, f"must be true or false, got {_show(value)}")

    def integer(self, field: str, value: object, *, minimum: int | None = None, maximum: int | None = None,
                required: bool = False) -> None:
        if value is None:
            if required:
                self.add(field, "must be an integer, got null")
            return
        if not _is_int(value):
            self.add(field, f"must be an integer, got {_show(value)}")
            return
        if minimum is not None and value < minimum:
            self.add(field, f"invalid value {value!r}: must be greater than or equal to {minimum}")
        elif maximum is not None and value > maximum:
            self.add(field, f"invalid value {value!r}: must be less than or equal to {maximum}")

    def string_list(self, field: str, value: object) -> None:
        items = self.sequence(field, value)
        for i, item in enumerate(items or []):
            if item is None:  # a list item has no "unset": null here is a typo, not a default
                self.add(f"{field}[{i}]", "must be a string, got null")
            self.string(f"{field}[{i}]", item)

    def choice(self, field: str, value: object, allowed: tuple[str, ...]) -> None:
        if value is not None and value not in allowed:
            self.add(field, f"unsupported value {_show(value)}: must be one of {', '.join(repr(a) for a in allowed)}")


def validate_pod(pod: object) -> list[FieldError]:
    """Every problem in ``pod``; an empty list means the node can run it."""
    v = _Collector()
    if not isinstance(pod, dict):
        v.add("", f"a pod must be a mapping (a Kubernetes object), got {_show(pod)}")
        return v.errors
    # Plain JSON first (string keys, int64 numbers, bounded depth): everything below
    # may then rely on it.
    shape = check_shape(pod)
    if shape:
        return [FieldError(field, message) for field, message in shape]
    try:
        _validate_pod(v, pod)
    except Exception as exc:  # a shape this validator did not foresee: refuse, never raise
        v.add("", f"cannot validate this pod ({type(exc).__name__}: {exc})")
    return v.errors


def _validate_pod(v: _Collector, pod: dict) -> None:
    # kind/apiVersion may be absent on pods taken from a list response; when present
    # they must say Pod/v1.
    kind = pod.get("kind")
    if kind is not None and kind != "Pod":
        v.add("kind", f"unsupported kind {_show(kind)}: expected 'Pod'")
    api_version = pod.get("apiVersion")
    if api_version is not None and api_version != "v1":
        v.add("apiVersion", f"unsupported apiVersion {_show(api_version)} for a Pod: expected 'v1'")
    _validate_metadata(v, pod.get("metadata"))
    spec = v.mapping("spec", pod.get("spec"), required=True)
    if spec is not None:
        _validate_spec(v, spec)
        from nodeagent.api.support import unsupported

        for field, message in unsupported(pod):
            v.add(field, message)


def _validate_metadata(v: _Collector, value: object) -> None:
    meta = v.mapping("metadata", value, required=True)
    if meta is None:
        if value is None:
            v.add("metadata.name", "Required value: a pod needs a name")
        return
    name = meta.get("name")
    if name is None or name == "":
        v.add("metadata.name", "Required value: a pod needs a name")
    elif not is_dns1123_subdomain(name):
        v.add(
            "metadata.name",
            f"invalid name {_show(name)}: must be a lowercase RFC 1123 subdomain (lowercase letters, "
            "digits, '-' and '.', starting and ending with a letter or digit, at most 253 characters)",
        )
    namespace = meta.get("namespace")
    if namespace is not None and namespace != "" and not is_dns1123_label(namespace):
        v.add(
            "metadata.namespace",
            f"invalid namespace {_show(namespace)}: must be a lowercase RFC 1123 label (lowercase "
            "letters, digits and '-', starting and ending with a letter or digit, at most 63 characters)",
        )
    v.string("metadata.uid", meta.get("uid"))
    labels = v.mapping("metadata.labels", meta.get("labels"))
    for key, val in (labels or {}).items():
        if not is_qualified_name(key):
            v.add("metadata.labels", f"invalid label key {_show(key)}: must be [prefix/]name, name at most 63 "
                  "alphanumerics, '-', '_' or '.', starting and ending alphanumeric")
        if not is_label_value(val):
            v.add(f"metadata.labels[{key}]", f"invalid label value {_show(val)}: at most 63 alphanumerics, "
                  "'-', '_' or '.', starting and ending alphanumeric (quote numbers and booleans in YAML)")
    annotations = v.mapping("metadata.annotations", meta.get("annotations"))
    for key, val in (annotations or {}).items():
        if not is_qualified_name(key):
            v.add("metadata.annotations", f"invalid annotation key {_show(key)}: must be [prefix/]name")
        if not isinstance(val, str):
            v.add(f"metadata.annotations[{key}]", f"annotation values must be strings, got {_show(val)}")
    total = sum(len(str(key).encode()) + len(val.encode()) for key, val in (annotations or {}).items()
                if isinstance(val, str))
    if total > MAX_ANNOTATIONS_BYTES:
        v.add("metadata.annotations", f"Too long: all annotations together are {total} bytes, "
              f"must have at most {MAX_ANNOTATIONS_BYTES} bytes")


class _PodContext:
    """What container validation needs to know about the rest of the pod."""

    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.volume_kinds: dict[str, str | None] = {}  # name -> source key
        self.container_names: set[str] = set()
        for key in ("initContainers", "containers"):
            for c in _list(spec.get(key)):
                if isinstance(c, dict) and isinstance(c.get("name"), str):
                    self.container_names.add(c["name"])
        self.host_network = spec.get("hostNetwork") is True
        self.host_ports: dict[tuple[int, str, str], str] = {}
        grace = spec.get("terminationGracePeriodSeconds", 30)
        self.grace_period: int | None = grace if _is_int(grace) else None


def _validate_spec(v: _Collector, spec: dict) -> None:
    ctx = _PodContext(spec)
    _validate_volumes(v, spec.get("volumes"), ctx)

    containers = v.sequence("spec.containers", spec.get("containers"))
    if not containers:
        if spec.get("containers") is None or containers == []:
            v.add("spec.containers", "Required value: a pod needs at least one container")
    init_containers = v.sequence("spec.initContainers", spec.get("initContainers"))

    seen_names: dict[str, str] = {}
    for key, items in (("initContainers", init_containers), ("containers", containers)):
        for i, container in enumerate(items or []):
            path = f"spec.{key}[{i}]"
            if not isinstance(container, dict):
                v.add(path, f"a container must be a mapping, got {_show(container)}")
                continue
            name = container.get("name")
            if isinstance(name, str) and name in seen_names:
                v.add(f"{path}.name", f"duplicate container name {name!r} (also {seen_names[name]})")
            elif isinstance(name, str):
                seen_names[name] = path
            _validate_container(v, path, container, ctx, init=(key == "initContainers"))

    v.choice("spec.restartPolicy", spec.get("restartPolicy"), RESTART_POLICIES)
    grace = spec.get("terminationGracePeriodSeconds")
    v.integer("spec.terminationGracePeriodSeconds", grace, minimum=0)
    v.integer("spec.activeDeadlineSeconds", spec.get("activeDeadlineSeconds"), minimum=1)
    dns_policy = spec.get("dnsPolicy")
    v.choice("spec.dnsPolicy", dns_policy, DNS_POLICIES)
    if dns_policy == "None" and not isinstance(spec.get("dnsConfig"), dict):
        v.add("spec.dnsConfig", "Required value: dnsPolicy 'None' needs a dnsConfig")
    for flag in ("hostNetwork", "hostPID", "hostIPC", "shareProcessNamespace", "enableServiceLinks",
                 "automountServiceAccountToken", "setHostnameAsFQDN"):
        v.boolean(f"spec.{flag}", spec.get(flag))
    if spec.get("shareProcessNamespace") is True and spec.get("hostPID") is True:
        v.add("spec.shareProcessNamespace", "may not be true when hostPID is true")
    for field in ("nodeName", "serviceAccountName", "serviceAccount"):
        value = spec.get(field)
        if value not in (None, "") and not is_dns1123_subdomain(value):
            v.add(f"spec.{field}", f"invalid value {_show(value)}: must be a lowercase RFC 1123 subdomain")
    for field in ("hostname", "subdomain"):
        value = spec.get(field)
        if value not in (None, "") and not is_dns1123_label(value):
            v.add(f"spec.{field}", f"invalid value {_show(value)}: must be a lowercase RFC 1123 label")
    v.string("spec.priorityClassName", spec.get("priorityClassName"))
    v.string("spec.schedulerName", spec.get("schedulerName"))
    v.integer("spec.priority", spec.get("priority"), minimum=INT32_MIN, maximum=INT32_MAX)
    for i, ref in enumerate(v.sequence("spec.imagePullSecrets", spec.get("imagePullSecrets")) or []):
        name = ref.get("name") if isinstance(ref, dict) else None
        if not isinstance(ref, dict) or not is_dns1123_subdomain(name):
            v.add(f"spec.imagePullSecrets[{i}].name",
                  f"invalid value {_show(name if isinstance(ref, dict) else ref)}: must be a Secret name")
    selector = v.mapping("spec.nodeSelector", spec.get("nodeSelector"))
    for key, val in (selector or {}).items():
        if not is_qualified_name(key) or not is_label_value(val):
            v.add(f"spec.nodeSelector[{key}]", f"invalid node selector {_show(key)}: {_show(val)}")
    sc = v.mapping("spec.securityContext", spec.get("securityContext"))
    if sc is not None:
        for field in ("runAsUser", "runAsGroup", "fsGroup"):
            v.integer(f"spec.securityContext.{field}", sc.get(field), minimum=0, maximum=MAX_ID)
        v.boolean("spec.securityContext.runAsNonRoot", sc.get("runAsNonRoot"))
        groups = v.sequence("spec.securityContext.supplementalGroups", sc.get("supplementalGroups"))
        for i, gid in enumerate(groups or []):
            v.integer(f"spec.securityContext.supplementalGroups[{i}]", gid, minimum=0, maximum=MAX_ID,
                      required=True)


def _validate_volumes(v: _Collector, value: object, ctx: _PodContext) -> None:
    volumes = v.sequence("spec.volumes", value)
    for i, volume in enumerate(volumes or []):
        path = f"spec.volumes[{i}]"
        if not isinstance(volume, dict):
            v.add(path, f"a volume must be a mapping, got {_show(volume)}")
            continue
        name = volume.get("name")
        if name is None or name == "":
            v.add(f"{path}.name", "Required value: a volume needs a name")
        elif not is_dns1123_label(name):
            v.add(f"{path}.name", f"invalid volume name {_show(name)}: must be a lowercase RFC 1123 label")
        elif name in ctx.volume_kinds:
            v.add(f"{path}.name", f"duplicate volume name {name!r}")
        sources = [k for k in KNOWN_VOLUME_SOURCES if volume.get(k) is not None]
        if isinstance(name, str) and name not in ctx.volume_kinds:
            ctx.volume_kinds[name] = sources[0] if len(sources) == 1 else None
        if not sources:
            v.add(path, "must specify a volume type (emptyDir, hostPath, configMap, secret, downwardAPI or projected)")
            continue
        if len(sources) > 1:
            v.add(path, f"may not specify more than 1 volume type, found {', '.join(sources)}")
            continue
        source = sources[0]
        if source not in SUPPORTED_VOLUME_SOURCES:
            v.add(f"{path}.{source}", f"unsupported volume type {source!r}: this node supports "
                  f"{', '.join(SUPPORTED_VOLUME_SOURCES)}")
            continue
        body = v.mapping(f"{path}.{source}", volume[source])
        if body is None:
            continue
        spath = f"{path}.{source}"
        if source == "emptyDir":
            v.choice(f"{spath}.medium", body.get("medium"), EMPTY_DIR_MEDIA)
            _validate_quantity(v, f"{spath}.sizeLimit", body.get("sizeLimit"))
        elif source == "hostPath":
            host_path = body.get("path")
            if host_path is None or host_path == "":
                v.add(f"{spath}.path", "Required value: a hostPath volume needs a path")
            elif not isinstance(host_path, str) or not host_path.startswith("/"):
                v.add(f"{spath}.path", f"invalid path {_show(host_path)}: must be an absolute path")
            elif _has_backsteps(host_path):
                v.add(f"{spath}.path", f"invalid path {host_path!r}: must not contain '..'")
            v.choice(f"{spath}.type", body.get("type"), HOST_PATH_TYPES)
        elif source in ("configMap", "secret"):
            _validate_object_projection(v, spath, body, source, top_level=True)
        elif source == "downwardAPI":
            v.integer(f"{spath}.defaultMode", body.get("defaultMode"), minimum=0, maximum=0o777)
            _validate_downward_items(v, spath, body, ctx)
        elif source == "projected":
            _validate_projected(v, spath, body, ctx)


def _validate_key_to_path_items(v: _Collector, path: str, body: dict) -> list[str]:
    paths: list[str] = []
    items = v.sequence(f"{path}.items", body.get("items"))
    for j, item in enumerate(items or []):
        ipath = f"{path}.items[{j}]"
        if not isinstance(item, dict):
            v.add(ipath, f"must be a mapping, got {_show(item)}")
            continue
        key = item.get("key")
        if not is_config_key(key):
            v.add(f"{ipath}.key", f"invalid key {_show(key)}: must consist of alphanumerics, '-', '_' or '.'")
        rel = _validate_relative_path(v, f"{ipath}.path", item.get("path"), required=True)
        if rel:
            paths.append(rel)
        v.integer(f"{ipath}.mode", item.get("mode"), minimum=0, maximum=0o777)
    return paths


def _validate_relative_path(v: _Collector, field: str, value: object, *, required: bool) -> str | None:
    if value is None or value == "":
        if required:
            v.add(field, "Required value")
        return None
    if not isinstance(value, str):
        v.add(field, f"must be a string, got {_show(value)}")
        return None
    if value.startswith("/"):
        v.add(field, f"invalid path {value!r}: must be a relative path")
        return None
    if _has_backsteps(value):
        v.add(field, f"invalid path {value!r}: must not contain '..'")
        return None
    if value.startswith(".."):
        v.add(field, f"invalid path {value!r}: must not start with '..'")
        return None
    return value


def _validate_object_projection(v: _Collector, path: str, body: dict, source: str, *, top_level: bool) -> list[str]:
    name_field = "secretName" if (source == "secret" and top_level) else "name"
    name = body.get(name_field)
    if name is None or name == "":
        v.add(f"{path}.{name_field}", f"Required value: the {source} to project")
    elif not is_dns1123_subdomain(name):
        v.add(f"{path}.{name_field}", f"invalid {source} name {_show(name)}: must be a lowercase RFC 1123 subdomain")
    if top_level:
        v.integer(f"{path}.defaultMode", body.get("defaultMode"), minimum=0, maximum=0o777)
    v.boolean(f"{path}.optional", body.get("optional"))
    return _validate_key_to_path_items(v, path, body)


def _validate_downward_items(v: _Collector, path: str, body: dict, ctx: _PodContext) -> list[str]:
    paths: list[str] = []
    items = v.sequence(f"{path}.items", body.get("items"))
    for j, item in enumerate(items or []):
        ipath = f"{path}.items[{j}]"
        if not isinstance(item, dict):
            v.add(ipath, f"must be a mapping, got {_show(item)}")
            continue
        rel = _validate_relative_path(v, f"{ipath}.path", item.get("path"), required=True)
        if rel:
            paths.append(rel)
        v.integer(f"{ipath}.mode", item.get("mode"), minimum=0, maximum=0o777)
        refs = [k for k in ("fieldRef", "resourceFieldRef") if item.get(k) is not None]
        if len(refs) != 1:
            v.add(ipath, "must specify exactly one of fieldRef or resourceFieldRef")
            continue
        if refs[0] == "fieldRef":
            _validate_field_ref(v, f"{ipath}.fieldRef", item["fieldRef"], VOLUME_FIELD_PATHS)
        else:
            _validate_resource_field_ref(v, f"{ipath}.resourceFieldRef", item["resourceFieldRef"], ctx, None)
    return paths


def _validate_projected(v: _Collector, path: str, body: dict, ctx: _PodContext) -> None:
    v.integer(f"{path}.defaultMode", body.get("defaultMode"), minimum=0, maximum=0o777)
    sources = v.sequence(f"{path}.sources", body.get("sources"))
    all_paths: set[str] = set()
    for k, src in enumerate(sources or []):
        spath = f"{path}.sources[{k}]"
        if not isinstance(src, dict):
            v.add(spath, f"must be a mapping, got {_show(src)}")
            continue
        kinds = [x for x in ("configMap", "secret", "downwardAPI", "serviceAccountToken", "clusterTrustBundle")
                 if src.get(x) is not None]
        if len(kinds) != 1:
            v.add(spath, "must specify exactly one of configMap, secret, downwardAPI, serviceAccountToken "
                  "or clusterTrustBundle")
            continue
        kind = kinds[0]
        inner = v.mapping(f"{spath}.{kind}", src[kind])
        if inner is None:
            continue
        ipath = f"{spath}.{kind}"
        if kind in ("configMap", "secret"):
            paths = _validate_object_projection(v, ipath, inner, kind, top_level=False)
        elif kind == "downwardAPI":
            paths = _validate_downward_items(v, ipath, inner, ctx)
        else:
            rel = _validate_relative_path(v, f"{ipath}.path", inner.get("path"), required=True)
            paths = [rel] if rel else []
            if kind == "serviceAccountToken":
                v.integer(f"{ipath}.expirationSeconds", inner.get("expirationSeconds"), minimum=600)
        for p in paths:
            if p in all_paths:
                v.add(spath, f"conflicting duplicate path {p!r}")
            all_paths.add(p)


def _validate_quantity(v: _Collector, field: str, value: object) -> Decimal | None:
    if value is None:
        return None
    try:
        amount = parse_quantity(value)
    except QuantityError as exc:
        v.add(field, str(exc))
        return None
    if amount < 0:
        v.add(field, f"invalid quantity {value!r}: must be greater than or equal to 0")
        return None
    return amount


def _validate_field_ref(v: _Collector, path: str, value: object, allowed: tuple[str, ...]) -> None:
    ref = v.mapping(path, value)
    if ref is None:
        return
    api_version = ref.get("apiVersion")
    if api_version not in (None, "", "v1"):
        v.add(f"{path}.apiVersion", f"unsupported apiVersion {_show(api_version)}: expected 'v1'")
    field_path = ref.get("fieldPath")
    if field_path is None or field_path == "":
        v.add(f"{path}.fieldPath", "Required value")
        return
    if not isinstance(field_path, str):
        v.add(f"{path}.fieldPath", f"must be a string, got {_show(field_path)}")
        return
    sub = _SUBSCRIPTED_FIELD.match(field_path)
    if sub is not None:
        if not is_qualified_name(sub.group(2)):
            v.add(f"{path}.fieldPath", f"invalid key {sub.group(2)!r} in {field_path!r}")
        return
    if field_path not in allowed:
        subscripted = "metadata.labels['<KEY>'], metadata.annotations['<KEY>']"
        v.add(
            f"{path}.fieldPath",
            f"unsupported fieldPath {field_path!r}: supported values are {', '.join(allowed)}, {subscripted}",
        )


def _validate_resource_field_ref(
    v: _Collector, path: str, value: object, ctx: _PodContext, own_container: str | None
) -> None:
    ref = v.mapping(path, value)
    if ref is None:
        return
    container_name = ref.get("containerName")
    if container_name in (None, ""):
        if own_container is None:  # volumes have no implicit container
            v.add(f"{path}.containerName", "Required value: the container whose resources to expose")
    elif not isinstance(container_name, str) or container_name not in ctx.container_names:
        v.add(f"{path}.containerName", f"no container named {_show(container_name)} in this pod")
    resource = ref.get("resource")
    if resource is None or resource == "":
        v.add(f"{path}.resource", "Required value")
        return
    hugepages = isinstance(resource, str) and re.match(r"^(limits|requests)\.hugepages-", resource)
    if resource not in RESOURCE_FIELD_REFS and not hugepages:
        v.add(f"{path}.resource", f"unsupported resource {_show(resource)}: must be one of {', '.join(RESOURCE_FIELD_REFS)}")
        return
    divisor = ref.get("divisor")
    if divisor is None:
        return
    try:
        amount = parse_quantity(divisor)
    except QuantityError as exc:
        v.add(f"{path}.divisor", str(exc))
        return
    if resource.endswith(".cpu"):
        if amount not in _CPU_DIVISORS:
            v.add(f"{path}.divisor", f"invalid divisor {divisor!r} for {resource}: only '1m' and '1' are supported")
    elif amount not in _BYTE_DIVISORS:
        v.add(f"{path}.divisor", f"invalid divisor {divisor!r} for {resource}: only 1, 1k, 1M, 1G, 1T, 1P, 1E, "
              "1Ki, 1Mi, 1Gi, 1Ti, 1Pi and 1Ei are supported")


def _validate_container(v: _Collector, path: str, c: dict, ctx: _PodContext, *, init: bool) -> None:
    name = c.get("name")
    if name is None or name == "":
        v.add(f"{path}.name", "Required value: a container needs a name")
    elif not is_dns1123_label(name):
        v.add(f"{path}.name", f"invalid container name {_show(name)}: must be a lowercase RFC 1123 label "
              "(lowercase letters, digits and '-', at most 63 characters)")

    image = c.get("image")
    if image is None or image == "":
        v.add(f"{path}.image", "Required value: a container needs an image")
    elif not isinstance(image, str):
        v.add(f"{path}.image", f"invalid image {_show(image)}: must be a string")
    elif _parse_image_ref is not None:
        try:
            _parse_image_ref(image)
        except _InvalidImageName as exc:
            v.add(f"{path}.image", str(exc))
    v.choice(f"{path}.imagePullPolicy", c.get("imagePullPolicy"), PULL_POLICIES)

    v.string_list(f"{path}.command", c.get("command"))
    v.string_list(f"{path}.args", c.get("args"))
    v.string(f"{path}.workingDir", c.get("workingDir"))
    for flag in ("tty", "stdin", "stdinOnce"):
        v.boolean(f"{path}.{flag}", c.get(flag))
    v.choice(f"{path}.terminationMessagePolicy", c.get("terminationMessagePolicy"), TERMINATION_MESSAGE_POLICIES)
    v.string(f"{path}.terminationMessagePath", c.get("terminationMessagePath"))

    restart_policy = c.get("restartPolicy")
    sidecar = init and restart_policy == "Always"
    if restart_policy is not None:
        if not init:
            v.add(f"{path}.restartPolicy", f"invalid value {_show(restart_policy)}: may not be set for app "
                  "containers (only init containers may set restartPolicy 'Always')")
        elif restart_policy != "Always":
            v.add(f"{path}.restartPolicy", f"unsupported value {_show(restart_policy)}: an init container "
                  "may only set restartPolicy 'Always' (a sidecar)")

    _validate_ports(v, path, c.get("ports"), ctx)
    _validate_env(v, path, c, ctx)
    _validate_resources(v, path, c.get("resources"))
    privileged = isinstance(c.get("securityContext"), dict) and c["securityContext"].get("privileged") is True
    _validate_mounts(v, path, c.get("volumeMounts"), ctx, privileged=privileged)

    for probe_name in ("livenessProbe", "readinessProbe", "startupProbe"):
        probe = c.get(probe_name)
        if probe is None:
            continue
        if init and not sidecar:
            v.add(f"{path}.{probe_name}", "may not be set for init containers (only for sidecars)")
            continue
        _validate_probe(v, f"{path}.{probe_name}", probe, readiness=probe_name == "readinessProbe")
    lifecycle = v.mapping(f"{path}.lifecycle", c.get("lifecycle"))
    if lifecycle is not None:
        if init and not sidecar:
            v.add(f"{path}.lifecycle", "may not be set for init containers (only for sidecars)")
        else:
            for hook in ("postStart", "preStop"):
                if lifecycle.get(hook) is not None:
                    _validate_lifecycle_handler(v, f"{path}.lifecycle.{hook}", lifecycle[hook], ctx)
            v.string(f"{path}.lifecycle.stopSignal", lifecycle.get("stopSignal"))

    sc = v.mapping(f"{path}.securityContext", c.get("securityContext"))
    if sc is not None:
        for field in ("runAsUser", "runAsGroup"):
            v.integer(f"{path}.securityContext.{field}", sc.get(field), minimum=0, maximum=MAX_ID)
        for field in ("privileged", "allowPrivilegeEscalation", "readOnlyRootFilesystem", "runAsNonRoot"):
            v.boolean(f"{path}.securityContext.{field}", sc.get(field))
        caps = v.mapping(f"{path}.securityContext.capabilities", sc.get("capabilities"))
        if caps is not None:
            v.string_list(f"{path}.securityContext.capabilities.add", caps.get("add"))
            v.string_list(f"{path}.securityContext.capabilities.drop", caps.get("drop"))


def _validate_ports(v: _Collector, path: str, value: object, ctx: _PodContext) -> None:
    ports = v.sequence(f"{path}.ports", value)
    names: set[str] = set()
    for j, port in enumerate(ports or []):
        ppath = f"{path}.ports[{j}]"
        if not isinstance(port, dict):
            v.add(ppath, f"a port must be a mapping, got {_show(port)}")
            continue
        container_port = port.get("containerPort")
        if container_port is None:
            v.add(f"{ppath}.containerPort", "Required value")
        elif not _is_int(container_port) or not 1 <= container_port <= 65535:
            v.add(f"{ppath}.containerPort", f"invalid port {_show(container_port)}: must be between 1 and 65535")
        host_port = port.get("hostPort")
        if host_port is not None and (not _is_int(host_port) or not 0 <= host_port <= 65535):
            v.add(f"{ppath}.hostPort", f"invalid port {_show(host_port)}: must be between 1 and 65535")
            host_port = None
        protocol = port.get("protocol", "TCP")
        v.choice(f"{ppath}.protocol", protocol, PROTOCOLS)
        name = port.get("name")
        if name is not None:
            if not is_iana_svc_name(name):
                v.add(f"{ppath}.name", f"invalid port name {_show(name)}: at most 15 lowercase letters, digits "
                      "and '-', with at least one letter")
            elif name in names:
                v.add(f"{ppath}.name", f"duplicate port name {name!r}")
            else:
                names.add(name)
        host_ip = port.get("hostIP")
        if host_ip not in (None, ""):
            try:
                ipaddress.ip_address(host_ip)
            except (ValueError, TypeError):
                v.add(f"{ppath}.hostIP", f"invalid IP address {_show(host_ip)}")
                host_ip = None
        if ctx.host_network and host_port and _is_int(container_port) and host_port != container_port:
            v.add(f"{ppath}.hostPort", f"invalid value {host_port!r}: must match containerPort "
                  f"{container_port} when hostNetwork is true")
        if host_port and isinstance(protocol, str):
            key = (host_port, protocol, host_ip or "")
            if key in ctx.host_ports:
                v.add(f"{ppath}.hostPort", f"duplicate value '{host_port}/{protocol}' (also {ctx.host_ports[key]})")
            else:
                ctx.host_ports[key] = ppath


def _validate_env(v: _Collector, path: str, c: dict, ctx: _PodContext) -> None:
    env = v.sequence(f"{path}.env", c.get("env"))
    for j, var in enumerate(env or []):
        epath = f"{path}.env[{j}]"
        if not isinstance(var, dict):
            v.add(epath, f"an env entry must be a mapping, got {_show(var)}")
            continue
        name = var.get("name")
        if name is None or name == "":
            v.add(f"{epath}.name", "Required value")
        elif not is_env_var_name(name):
            v.add(f"{epath}.name", f"invalid environment variable name {_show(name)}: must be printable "
                  "ASCII characters other than '='")
        value = var.get("value")
        v.string(f"{epath}.value", value)
        value_from = var.get("valueFrom")
        if value_from is None:
            continue
        src = v.mapping(f"{epath}.valueFrom", value_from)
        if src is None:
            continue
        if value not in (None, ""):
            v.add(f"{epath}.valueFrom", "may not be specified when `value` is not empty")
        kinds = [k for k in ("fieldRef", "resourceFieldRef", "configMapKeyRef", "secretKeyRef") if src.get(k) is not None]
        if not kinds:
            v.add(f"{epath}.valueFrom", "must specify one of: fieldRef, resourceFieldRef, configMapKeyRef or secretKeyRef")
            continue
        if len(kinds) > 1:
            v.add(f"{epath}.valueFrom", f"may not have more than one field specified at a time, found {', '.join(kinds)}")
            continue
        kind = kinds[0]
        kpath = f"{epath}.valueFrom.{kind}"
        if kind == "fieldRef":
            _validate_field_ref(v, kpath, src[kind], ENV_FIELD_PATHS)
        elif kind == "resourceFieldRef":
            _validate_resource_field_ref(v, kpath, src[kind], ctx, c.get("name") or "")
        else:
            ref = v.mapping(kpath, src[kind])
            if ref is None:
                continue
            ref_name = ref.get("name")
            if ref_name is None or ref_name == "":
                v.add(f"{kpath}.name", "Required value")
            elif not is_dns1123_subdomain(ref_name):
                v.add(f"{kpath}.name", f"invalid name {_show(ref_name)}: must be a lowercase RFC 1123 subdomain")
            key = ref.get("key")
            if key is None or key == "":
                v.add(f"{kpath}.key", "Required value")
            elif not is_config_key(key):
                v.add(f"{kpath}.key", f"invalid key {_show(key)}: must consist of alphanumerics, '-', '_' or '.'")
            v.boolean(f"{kpath}.optional", ref.get("optional"))

    env_from = v.sequence(f"{path}.envFrom", c.get("envFrom"))
    for j, src in enumerate(env_from or []):
        fpath = f"{path}.envFrom[{j}]"
        if not isinstance(src, dict):
            v.add(fpath, f"an envFrom entry must be a mapping, got {_show(src)}")
            continue
        prefix = v.string(f"{fpath}.prefix", src.get("prefix"))
        if prefix and not is_env_var_name(prefix):
            v.add(f"{fpath}.prefix", f"invalid prefix {prefix!r}: must be printable ASCII characters other than '='")
        kinds = [k for k in ("configMapRef", "secretRef") if src.get(k) is not None]
        if len(kinds) != 1:
            v.add(fpath, "must specify exactly one of configMapRef or secretRef")
            continue
        ref = v.mapping(f"{fpath}.{kinds[0]}", src[kinds[0]])
        if ref is None:
            continue
        ref_name = ref.get("name")
        if ref_name is None or ref_name == "":
            v.add(f"{fpath}.{kinds[0]}.name", "Required value")
        elif not is_dns1123_subdomain(ref_name):
            v.add(f"{fpath}.{kinds[0]}.name", f"invalid name {_show(ref_name)}: must be a lowercase RFC 1123 subdomain")
        v.boolean(f"{fpath}.{kinds[0]}.optional", ref.get("optional"))


def _is_valid_resource_name(name: object) -> bool:
    if not isinstance(name, str):
        return False
    if name in NATIVE_RESOURCES or name.startswith("hugepages-"):
        return True
    # Extended resources must be fully qualified (example.com/gpu).
    return "/" in name and is_qualified_name(name)


def _validate_resources(v: _Collector, path: str, value: object) -> None:
    res = v.mapping(f"{path}.resources", value)
    if res is None:
        return
    parsed: dict[str, dict[str, Decimal]] = {"requests": {}, "limits": {}}
    for section in ("requests", "limits"):
        amounts = v.mapping(f"{path}.resources.{section}", res.get(section))
        for name, raw in (amounts or {}).items():
            field = f"{path}.resources.{section}.{name}"
            if not _is_valid_resource_name(name):
                v.add(field, f"unsupported resource name {_show(name)}: must be cpu, memory, ephemeral-storage, "
                      "hugepages-<size> or a fully qualified extended resource (example.com/name)")
                continue
            amount = _validate_quantity(v, field, raw)
            if amount is not None:
                parsed[section][name] = amount
    for name, request in parsed["requests"].items():
        limit = parsed["limits"].get(name)
        if limit is not None and request > limit:
            v.add(
                f"{path}.resources.requests.{name}",
                f"invalid value {res['requests'][name]!r}: must be less than or equal to the {name} limit "
                f"{res['limits'][name]!r}",
            )


def _validate_mounts(v: _Collector, path: str, value: object, ctx: _PodContext, *, privileged: bool) -> None:
    mounts = v.sequence(f"{path}.volumeMounts", value)
    mount_paths: set[str] = set()
    for j, mount in enumerate(mounts or []):
        mpath = f"{path}.volumeMounts[{j}]"
        if not isinstance(mount, dict):
            v.add(mpath, f"a volume mount must be a mapping, got {_show(mount)}")
            continue
        name = mount.get("name")
        if name is None or name == "":
            v.add(f"{mpath}.name", "Required value")
        elif not isinstance(name, str):
            v.add(f"{mpath}.name", f"must be a string, got {_show(name)}")
        elif name not in ctx.volume_kinds:
            v.add(f"{mpath}.name", f"volume {_show(name)} not found: no volume with that name in spec.volumes")
        mount_path = mount.get("mountPath")
        if mount_path is None or mount_path == "":
            v.add(f"{mpath}.mountPath", "Required value")
        elif not isinstance(mount_path, str) or not mount_path.startswith("/"):
            v.add(f"{mpath}.mountPath", f"invalid mount path {_show(mount_path)}: must be an absolute path")
        else:
            normalized = posixpath.normpath(mount_path)
            if normalized in mount_paths:
                v.add(f"{mpath}.mountPath", f"duplicate mount path {mount_path!r}")
            mount_paths.add(normalized)
        v.boolean(f"{mpath}.readOnly", mount.get("readOnly"))
        sub_path = mount.get("subPath")
        sub_path_expr = mount.get("subPathExpr")
        if sub_path not in (None, "") and sub_path_expr not in (None, ""):
            v.add(f"{mpath}.subPathExpr", "subPathExpr and subPath are mutually exclusive")
        _validate_sub_path(v, f"{mpath}.subPath", sub_path)
        _validate_sub_path(v, f"{mpath}.subPathExpr", sub_path_expr)
        propagation = mount.get("mountPropagation")
        v.choice(f"{mpath}.mountPropagation", propagation, MOUNT_PROPAGATIONS)
        if propagation == "Bidirectional" and not privileged:
            v.add(f"{mpath}.mountPropagation", "Bidirectional mount propagation is available only to privileged containers")


def _validate_sub_path(v: _Collector, field: str, value: object) -> None:
    if value is None or value == "":
        return
    if not isinstance(value, str):
        v.add(field, f"must be a string, got {_show(value)}")
    elif value.startswith("/"):
        v.add(field, f"invalid path {value!r}: must be a relative path")
    elif _has_backsteps(value):
        v.add(field, f"invalid path {value!r}: must not contain '..'")


def _validate_port_ref(v: _Collector, field: str, value: object) -> None:
    if value is None:
        v.add(field, "Required value")
    elif _is_int(value):
        if not 1 <= value <= 65535:
            v.add(field, f"invalid port {value!r}: must be between 1 and 65535")
    elif not is_iana_svc_name(value):
        v.add(field, f"invalid port {_show(value)}: must be a number between 1 and 65535 or a port name")


def _validate_handler(v: _Collector, path: str, value: object, kinds: tuple[str, ...]) -> None:
    handler = v.mapping(path, value)
    if handler is None:
        return
    found = [k for k in kinds if handler.get(k) is not None]
    if len(found) != 1:
        v.add(path, f"must specify exactly one handler: {', '.join(kinds)}")
        return
    kind = found[0]
    body = v.mapping(f"{path}.{kind}", handler[kind])
    if body is None:
        return
    if kind == "exec":
        commands = body.get("command")
        if not commands:
            v.add(f"{path}.exec.command", "Required value")
        v.string_list(f"{path}.exec.command", commands)
    elif kind == "httpGet":
        _validate_port_ref(v, f"{path}.httpGet.port", body.get("port"))
        v.choice(f"{path}.httpGet.scheme", body.get("scheme"), ("HTTP", "HTTPS"))
        v.string(f"{path}.httpGet.path", body.get("path"))
        v.string(f"{path}.httpGet.host", body.get("host"))
        headers = v.sequence(f"{path}.httpGet.httpHeaders", body.get("httpHeaders"))
        for j, header in enumerate(headers or []):
            hpath = f"{path}.httpGet.httpHeaders[{j}]"
            if not isinstance(header, dict):
                v.add(hpath, f"a header must be a mapping with name and value, got {_show(header)}")
                continue
            name = header.get("name")
            if not isinstance(name, str) or not _HTTP_HEADER_NAME.match(name):
                v.add(f"{hpath}.name", f"invalid HTTP header name {_show(name)}: must be a token "
                      "(letters, digits and !#$%&'*+-.^_`|~)")
            v.string(f"{hpath}.value", header.get("value"))
    elif kind == "tcpSocket":
        _validate_port_ref(v, f"{path}.tcpSocket.port", body.get("port"))
        v.string(f"{path}.tcpSocket.host", body.get("host"))
    elif kind == "grpc":
        port = body.get("port")
        if not _is_int(port) or not 1 <= port <= 65535:
            v.add(f"{path}.grpc.port", f"invalid port {_show(port)}: must be between 1 and 65535")
        v.string(f"{path}.grpc.service", body.get("service"))
    elif kind == "sleep":
        seconds = body.get("seconds")
        if seconds is None:
            v.add(f"{path}.sleep.seconds", "Required value")
        v.integer(f"{path}.sleep.seconds", seconds, minimum=0)


def _validate_probe(v: _Collector, path: str, value: object, *, readiness: bool) -> None:
    """The API server's rules; defaulting has already turned 0 into the defaults
    (timeoutSeconds 1, periodSeconds 10, successThreshold 1, failureThreshold 3)."""
    probe = v.mapping(path, value)
    if probe is None:
        return
    _validate_handler(v, path, probe, ("exec", "httpGet", "tcpSocket", "grpc"))
    v.integer(f"{path}.initialDelaySeconds", probe.get("initialDelaySeconds"), minimum=0)
    for field in ("timeoutSeconds", "periodSeconds", "successThreshold", "failureThreshold"):
        v.integer(f"{path}.{field}", probe.get(field), minimum=1)
    grace = probe.get("terminationGracePeriodSeconds")
    if readiness and grace is not None:
        v.add(f"{path}.terminationGracePeriodSeconds", "must not be set for readinessProbes")
    else:
        v.integer(f"{path}.terminationGracePeriodSeconds", grace, minimum=1)
    success = probe.get("successThreshold")
    if not readiness and _is_int(success) and success != 1:
        v.add(f"{path}.successThreshold", f"invalid value {success!r}: must be 1 for liveness and startup probes")


def _validate_lifecycle_handler(v: _Collector, path: str, value: object, ctx: "_PodContext") -> None:
    handler = v.mapping(path, value)
    if handler is None:
        return
    if handler.get("tcpSocket") is not None:
        # The API server still accepts it, but kubelet does not run it (the hook
        # would fail on every start): refuse it rather than accept and ignore.
        v.add(f"{path}.tcpSocket", "not supported as a lifecycle handler (kubelet does not run "
              "tcpSocket hooks): use exec, httpGet or sleep")
        return
    _validate_handler(v, path, handler, ("exec", "httpGet", "sleep"))
    sleep = handler.get("sleep")
    grace = ctx.grace_period
    if isinstance(sleep, dict) and _is_int(sleep.get("seconds")) and grace is not None and sleep["seconds"] > grace:
        v.add(f"{path}.sleep.seconds", f"invalid value {sleep['seconds']!r}: must be less than or equal to "
              f"terminationGracePeriodSeconds ({grace})")


# --- defaulting --------------------------------------------------------------------


def default_pull_policy(image: object) -> str:
    """``Always`` when the image's tag is ``latest`` (or there is neither tag nor
    digest), else ``IfNotPresent`` — the API server's rule, unparseable images included."""
    if not isinstance(image, str) or _parse_image_ref is None:
        return "IfNotPresent"
    try:
        ref = _parse_image_ref(image)
    except _InvalidImageName:
        return "IfNotPresent"
    tag = ref.tag if ref.tag is not None or ref.digest is not None else "latest"
    return "Always" if tag == "latest" else "IfNotPresent"


def _default_http_get(handler: object) -> None:
    if isinstance(handler, dict) and isinstance(handler.get("httpGet"), dict):
        handler["httpGet"].setdefault("path", "/")
        handler["httpGet"].setdefault("scheme", "HTTP")


def _default_container(c: dict, host_network: bool) -> None:
    c.setdefault("terminationMessagePath", "/dev/termination-log")
    c.setdefault("terminationMessagePolicy", "File")
    if "imagePullPolicy" not in c and isinstance(c.get("image"), str) and c["image"]:
        c["imagePullPolicy"] = default_pull_policy(c["image"])
    if c.get("resources") is None:
        c["resources"] = {}
    resources = c["resources"]
    if isinstance(resources, dict) and isinstance(resources.get("limits"), dict) and resources["limits"]:
        if resources.get("requests") is None:
            resources["requests"] = {}
        requests = resources["requests"]
        if isinstance(requests, dict):
            for name, limit in resources["limits"].items():
                # Only limits that parse: a bad one is then reported once, at the limit.
                if name not in requests and _parses(limit):
                    requests[name] = copy.deepcopy(limit)
    for port in _list(c.get("ports")):
        if isinstance(port, dict):
            port.setdefault("protocol", "TCP")
            if host_network and "hostPort" not in port and "containerPort" in port:
                port["hostPort"] = port["containerPort"]
    for var in _list(c.get("env")):
        value_from = var.get("valueFrom") if isinstance(var, dict) else None
        ref = value_from.get("fieldRef") if isinstance(value_from, dict) else None
        if isinstance(ref, dict):
            ref.setdefault("apiVersion", "v1")
    for name in ("livenessProbe", "readinessProbe", "startupProbe"):
        probe = c.get(name)
        if isinstance(probe, dict):
            # Like the API server: unset or 0 means the default.
            for field, default in (("timeoutSeconds", 1), ("periodSeconds", 10),
                                   ("successThreshold", 1), ("failureThreshold", 3)):
                if probe.get(field) in (None, 0):
                    probe[field] = default
            _default_http_get(probe)
    lifecycle = c.get("lifecycle")
    if isinstance(lifecycle, dict):
        _default_http_get(lifecycle.get("postStart"))
        _default_http_get(lifecycle.get("preStop"))


def _parses(value: object) -> bool:
    try:
        parse_quantity(value)
    except QuantityError:
        return False
    return True


def _default_downward_items(body: object) -> None:
    if not isinstance(body, dict) or not isinstance(body.get("items"), list):
        return
    for item in body["items"]:
        if isinstance(item, dict) and isinstance(item.get("fieldRef"), dict):
            item["fieldRef"].setdefault("apiVersion", "v1")


def _default_volume(volume: dict) -> None:
    if not any(volume.get(k) is not None for k in KNOWN_VOLUME_SOURCES):
        volume["emptyDir"] = {}  # the API server's default for a volume with no source
    for source in ("configMap", "secret", "downwardAPI", "projected"):
        if isinstance(volume.get(source), dict):
            volume[source].setdefault("defaultMode", DEFAULT_FILE_MODE)
    if isinstance(volume.get("hostPath"), dict):
        volume["hostPath"].setdefault("type", "")
    _default_downward_items(volume.get("downwardAPI"))
    projected = volume.get("projected")
    if isinstance(projected, dict) and isinstance(projected.get("sources"), list):
        for src in projected["sources"]:
            if not isinstance(src, dict):
                continue
            if isinstance(src.get("serviceAccountToken"), dict):
                src["serviceAccountToken"].setdefault("expirationSeconds", DEFAULT_TOKEN_EXPIRATION)
            _default_downward_items(src.get("downwardAPI"))


def apply_defaults(pod: Any) -> Any:
    """A deep copy of ``pod`` with the API server's core/v1 defaults filled in."""
    pod = copy.deepcopy(pod)
    if not isinstance(pod, dict):
        return pod
    meta = pod.get("metadata")
    if isinstance(meta, dict) and not meta.get("namespace"):
        meta["namespace"] = DEFAULT_NAMESPACE
    spec = pod.get("spec")
    if not isinstance(spec, dict):
        return pod
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", DEFAULT_GRACE_PERIOD)
    grace = spec.get("terminationGracePeriodSeconds")
    if isinstance(grace, int) and not isinstance(grace, bool) and grace < 0:
        # The API server treats a negative grace period as 1 second (Kubernetes 1.27+).
        spec["terminationGracePeriodSeconds"] = 1
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("securityContext", {})
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("enableServiceLinks", True)
    host_network = spec.get("hostNetwork") is True
    for key in ("initContainers", "containers"):
        for c in _list(spec.get(key)):
            if isinstance(c, dict):
                _default_container(c, host_network)
    for volume in _list(spec.get("volumes")):
        if isinstance(volume, dict):
            _default_volume(volume)
    return pod


# --- containers, QoS, identity --------------------------------------------------------


def iter_containers(pod: dict) -> Iterator[tuple[str, dict]]:
    """``(kind, container)`` in spec order: init containers ("init", or "sidecar" for
    ``restartPolicy: Always``) first, then app containers ("app")."""
    spec = pod.get("spec") if isinstance(pod, dict) else None
    if not isinstance(spec, dict):
        return
    for c in _list(spec.get("initContainers")):
        if isinstance(c, dict):
            yield ("sidecar" if c.get("restartPolicy") == "Always" else "init"), c
    for c in _list(spec.get("containers")):
        if isinstance(c, dict):
            yield "app", c


def container_kind(pod: dict, name: str) -> str | None:
    for kind, c in iter_containers(pod):
        if c.get("name") == name:
            return kind
    return None


def effective_requests(container: dict) -> dict[str, Decimal]:
    """Requests as the API server stores them: a resource with only a limit requests
    the limit. Unparseable amounts are left out (validation reports them)."""
    res = container.get("resources") if isinstance(container.get("resources"), dict) else {}
    out: dict[str, Decimal] = {}
    for section in ("limits", "requests"):  # requests override the implied ones
        amounts = res.get(section)
        for name, raw in (amounts.items() if isinstance(amounts, dict) else ()):
            try:
                out[name] = parse_quantity(raw)
            except QuantityError:
                out.pop(name, None)
    return out


def container_limits(container: dict) -> dict[str, Decimal]:
    res = container.get("resources") if isinstance(container.get("resources"), dict) else {}
    amounts = res.get("limits")
    out: dict[str, Decimal] = {}
    for name, raw in (amounts.items() if isinstance(amounts, dict) else ()):
        try:
            out[name] = parse_quantity(raw)
        except QuantityError:
            pass
    return out


def qos_class(pod: dict) -> str:
    """Kubernetes' QoS class (Guaranteed, Burstable, BestEffort) over app and init
    containers, counting only cpu and memory and ignoring zero amounts."""
    requests: dict[str, Decimal] = {}
    limits: dict[str, Decimal] = {}
    guaranteed = True
    for _kind, c in iter_containers(pod):
        for name, amount in effective_requests(c).items():
            if name in QOS_RESOURCES and amount > 0:
                requests[name] = requests.get(name, Decimal(0)) + amount
        found = set()
        for name, amount in container_limits(c).items():
            if name in QOS_RESOURCES and amount > 0:
                found.add(name)
                limits[name] = limits.get(name, Decimal(0)) + amount
        if not found.issuperset(QOS_RESOURCES):
            guaranteed = False
    if not requests and not limits:
        return "BestEffort"
    if guaranteed and all(limits.get(name) == amount for name, amount in requests.items()):
        if len(requests) == len(limits):
            return "Guaranteed"
    return "Burstable"


# Metadata the agent itself stamps on a static pod; excluded from its identity so
# hashing a finished pod again gives the same answer.
_VOLATILE_METADATA = ("uid", "creationTimestamp", "resourceVersion", "generation", "managedFields", "selfLink",
                      "deletionTimestamp", "deletionGracePeriodSeconds")
_VOLATILE_ANNOTATIONS = ("kubernetes.io/config.hash", "kubernetes.io/config.seen", "kubernetes.io/config.source",
                         "kubernetes.io/config.mirror", "nodeagent.io/manifest-file")


def static_pod_uid(pod: dict, node_name: str, source_path: str) -> str:
    """A deterministic uid (32 hex digits) for a pod read from a manifest: the same
    content on the same node from the same file gives the same uid across restarts,
    and any edit gives a new one, so an edited pod replaces the old instance."""
    content = copy.deepcopy(pod) if isinstance(pod, dict) else {"pod": pod}
    content.pop("status", None)
    meta = content.get("metadata")
    if isinstance(meta, dict):
        for key in _VOLATILE_METADATA:
            meta.pop(key, None)
        annotations = meta.get("annotations")
        if isinstance(annotations, dict):
            for key in _VOLATILE_ANNOTATIONS:
                annotations.pop(key, None)
            if not annotations:
                meta.pop("annotations")
    digest = hashlib.sha256()
    digest.update(json.dumps(content, sort_keys=True, separators=(",", ":"), default=str).encode())
    digest.update(b"\0node\0" + node_name.encode())
    digest.update(b"\0source\0" + str(source_path).encode())
    return digest.hexdigest()[:32]
