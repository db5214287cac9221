"""First-packet latency through a ClusterIP: verdict maps versus one rule per service.

    .venv/bin/python bench/proxy_latency.py [--sizes 10,1000,10000] [--samples 3000] [--rounds 10]

For every size, two setups, each in its own three network namespaces
(client 10.202.200.2 -> node -> server 10.202.1.2 listening on 8080):

* "proxy": the node runs a ServiceProxy with N services; one of them (port 80) has the
  server as its endpoint, the others point at unused addresses. Dispatch is one lookup
  in the ``service-ips`` verdict map.
* "baseline": the node holds a table built the way kube-proxy's iptables mode lays out
  KUBE-SERVICES: a chain with one rule per service port (``ip daddr X tcp dport 80 goto
  svc-X``), each svc chain DNATs. The measured service sits in the middle of the list
  (the average position).

The client measures connect() time (SYN out to SYN-ACK back: the first packet is the
one that walks the NAT rules) to the ClusterIP. Every round measures every setup, in
rotating order, so that machine noise hits them all alike. Reported: median and p90 per size, and
each size's median relative to the 10-service median of the same setup.
Target: proxy flat within 20 % from 10 to 10,000 services while the baseline grows.
Nothing leaves the namespaces (no default routes except towards the node).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import ipaddress
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import time

from _proxy_common import CLUSTER_CIDR, SERVICE_CIDR, machine, netns, percentile, run, service_objects

from netplugin.proxy import ServiceProxy, kernel, nfnl

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
TARGET_IP = "10.203.255.250"
SERVER_IP = "10.202.1.2"
SERVER_PORT = 8080
SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", %d)); s.listen(4096); print("ready", flush=True)
while True:
    c, _ = s.accept(); c.close()
""" % SERVER_PORT


@contextlib.contextmanager
def in_netns(name: str):
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
        try:
            yield
        finally:
            _libc.setns(home, CLONE_NEWNET)
    finally:
        os.close(target)
        os.close(home)


