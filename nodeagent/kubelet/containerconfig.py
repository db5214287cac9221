"""From a pod's container spec to the runtime's ``ContainerConfig``.

This is kubelet's generateContainerConfig: environment (literal values, the downward
API, configMap/secret references), ``$(VAR)`` expansion, command/args semantics,
resource quantities turned into cgroup numbers, volume mounts with subPath, security
context. Anything the spec asks for that cannot be satisfied raises ``ConfigError``;
the kubelet shows it as the container's waiting reason (CreateContainerConfigError)
and retries, exactly like a missing ConfigMap on a real node.
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Protocol

import psutil
import structlog

from nodeagent.kubelet.hashing import container_hash
from nodeagent.api.podspec import (
    DEFAULT_GRACE_PERIOD,
    DEFAULT_NAMESPACE,
    container_limits,
    effective_requests,
    is_env_var_name,
    iter_containers,
    qos_class,
)
from nodeagent.api.quantity import QuantityError, parse_quantity
from runtime.types import ContainerConfig, Mount, Resources

if TYPE_CHECKING:
    from nodeagent.kubelet.security import SecurityPolicy

log = structlog.get_logger(__name__)

# cgroup v1 cpu.shares bounds and CFS constants, as kubelet uses them.
MIN_SHARES = 2
MAX_SHARES = 262144
SHARES_PER_CPU = 1024
CFS_PERIOD_US = 100_000
MIN_QUOTA_US = 1000

GUARANTEED_OOM_SCORE_ADJ = -997
BEST_EFFORT_OOM_SCORE_ADJ = 1000
NODE_CRITICAL_PRIORITY_CLASS = "system-node-critical"

# Volume sources whose content comes from the API: kubelet always mounts them read-only.
READ_ONLY_SOURCES = ("configMap", "secret", "downwardAPI", "projected")


class ConfigError(Exception):
    """The container cannot be configured; ``str(exc)`` says why, ``reason`` is the
    kubelet waiting reason shown in the pod status."""

    def __init__(self, message: str, reason: str = "CreateContainerConfigError") -> None:
        super().__init__(message)
        self.reason = reason


class EnvSources(Protocol):
    """Where configMap/secret data comes from (the API client's cache in cluster mode).

    Both return ``None`` when the object does not exist. Secret values are the decoded
    bytes (or text); ConfigMap values are text (``binaryData`` may add bytes).
    """

    def config_map(self, namespace: str, name: str) -> dict[str, str | bytes] | None: ...

    def secret(self, namespace: str, name: str) -> dict[str, str | bytes] | None: ...


@dataclass(frozen=True)
class NodeResources:
    """Node capacity used where a container has no limit (resourceFieldRef, OOM score)."""

    cpu_millicores: int
    memory_bytes: int
    ephemeral_storage_bytes: int

    @staticmethod
    @functools.cache
    def detect() -> NodeResources:
        try:
            storage = psutil.disk_usage("/").total
        except OSError:
            storage = 0
        return NodeResources(
            cpu_millicores=(psutil.cpu_count() or 1) * 1000,
            memory_bytes=psutil.virtual_memory().total,
            ephemeral_storage_bytes=storage,
        )


# --- $(VAR) expansion ----------------------------------------------------------------


def expand(text: str, lookup: Mapping[str, str] | Callable[[str], str | None]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: ``$(NAME)`` becomes the value when NAME is
    known and stays verbatim otherwise, ``$$`` is a literal ``$``, and any other ``$``
    (including an unterminated ``$(``) is kept as written."""
    get = lookup.get if isinstance(lookup, Mapping) else lookup
    out: list[str] = []
    checkpoint = 0
    i = 0
    n = len(text)
    while i < n:
        if text[i] == "$" and i + 1 < n:
            out.append(text[checkpoint:i])
            nxt = text[i + 1]
            if nxt == "$":
                out.append("$")
                i += 1
            elif nxt == "(":
                close = text.find(")", i + 2)
                if close == -1:
                    out.append("$(")
                    i += 1
                else:
                    name = text[i + 2 : close]
                    value = get(name)
                    out.append(value if value is not None else f"$({name})")
                    i = close
            else:
                out.append("$" + nxt)
                i += 1
            checkpoint = i + 1
        i += 1
    out.append(text[checkpoint:])
    return "".join(out)


# --- environment -----------------------------------------------------------------------


def _pod_ident(pod: dict) -> tuple[str, str]:
    meta = pod.get("metadata") or {}
    return meta.get("namespace") or DEFAULT_NAMESPACE, meta.get("name", "?")


def _format_map(values: Mapping[str, str]) -> str:
    # The downward API's rendering of all labels/annotations: key="value" lines, sorted.
    return "\n".join(f"{k}={json.dumps(str(v), ensure_ascii=False)}" for k, v in sorted(values.items()))


def pod_field_value(pod: dict, field_path: str, *, pod_ip: str | None, host_ip: str | None, node_name: str) -> str:
    """The value of a downward-API ``fieldRef`` for ``pod``."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    if field_path.startswith("metadata.labels['") or field_path.startswith("metadata.annotations['"):
        section, _, rest = field_path.partition("['")
        if rest.endswith("']"):
            key = rest[:-2]
            values = meta.get(section.split(".", 1)[1]) or {}
            return str(values.get(key, ""))
    simple: dict[str, Callable[[], str]] = {
        "metadata.name": lambda: str(meta.get("name", "")),
        "metadata.namespace": lambda: str(meta.get("namespace") or DEFAULT_NAMESPACE),
        "metadata.uid": lambda: str(meta.get("uid", "")),
        "metadata.labels": lambda: _format_map(meta.get("labels") or {}),
        "metadata.annotations": lambda: _format_map(meta.get("annotations") or {}),
        "spec.nodeName": lambda: str(spec.get("nodeName") or node_name),
        "spec.serviceAccountName": lambda: str(spec.get("serviceAccountName") or ""),
        "status.podIP": lambda: pod_ip or "",
        "status.podIPs": lambda: pod_ip or "",
        "status.hostIP": lambda: host_ip or "",
        "status.hostIPs": lambda: host_ip or "",
    }
    getter = simple.get(field_path)
    if getter is None:
        raise ConfigError(f"unsupported fieldRef fieldPath {field_path!r}")
    return getter()


def _find_container(pod: dict, name: str) -> dict | None:
    return next((c for _kind, c in iter_containers(pod) if c.get("name") == name), None)


def _ceil_div(value: Decimal, divisor: Decimal) -> int:
    return int((value / divisor).to_integral_value(rounding=ROUND_CEILING))


def resource_field_value(pod: dict, ref: dict, default_container: str | None, node: NodeResources) -> str:
    """The value of a ``resourceFieldRef``: a container's request or limit in units of
    ``divisor`` (rounded up); a missing limit reads as the node's capacity."""
    container_name = ref.get("containerName") or default_container
    container = _find_container(pod, container_name) if container_name else None
    if container is None:
        raise ConfigError(f"resourceFieldRef names container {container_name!r}, which is not in the pod")
    resource = str(ref.get("resource", ""))
    section, _, name = resource.partition(".")
    if section not in ("limits", "requests") or not name:
        raise ConfigError(f"unsupported resourceFieldRef resource {resource!r}")
    try:
        divisor = parse_quantity(ref.get("divisor", "1"))
    except QuantityError as exc:
        raise ConfigError(f"resourceFieldRef {resource}: {exc}") from None
    if divisor <= 0:
        raise ConfigError(f"resourceFieldRef {resource}: divisor {ref.get('divisor')!r} must be positive")
    amounts = container_limits(container) if section == "limits" else effective_requests(container)
    amount = amounts.get(name)
    if amount is None or (section == "limits" and amount == 0):
        if section == "limits":
            capacity = {
                "cpu": Decimal(node.cpu_millicores) / 1000,
                "memory": Decimal(node.memory_bytes),
                "ephemeral-storage": Decimal(node.ephemeral_storage_bytes),
            }
            amount = capacity.get(name, Decimal(0))
        else:
            amount = Decimal(0)
    if name == "cpu":
        millis = (amount * 1000).to_integral_value(rounding=ROUND_CEILING)
        return str(_ceil_div(millis, (divisor * 1000).to_integral_value(rounding=ROUND_CEILING) or Decimal(1)))
    return str(_ceil_div(amount.to_integral_value(rounding=ROUND_CEILING), divisor))


def _source_data(
    env_sources: EnvSources | None, kind: str, namespace: str, name: str, optional: bool, where: str
) -> dict[str, str | bytes] | None:
    label = "configMap" if kind == "configMap" else "secret"
    if env_sources is None:
        raise ConfigError(
            f"{where} references {label} {name!r}: configMap and secret references need cluster mode "
            "(this node runs without an API server)"
        )
    data = env_sources.config_map(namespace, name) if kind == "configMap" else env_sources.secret(namespace, name)
    if data is None:
        if optional:
            return None
        # kubelet's wording (what `kubectl describe` shows): configmap "x" not found
        raise ConfigError(f'{where}: {label.lower()} "{name}" not found')
    return data


def _text(value: str | bytes) -> str:
    # Like Go's string(bytes) sent through Docker's JSON API: invalid UTF-8 becomes U+FFFD.
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def make_environment(
    pod: dict,
    container: dict,
    *,
    pod_ip: str | None,
    host_ip: str | None,
    node_name: str,
    env_sources: EnvSources | None = None,
    node: NodeResources | None = None,
    service_env: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The container's environment, in kubelet's order: ``envFrom`` sources first, then
    ``env`` entries (which win), literal values expanded against what came before and
    the Service variables (``servicelinks``), which fill in whatever is left unset."""
    services = dict(service_env or {})
    namespace, pod_name = _pod_ident(pod)
    cname = container.get("name", "?")
    env: dict[str, str] = {}
    for i, src in enumerate(container.get("envFrom") or []):
        kind = "configMap" if src.get("configMapRef") is not None else "secret"
        ref = src.get("configMapRef") if kind == "configMap" else src.get("secretRef")
        ref = ref or {}
        where = f"container {cname!r} envFrom[{i}]"
        data = _source_data(env_sources, kind, namespace, ref.get("name", ""), bool(ref.get("optional")), where)
        prefix = src.get("prefix") or ""
        invalid: list[str] = []
        for key, value in (data or {}).items():
            if kind == "configMap" and isinstance(value, bytes):
                continue  # binaryData: kubelet builds env from a ConfigMap's text data only
            name = prefix + key
            if not is_env_var_name(name):
                invalid.append(key)
                continue
            env[name] = _text(value)
        if invalid:
            # kubelet skips them and records an event; the container still starts.
            log.warning("skipping keys that are not valid environment variable names",
                        pod=f"{namespace}/{pod_name}", container=cname, source=ref.get("name"), keys=sorted(invalid))

    for var in container.get("env") or []:
        name = var["name"]
        value_from = var.get("valueFrom")
        if value_from is None:
            env[name] = expand(var.get("value") or "", {**services, **env} if services else env)
            continue
        where = f"container {cname!r} env {name!r}"
        if value_from.get("fieldRef") is not None:
            field_path = value_from["fieldRef"].get("fieldPath", "")
            try:
                env[name] = pod_field_value(pod, field_path, pod_ip=pod_ip, host_ip=host_ip, node_name=node_name)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        elif value_from.get("resourceFieldRef") is not None:
            try:
                env[name] = resource_field_value(
                    pod, value_from["resourceFieldRef"], cname, node or NodeResources.detect()
                )
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        else:
            kind = "configMap" if value_from.get("configMapKeyRef") is not None else "secret"
            ref = value_from.get("configMapKeyRef") if kind == "configMap" else value_from.get("secretKeyRef")
            ref = ref or {}
            optional = bool(ref.get("optional"))
            ref_name, key = ref.get("name", ""), ref.get("key", "")
            data = _source_data(env_sources, kind, namespace, ref_name, optional, where)
            if data is None:
                continue
            if key not in data or (kind == "configMap" and isinstance(data[key], bytes)):
                if optional:
                    continue
                label = "ConfigMap" if kind == "configMap" else "Secret"
                raise ConfigError(f"{where}: couldn't find key {key!r} in {label} {namespace}/{ref_name}")
            env[name] = _text(data[key])
    return {**services, **env} if services else env


# --- command, resources, mounts --------------------------------------------------------


def command_and_args(container: dict, env: Mapping[str, str]) -> tuple[list[str] | None, list[str] | None]:
    """``(entrypoint, cmd)`` after expansion. ``command`` replaces the image's
    ENTRYPOINT and drops its CMD (``args`` become the new CMD, possibly empty); ``args``
    alone replace only CMD; neither keeps both (``None, None``)."""
    command = [expand(str(x), env) for x in container.get("command") or []]
    args = [expand(str(x), env) for x in container.get("args") or []]
    if command:
        return command, args
    if args:
        return None, args
    return None, None


def milli_cpu_to_shares(millicores: int) -> int:
    if millicores <= 0:
        return MIN_SHARES
    return max(MIN_SHARES, min(MAX_SHARES, millicores * SHARES_PER_CPU // 1000))


def milli_cpu_to_quota(millicores: int, period: int = CFS_PERIOD_US) -> int | None:
    """CFS quota in microseconds per ``period``; ``None`` (unlimited) without a limit."""
    if millicores <= 0:
        return None
    return max(MIN_QUOTA_US, millicores * period // 1000)


def _millis(amount: Decimal | None) -> int:
    if amount is None or amount <= 0:
        return 0
    return int((amount * 1000).to_integral_value(rounding=ROUND_CEILING))


def _bytes(amount: Decimal | None) -> int:
    if amount is None or amount <= 0:
        return 0
    return int(amount.to_integral_value(rounding=ROUND_CEILING))


def oom_score_adj(pod: dict, container: dict, memory_capacity: int) -> int:
    """kubelet's per-container OOM score adjustment: Guaranteed -997, BestEffort 1000,
    Burstable scaled by the memory request's share of the node, within [3, 999]
    (a sidecar never scores above the pod's least-requesting app container)."""
    spec = pod.get("spec") or {}
    if spec.get("priorityClassName") == NODE_CRITICAL_PRIORITY_CLASS:
        return GUARANTEED_OOM_SCORE_ADJ
    qos = qos_class(pod)
    if qos == "Guaranteed":
        return GUARANTEED_OOM_SCORE_ADJ
    if qos == "BestEffort":
        return BEST_EFFORT_OOM_SCORE_ADJ
    capacity = max(1, memory_capacity)
    request = _bytes(effective_requests(container).get("memory"))
    adjust = 1000 - (1000 * request) // capacity
    is_sidecar = any(kind == "sidecar" and c.get("name") == container.get("name") for kind, c in iter_containers(pod))
    if is_sidecar:
        app_requests = [_bytes(effective_requests(c).get("memory")) for kind, c in iter_containers(pod) if kind == "app"]
        if app_requests:
            adjust = min(adjust, 1000 - (1000 * min(app_requests)) // capacity)
    if adjust < 1000 + GUARANTEED_OOM_SCORE_ADJ:
        return 1000 + GUARANTEED_OOM_SCORE_ADJ
    if adjust == BEST_EFFORT_OOM_SCORE_ADJ:
        return adjust - 1
    return adjust


def container_resources(pod: dict, container: dict, *, node_memory: int | None = None) -> Resources:
    """cgroup settings: cpu.shares from the CPU request (a lone limit counts as the
    request), CFS quota from the CPU limit, memory limit, OOM score adjustment."""
    requests = effective_requests(container)
    limits = container_limits(container)
    quota = milli_cpu_to_quota(_millis(limits.get("cpu")))
    memory_limit = _bytes(limits.get("memory"))
    return Resources(
        cpu_shares=milli_cpu_to_shares(_millis(requests.get("cpu"))),
        cpu_quota=quota,
        cpu_period=CFS_PERIOD_US if quota is not None else None,
        memory_limit=memory_limit or None,
        oom_score_adj=oom_score_adj(
            pod, container, node_memory if node_memory is not None else NodeResources.detect().memory_bytes
        ),
    )


def prepare_sub_path(volume_root: str | os.PathLike, sub_path: str, *, where: str) -> str:
    """The host path for ``subPath`` inside a volume, created as a directory (with the
    volume root's mode) when missing. Escapes — ``..``, absolute paths, symlinks that
    lead outside the volume — raise ConfigError. Returns the resolved path so the
    bind mount uses exactly the location that was checked."""
    if sub_path.startswith("/"):
        raise ConfigError(f"{where}: subPath {sub_path!r} must be a relative path")
    if ".." in sub_path.split("/"):
        raise ConfigError(f"{where}: subPath {sub_path!r} must not contain '..'")
    root = Path(os.path.realpath(volume_root))
    if not root.is_dir():
        raise ConfigError(f"{where}: subPath {sub_path!r} needs a directory volume, but {root} is not a directory")
    target = root / posixpath.normpath(sub_path)

    def inside(path: Path) -> bool:
        resolved = Path(os.path.realpath(path))
        return resolved == root or root in resolved.parents

    if not inside(target):
        raise ConfigError(f"{where}: subPath {sub_path!r} resolves outside its volume (through a symlink)")
    if not os.path.lexists(target):
        mode = root.stat().st_mode & 0o7777
        try:
            # Each created component is checked again: a symlink planted between the
            # check and the mkdir must not lead outside the volume.
            current = root
            for part in Path(posixpath.normpath(sub_path)).parts:
                current = current / part
                if not os.path.lexists(current):
                    current.mkdir()
                    os.chmod(current, mode)
                if not inside(current):
                    raise ConfigError(f"{where}: subPath {sub_path!r} resolves outside its volume (through a symlink)")
        except OSError as exc:
            raise ConfigError(f"{where}: cannot create subPath {sub_path!r} in {root}: {exc.strerror}") from None
    resolved = os.path.realpath(target)
    if not inside(Path(resolved)):
        raise ConfigError(f"{where}: subPath {sub_path!r} resolves outside its volume (through a symlink)")
    return resolved


def container_mounts(
    pod: dict, container: dict, volume_paths: Mapping[str, str | os.PathLike], env: Mapping[str, str]
) -> list[Mount]:
    spec = pod.get("spec") or {}
    sources = {
        v.get("name"): next((k for k in READ_ONLY_SOURCES if v.get(k) is not None), None)
        for v in spec.get("volumes") or []
        if isinstance(v, dict)
    }
    cname = container.get("name", "?")
    mounts: list[Mount] = []
    for i, m in enumerate(container.get("volumeMounts") or []):
        name = m.get("name")
        where = f"container {cname!r} volumeMounts[{i}] ({name})"
        host_path = volume_paths.get(name)
        if host_path is None:
            raise ConfigError(f"{where}: volume {name!r} is not set up on this node")
        sub_path = m.get("subPath") or ""
        if not sub_path and m.get("subPathExpr"):
            sub_path = expand(m["subPathExpr"], env)
            if sub_path.startswith("/") or ".." in sub_path.split("/"):
                raise ConfigError(f"{where}: subPathExpr {m['subPathExpr']!r} expands to {sub_path!r}, "
                                  "which is absolute or contains '..'")
        host = prepare_sub_path(host_path, sub_path, where=where) if sub_path else os.fspath(host_path)
        read_only = bool(m.get("readOnly")) or sources.get(name) is not None
        mounts.append(Mount(host_path=host, container_path=m["mountPath"], read_only=read_only))
    return mounts


# --- the whole config ------------------------------------------------------------------


def build_container_config(
    pod: dict,
    container: dict,
    *,
    kind: str,
    attempt: int,
    pod_ip: str | None,
    host_ip: str | None,
    node_name: str,
    volume_paths: Mapping[str, str | os.PathLike],
    env_sources: EnvSources | None = None,
    node: NodeResources | None = None,
    service_env: Mapping[str, str] | None = None,
    security_policy: "SecurityPolicy | None" = None,
) -> ContainerConfig:
    """Everything the runtime needs to create ``container`` of ``pod``.

    ``node`` defaults to this machine's capacity (psutil); pass one to pin the
    numbers (tests, or allocatable instead of capacity)."""
    node = node or NodeResources.detect()
    namespace, pod_name = _pod_ident(pod)
    cname = container.get("name", "?")
    spec = pod.get("spec") or {}
    env = make_environment(
        pod, container, pod_ip=pod_ip, host_ip=host_ip, node_name=node_name, env_sources=env_sources, node=node,
        service_env=service_env,
    )
    entrypoint, cmd = command_and_args(container, env)
    mounts = container_mounts(pod, container, volume_paths, env)

    # Local import: security.py builds on this module's ConfigError.
    from nodeagent.kubelet.security import container_security

    security = container_security(pod, container, security_policy)

    lifecycle = container.get("lifecycle") or {}
    stop_signal = lifecycle.get("stopSignal") if isinstance(lifecycle.get("stopSignal"), str) else None
    grace = spec.get("terminationGracePeriodSeconds")
    return ContainerConfig(
        name=cname,
        image=container.get("image", ""),
        attempt=attempt,
        entrypoint=entrypoint,
        cmd=cmd,
        env=env,
        working_dir=container.get("workingDir") or None,
        mounts=mounts,
        resources=container_resources(pod, container, node_memory=node.memory_bytes),
        spec_hash=container_hash(container),
        stop_signal=stop_signal,
        termination_grace_period=int(grace) if grace is not None else DEFAULT_GRACE_PERIOD,
        tty=bool(container.get("tty")),
        stdin=bool(container.get("stdin")),
        stdin_once=bool(container.get("stdinOnce")),
        privileged=security.privileged,
        run_as_user=security.run_as_user,
        run_as_group=security.run_as_group,
        run_as_non_root=security.run_as_non_root,
        supplemental_groups=security.supplemental_groups,
        cap_add=security.cap_add,
        cap_drop=security.cap_drop,
        read_only_rootfs=security.read_only_rootfs,
        no_new_privileges=security.no_new_privileges,
        seccomp=security.seccomp,
        unmasked_proc=security.unmasked_proc,
        labels={},
        kind=kind,
    )
