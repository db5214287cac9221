"""Types of the Service fields the node's proxy reads, checked before it reads them.

The proxy's model (``netplugin/proxy/model.py``) judges values (address ranges, port
allocation, policies); it assumes the JSON types a Service from the API server has. A
Service read from a manifest file has not been through the API server, so
``validate_service_types`` holds it to those types (and the API's name and port
limits) first, naming the field of each problem. Unknown fields are left alone, as
the API server drops them.
"""

from __future__ import annotations

from nodeagent.api.podspec import (
    FieldError,
    _Collector,
    _show,
    is_dns1123_label,
    is_label_value,
    is_qualified_name,
)
from nodeagent.api.shape import check_shape


def validate_service_types(svc: object) -> list[FieldError]:
    v = _Collector()
    if not isinstance(svc, dict):
        v.add("", f"a Service must be a mapping (a Kubernetes object), got {_show(svc)}")
        return v.errors
    shape = check_shape(svc)
    if shape:
        return [FieldError(field, message) for field, message in shape]
    meta = v.mapping("metadata", svc.get("metadata"), required=True)
    if meta is not None:
        name = meta.get("name")
        if not is_dns1123_label(name):
            v.add("metadata.name", f"invalid Service name {_show(name)}: must be a lowercase RFC 1123 label")
        namespace = meta.get("namespace")
        if namespace not in (None, "") and not is_dns1123_label(namespace):
            v.add("metadata.namespace", f"invalid namespace {_show(namespace)}: must be a lowercase RFC 1123 label")
        for section in ("labels", "annotations"):
            values = v.mapping(f"metadata.{section}", meta.get(section))
            for key, val in (values or {}).items():
                if not is_qualified_name(key):
                    v.add(f"metadata.{section}", f"invalid key {_show(key)}: must be [prefix/]name")
                v.string(f"metadata.{section}[{key}]", val)
    spec = v.mapping("spec", svc.get("spec"), required=True)
    if spec is not None:
        _validate_service_spec(v, spec)
    status = v.mapping("status", svc.get("status"))
    lb = v.mapping("status.loadBalancer", (status or {}).get("loadBalancer"))
    ingress = v.sequence("status.loadBalancer.ingress", (lb or {}).get("ingress"))
    for i, item in enumerate(ingress or []):
        entry = v.mapping(f"status.loadBalancer.ingress[{i}]", item)
        if entry is not None:
            v.string(f"status.loadBalancer.ingress[{i}].ip", entry.get("ip"))
    return v.errors


def _validate_service_spec(v: _Collector, spec: dict) -> None:
    for field in ("type", "clusterIP", "externalTrafficPolicy", "internalTrafficPolicy", "sessionAffinity",
                  "externalName", "loadBalancerIP"):
        v.string(f"spec.{field}", spec.get(field))
    for field in ("clusterIPs", "externalIPs", "loadBalancerSourceRanges", "ipFamilies"):
        v.string_list(f"spec.{field}", spec.get(field))
    v.boolean("spec.publishNotReadyAddresses", spec.get("publishNotReadyAddresses"))
    selector = v.mapping("spec.selector", spec.get("selector"))
    for key, val in (selector or {}).items():
        if not is_qualified_name(key) or not is_label_value(val):
            v.add(f"spec.selector[{key}]", f"invalid selector {_show(key)}: {_show(val)}")
    affinity = v.mapping("spec.sessionAffinityConfig", spec.get("sessionAffinityConfig"))
    client_ip = v.mapping("spec.sessionAffinityConfig.clientIP", (affinity or {}).get("clientIP"))
    if client_ip is not None:
        v.integer("spec.sessionAffinityConfig.clientIP.timeoutSeconds", client_ip.get("timeoutSeconds"),
                  minimum=1, maximum=86400)
    ports = v.sequence("spec.ports", spec.get("ports"))
    for i, item in enumerate(ports or []):
        path = f"spec.ports[{i}]"
        port = v.mapping(path, item)
        if port is None:
            continue
        v.string(f"{path}.name", port.get("name"))
        v.string(f"{path}.protocol", port.get("protocol"))
        v.string(f"{path}.appProtocol", port.get("appProtocol"))
        if port.get("port") is None:
            v.add(f"{path}.port", "Required value")
        v.integer(f"{path}.port", port.get("port"), minimum=1, maximum=65535)
        v.integer(f"{path}.nodePort", port.get("nodePort"), minimum=0, maximum=65535)
        target = port.get("targetPort")
        if isinstance(target, str):
            if not target:
                v.add(f"{path}.targetPort", "must not be empty")
        else:
            v.integer(f"{path}.targetPort", target, minimum=1, maximum=65535)
