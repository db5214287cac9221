"""Agent settings: defaults, then the YAML config file, then command-line flags."""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(Exception):
    """A setting is invalid; the message names the file (if any) and the key."""


@dataclass
class Settings:
    node_name: str = field(default_factory=lambda: socket.gethostname().lower())
    manifest_dir: str | None = None
    kubeconfig: str | None = None
    pod_cidr: str = "10.244.0.0/24"
    cluster_cidr: str = "10.244.0.0/16"
    service_cidr: str = "10.96.0.0/12"
    status_address: str = "127.0.0.1:10255"
    root_dir: str = "/var/lib/nodeagent"
    bridge_name: str = "nabr0"
    pod_infra_image: str = "nodeagent/pause:1"
    docker_url: str | None = None
    # kubelet's crash-loop back-off; tests shorten the base.
    backoff_base: float = 10.0
    backoff_cap: float = 300.0
    runtime_call_timeout: float = 30.0
    image_pull_timeout: float = 300.0
    # Registry credentials for every pull (a Docker config.json: {"auths": {...}});
    # the only credentials a standalone node has (no Secrets without an API server).
    image_credential_file: str | None = None
    # kubelet's maxParallelImagePulls; 1 is its default (serializeImagePulls), 0 no limit.
    max_parallel_image_pulls: int = 1
    # Image garbage collection (kubelet's imageGCHighThresholdPercent/Low, imageMinimumGCAge).
    image_gc_high_threshold: int = 85
    image_gc_low_threshold: int = 80
    image_minimum_gc_age: float = 120.0
    image_gc_period: float = 300.0
    # Node-pressure eviction (kubelet's evictionHard, evictionPressureTransitionPeriod).
    eviction_hard: str = ("memory.available<100Mi,nodefs.available<10%,nodefs.inodesFree<5%,"
                          "imagefs.available<15%,imagefs.inodesFree<5%,pid.available<10%")
    eviction_pressure_transition_period: float = 300.0
    eviction_monitoring_interval: float = 10.0
    relist_period: float = 10.0
    manifest_poll_period: float = 1.0
    max_pods: int = 110
    node_ip: str | None = None
    # The service proxy (kube-proxy's job): its own nftables table; tests give each
    # agent a table name of its own.
    proxy: bool = True
    proxy_table: str = "nodeagent"
    # --- cluster mode (--kubeconfig) ---
    # Extra node labels, "key=value,key2=value2" (kubelet's --node-labels).
    node_labels: str = ""
    # kubelet's client limits to the API server.
    kube_api_qps: float = 50.0
    kube_api_burst: int = 100
    # Node status is computed this often and sent when it changed, or at least every
    # node-status-report-period; the Lease is renewed every lease-renew-period.
    node_status_update_period: float = 10.0
    node_status_report_period: float = 300.0
    lease_renew_period: float = 10.0
    lease_duration_seconds: int = 40
    # At start the Node is registered before the pod network comes up (so the network
    # uses the Node's spec.podCIDR); with the API unreachable the network starts after
    # this long with the last known (or configured) pod CIDR, and registration goes on.
    node_registration_wait: float = 10.0
    # --- pod DNS (kubelet's clusterDNS, clusterDomain, resolvConf) ---
    cluster_dns: list[str] = field(default_factory=list)
    cluster_domain: str = "cluster.local"
    resolv_conf: str = "/etc/resolv.conf"
    # --- security contexts ---
    # Localhost seccomp profiles are read from here (default <root-dir>/seccomp).
    seccomp_profile_root: str | None = None
    # kubelet's seccompDefault: RuntimeDefault for containers without a profile.
    seccomp_default: bool = False
    # kubelet's allowedUnsafeSysctls: namespaced sysctls (or prefixes ending in *).
    allowed_unsafe_sysctls: list[str] = field(default_factory=list)
    # --- container logs (kubelet's containerLogMaxSize / containerLogMaxFiles) ---
    container_log_max_size: str = "10Mi"
    container_log_max_files: int = 5
    # --- certificates (nodeagent/certificate/) ---
    # Renew the client certificate `nodeagent join` wrote through new CSRs (kubelet's
    # rotateCertificates), and request the node API's serving certificate from the
    # kubernetes.io/kubelet-serving signer (kubelet's serverTLSBootstrap).
    rotate_certificates: bool = True
    server_tls_bootstrap: bool = True
    # --- node API (kubelet's HTTPS port: logs, exec, attach, port-forward, stats) ---
    # On in cluster mode; in standalone mode only when client-ca-file is set.
    node_api_address: str = "0.0.0.0:10250"
    # Serving certificate. Unset: on a joined node the kubelet-serving certificate
    # <root-dir>/pki/kubelet-server-current.pem (cert and key in one file, renewed in
    # place and reloaded by the node API), else root-dir/pki/kubelet.crt|key, created
    # self-signed on first start when absent.
    tls_cert_file: str | None = None
    tls_private_key_file: str | None = None
    # CA bundle for client certificates (default: the kubeconfig's cluster CA).
    client_ca_file: str | None = None
    anonymous_auth: bool = False
    # Concurrent exec/attach/port-forward/follow streams, and how long one may idle
    # (kubelet's streaming-connection-idle-timeout, 4h).
    node_api_max_streams: int = 64
    streaming_idle_timeout: float = 14400.0
    # Resource usage (nodeagent/stats/): cgroups are sampled this often; filesystem
    # usage (writable layers, logs, emptyDirs: a directory walk) every stats-fs-interval.
    stats_interval: float = 10.0
    stats_fs_interval: float = 60.0

    @property
    def status_host_port(self) -> tuple[str, int]:
        host, _, port = self.status_address.rpartition(":")
        return host.strip("[]") or "127.0.0.1", int(port)

    @property
    def node_api_host_port(self) -> tuple[str, int]:
        host, _, port = self.node_api_address.rpartition(":")
        return host.strip("[]") or "0.0.0.0", int(port)

    @property
    def state_dir(self) -> Path:
        return Path(self.root_dir)


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def _key(name: str) -> str:
    return name.replace("-", "_")


