"""Resource usage of the node, its pods and their containers (kubelet's stats provider
with cAdvisor's job folded in): cgroup v1/v2 readers (``cgroups``), node-wide figures,
pod network namespaces and filesystem usage (``host``), the one sampling loop with its
bounded history (``sampler``), and the stats/v1alpha1 Summary built from a snapshot
(``summary``). Endpoints that serve these live in ``nodeagent/server/``.
"""

from nodeagent.stats.sampler import ContainerStats, PodStats, Snapshot, StatsSampler

__all__ = ["ContainerStats", "PodStats", "Snapshot", "StatsSampler"]
