from __future__ import annotations

import os
import secrets

import pytest

from netplugin.proxy import ServiceProxy, cleanup

from .topology import CLUSTER_CIDR, NODE_BRIDGE_IP, NODE_CLIENT_IP, SERVICE_CIDR, Topology, run

PODS = [("pod1", "node-a"), ("pod2", "node-a"), ("pod3", "node-b"), ("pod4", "node-a")]


@pytest.fixture(scope="module")
def topo():
    if os.geteuid() != 0:
        pytest.fail("the service proxy kernel tests need root")
    topology = Topology()
    try:
        topology.create(PODS)
        yield topology
    finally:
        topology.destroy()


def new_proxy(topo: Topology, table: str, **kwargs) -> ServiceProxy:
    kwargs.setdefault("min_sync_period", 0.05)
    return ServiceProxy(table=table, node_name="node-a", node_ips=[NODE_CLIENT_IP, NODE_BRIDGE_IP],
                        cluster_cidr=CLUSTER_CIDR, service_cidr=SERVICE_CIDR, netns=topo.node, **kwargs)


@pytest.fixture
async def proxy(topo):
    table = f"np4{secrets.token_hex(3)}"
    instance = new_proxy(topo, table)
    try:
        yield instance
    finally:
        instance.close()
        await cleanup(table, topo.node)
        # connections of one test must not steer the next one
        run("ip", "netns", "exec", topo.node, "conntrack", "-F", check=False)
