"""Per-pod network setup time, sequential and 110 at once (root, real kernel).

    .venv/bin/python -m tests.netplugin.bench_podnet [--pods 110]

Creates its own bridge, /24 (sunk into an unreachable route first, like the tests),
state directory and network namespaces, and deletes them all at the end. Sends no
traffic.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import statistics
import subprocess
import tempfile
import time

import structlog

from netplugin.podnet import BridgeNetwork


def sh(*argv: str, check: bool = True) -> None:
    subprocess.run(argv, check=check, capture_output=True, timeout=30)


async def measure(pods: int, concurrent: bool) -> tuple[float, list[float]]:
    token = secrets.token_hex(3)
    bridge = f"natb{token}"
    cidr = f"10.201.{250 if concurrent else 249}.0/24"
    namespaces = [f"natbn{token}{i}" for i in range(pods)]
    sh("ip", "route", "add", "unreachable", cidr, "metric", "4000")
    net = BridgeNetwork(bridge_name=bridge, pod_cidr=cidr, state_dir=tempfile.mkdtemp(prefix="bench-ipam-"))
    try:
        for name in namespaces:
            sh("ip", "netns", "add", name)
        await net.start()

        async def one(i: int) -> float:
            began = time.perf_counter()
            await net.setup_pod(f"bench-{i}", f"/var/run/netns/{namespaces[i]}")
            return time.perf_counter() - began

        began = time.perf_counter()
        if concurrent:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(one(i)) for i in range(pods)]
            latencies = [t.result() for t in tasks]
        else:
            latencies = [await one(i) for i in range(pods)]
        return time.perf_counter() - began, latencies
    finally:
        for name in namespaces:
            sh("ip", "netns", "del", name, check=False)
        try:
            await net.destroy()
        finally:
            await net.stop()
            sh("ip", "route", "del", "unreachable", cidr, "metric", "4000", check=False)


def report(label: str, wall: float, latencies: list[float]) -> None:
    ms = sorted(x * 1000 for x in latencies)
    print(
        f"{label:>22}: {len(ms)} pods, wall {wall * 1000:7.0f} ms, "
        f"{wall * 1000 / len(ms):5.1f} ms/pod throughput, latency median {statistics.median(ms):6.1f} ms, "
        f"p95 {ms[int(len(ms) * 0.95) - 1]:6.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pods", type=int, default=110)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    report("sequential", *asyncio.run(measure(args.pods, concurrent=False)))
    report(f"{args.pods} concurrent", *asyncio.run(measure(args.pods, concurrent=True)))


if __name__ == "__main__":
    main()
