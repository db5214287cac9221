"""Pod DNS and naming: resolv.conf, /etc/hosts and /etc/hostname of a pod.

kubelet's ``pkg/kubelet/network/dns`` and ``GeneratePodHostNameAndDomain``:

* ``dnsPolicy``: ``ClusterFirst`` (cluster DNS servers, search ``<ns>.svc.<domain>
  svc.<domain> <domain>`` then the host's, ``ndots:5``); without ``cluster-dns`` it
  falls back to ``Default`` with a warning event (``MissingClusterDNS``), as kubelet
  does. ``Default``: the host's resolv.conf (the ``resolv-conf`` setting).
  ``ClusterFirstWithHostNet``: cluster DNS even with hostNetwork; plain ``ClusterFirst``
  with hostNetwork means ``Default``. ``None``: only ``dnsConfig``.
* ``dnsConfig`` is merged on top: nameservers and searches appended (duplicates
  dropped), options merged by name (the pod's win). The result is cut to the
  resolver's limits (3 nameservers, 32 search domains, 2048 characters) with a
  ``DNSConfigForming`` warning, like kubelet.
* hostname = ``spec.hostname`` or the pod name (cut to 63 characters); with
  ``subdomain`` the FQDN is ``<hostname>.<subdomain>.<ns>.svc.<cluster-domain>``;
  ``setHostnameAsFQDN`` makes the kernel hostname the FQDN (at most 64 characters).
* /etc/hosts: kubelet's managed file (localhost lines, the pod IP with its names,
  ``hostAliases``); hostNetwork pods get the host's /etc/hosts plus their aliases.

One resolv.conf, hosts and hostname file per pod, under the pod's directory in the
root dir, bind-mounted into all its containers (a container that mounts one of these
paths itself keeps its own).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from nodeagent.api.podspec import DEFAULT_NAMESPACE, is_dns1123_subdomain
from runtime.types import Mount

MAX_NAMESERVERS = 3
MAX_SEARCHES = 32
MAX_SEARCH_CHARS = 2048
MAX_HOSTNAME = 63
MAX_FQDN = 64
CLUSTER_NDOTS = "ndots:5"

RESOLV_CONF = "resolv.conf"
HOSTS = "etc-hosts"
HOSTNAME = "etc-hostname"


class DNSError(Exception):
    """The pod's DNS settings cannot be honoured; the message names the field."""


@dataclass(frozen=True)
class DNSSettings:
    cluster_dns: tuple[str, ...] = ()
    cluster_domain: str = "cluster.local"
    resolv_conf: str = "/etc/resolv.conf"
    hosts_file: str = "/etc/hosts"


@dataclass
class ResolvConf:
    nameservers: list[str] = field(default_factory=list)
    searches: list[str] = field(default_factory=list)
    options: list[str] = field(default_factory=list)

    def render(self) -> str:
        lines = []
        if self.searches:
            lines.append("search " + " ".join(self.searches))
        lines += [f"nameserver {ns}" for ns in self.nameservers]
        if self.options:
            lines.append("options " + " ".join(self.options))
        return "\n".join(lines) + "\n"


def parse_resolv_conf(text: str) -> ResolvConf:
    """nameserver/search/domain/options lines; the last search or domain line wins."""
    conf = ResolvConf()
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        fields = line.split()
        if not fields:
            continue
        key, values = fields[0], fields[1:]
        if key == "nameserver" and values:
            conf.nameservers.append(values[0])
        elif key in ("search", "domain"):
            conf.searches = [v.rstrip(".") if v != "." else v for v in values]
        elif key == "options":
            conf.options.extend(values)
    return conf


SYSTEMD_RESOLVED_UPSTREAM = "/run/systemd/resolve/resolv.conf"
DEFAULT_RESOLV_CONF = "/etc/resolv.conf"


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def read_host_resolv_conf(path: str) -> ResolvConf:
    """The host's resolver config. With the default path pointing at systemd-resolved's
    stub (127.0.0.53, unreachable from a pod's network namespace), its upstream file is
    used instead, as kubeadm configures kubelet's resolvConf on such hosts."""
    try:
        conf = parse_resolv_conf(Path(path).read_text(errors="replace"))
    except FileNotFoundError:
        return ResolvConf()
    if (path == DEFAULT_RESOLV_CONF and conf.nameservers and all(_loopback(ns) for ns in conf.nameservers)
            and os.path.exists(SYSTEMD_RESOLVED_UPSTREAM)):
        try:
            return parse_resolv_conf(Path(SYSTEMD_RESOLVED_UPSTREAM).read_text(errors="replace"))
        except OSError:
            pass
    return conf