class Stack:
    """client -- node -- server, in three namespaces."""

    def __init__(self, exit_stack: contextlib.ExitStack, label: str) -> None:
        self.label = label
        self.node = exit_stack.enter_context(netns(f"{label}-node"))
        self.client = exit_stack.enter_context(netns(f"{label}-cli"))
        self.server = exit_stack.enter_context(netns(f"{label}-srv"))
        node, client, server = self.node, self.client, self.server
        run("ip", "netns", "exec", node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        run("ip", "-n", node, "link", "add", "cli0", "type", "veth", "peer", "name", "eth0", "netns", client)
        run("ip", "-n", node, "link", "add", "srv0", "type", "veth", "peer", "name", "eth0", "netns", server)
        for ns, dev, addr in ((node, "cli0", "10.202.200.1/24"), (node, "srv0", "10.202.1.1/24"),
                              (client, "eth0", "10.202.200.2/24"), (server, "eth0", f"{SERVER_IP}/24")):
            run("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")
        run("ip", "-n", client, "route", "add", "default", "via", "10.202.200.1")
        run("ip", "-n", server, "route", "add", "default", "via", "10.202.1.1")
        self.process = subprocess.Popen(["ip", "netns", "exec", server, sys.executable, "-c", SERVER],
                                        stdout=subprocess.PIPE, text=True)
        exit_stack.callback(self.process.kill)
        assert self.process.stdout is not None and self.process.stdout.readline().strip() == "ready"

    def connect_times(self, count: int) -> list[float]:
        """``count`` TCP connects to the target ClusterIP; seconds each."""
        out = []
        with in_netns(self.client):
            for _ in range(count):
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                started = time.perf_counter()
                sock.connect((TARGET_IP, 80))
                out.append(time.perf_counter() - started)
                sock.close()
        return out


def target_objects() -> tuple[dict, dict]:
    svc = {"metadata": {"name": "target", "namespace": "bench"},
           "spec": {"clusterIP": TARGET_IP, "ports": [{"name": "http", "port": 80}]}}
    sl = {"metadata": {"name": "target-1", "namespace": "bench", "labels": {"kubernetes.io/service-name": "target"}},
          "addressType": "IPv4", "ports": [{"name": "http", "port": SERVER_PORT}],
          "endpoints": [{"addresses": [SERVER_IP], "conditions": {"ready": True}, "nodeName": "node-b"}]}
    return svc, sl


async def size_proxy(proxy: ServiceProxy, current: int, wanted: int) -> None:
    """Grow the proxy from ``current`` to ``wanted`` services (the target included).
    The other services have one endpoint each: only the dispatch depends on their
    number, not on how many endpoints they have."""
    services, slices = service_objects(wanted - current, 1, first=current)
    for svc in services:
        proxy.on_service("ADDED", svc)
    for sl in slices:
        proxy.on_endpoint_slice("ADDED", sl)
    await proxy.sync_now()


def build_baseline(ns: str, size: int) -> None:
    """KUBE-SERVICES style: the target in the middle of ``size`` sequential rules."""
    table = "baseline"
    sock = kernel.NftSocket(ns)
    try:
        batch = nfnl.Batch(first_seq=sock.next_seq(10))
        batch.destroy_table(table)
        batch.new_table(table)
        batch.new_chain(table, "nat-prerouting", ("nat", "prerouting", -100))
        batch.new_chain(table, "services")
        batch.new_rule(table, "nat-prerouting", nfnl.e_verdict(nfnl.NFT_JUMP, "services"))
        services, slices = service_objects(size - 1, 1)
        entries = [(s["spec"]["clusterIP"], sl["endpoints"][0]["addresses"][0]) for s, sl in zip(services, slices)]
        entries.insert(len(entries) // 2, (TARGET_IP, SERVER_IP))
        for i, (cluster_ip, endpoint_ip) in enumerate(entries):
            chain = f"svc-{i}"
            batch.new_chain(table, chain)
            batch.new_rule(table, chain,
                           nfnl.e_immediate_data(socket.inet_aton(endpoint_ip), nfnl.REG_1)
                           + nfnl.e_immediate_data(struct.pack(">H", SERVER_PORT), 2) + nfnl.e_dnat(nfnl.REG_1, 2))
            batch.new_rule(table, "services",
                           nfnl.e_payload(nfnl.PAYLOAD_NETWORK, 16, 4) + nfnl.e_cmp(nfnl.CMP_EQ, socket.inet_aton(cluster_ip))
                           + nfnl.e_meta_load(nfnl.META_L4PROTO) + nfnl.e_cmp(nfnl.CMP_EQ, bytes((6,)))
                           + nfnl.e_payload(nfnl.PAYLOAD_TRANSPORT, 2, 2) + nfnl.e_cmp(nfnl.CMP_EQ, struct.pack(">H", 80))
                           + nfnl.e_verdict(nfnl.NFT_GOTO, chain))
        sock.send_batch(batch)
    finally:
        sock.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,1000,10000")
    parser.add_argument("--samples", type=int, default=3000, help="connects per size and setup")
    parser.add_argument("--rounds", type=int, default=150,
                        help="slots per setup; small slots interleave the setups finely in time")
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    per_round = max(1, args.samples // args.rounds)
    facts = machine()
    # the whole path (client syscall, both veth hops, the node's netfilter, the server's
    # SYN-ACK) runs in softirq on the sending CPU; keep it on one CPU
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    samples: dict[tuple[str, int], list[float]] = {}
    with contextlib.ExitStack() as stack:
        stacks: dict[tuple[str, int], Stack] = {}
        for size in sizes:
            proxy_stack = stacks[("proxy", size)] = Stack(stack, f"p{size}")
            proxy = ServiceProxy(table="nodeagent", node_name="node-a", node_ips=["10.202.200.1"],
                                 cluster_cidr=CLUSTER_CIDR, service_cidr=SERVICE_CIDR, netns=proxy_stack.node)
            stack.callback(proxy.close)
            svc, sl = target_objects()
            proxy.on_service("ADDED", svc)
            proxy.on_endpoint_slice("ADDED", sl)
            await size_proxy(proxy, 1, size)
            base_stack = stacks[("baseline", size)] = Stack(stack, f"b{size}")
            build_baseline(base_stack.node, size)
            print(f"set up {size} services", flush=True)
        order = list(stacks)
        for key in order:  # warm up: ARP, route caches, code paths
            stacks[key].connect_times(300)
        for round_index in range(args.rounds):
            # every round visits every setup, in a rotating order, so drift in machine
            # load spreads evenly over them
            shift = round_index % len(order)
            for key in order[shift:] + order[:shift]:
                samples.setdefault(key, []).extend(stacks[key].connect_times(per_round))

    summary: dict[str, object] = {"machine": facts, "samples_per_point": per_round * args.rounds,
                                  "measured_service_position_in_baseline": "middle of the rule list"}
    for name in ("proxy", "baseline"):
        first = statistics.median(samples[(name, sizes[0])])
        summary[name] = {}
        for size in sizes:
            values = samples[(name, size)]
            summary[name][str(size)] = {  # type: ignore[index]
                "median_us": round(statistics.median(values) * 1e6, 1),
                "p90_us": round(percentile(values, 90) * 1e6, 1),
                "vs_smallest": round(statistics.median(values) / first, 3)}
            print(f"{name:8s} {size:6d} services: median {statistics.median(values) * 1e6:7.1f} us, "
                  f"p90 {percentile(values, 90) * 1e6:7.1f} us", flush=True)
    growth = statistics.median(samples[("proxy", sizes[-1])]) / statistics.median(samples[("proxy", sizes[0])])
    summary["proxy_growth_smallest_to_largest"] = round(growth, 3)
    summary["target_flat_within_20pct"] = abs(growth - 1) <= 0.2
    summary["baseline_over_proxy_at_largest"] = round(
        statistics.median(samples[("baseline", sizes[-1])]) / statistics.median(samples[("proxy", sizes[-1])]), 2)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
