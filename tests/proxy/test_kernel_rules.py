"""What the kernel holds, read back with the nft CLI. Needs root.

Every statement type the proxy uses appears in this ruleset; each chain's rules as
``nft list table`` prints them must equal the proxy's own rendering of its rules, so
the encoder and the text used by describe()/docs cannot drift apart.
"""

from __future__ import annotations

import re
import secrets

import pytest

from netplugin.proxy import HostPortMapping
from netplugin.proxy.stmts import rule_text

from .conftest import new_proxy
from .helpers import endpoint, endpoint_slice, service
from .topology import Topology, run

pytestmark = pytest.mark.root


@pytest.fixture
def node_ns():
    topology = Topology()
    name = topology._add_ns("node")
    try:
        yield topology, name
    finally:
        topology.destroy()


def listed_chains(text: str) -> dict[str, list[str]]:
    chains: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        stripped = line.strip()
        match = re.match(r"chain (\S+) \{$", stripped)
        if match:
            current = chains.setdefault(match.group(1), [])
        elif stripped == "}":
            current = None
        elif current is not None and stripped and not stripped.startswith("type "):
            current.append(stripped)
    return chains


async def test_every_construct_reads_back_as_written(node_ns) -> None:
    topology, netns = node_ns
    table = f"np4k{secrets.token_hex(3)}"
    proxy = new_proxy(topology, table, cascade_limit=3)
    try:
        proxy.set_host_ports([HostPortMapping("TCP", 8080, "10.202.1.5", 80),
                              HostPortMapping("UDP", 5353, "10.202.1.6", 53, host_ip="10.202.200.1")])
        eps = [endpoint(f"10.202.1.{i}", node="node-a" if i % 2 else "node-b") for i in range(10, 15)]
        # plain services: map elements and shared pick chains (eTP Local: external chain)
        proxy.on_service("ADDED", service("web", "10.203.0.10", type="LoadBalancer", externalIPs=["192.0.2.10"],
                                          externalTrafficPolicy="Local",
                                          ports=[{"name": "http", "port": 80, "nodePort": 30080}]))
        proxy.on_endpoint_slice("ADDED", endpoint_slice("web", eps))
        udp = [{"name": "dns", "port": 53, "protocol": "UDP"}]
        proxy.on_service("ADDED", service("dns", "10.203.0.12", type="NodePort",
                                          ports=[{"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053}]))
        proxy.on_endpoint_slice("ADDED", endpoint_slice("dns", eps[:1], ports=udp))
        proxy.on_service("ADDED", service("empty", "10.203.0.13", type="NodePort",
                                          ports=[{"name": "http", "port": 80, "nodePort": 30081}]))
        # session affinity: chains per endpoint (cascade, or a verdict map above 3)
        proxy.on_service("ADDED", service("sticky", "10.203.0.11", sessionAffinity="ClientIP"))
        proxy.on_endpoint_slice("ADDED", endpoint_slice("sticky", eps))
        proxy.on_service("ADDED", service("sticky2", "10.203.0.14", sessionAffinity="ClientIP", type="NodePort",
                                          externalTrafficPolicy="Local",
                                          ports=[{"name": "http", "port": 80, "nodePort": 30082}]))
        proxy.on_endpoint_slice("ADDED", endpoint_slice("sticky2", eps[:4]))
        await proxy.sync_now()

        text = run("ip", "netns", "exec", netns, "nft", "list", "table", "ip", table).stdout
        listed = listed_chains(text)
        ours = proxy._state.chains()
        assert set(listed) == set(ours)
        for name, chain in ours.items():
            assert listed[name] == [rule_text(rule) for rule in chain.rules], name
        # the constructs this test is meant to cover are really there
        flat = "\n".join(line for rules in listed.values() for line in rules)
        for needle in ("numgen random mod 5 vmap {", "numgen random mod 2 0 goto endpoint-default/sticky2", "update @affinity-",
                       "fib saddr type local", "ct state new", "reject", "masquerade fully-random",
                       "ip saddr . ip daddr @hairpin-endpoints", "ip saddr != 10.202.0.0/17",
                       "dnat to 10.202.1.5:80", "goto local-default/sticky2/tcp/http", "goto pick-local-2",
                       "numgen random mod 2 offset 65536 map @endpoints", "map @nodeport-endpoints", "goto pick-1"):
            assert needle in flat, needle
        for element in ("10.203.0.12 . udp . 53 : goto pick-1",
                        "udp . 30053 : goto pick-masquerade-1",
                        "10.203.0.12 . udp . 53 . 0x00000000 : 10.202.1.10 . 53",
                        "udp . 30053 . 0x00000000 : 10.202.1.10 . 53",
                        "192.0.2.10 . tcp . 80 . 0x00010001 : 10.202.1.13 . 8080",
                        "tcp . 30081 : goto reject-chain",
                        "10.202.200.1 . udp . 5353 : goto hostport-udp/10.202.200.1/5353",
                        "192.0.2.10 . tcp . 80 : goto external-default/web/tcp/http"):
            assert element in text, element
        # JSON output (what other tools consume) works too
        assert run("ip", "netns", "exec", netns, "nft", "-j", "list", "table", "ip", table).returncode == 0

        # an unchanged resync sends nothing; a full one rewrites to the same listing
        await proxy.sync_now()
        assert proxy.last_sync_phases.get("kernel") is None
        await proxy.full_resync()
        assert run("ip", "netns", "exec", netns, "nft", "list", "table", "ip", table).stdout == text
    finally:
        proxy.close()