# --- names ---------------------------------------------------------------------------


def pod_hostname_and_domain(pod: dict, cluster_domain: str) -> tuple[str, str | None]:
    """kubelet's GeneratePodHostNameAndDomain."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    hostname = spec.get("hostname") or meta.get("name", "")
    hostname = hostname[:MAX_HOSTNAME].rstrip("-.") or "pod"
    subdomain = spec.get("subdomain")
    namespace = meta.get("namespace") or DEFAULT_NAMESPACE
    domain = f"{subdomain}.{namespace}.svc.{cluster_domain}" if subdomain else None
    return hostname, domain


def kernel_hostname(pod: dict, cluster_domain: str) -> str:
    """What ``hostname`` prints inside the pod; DNSError when the FQDN is too long."""
    spec = pod.get("spec") or {}
    if spec.get("hostNetwork"):
        return socket.gethostname()
    hostname, domain = pod_hostname_and_domain(pod, cluster_domain)
    if spec.get("setHostnameAsFQDN") and domain:
        fqdn = f"{hostname}.{domain}"
        if len(fqdn) > MAX_FQDN:
            raise DNSError(f"spec.setHostnameAsFQDN: the FQDN {fqdn!r} is too long ({MAX_FQDN} characters is "
                           f"the max, {len(fqdn)} characters requested)")
        return fqdn
    return hostname


# --- resolv.conf ---------------------------------------------------------------------


def _merge_options(base: list[str], extra: list[dict]) -> list[str]:
    merged: dict[str, str] = {}
    for opt in base:
        name, sep, value = opt.partition(":")
        merged[name] = opt
    for opt in extra:
        name = str(opt.get("name") or "")
        if not name:
            continue
        value = opt.get("value")
        merged[name] = f"{name}:{value}" if value not in (None, "") else name
    return list(merged.values())


def _dedupe(items: list[str]) -> list[str]:
    seen: list[str] = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen


def validate_dns_config(spec: dict) -> str | None:
    """The API's checks of dnsConfig (ValidatePodDNSConfig); a message naming the field."""
    policy = spec.get("dnsPolicy") or "ClusterFirst"
    config = spec.get("dnsConfig")
    if config is None:
        return "spec.dnsConfig: Required value: dnsPolicy 'None' needs a dnsConfig" if policy == "None" else None
    if not isinstance(config, dict):
        return "spec.dnsConfig: must be a mapping"
    nameservers = config.get("nameservers") or []
    if not isinstance(nameservers, list):
        return "spec.dnsConfig.nameservers: must be a list"
    if policy == "None" and not nameservers:
        return "spec.dnsConfig.nameservers: Required value: must provide at least one DNS nameserver when dnsPolicy is None"
    if len(nameservers) > MAX_NAMESERVERS:
        return f"spec.dnsConfig.nameservers: Invalid value: must not have more than {MAX_NAMESERVERS} nameservers"
    for i, ns in enumerate(nameservers):
        try:
            ipaddress.ip_address(str(ns))
        except ValueError:
            return f"spec.dnsConfig.nameservers[{i}]: Invalid value: {ns!r}: must be a valid IP address"
    searches = config.get("searches") or []
    if not isinstance(searches, list):
        return "spec.dnsConfig.searches: must be a list"
    if len(searches) > MAX_SEARCHES:
        return f"spec.dnsConfig.searches: Invalid value: must not have more than {MAX_SEARCHES} search paths"
    if len(" ".join(str(s) for s in searches)) > MAX_SEARCH_CHARS:
        return f"spec.dnsConfig.searches: Invalid value: must not have more than {MAX_SEARCH_CHARS} characters"
    for i, search in enumerate(searches):
        name = str(search)
        if name != "." and not is_dns1123_subdomain(name.rstrip(".").lower()):
            return f"spec.dnsConfig.searches[{i}]: Invalid value: {search!r}: must be a DNS subdomain"
    options = config.get("options") or []
    if not isinstance(options, list):
        return "spec.dnsConfig.options: must be a list"
    for i, opt in enumerate(options):
        if not isinstance(opt, dict) or not opt.get("name"):
            return f"spec.dnsConfig.options[{i}].name: Required value"
    return None