_LIST_SETTINGS = ("cluster_dns", "allowed_unsafe_sysctls")


def _coerce(name: str, value: Any, origin: str) -> Any:
    if name in _LIST_SETTINGS:
        # A YAML list, or "a,b" as on kubelet's command line.
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ConfigError(f"{origin}: {name.replace('_', '-')}: expected a list of strings, got {value!r}")
    default = _FIELDS[name].default
    kind = type(default) if default is not dataclasses.MISSING and default is not None else str
    if name == "node_name":
        kind = str
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError(f"expected true or false, got {value!r}")
        return kind(value) if value is not None else None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{origin}: {name.replace('_', '-')}: {exc}") from None


def load_config_file(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config file must be a mapping of setting: value")
    out = {}
    for raw_key, value in data.items():
        name = _key(str(raw_key))
        if name not in _FIELDS:
            known = ", ".join(sorted(n.replace("_", "-") for n in _FIELDS))
            raise ConfigError(f"{path}: unknown setting {raw_key!r} (known: {known})")
        out[name] = _coerce(name, value, path)
    return out


def build_settings(config_file: str | None, flags: dict[str, Any]) -> Settings:
    """Defaults < config file < flags (flags given as None are 'not set')."""
    values: dict[str, Any] = {}
    if config_file:
        values.update(load_config_file(config_file))
    for name, value in flags.items():
        if value is not None:
            values[_key(name)] = _coerce(_key(name), value, "command line")
    settings = Settings(**values)
    if settings.kubeconfig is None and (Path(settings.root_dir) / "kubeconfig").is_file():
        # Written by `nodeagent join`: a joined node runs in cluster mode without flags.
        settings.kubeconfig = str(Path(settings.root_dir) / "kubeconfig")
    validate(settings)
    return settings


def validate(s: Settings) -> None:
    for name in ("pod_cidr", "cluster_cidr", "service_cidr"):
        try:
            net = ipaddress.ip_network(getattr(s, name), strict=True)
        except ValueError as exc:
            raise ConfigError(f"{name.replace('_', '-')}: {exc}") from None
        if net.version != 4:
            raise ConfigError(f"{name.replace('_', '-')}: only IPv4 is supported, got {net}")
    if ipaddress.ip_network(s.pod_cidr).num_addresses < 4:
        raise ConfigError(f"pod-cidr: {s.pod_cidr} is too small for a gateway and pods")
    try:
        host, port = s.status_host_port
        if not 0 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise ConfigError(
            f"status-address: expected HOST:PORT, got {s.status_address!r}"
        ) from None
    try:
        _, port = s.node_api_host_port
        if not 0 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise ConfigError(
            f"node-api-address: expected HOST:PORT, got {s.node_api_address!r}"
        ) from None
    if s.node_api_max_streams < 1 or s.streaming_idle_timeout <= 0:
        raise ConfigError("node-api-max-streams and streaming-idle-timeout must be positive")
    if not s.node_name or len(s.node_name) > 253:
        raise ConfigError(f"node-name: invalid node name {s.node_name!r}")
    for name in ("node_status_update_period", "node_status_report_period", "lease_renew_period",
                 "kube_api_burst", "lease_duration_seconds"):
        if getattr(s, name) <= 0:
            raise ConfigError(f"{name.replace('_', '-')}: must be positive, got {getattr(s, name)}")
    if s.kube_api_qps < 0 or s.node_registration_wait < 0:
        raise ConfigError("kube-api-qps and node-registration-wait must not be negative")
    if not 0 <= s.image_gc_low_threshold <= s.image_gc_high_threshold <= 100:
        raise ConfigError("image-gc-low-threshold and image-gc-high-threshold: need "
                          f"0 <= low ({s.image_gc_low_threshold}) <= high ({s.image_gc_high_threshold}) <= 100")
    for name in ("image_minimum_gc_age", "eviction_pressure_transition_period"):
        if getattr(s, name) < 0:
            raise ConfigError(f"{name.replace('_', '-')}: must not be negative, got {getattr(s, name)}")
    for name in ("image_gc_period", "eviction_monitoring_interval"):
        if getattr(s, name) <= 0:
            raise ConfigError(f"{name.replace('_', '-')}: must be positive, got {getattr(s, name)}")
    from nodeagent.eviction.thresholds import parse_thresholds

    try:
        parse_thresholds(s.eviction_hard)
    except ValueError as exc:
        raise ConfigError(f"eviction-hard: {exc}") from None
    if s.max_parallel_image_pulls < 0:
        raise ConfigError(f"max-parallel-image-pulls: must be 0 (no limit) or more, "
                          f"got {s.max_parallel_image_pulls}")
    if s.image_credential_file:
        from nodeagent.images.credentials import CredentialError, load_credential_file

        try:
            load_credential_file(s.image_credential_file)
        except CredentialError as exc:
            raise ConfigError(f"image-credential-file: {exc}") from None
    if s.stats_interval <= 0 or s.stats_fs_interval <= 0:
        raise ConfigError("stats-interval and stats-fs-interval: must be positive")
    if s.max_pods < 1:
        raise ConfigError(f"max-pods: must be at least 1, got {s.max_pods}")
    try:
        parse_node_labels(s.node_labels)
    except ValueError as exc:
        raise ConfigError(f"node-labels: {exc}") from None
    _validate_pod_settings(s)
    if s.manifest_dir is None and s.kubeconfig is None:
        raise ConfigError("nothing to run: give --manifest-dir, --kubeconfig, or both")


def _validate_pod_settings(s: Settings) -> None:
    """cluster-dns, cluster-domain, allowed-unsafe-sysctls, container log rotation."""
    from nodeagent.api.podspec import is_dns1123_subdomain
    from nodeagent.api.quantity import QuantityError, parse_quantity
    from nodeagent.kubelet.security import validate_allowed_unsafe_sysctls

    for address in s.cluster_dns:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise ConfigError(f"cluster-dns: {address!r} is not an IP address") from None
    if not is_dns1123_subdomain(s.cluster_domain.rstrip(".")):
        raise ConfigError(f"cluster-domain: {s.cluster_domain!r} is not a DNS domain")
    try:
        validate_allowed_unsafe_sysctls(s.allowed_unsafe_sysctls)
    except ValueError as exc:
        raise ConfigError(f"allowed-unsafe-sysctls: {exc}") from None
    try:
        size = parse_quantity(s.container_log_max_size)
    except QuantityError as exc:
        raise ConfigError(f"container-log-max-size: {exc}") from None
    if size < 16 * 1024:
        raise ConfigError(f"container-log-max-size: {s.container_log_max_size!r} is too small (at least 16Ki)")
    if s.container_log_max_files < 2:
        raise ConfigError(f"container-log-max-files: must be at least 2 (kubelet's minimum), "
                          f"got {s.container_log_max_files}")


def container_log_max_bytes(s: Settings) -> int:
    from nodeagent.api.quantity import parse_quantity

    return int(parse_quantity(s.container_log_max_size))


def parse_node_labels(text: str) -> dict[str, str]:
    """ "a=b,c=d" -> {"a": "b", "c": "d"}; label keys and values as Kubernetes allows."""
    from nodeagent.api.podspec import is_label_value, is_qualified_name

    labels: dict[str, str] = {}
    for part in (p.strip() for p in (text or "").split(",")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not is_qualified_name(key):
            raise ValueError(f"{part!r} is not KEY=VALUE with a valid label key")
        if not is_label_value(value):
            raise ValueError(f"label {key}: {value!r} is not a valid label value")
        labels[key] = value
    return labels
