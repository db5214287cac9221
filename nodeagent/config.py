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
    # Resource usage (nodeagent/stats/): cgroups are sampled this often; filesystem
    # usage (writable layers, logs, emptyDirs: a directory walk) every stats-fs-interval.
    stats_interval: float = 10.0
    stats_fs_interval: float = 60.0

    @property
    def status_host_port(self) -> tuple[str, int]:
        host, _, port = self.status_address.rpartition(":")
        return host.strip("[]") or "127.0.0.1", int(port)

    @property
    def state_dir(self) -> Path:
        return Path(self.root_dir)


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def _key(name: str) -> str:
    return name.replace("-", "_")


def _coerce(name: str, value: Any, origin: str) -> Any:
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
    if not s.node_name or len(s.node_name) > 253:
        raise ConfigError(f"node-name: invalid node name {s.node_name!r}")
    for name in ("node_status_update_period", "node_status_report_period", "lease_renew_period",
                 "kube_api_burst", "lease_duration_seconds"):
        if getattr(s, name) <= 0:
            raise ConfigError(f"{name.replace('_', '-')}: must be positive, got {getattr(s, name)}")
    if s.kube_api_qps < 0 or s.node_registration_wait < 0:
        raise ConfigError("kube-api-qps and node-registration-wait must not be negative")
    if s.stats_interval <= 0 or s.stats_fs_interval <= 0:
        raise ConfigError("stats-interval and stats-fs-interval: must be positive")
    if s.max_pods < 1:
        raise ConfigError(f"max-pods: must be at least 1, got {s.max_pods}")
    try:
        parse_node_labels(s.node_labels)
    except ValueError as exc:
        raise ConfigError(f"node-labels: {exc}") from None
    if s.manifest_dir is None and s.kubeconfig is None:
        raise ConfigError("nothing to run: give --manifest-dir, --kubeconfig, or both")


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
