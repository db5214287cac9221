"""Standalone mode: Services from manifest files, endpoints from the local pods.

Without an API server nobody allocates ClusterIPs and NodePorts or maintains
EndpointSlices, so this module does both, deterministically:

* a ``clusterIP`` inside the service CIDR is honoured; anything else (absent, outside
  the CIDR) gets an address allocated from the CIDR; ``None`` keeps a headless service;
* ``nodePort`` inside the range is honoured, absent ones are allocated, values outside
  the range or claimed twice are errors;
* allocations are persisted in ``state_dir`` so a restarted agent hands out the same
  addresses and ports again (established connections and clients' caches stay valid);
* EndpointSlices (discovery.k8s.io/v1) are generated from pods matching the selector,
  with ready/serving/terminating following the pods' Ready condition and deletion.

A bad Service is reported (log line + returned ``ServiceError``) and skipped; it never
affects the others. ``compute``/``sync`` are plain functions that may write the small
state file: from an event loop, call them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import copy
import hashlib
import ipaddress
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog

from .model import (
    PROTOCOLS,
    InvalidService,
    ServiceError,
    canonical_ipv4,
    parse_service,
    service_key,
)

log = structlog.get_logger(__name__)

STATE_FILE = "service-allocations.json"
MANAGED_BY = "nodeagent"


class ProxyInput(Protocol):
    def on_service(self, event: str, svc: dict) -> None: ...

    def on_endpoint_slice(self, event: str, slice_: dict) -> None: ...


@dataclass
class StandaloneResult:
    services: list[dict] = field(default_factory=list)
    endpoint_slices: list[dict] = field(default_factory=list)
    errors: list[ServiceError] = field(default_factory=list)


def _name(key: tuple[str, str]) -> str:
    return f"{key[0]}/{key[1]}"


def _port_id(port: dict, index: int) -> str:
    proto = port.get("protocol") or "TCP"
    return f"{port.get('name') or index}/{proto}"


class StandaloneServices:
    def __init__(self, *, state_dir: str | os.PathLike[str], node_name: str,
                 service_cidr: str = "10.96.0.0/12", nodeport_range: tuple[int, int] = (30000, 32767)) -> None:
        self.state_dir = Path(state_dir)
        self.node_name = node_name
        self.service_cidr = ipaddress.IPv4Network(service_cidr, strict=False)
        self.nodeport_range = tuple(nodeport_range)
        self._cluster_ips: dict[str, str] = {}  # "ns/name" -> ip
        self._node_ports: dict[str, int] = {}  # "ns/name/<port id>" -> port
        self._fed_services: dict[tuple[str, str], dict] = {}
        self._fed_slices: dict[tuple[str, str], dict] = {}
        self._load()

    # ------------------------------------------------------------------ state

    @property
    def state_path(self) -> Path:
        return self.state_dir / STATE_FILE

    def _load(self) -> None:
        try:
            data = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("service allocation state unreadable; starting fresh", path=str(self.state_path),
                        error=str(exc))
            return
        for name, ip in (data.get("clusterIPs") or {}).items():
            ip = canonical_ipv4(ip)
            if ip and ipaddress.IPv4Address(ip) in self.service_cidr:
                self._cluster_ips[name] = ip
        low, high = self.nodeport_range
        for name, port in (data.get("nodePorts") or {}).items():
            if isinstance(port, int) and low <= port <= high:
                self._node_ports[name] = port

    def _save(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"clusterIPs": self._cluster_ips, "nodePorts": self._node_ports},
                                  indent=1, sort_keys=True))
        os.replace(tmp, self.state_path)

    # ------------------------------------------------------------------ compute

    def compute(self, manifests: list[dict], pods: list[dict]) -> StandaloneResult:
        result = StandaloneResult()
        by_key: dict[tuple[str, str], dict] = {}
        for manifest in manifests:
            if manifest.get("kind", "Service") != "Service":
                continue
            key = service_key(manifest)
            if key in by_key:
                self._error(result, key, "metadata.name", "defined twice in the manifest directory")
                continue
            by_key[key] = manifest
        before = (dict(self._cluster_ips), dict(self._node_ports))
        live = {_name(key) for key in by_key}
        self._cluster_ips = {k: v for k, v in self._cluster_ips.items() if k in live}
        self._node_ports = {k: v for k, v in self._node_ports.items() if k.rsplit("/", 2)[0] in live}

        # conflicts are settled by who held the value before (restarts keep allocations),
        # then by manifest order (the caller lists the directory sorted by file name)
        services = {}
        for key in by_key:
            svc = self._normalize(key, by_key[key], result)
            if svc is not None:
                services[key] = svc
        self._assign_cluster_ips(services, result)
        self._assign_node_ports(services, result)

        for key in list(services):
            svc = services[key]
            try:
                parse_service(svc, self.nodeport_range)
            except InvalidService as exc:
                self._report(result, exc.error)
                self._release(key)
                continue
            result.services.append(svc)
            result.endpoint_slices.extend(self._slices(svc, pods))
        if (self._cluster_ips, self._node_ports) != before:
            self._save()
        return result

    def _error(self, result: StandaloneResult, key: tuple[str, str], where: str, message: str) -> None:
        self._report(result, ServiceError(_name(key), where, message))

    @staticmethod
    def _report(result: StandaloneResult, error: ServiceError) -> None:
        log.error("service skipped", service=error.service, field=error.field, reason=error.message)
        result.errors.append(error)

    def _release(self, key: tuple[str, str]) -> None:
        name = _name(key)
        self._cluster_ips.pop(name, None)
        for port_key in [k for k in self._node_ports if k.rsplit("/", 2)[0] == name]:
            del self._node_ports[port_key]

    def _normalize(self, key: tuple[str, str], manifest: dict, result: StandaloneResult) -> dict | None:
        svc = copy.deepcopy(manifest)
        svc.setdefault("apiVersion", "v1")
        svc["kind"] = "Service"
        meta = svc.setdefault("metadata", {})
        meta.setdefault("namespace", key[0])
        spec = svc.get("spec")
        if not isinstance(spec, dict):
            self._error(result, key, "spec", "missing")
            return None
        ports = spec.get("ports")
        if not isinstance(ports, list) or not ports:
            self._error(result, key, "spec.ports", "a Service needs at least one port")
            return None
        for i, port in enumerate(ports):
            if not isinstance(port, dict):
                self._error(result, key, f"spec.ports[{i}]", "must be an object")
                return None
            proto = port.get("protocol") or "TCP"
            if proto not in PROTOCOLS:
                self._error(result, key, f"spec.ports[{i}].protocol", f"unsupported protocol {proto!r}")
                return None
        return svc

    def _assign_cluster_ips(self, services: dict[tuple[str, str], dict], result: StandaloneResult) -> None:
        used: dict[str, str] = {}
        pending: list[tuple[str, str]] = []
        # 1: explicit addresses inside the CIDR (their previous holder first);
        # 2: remembered allocations; 3: new ones
        order = sorted(services, key=lambda k: self._cluster_ips.get(_name(k)) != (services[k]["spec"].get("clusterIP") or None))
        for key in order:
            spec = services[key]["spec"]
            if spec.get("type") == "ExternalName" or spec.get("clusterIP") == "None":
                continue
            wanted = spec.get("clusterIP") or ""
            if wanted:
                ip = canonical_ipv4(wanted)
                if ip is None:
                    self._error(result, key, "spec.clusterIP", f"{wanted!r} is not an IPv4 address")
                    services[key] = None  # type: ignore[assignment]
                    continue
                if ipaddress.IPv4Address(ip) in self.service_cidr:
                    if ip in used:
                        self._error(result, key, "spec.clusterIP", f"{ip} is already used by service {used[ip]}")
                        services[key] = None  # type: ignore[assignment]
                        continue
                    used[ip] = _name(key)
                    self._cluster_ips[_name(key)] = ip
                    spec["clusterIP"], spec["clusterIPs"] = ip, [ip]
                    continue
                log.info("clusterIP outside the service CIDR; allocating one", service=_name(key),
                         requested=ip, service_cidr=str(self.service_cidr))
            pending.append(key)
        for key in list(pending):
            remembered = self._cluster_ips.get(_name(key))
            if remembered and remembered not in used:
                used[remembered] = _name(key)
                services[key]["spec"]["clusterIP"] = remembered
                services[key]["spec"]["clusterIPs"] = [remembered]
                pending.remove(key)
        hosts = self.service_cidr.hosts()
        for key in pending:
            for candidate in hosts:
                ip = str(candidate)
                if ip not in used:
                    break
            else:
                self._error(result, key, "spec.clusterIP", f"service CIDR {self.service_cidr} is exhausted")
                services[key] = None  # type: ignore[assignment]
                continue
            used[ip] = _name(key)
            self._cluster_ips[_name(key)] = ip
            services[key]["spec"]["clusterIP"] = ip
            services[key]["spec"]["clusterIPs"] = [ip]
        for key in [k for k, v in services.items() if v is None]:
            del services[key]
            self._release(key)

    def _assign_node_ports(self, services: dict[tuple[str, str], dict], result: StandaloneResult) -> None:
        low, high = self.nodeport_range
        used: dict[int, str] = {}
        pending: list[tuple[tuple[str, str], dict, str]] = []
        bad: set[tuple[str, str]] = set()

        def held_before(key: tuple[str, str]) -> bool:
            ports = services[key]["spec"]["ports"]
            return any(self._node_ports.get(f"{_name(key)}/{_port_id(p, i)}") == p.get("nodePort")
                       for i, p in enumerate(ports) if p.get("nodePort"))

        for key in sorted(services, key=lambda k: not held_before(k)):
            spec = services[key]["spec"]
            if spec.get("type") not in ("NodePort", "LoadBalancer"):
                for port in spec["ports"]:
                    port.pop("nodePort", None)
                continue
            for i, port in enumerate(spec["ports"]):
                port_key = f"{_name(key)}/{_port_id(port, i)}"
                wanted = port.get("nodePort")
                if wanted in (None, 0):
                    pending.append((key, port, port_key))
                    continue
                if isinstance(wanted, bool) or not isinstance(wanted, int) or not low <= wanted <= high:
                    self._error(result, key, f"spec.ports[{i}].nodePort",
                                f"{wanted!r} is outside the NodePort range {low}-{high}")
                    bad.add(key)
                    break
                if wanted in used:
                    self._error(result, key, f"spec.ports[{i}].nodePort",
                                f"{wanted} is already used by service {used[wanted]}")
                    bad.add(key)
                    break
                used[wanted] = _name(key)
                self._node_ports[port_key] = wanted
        pending = [p for p in pending if p[0] not in bad]
        for key, port, port_key in list(pending):
            remembered = self._node_ports.get(port_key)
            if remembered and remembered not in used:
                used[remembered] = _name(key)
                port["nodePort"] = remembered
                pending.remove((key, port, port_key))
        candidate = low
        for key, port, port_key in pending:
            while candidate in used and candidate <= high:
                candidate += 1
            if candidate > high:
                self._error(result, key, "spec.ports[].nodePort", f"NodePort range {low}-{high} is exhausted")
                bad.add(key)
                continue
            used[candidate] = _name(key)
            port["nodePort"] = candidate
            self._node_ports[port_key] = candidate
        for key in bad:
            services.pop(key, None)
            self._release(key)

    # ------------------------------------------------------------------ endpoints

    def _slices(self, svc: dict, pods: list[dict]) -> list[dict]:
        spec = svc["spec"]
        selector = spec.get("selector")
        key = service_key(svc)
        if not selector or spec.get("type") == "ExternalName" or spec.get("clusterIP") == "None":
            return []
        publish_not_ready = bool(spec.get("publishNotReadyAddresses"))
        groups: dict[tuple, dict] = {}
        for pod in sorted(pods, key=lambda p: (p.get("metadata") or {}).get("name") or ""):
            meta = pod.get("metadata") or {}
            if (meta.get("namespace") or "default") != key[0]:
                continue
            labels = meta.get("labels") or {}
            if any(labels.get(k) != v for k, v in selector.items()):
                continue
            status = pod.get("status") or {}
            ip = canonical_ipv4(status.get("podIP"))
            if ip is None or status.get("phase") in ("Succeeded", "Failed"):
                continue
            ports = []
            for port in spec["ports"]:
                target = _resolve_target_port(port, pod)
                if target is None:
                    break
                ports.append({"name": port.get("name") or "", "port": target,
                              "protocol": port.get("protocol") or "TCP"})
            else:
                pod_ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                                for c in status.get("conditions") or [])
                terminating = bool(meta.get("deletionTimestamp"))
                serving = pod_ready or publish_not_ready
                endpoint: dict[str, Any] = {
                    "addresses": [ip],
                    "conditions": {"ready": serving and not terminating, "serving": serving,
                                   "terminating": terminating},
                    "nodeName": (pod.get("spec") or {}).get("nodeName") or self.node_name,
                    "targetRef": {"kind": "Pod", "namespace": key[0], "name": meta.get("name"),
                                  "uid": meta.get("uid")},
                }
                signature = tuple((p["name"], p["port"], p["protocol"]) for p in ports)
                group = groups.setdefault(signature, {"ports": ports, "endpoints": []})
                group["endpoints"].append(endpoint)
        slices = []
        for signature, group in sorted(groups.items()):
            digest = hashlib.sha256(repr(signature).encode()).hexdigest()[:8]
            slices.append({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": f"{key[1]}-{digest}",
                    "namespace": key[0],
                    "labels": {"kubernetes.io/service-name": key[1],
                               "endpointslice.kubernetes.io/managed-by": MANAGED_BY},
                },
                "addressType": "IPv4",
                "ports": group["ports"],
                "endpoints": group["endpoints"],
            })
        return slices

    # ------------------------------------------------------------------ feed

    def fed_services(self) -> list[dict]:
        """The Services last handed to the proxy (cluster IPs and NodePorts assigned)."""
        return [copy.deepcopy(s) for s in self._fed_services.values()]

    def sync(self, proxy: ProxyInput, manifests: list[dict], pods: list[dict]) -> list[ServiceError]:
        """Compute and hand the differences to ``proxy``; returns the errors (for events)."""
        result = self.compute(manifests, pods)
        services = {service_key(s): s for s in result.services}
        slices = {service_key(s): s for s in result.endpoint_slices}
        for key, svc in services.items():
            old = self._fed_services.get(key)
            if old != svc:
                proxy.on_service("MODIFIED" if old is not None else "ADDED", svc)
        for key, sl in slices.items():
            old = self._fed_slices.get(key)
            if old != sl:
                proxy.on_endpoint_slice("MODIFIED" if old is not None else "ADDED", sl)
        for key in self._fed_slices.keys() - slices.keys():
            proxy.on_endpoint_slice("DELETED", self._fed_slices[key])
        for key in self._fed_services.keys() - services.keys():
            proxy.on_service("DELETED", self._fed_services[key])
        self._fed_services = copy.deepcopy(services)
        self._fed_slices = copy.deepcopy(slices)
        return result.errors


def _resolve_target_port(port: dict, pod: dict) -> int | None:
    target = port.get("targetPort", port.get("port"))
    if isinstance(target, int) and not isinstance(target, bool):
        return target
    if isinstance(target, str):
        if target.isdigit():
            return int(target)
        proto = port.get("protocol") or "TCP"
        for container in (pod.get("spec") or {}).get("containers") or []:
            for cport in container.get("ports") or []:
                if cport.get("name") == target and (cport.get("protocol") or "TCP") == proto:
                    return cport.get("containerPort")
    return None