def pod_resolv_conf(pod: dict, settings: DNSSettings, host: ResolvConf) -> tuple[ResolvConf, list[tuple[str, str]]]:
    """The pod's resolv.conf and the warning events ``(reason, message)`` to record."""
    spec = pod.get("spec") or {}
    meta = pod.get("metadata") or {}
    namespace = meta.get("namespace") or DEFAULT_NAMESPACE
    policy = spec.get("dnsPolicy") or "ClusterFirst"
    host_network = bool(spec.get("hostNetwork"))
    warnings: list[tuple[str, str]] = []

    effective = policy
    if policy == "ClusterFirst" and host_network:
        effective = "Default"
    if effective in ("ClusterFirst", "ClusterFirstWithHostNet") and not settings.cluster_dns:
        warnings.append(("MissingClusterDNS",
                         f"pod: \"{meta.get('name')}_{namespace}\". kubelet does not have ClusterDNS IP configured "
                         f"and cannot create Pod using \"{policy}\" policy. Falling back to \"Default\" policy."))
        effective = "Default"

    if effective == "None":
        conf = ResolvConf()
    elif effective == "Default":
        conf = ResolvConf(list(host.nameservers), list(host.searches), list(host.options))
    else:
        domain = settings.cluster_domain
        conf = ResolvConf(
            nameservers=list(settings.cluster_dns),
            searches=[f"{namespace}.svc.{domain}", f"svc.{domain}", domain] + list(host.searches),
            options=[CLUSTER_NDOTS],
        )

    config = spec.get("dnsConfig") or {}
    if isinstance(config, dict):
        conf.nameservers = _dedupe(conf.nameservers + [str(n) for n in config.get("nameservers") or []])
        conf.searches = _dedupe(conf.searches + [str(s) for s in config.get("searches") or []])
        conf.options = _merge_options(conf.options, [o for o in config.get("options") or [] if isinstance(o, dict)])
    conf.searches = _dedupe(conf.searches)

    if len(conf.nameservers) > MAX_NAMESERVERS:
        warnings.append(("DNSConfigForming",
                         f"Nameserver limits were exceeded, some nameservers have been omitted, the applied "
                         f"nameserver line is: {' '.join(conf.nameservers[:MAX_NAMESERVERS])}"))
        conf.nameservers = conf.nameservers[:MAX_NAMESERVERS]
    trimmed = conf.searches[:MAX_SEARCHES]
    while trimmed and len(" ".join(trimmed)) > MAX_SEARCH_CHARS:
        trimmed.pop()
    if trimmed != conf.searches:
        warnings.append(("DNSConfigForming",
                         f"Search Line limits were exceeded, some search paths have been omitted, the applied "
                         f"search line is: {' '.join(trimmed)}"))
        conf.searches = trimmed
    return conf, warnings


# --- /etc/hosts ----------------------------------------------------------------------

_MANAGED_HEADER = "# Kubernetes-managed hosts file.\n"
_HOST_NETWORK_HEADER = "# Kubernetes-managed hosts file (host network).\n"


def _aliases(pod: dict) -> str:
    entries = [a for a in (pod.get("spec") or {}).get("hostAliases") or [] if isinstance(a, dict)]
    if not entries:
        return ""
    lines = ["", "# Entries added by HostAliases."]
    for alias in entries:
        names = [str(h) for h in alias.get("hostnames") or []]
        lines.append("\t".join([str(alias.get("ip", "")), *names]))
    return "\n".join(lines) + "\n"


