"""Service environment variables, as kubelet injects them into every container:
``<NAME>_SERVICE_HOST`` / ``<NAME>_SERVICE_PORT[_<PORT NAME>]`` and the Docker-link
variables ``<NAME>_PORT``, ``<NAME>_PORT_<port>_<PROTO>[_PROTO|_PORT|_ADDR]``.

Which Services: those of the pod's namespace when ``enableServiceLinks`` is true (the
default), and always the master Service ``kubernetes`` of namespace ``default`` — that
is how in-cluster clients find the API server (``KUBERNETES_SERVICE_HOST``). Only
Services with a cluster IP count. Variables the container sets itself win; ``$(VAR)``
in its env, command and args may refer to them.
"""

from __future__ import annotations

from typing import Callable

from nodeagent.kubelet.containerconfig import ConfigError

MASTER_NAMESPACE = "default"
MASTER_SERVICES = ("kubernetes",)


def _var(name: str) -> str:
    return name.upper().replace("-", "_")


def _ip_set(svc: dict) -> bool:
    ip = (svc.get("spec") or {}).get("clusterIP")
    return bool(ip) and ip != "None"


def env_for_services(services: list[dict]) -> dict[str, str]:
    env: dict[str, str] = {}
    for svc in services:
        spec = svc.get("spec") or {}
        ports = [p for p in spec.get("ports") or [] if isinstance(p, dict) and isinstance(p.get("port"), int)]
        if not _ip_set(svc) or not ports:
            continue
        ip = spec["clusterIP"]
        prefix = _var(svc["metadata"]["name"])
        env[f"{prefix}_SERVICE_HOST"] = ip
        env[f"{prefix}_SERVICE_PORT"] = str(ports[0]["port"])
        for p in ports:
            if p.get("name"):
                env[f"{prefix}_SERVICE_PORT_{_var(p['name'])}"] = str(p["port"])
        host = f"[{ip}]" if ":" in ip else ip
        for i, p in enumerate(ports):
            proto = (p.get("protocol") or "TCP")
            url = f"{proto.lower()}://{host}:{p['port']}"
            if i == 0:
                env[f"{prefix}_PORT"] = url  # Docker special-cases the first port
            port_prefix = f"{prefix}_PORT_{p['port']}_{proto.upper()}"
            env[port_prefix] = url
            env[f"{port_prefix}_PROTO"] = proto.lower()
            env[f"{port_prefix}_PORT"] = str(p["port"])
            env[f"{port_prefix}_ADDR"] = ip
    return env


def _is_static(pod: dict) -> bool:
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    return annotations.get("kubernetes.io/config.source", "api") != "api"


class ServiceEnv:
    """``services()`` lists every Service the node knows (all namespaces), or None while
    they have not been read yet (a container then waits with
    CreateContainerConfigError, as kubelet's does)."""

    def __init__(self, services: Callable[[], list[dict] | None]) -> None:
        self._services = services

    def for_pod(self, pod: dict) -> dict[str, str]:
        services = self._services()
        if services is None:
            # As kubelet: an API pod waits for the first list (KUBERNETES_SERVICE_HOST must
            # not go missing); a static pod starts without the API, with what is known.
            if _is_static(pod):
                services = []
            else:
                raise ConfigError("services have not yet been read at least once, cannot construct envvars")
        namespace = (pod.get("metadata") or {}).get("namespace") or "default"
        links = (pod.get("spec") or {}).get("enableServiceLinks", True) is not False
        chosen: dict[str, dict] = {}
        for svc in services:
            meta = svc.get("metadata") or {}
            name, ns = meta.get("name"), meta.get("namespace") or "default"
            if not name or not _ip_set(svc):
                continue
            if ns == MASTER_NAMESPACE and name in MASTER_SERVICES:
                chosen.setdefault(name, svc)
            elif ns == namespace and links:
                chosen[name] = svc
        return env_for_services([chosen[k] for k in sorted(chosen)])
