"""The agent's own Prometheus metrics under kubelet's and kube-proxy's names (kubelet's
pkg/kubelet/metrics): one ``AgentMetrics`` per agent with its own registries, so two
agents in one process never share counters.

Components stay ignorant of Prometheus: each exposes a small optional hook (an
``observer`` attribute or callback) and ``instrument()`` plugs this object's methods
into them. Figures the components already count (status-manager writes, proxy object
counts, container states) are read at scrape time by a custom collector instead.

Hooks others may call (all cheap, never raise):
  ``runtime_operation(op, seconds, error)``  – every runtime call (runtime/docker.py)
  ``pod_worker(operation, seconds)``         – one pod worker sync/kill
  ``pleg_relist(seconds)``                   – one PLEG relist
  ``api_request(method, resource, code, seconds)``, ``watch_event(resource, type)``
  ``proxy_sync(seconds, full, error)``       – one service-proxy sync
  ``pod_status(uid, status)``                – pod status updates (start duration)
  ``probe_result(probe_type, result, container, pod, namespace)`` – for the prober;
      served on /metrics/probes as kubelet's ``prober_probe_total``.
"""

from __future__ import annotations

import calendar
import time
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# kubelet's buckets for pod start / worker durations (seconds), and the default
# Prometheus buckets for the short runtime calls.
POD_START_BUCKETS = (0.5, 1, 2, 3, 4, 5, 6, 8, 10, 20, 30, 45, 60, 120, 180, 240, 300, 360, 480, 600, 900, 1200)
SHORT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30, 60)


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.probe_registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.runtime_ops = Counter(
            "kubelet_runtime_operations_total", "Cumulative number of runtime operations by operation type.",
            ["operation_type"], registry=r)
        self.runtime_errors = Counter(
            "kubelet_runtime_operations_errors_total", "Cumulative number of runtime operation errors by operation type.",
            ["operation_type"], registry=r)
        self.runtime_duration = Histogram(
            "kubelet_runtime_operations_duration_seconds", "Duration in seconds of runtime operations.",
            ["operation_type"], buckets=SHORT_BUCKETS, registry=r)
        self.pod_worker_duration = Histogram(
            "kubelet_pod_worker_duration_seconds",
            "Duration in seconds to sync a single pod. Broken down by operation type: sync or kill.",
            ["operation_type"], buckets=SHORT_BUCKETS, registry=r)
        self.pod_start_duration = Histogram(
            "kubelet_pod_start_duration_seconds",
            "Duration in seconds from the node first seeing a pod (its startTime) to the pod running.",
            buckets=POD_START_BUCKETS, registry=r)
        self.pleg_relist_duration = Histogram(
            "kubelet_pleg_relist_duration_seconds", "Duration in seconds for relisting pods in PLEG.",
            buckets=SHORT_BUCKETS, registry=r)
        self.pleg_last_seen = Gauge(
            "kubelet_pleg_last_seen_seconds", "Timestamp in seconds when PLEG was last seen active.", registry=r)
        self.api_requests = Counter(
            "rest_client_requests_total", "Number of HTTP requests to the API server, by status code, method and resource.",
            ["code", "method", "resource"], registry=r)
        self.api_duration = Histogram(
            "rest_client_request_duration_seconds", "Request latency in seconds, by verb and resource.",
            ["verb", "resource"], buckets=SHORT_BUCKETS, registry=r)
        self.watch_events = Counter(
            "nodeagent_watch_events_total", "Watch events received from the API server, by resource and type.",
            ["resource", "type"], registry=r)
        self.proxy_sync_duration = Histogram(
            "kubeproxy_sync_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds.",
            buckets=SHORT_BUCKETS, registry=r)
        self.proxy_full_sync_duration = Histogram(
            "kubeproxy_sync_full_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds for full resyncs.",
            buckets=SHORT_BUCKETS, registry=r)
        self.proxy_partial_sync_duration = Histogram(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds for partial resyncs.",
            buckets=SHORT_BUCKETS, registry=r)
        self.proxy_last_sync = Gauge(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds", "The last time proxy rules were successfully synced.",
            registry=r)
        self.proxy_failures = Counter(
            "kubeproxy_sync_proxy_rules_nftables_sync_failures_total", "Cumulative proxy nftables sync failures.",
            registry=r)
        self.probes = Counter(
            "prober_probe_total", "Cumulative number of a liveness, readiness or startup probe for a container by result.",
            ["probe_type", "result", "container", "pod", "namespace"], registry=self.probe_registry)
        self._started_pods: dict[str, bool] = {}
        self._scrape = _ScrapeCollector()
        r.register(self._scrape)

    # --- hooks ---------------------------------------------------------------------------

    def runtime_operation(self, op: str, seconds: float, error: BaseException | None) -> None:
        self.runtime_ops.labels(op).inc()
        self.runtime_duration.labels(op).observe(seconds)
        if error is not None:
            self.runtime_errors.labels(op).inc()

    def pod_worker(self, operation: str, seconds: float) -> None:
        self.pod_worker_duration.labels(operation).observe(seconds)

    def pleg_relist(self, seconds: float) -> None:
        self.pleg_relist_duration.observe(seconds)
        self.pleg_last_seen.set(time.time())

    def api_request(self, method: str, resource: str, code: str, seconds: float) -> None:
        self.api_requests.labels(code, method, resource).inc()
        self.api_duration.labels(method, resource).observe(seconds)

    def watch_event(self, resource: str, type_: str) -> None:
        self.watch_events.labels(resource, type_).inc()

    def proxy_sync(self, seconds: float, full: bool, error: BaseException | None) -> None:
        if error is not None:
            self.proxy_failures.inc()
            return
        self.proxy_sync_duration.observe(seconds)
        (self.proxy_full_sync_duration if full else self.proxy_partial_sync_duration).observe(seconds)
        self.proxy_last_sync.set(time.time())

    def pod_status(self, uid: str, status: dict) -> None:
        """Observe the start duration once per pod: from its startTime (when the node
        accepted it) to the first status with phase Running."""
        if uid in self._started_pods or status.get("phase") != "Running":
            return
        self._started_pods[uid] = True
        started = _parse_time(status.get("startTime"))
        if started is not None:
            self.pod_start_duration.observe(max(0.0, time.time() - started))

    def forget_pod(self, uid: str) -> None:
        self._started_pods.pop(uid, None)

    def probe_result(self, probe_type: str, result: str, container: str, pod: str, namespace: str) -> None:
        self.probes.labels(probe_type, result, container, pod, namespace).inc()

    # --- scrape-time sources ----------------------------------------------------------------

    def add_source(self, source: Callable[[], Iterable[Any]]) -> None:
        """``source()`` yields metric families at scrape time (see _ScrapeCollector)."""
        self._scrape.sources.append(source)


class _ScrapeCollector(Collector):
    """Families computed at scrape time from what components already count. A source
    that fails is skipped (the rest of /metrics is still served)."""

    def __init__(self) -> None:
        self.sources: list[Callable[[], Iterable[Any]]] = []

    def collect(self):
        for source in self.sources:
            try:
                families = list(source())
            except Exception:
                continue
            yield from families

    def describe(self):
        return []


def _parse_time(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return float(calendar.timegm(time.strptime(value[:19], "%Y-%m-%dT%H:%M:%S")))
    except ValueError:
        return None


def gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


def counter(name: str, doc: str, labels: list[str] | None = None) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=labels)


__all__ = ["AgentMetrics", "counter", "gauge"]
