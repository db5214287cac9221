"""Builders for Kubernetes objects used across the proxy tests."""

from __future__ import annotations

from typing import Any


def service(name: str, cluster_ip: str, ports: list[dict] | None = None, namespace: str = "default",
            **spec: Any) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"clusterIP": cluster_ip, "ports": ports or [{"name": "http", "port": 80, "protocol": "TCP"}],
                 **spec},
    }


def endpoint(ip: str, node: str = "node-a", ready: bool | None = True, serving: bool | None = None,
             terminating: bool | None = None) -> dict:
    conditions: dict[str, Any] = {}
    if ready is not None:
        conditions["ready"] = ready
    if serving is not None:
        conditions["serving"] = serving
    if terminating is not None:
        conditions["terminating"] = terminating
    return {"addresses": [ip], "conditions": conditions, "nodeName": node}


def endpoint_slice(service_name: str, endpoints: list[dict], ports: list[dict] | None = None,
                   namespace: str = "default", name: str | None = None) -> dict:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name or f"{service_name}-x1", "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": service_name}},
        "addressType": "IPv4",
        "ports": ports or [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    }