def render_hosts(pod: dict, pod_ips: list[str], settings: DNSSettings, host_hosts: str = "") -> str:
    spec = pod.get("spec") or {}
    if spec.get("hostNetwork"):
        body = host_hosts if host_hosts.endswith("\n") or not host_hosts else host_hosts + "\n"
        return _HOST_NETWORK_HEADER + body + _aliases(pod)
    hostname, domain = pod_hostname_and_domain(pod, settings.cluster_domain)
    lines = [
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        "fe00::0\tip6-localnet",
        "fe00::0\tip6-mcastprefix",
        "fe00::1\tip6-allnodes",
        "fe00::2\tip6-allrouters",
    ]
    for ip in pod_ips:
        lines.append(f"{ip}\t{hostname}.{domain}\t{hostname}" if domain else f"{ip}\t{hostname}")
    return _MANAGED_HEADER + "\n".join(lines) + "\n" + _aliases(pod)


def validate_host_aliases(spec: dict) -> str | None:
    aliases = spec.get("hostAliases")
    if aliases is None:
        return None
    if not isinstance(aliases, list):
        return "spec.hostAliases: must be a list"
    for i, alias in enumerate(aliases):
        if not isinstance(alias, dict):
            return f"spec.hostAliases[{i}]: must be a mapping"
        try:
            ipaddress.ip_address(str(alias.get("ip")))
        except ValueError:
            return f"spec.hostAliases[{i}].ip: Invalid value: {alias.get('ip')!r}: must be a valid IP address"
        names = alias.get("hostnames") or []
        if not isinstance(names, list):
            return f"spec.hostAliases[{i}].hostnames: must be a list"
        for j, name in enumerate(names):
            if not isinstance(name, str) or not is_dns1123_subdomain(name):
                return f"spec.hostAliases[{i}].hostnames[{j}]: Invalid value: {name!r}: must be a DNS subdomain"
    return None


def admit_pod(pod: dict) -> tuple[str, str] | None:
    """Refuse pods whose DNS or naming settings cannot be honoured."""
    spec = pod.get("spec") or {}
    problem = validate_dns_config(spec) or validate_host_aliases(spec)
    if problem:
        return "InvalidDNSConfig", problem
    return None


# --- the per-pod files -----------------------------------------------------------------


def _write_if_changed(path: Path, text: str) -> None:
    data = text.encode()
    try:
        if path.read_bytes() == data:
            return
    except FileNotFoundError:
        pass
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    # Bind mounts pin the inode: rewrite in place when the file is already mounted,
    # so running containers see the change; a new file is moved into place.
    if path.exists():
        with open(path, "r+b") as f:
            f.write(data)
            f.truncate()
        tmp.unlink()
    else:
        os.replace(tmp, path)


def write_pod_files(
    pod_dir: str | os.PathLike, pod: dict, pod_ips: list[str], settings: DNSSettings
) -> tuple[list[Mount], list[tuple[str, str]]]:
    """Write the pod's resolv.conf, hosts and hostname files (blocking; run in a thread).

    Returns the mounts for every container and the warning events to record.
    Raises DNSError when the pod's naming cannot be honoured.
    """
    directory = Path(pod_dir)
    directory.mkdir(parents=True, exist_ok=True)
    host = read_host_resolv_conf(settings.resolv_conf)
    conf, warnings = pod_resolv_conf(pod, settings, host)
    host_hosts = ""
    if (pod.get("spec") or {}).get("hostNetwork"):
        try:
            host_hosts = Path(settings.hosts_file).read_text(errors="replace")
        except FileNotFoundError:
            host_hosts = ""
    hostname = kernel_hostname(pod, settings.cluster_domain)
    files = {
        RESOLV_CONF: conf.render(),
        HOSTS: render_hosts(pod, pod_ips, settings, host_hosts),
        HOSTNAME: hostname + "\n",
    }
    for name, text in files.items():
        _write_if_changed(directory / name, text)
    mounts = [
        Mount(host_path=str(directory / RESOLV_CONF), container_path="/etc/resolv.conf"),
        Mount(host_path=str(directory / HOSTS), container_path="/etc/hosts"),
        Mount(host_path=str(directory / HOSTNAME), container_path="/etc/hostname"),
    ]
    return mounts, warnings


def add_pod_mounts(mounts: list[Mount], extra: list[Mount]) -> None:
    """Append ``extra`` unless the container mounts something at the same path itself."""
    taken = {m.container_path.rstrip("/") for m in mounts}
    mounts.extend(m for m in extra if m.container_path not in taken)
