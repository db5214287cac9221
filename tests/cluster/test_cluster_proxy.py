"""Cluster mode feeds the service proxy from Services/EndpointSlices and keeps host-gw
routes to other nodes' podCIDRs, all inside a network namespace the test creates."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess

import pytest

from netplugin.proxy import PodRoutes, ServiceProxy
from nodeagent.cluster.proxyfeed import ClusterServiceFeed
from nodeagent.kube import resources as R

pytestmark = [pytest.mark.root]


def sh(*args: str) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=True, timeout=30).stdout


@pytest.fixture
def node_ns():
    name = f"cpx{secrets.token_hex(3)}"
    sh("ip", "netns", "add", name)
    sh("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
    # A link on which the other node's InternalIP is on-link.
    sh("ip", "netns", "exec", name, "ip", "link", "add", "n0", "type", "veth", "peer", "name", "n1")
    sh("ip", "netns", "exec", name, "ip", "addr", "add", "10.202.250.1/24", "dev", "n0")
    sh("ip", "netns", "exec", name, "ip", "link", "set", "n0", "up")
    sh("ip", "netns", "exec", name, "ip", "link", "set", "n1", "up")
    yield name
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


async def wait_until(what, predicate, timeout=15.0):
    async with asyncio.timeout(timeout):
        while not (result := predicate()):
            await asyncio.sleep(0.1)
    return result


async def test_services_slices_and_node_routes_reach_the_kernel(controlplane, admin_client, node_ns):
    await admin_client.create(R.SERVICES, {
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.50", "selector": {"app": "web"},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}},
        namespace="default")
    await admin_client.create(R.ENDPOINTSLICES, {
        "metadata": {"name": "web-abc", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.244.9.7"], "conditions": {"ready": True}, "nodeName": "other"}]},
        namespace="default")
    await admin_client.create(R.NODES, {
        "metadata": {"name": "other"},
        "spec": {"podCIDR": "10.244.9.0/24"},
        "status": {"addresses": [{"type": "InternalIP", "address": "10.202.250.2"}]}})

    proxy = ServiceProxy(table="nodeagent", node_name="me", node_ips=["10.202.250.1"],
                         cluster_cidr="10.244.0.0/16", service_cidr="10.96.0.0/12",
                         min_sync_period=0.2, netns=node_ns, nodeport_range=(31000, 31100))
    recorded = []

    class Events:
        def record(self, involved, type_, reason, message):
            recorded.append((involved, type_, reason, message))

    feed = ClusterServiceFeed(admin_client, proxy, node_name="me",
                              routes=PodRoutes(node_name="me", netns=node_ns), route_sync_period=1.0,
                              events=Events())

    def table() -> str:
        out = subprocess.run(["ip", "netns", "exec", node_ns, "nft", "list", "table", "ip", "nodeagent"],
                             capture_output=True, text=True)
        return out.stdout

    def routes() -> list[dict]:
        return json.loads(sh("ip", "netns", "exec", node_ns, "ip", "-j", "route", "show", "10.244.9.0/24"))

    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(feed.run()), tg.create_task(proxy.run())]
        try:
            listing = await wait_until("service in the table", lambda: "10.244.9.7" in table() and table())
            assert "10.96.0.50 . tcp . 80" in listing
            (route,) = await wait_until("route to the other node", routes)
            assert route["gateway"] == "10.202.250.2"

            # An endpoint change arrives through the watch.
            await admin_client.patch(R.ENDPOINTSLICES, "web-abc", {
                "endpoints": [{"addresses": ["10.244.9.8"], "conditions": {"ready": True}, "nodeName": "other"}]},
                namespace="default", patch_type="application/merge-patch+json")
            await wait_until("new endpoint", lambda: "10.244.9.8" in table() and "10.244.9.7" not in table())

            # A Service the proxy cannot program (its NodePort is outside this node's range,
            # which the API server cannot know) is skipped with a Warning event; the
            # others keep working.
            await admin_client.create(R.SERVICES, {
                "metadata": {"name": "bad", "namespace": "default"},
                "spec": {"type": "NodePort", "clusterIP": "10.96.0.51",
                         "ports": [{"port": 81, "targetPort": 8080, "protocol": "TCP", "nodePort": 30555}]}},
                namespace="default")
            await wait_until("error event", lambda: any("default/bad" in str(e) for e in proxy.errors))
            await asyncio.sleep(0.5)
            assert "10.96.0.51" not in table() and "10.96.0.50 . tcp . 80" in table()
            assert [e for e in recorded if e[2] == "InvalidService" and e[0]["name"] == "bad"]

            # The other node goes away: its route goes too.
            await admin_client.delete(R.NODES, "other")
            await wait_until("route removed", lambda: not routes())
        finally:
            for t in tasks:
                t.cancel()
    proxy.close()
