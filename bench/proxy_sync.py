"""Service proxy sync cost (docs/BENCHMARKS.md, "Service proxy").

    .venv/bin/python bench/proxy_sync.py [--services 10000] [--endpoints 10] [--runs 3] [--changes 200]

1. Full sync: --services ClusterIP Services x --endpoints endpoints, handed to a new
   ServiceProxy as Service + EndpointSlice dicts (the event handlers parse and validate
   them: timed apart, as kube-proxy's change trackers are), then sync_now() until the
   kernel acknowledged the transaction (END ack). Median of --runs, each into a fresh
   network namespace. Target: < 3 s.
2. Steady-state full resync of the same state (what the 30 s periodic resync costs).
3. One endpoint change until the kernel has it: one endpoint of one service flips
   readiness, on_endpoint_slice() then sync_now(); --changes samples spread over
   different services, p50/p99. minSyncPeriod batching is not part of this number (it
   is a deliberate delay, not a cost). Target: p99 < 50 ms.

Phase times (build = parse + ruleset + diff, encode = netlink bytes, kernel = send to
ack) and the worker thread's CPU time are reported too: other processes compete for
the 2 CPUs of the test machine, and wall time alone hides that.
Everything happens in network namespaces the script creates and deletes; no packets.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import statistics
import time

from _proxy_common import CLUSTER_CIDR, SERVICE_CIDR, machine, netns, percentile, service_objects

from netplugin.proxy import ServiceProxy


def new_proxy(ns: str) -> ServiceProxy:
    return ServiceProxy(table="nodeagent", node_name="node-a", node_ips=["10.202.255.1"],
                        cluster_cidr=CLUSTER_CIDR, service_cidr=SERVICE_CIDR, netns=ns)


async def one_run(services: list[dict], slices: list[dict], changes: int) -> dict:
    with netns("sync") as ns:
        proxy = new_proxy(ns)
        try:
            started = time.perf_counter()
            for svc in services:
                proxy.on_service("ADDED", svc)
            for sl in slices:
                proxy.on_endpoint_slice("ADDED", sl)
            events = time.perf_counter() - started
            started = time.perf_counter()
            await proxy.sync_now()
            full = time.perf_counter() - started
            full_phases = dict(proxy.last_sync_phases)

            started = time.perf_counter()
            await proxy.full_resync()
            resync = time.perf_counter() - started
            resync_phases = dict(proxy.last_sync_phases)

            # the first event after a big full sync pays the cyclic GC's pass over the
            # objects that sync created (the GC is paused during it); measured apart
            first = None
            latencies = []
            kernel = []
            step = max(1, len(slices) // max(1, changes))
            for i in range(changes):
                sl = copy.deepcopy(slices[(i * step) % len(slices)])
                endpoint = sl["endpoints"][i % len(sl["endpoints"])]
                endpoint["conditions"]["ready"] = False
                slices[(i * step) % len(slices)] = sl
                started = time.perf_counter()
                proxy.on_endpoint_slice("MODIFIED", sl)
                await proxy.sync_now()
                if first is None:
                    first = time.perf_counter() - started
                    continue
                latencies.append(time.perf_counter() - started)
                kernel.append(proxy.last_sync_phases.get("kernel", 0.0))
            return {"events": events, "full": full, "full_phases": full_phases, "resync": resync, "resync_phases": resync_phases,
                    "first_change": first, "change_latencies": latencies, "change_kernel": kernel}
        finally:
            proxy.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--changes", type=int, default=200)
    args = parser.parse_args()
    args.changes += 1  # the first change is reported apart (see one_run)

    facts = machine()
    results = []
    for run_index in range(args.runs):
        services, slices = service_objects(args.services, args.endpoints)
        result = await one_run(services, slices, args.changes if run_index == 0 else 0)
        results.append(result)
        print(f"run {run_index + 1}: events {result['events']:.2f} s, full sync {result['full']:.2f} s "
              f"{ {k: round(v, 3) for k, v in result['full_phases'].items()} }; "
              f"resync {result['resync']:.2f} s", flush=True)

    full = statistics.median(r["full"] for r in results)
    resync = statistics.median(r["resync"] for r in results)
    latencies = [x * 1000 for x in results[0]["change_latencies"]]
    kernel = [x * 1000 for x in results[0]["change_kernel"]]
    summary = {
        "machine": facts,
        "services": args.services,
        "endpoints_per_service": args.endpoints,
        "runs": args.runs,
        "event_handling_s": {"median": round(statistics.median(r["events"] for r in results), 3),
                             "note": "parse + validate all Service and EndpointSlice objects (change trackers)"},
        "full_sync_s": {"median": round(full, 3), "all": [round(r["full"], 3) for r in results],
                        "phases_of_median_run": sorted(results, key=lambda r: r["full"])[len(results) // 2]["full_phases"]},
        "full_resync_s": {"median": round(resync, 3), "all": [round(r["resync"], 3) for r in results],
                          "phases_of_first_run": results[0]["resync_phases"]},
        "endpoint_change_ms": {
            "first_after_full_sync": round(results[0]["first_change"] * 1000, 1) if results[0]["first_change"] else None,
            "samples": len(latencies),
            "p50": round(percentile(latencies, 50), 2),
            "p99": round(percentile(latencies, 99), 2),
            "max": round(max(latencies), 2) if latencies else None,
            "kernel_p50": round(percentile(kernel, 50), 2) if kernel else None,
            "kernel_p99": round(percentile(kernel, 99), 2) if kernel else None,
        },
        "targets": {"full_sync_lt_3s": full < 3.0,
                    "endpoint_change_p99_lt_50ms": bool(latencies) and percentile(latencies, 99) < 50},
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
