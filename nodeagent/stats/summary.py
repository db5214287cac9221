"""A Snapshot as kubelet's stats/v1alpha1 ``Summary`` (what metrics-server reads from
``/stats/summary``). Absent figures are left out, as Go's ``omitempty`` pointers are."""

from __future__ import annotations

import time
from typing import Any

from nodeagent.stats.host import DirUsage, NetSample
from nodeagent.stats.sampler import ContainerStats, PodStats, Snapshot


def rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _cpu(ts: str, usage_ns: int | None, rate: float | None) -> dict[str, Any] | None:
    if usage_ns is None:
        return None
    return _clean({"time": ts, "usageNanoCores": None if rate is None else int(rate),
                   "usageCoreNanoSeconds": usage_ns})


def _memory(ts: str, usage, working_set, rss, faults, major, limit=None) -> dict[str, Any] | None:
    if usage is None and working_set is None:
        return None
    available = None
    if limit is not None and working_set is not None:
        available = max(0, limit - working_set)
    return _clean({"time": ts, "availableBytes": available, "usageBytes": usage,
                   "workingSetBytes": working_set, "rssBytes": rss, "pageFaults": faults,
                   "majorPageFaults": major})


def _fs(ts: str, used: DirUsage | None, capacity: int | None, available: int | None,
        inodes: int | None = None, inodes_free: int | None = None) -> dict[str, Any] | None:
    if used is None:
        return None
    return _clean({"time": ts, "availableBytes": available, "capacityBytes": capacity,
                   "usedBytes": used.used_bytes, "inodesFree": inodes_free, "inodes": inodes,
                   "inodesUsed": used.inodes_used})


def _net(ts: str, interfaces: dict[str, NetSample]) -> dict[str, Any] | None:
    if not interfaces:
        return None
    items = [{"name": name, "rxBytes": n.rx_bytes, "rxErrors": n.rx_errors,
              "txBytes": n.tx_bytes, "txErrors": n.tx_errors}
             for name, n in sorted(interfaces.items())]
    # The default interface (eth0 in a pod) is also given inline, as kubelet does.
    first = next((i for i in items if i["name"] == "eth0"), items[0])
    return {"time": ts, **first, "interfaces": items}


def _container(c: ContainerStats, ts: str, snap: Snapshot) -> dict[str, Any]:
    g = c.cgroup
    node = snap.node
    return _clean({
        "name": c.name,
        "startTime": rfc3339(c.start_time),
        "cpu": _cpu(ts, g.cpu_usage_ns, c.cpu_nano_cores),
        "memory": _memory(ts, g.memory_usage, g.memory_working_set, g.memory_rss,
                          g.page_faults, g.major_page_faults, g.memory_limit),
        "rootfs": _fs(ts, c.rootfs, node.image_fs_capacity if node else None,
                      node.image_fs_available if node else None),
        "logs": _fs(ts, c.logs, node.fs_capacity if node else None,
                    node.fs_available if node else None),
    })


def _pod(p: PodStats, snap: Snapshot) -> dict[str, Any]:
    ts = rfc3339(snap.time)
    node = snap.node
    limits = [c.cgroup.memory_limit for c in p.containers]
    pod_limit = sum(limits) if limits and all(v is not None for v in limits) else None
    volumes = [
        {**_fs(ts, usage, node.fs_capacity if node else None, node.fs_available if node else None), "name": name}
        for name, usage in sorted(p.volumes.items())
    ]
    parts = [u for c in p.containers for u in (c.rootfs, c.logs) if u is not None] + list(p.volumes.values())
    ephemeral = (DirUsage(sum(u.used_bytes for u in parts), sum(u.inodes_used for u in parts))
                 if parts else None)
    pids = p.total("pids")
    return _clean({
        "podRef": {"name": p.ref.name, "namespace": p.ref.namespace, "uid": p.ref.uid},
        "startTime": rfc3339(p.start_time),
        "containers": [_container(c, ts, snap) for c in sorted(p.containers, key=lambda c: c.name)],
        "cpu": _cpu(ts, p.total("cpu_usage_ns"), p.cpu_nano_cores),
        "memory": _memory(ts, p.total("memory_usage"), p.total("memory_working_set"),
                          p.total("memory_rss"), p.total("page_faults"),
                          p.total("major_page_faults"), pod_limit),
        "network": _net(ts, p.network),
        "volume": volumes or None,
        "ephemeral-storage": _fs(ts, ephemeral, node.fs_capacity if node else None,
                                 node.fs_available if node else None),
        "process_stats": {"process_count": pids} if pids is not None else None,
    })


def build_summary(snap: Snapshot | None, *, node_name: str, node_start: float) -> dict[str, Any]:
    """The Summary for ``snap`` (an empty node section before the first sample)."""
    if snap is None:
        return {"node": {"nodeName": node_name, "startTime": rfc3339(node_start)}, "pods": []}
    ts = rfc3339(snap.time)
    n = snap.node
    node: dict[str, Any] = {"nodeName": node_name, "startTime": rfc3339(node_start)}
    if n is not None:
        node.update(_clean({
            "cpu": _cpu(ts, n.cpu_usage_ns, snap.node_cpu_nano_cores),
            "memory": _clean({"time": ts, "availableBytes": n.memory_available,
                              "usageBytes": n.memory_usage, "workingSetBytes": n.memory_working_set,
                              "rssBytes": n.memory_rss, "pageFaults": n.page_faults,
                              "majorPageFaults": n.major_page_faults}),
            "network": _net(ts, n.interfaces),
            "fs": {"time": ts, "availableBytes": n.fs_available, "capacityBytes": n.fs_capacity,
                   "usedBytes": n.fs_used, "inodesFree": n.fs_inodes_free, "inodes": n.fs_inodes,
                   "inodesUsed": n.fs_inodes - n.fs_inodes_free},
            "runtime": {"imageFs": {"time": ts, "availableBytes": n.image_fs_available,
                                    "capacityBytes": n.image_fs_capacity,
                                    "usedBytes": n.image_fs_used}},
            "rlimit": {"time": ts, "maxpid": n.max_pid, "curproc": n.num_processes},
        }))
    pods = [_pod(p, snap) for p in sorted(snap.pods.values(),
                                          key=lambda p: (p.ref.namespace, p.ref.name))]
    return {"node": node, "pods": pods}
