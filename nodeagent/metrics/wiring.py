"""Plugs one AgentMetrics into the agent's components (their optional hooks) and adds
the figures read at scrape time. The only place that knows both sides."""

from __future__ import annotations

from typing import Any

from nodeagent.metrics import AgentMetrics, counter, gauge


def instrument(agent: Any, metrics: AgentMetrics | None = None) -> AgentMetrics:
    m = metrics or AgentMetrics()
    agent.runtime.observer = m.runtime_operation
    agent.pleg.observer = m.pleg_relist
    agent.workers.observer = m.pod_worker
    if agent.proxy is not None:
        agent.proxy.observer = m.proxy_sync
        m.add_source(lambda: _proxy_families(agent.proxy))
    if agent.cluster is not None:
        agent.cluster.client.observer = m
        m.add_source(lambda: _status_manager_families(agent.cluster.status))
    m.add_source(lambda: _running_families(agent.pleg))
    sampler = getattr(agent, "stats", None)
    if sampler is not None:
        m.add_source(lambda: _sampler_families(sampler))
    return m


def _running_families(pleg: Any):
    pods, states = pleg.container_counts()
    running = gauge("kubelet_running_pods", "Number of pods that have a running pod sandbox")
    running.add_metric([], pods)
    containers = gauge("kubelet_running_containers", "Number of containers currently running",
                       ["container_state"])
    for state in ("created", "running", "exited", "unknown"):
        containers.add_metric([state], states.get(state, 0))
    return [running, containers]


def _status_manager_families(status: Any):
    writes = counter("nodeagent_status_manager_writes_total",
                     "Pod status writes to the API server by result", ["result"])
    for result, value in sorted(status.stats.items()):
        writes.add_metric([result], value)
    return [writes]


def _proxy_families(proxy: Any):
    counts = proxy.counts()
    objects = gauge("nodeagent_proxy_objects", "Objects the service proxy has programmed, by kind", ["kind"])
    for kind, value in sorted(counts.items()):
        objects.add_metric([kind], value)
    syncs = counter("nodeagent_proxy_syncs_total", "Service proxy syncs by kind", ["kind"])
    syncs.add_metric(["full"], proxy.full_syncs)
    syncs.add_metric(["partial"], proxy.syncs - proxy.full_syncs)
    return [objects, syncs]


def _sampler_families(sampler: Any):
    snap = sampler.latest
    rounds = counter("nodeagent_stats_rounds_total", "Resource usage sampling rounds")
    rounds.add_metric([], sampler.rounds)
    skipped = counter("nodeagent_stats_skipped_rounds_total",
                      "Sampling rounds skipped because the previous read was still running")
    skipped.add_metric([], sampler.skipped_rounds)
    errors = gauge("nodeagent_stats_errors", "Read errors in the latest resource usage sample")
    errors.add_metric([], len(snap.errors) if snap else 0)
    duration = gauge("nodeagent_stats_duration_seconds", "Wall time of the latest sampling round")
    duration.add_metric([], snap.duration if snap else 0.0)
    return [rounds, skipped, errors, duration]


def setup_observability(agent: Any) -> tuple[Any, AgentMetrics]:
    """Create the stats sampler and the metrics, and mount /metrics*, /stats/summary and
    the status page on the agent's status server. Returns (sampler, metrics)."""
    from nodeagent import __version__
    from nodeagent.kubelet.events import RecentEvents
    from nodeagent.server.metrics import StatsHandlers
    from nodeagent.server.page import StatusPage
    from nodeagent.stats.sampler import StatsSampler

    settings = agent.settings
    sampler = StatsSampler(agent.runtime, root_dir=settings.root_dir,
                           interval=settings.stats_interval, fs_interval=settings.stats_fs_interval)
    agent.stats = sampler
    # The PLEG lists the runtime every relist-period anyway: no second listing.
    sampler.listing = lambda: agent.pleg.last_listing
    metrics = instrument(agent)
    recent = RecentEvents(agent.kubelet.events)
    agent.kubelet.events = recent
    handlers = StatsHandlers(sampler=sampler, metrics=metrics, node_name=settings.node_name,
                             node_start=_boot_time())
    page = StatusPage(node_name=settings.node_name, version=__version__,
                      mode="cluster" if agent.cluster is not None else "standalone",
                      pods=agent.pod_list, sampler=sampler, checks=agent.server._checks,
                      warnings=lambda: list(recent.warnings), started_at=agent.started_at)
    agent.server.mount(handlers.routes() + page.routes())
    # Ready (beyond healthy): every pod source has reported and resource usage has been
    # sampled once. The server's check table is extended here, where both are known.
    agent.server._ready_checks.update({
        "sources": lambda: (agent._sources_synced(), "pod sources not synced yet"),
        "stats": lambda: (sampler.latest is not None, "no resource usage sample yet"),
    })
    # For other servers (the HTTPS node API) to mount the same handlers.
    agent.stats_handlers = handlers
    agent.status_page = page
    return sampler, metrics


def _boot_time() -> float:
    import psutil

    return psutil.boot_time()
