"""Helpers shared by the service proxy benchmarks: namespaces, objects, machine facts."""

from __future__ import annotations

import ipaddress
import logging
import os
import platform
import secrets
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import structlog  # noqa: E402

# benchmarks print their own results; the proxy's per-sync log lines are noise here
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

CLUSTER_CIDR = "10.202.0.0/16"
SERVICE_CIDR = "10.203.0.0/16"
ENDPOINT_BASE = int(ipaddress.IPv4Address("10.202.0.0"))
SERVICE_BASE = int(ipaddress.IPv4Address("10.203.0.0"))


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(list(args), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {result.stderr.strip()}")
    return result


@contextmanager
def netns(role: str):
    """A fresh, empty network namespace, removed afterwards."""
    name = f"np4b{secrets.token_hex(3)}-{role}"
    run("ip", "netns", "add", name)
    try:
        run("ip", "-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        run("ip", "netns", "del", name, check=False)


def service_objects(count: int, endpoints: int, first: int = 0) -> tuple[list[dict], list[dict]]:
    """``count`` ClusterIP Services (port 80) with one EndpointSlice each holding
    ``endpoints`` ready endpoints (port 8080), all with distinct addresses."""
    services, slices = [], []
    for i in range(first, first + count):
        name, namespace = f"svc{i}", f"ns{i % 100}"
        cluster_ip = str(ipaddress.IPv4Address(SERVICE_BASE + 16 + i))
        services.append({"apiVersion": "v1", "kind": "Service",
                         "metadata": {"name": name, "namespace": namespace},
                         "spec": {"clusterIP": cluster_ip,
                                  "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}})
        slices.append({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-abcde", "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [str(ipaddress.IPv4Address(ENDPOINT_BASE + 256 + i * endpoints + e))],
                           "conditions": {"ready": True}, "nodeName": "node-b"}
                          for e in range(endpoints)],
        })
    return services, slices


def machine() -> dict[str, object]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg(),
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]
