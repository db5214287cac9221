"""Traffic through the proxy's rules, in namespaces (see topology.py). Needs root."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from netplugin.proxy import HostPortMapping, ProxySyncError, cleanup

from .conftest import new_proxy
from .helpers import endpoint, endpoint_slice, service
from .topology import CLIENT_IP, NODE_BRIDGE_IP, NODE_CLIENT_IP, read_line, run, wait_until

pytestmark = pytest.mark.root

CLUSTER_IP = "10.203.0.10"


def pods_slice(topo, name: str, pods: list[str], **kw) -> dict:
    return endpoint_slice(name, [endpoint(topo.pod(p).ip, node=topo.pod(p).node, **kw) for p in pods])


async def publish(proxy, svc: dict, slice_: dict | None) -> None:
    proxy.on_service("ADDED", svc)
    if slice_ is not None:
        proxy.on_endpoint_slice("ADDED", slice_)
    await proxy.sync_now()


def nodeport_service(name: str, cluster_ip: str, node_port: int, **spec) -> dict:
    return service(name, cluster_ip, type="NodePort",
                   ports=[{"name": "http", "port": 80, "nodePort": node_port}], **spec)


async def test_nodeport_clusterip_and_node_local_access(topo, proxy) -> None:
    await publish(proxy, nodeport_service("web", CLUSTER_IP, 30080), pods_slice(topo, "web", ["pod2", "pod3"]))
    backends = {"pod2", "pod3"}
    # an outside client through the NodePort: served, and masqueraded (policy Cluster)
    name, seen = topo.request(topo.client, NODE_CLIENT_IP, 30080)
    assert name in backends and seen == NODE_BRIDGE_IP
    # a pod through the ClusterIP: served, with its own address preserved
    name, seen = topo.request(topo.pod("pod1").netns, CLUSTER_IP, 80)
    assert name in backends and seen == topo.pod("pod1").ip
    # the node itself (output hook) through both
    assert topo.request(topo.node, CLUSTER_IP, 80)[0] in backends
    assert topo.request(topo.node, NODE_BRIDGE_IP, 30080)[0] in backends
    # an outside host through the ClusterIP: masqueraded so the reply comes back
    name, seen = topo.request(topo.client, CLUSTER_IP, 80)
    assert name in backends and seen == NODE_BRIDGE_IP


async def test_load_spreads_over_all_endpoints(topo, proxy) -> None:
    await publish(proxy, nodeport_service("spread", CLUSTER_IP, 30081), pods_slice(topo, "spread", ["pod1", "pod2", "pod3"]))
    seen: dict[str, int] = {}
    for _ in range(60):  # P(some endpoint unseen after 60 tries) ~ 1e-10
        name, _ = topo.request(topo.client, NODE_CLIENT_IP, 30081)
        seen[name] = seen.get(name, 0) + 1
        if len(seen) == 3 and sum(seen.values()) >= 15:
            break
    assert set(seen) == {"pod1", "pod2", "pod3"}, seen


async def test_session_affinity_sticks(topo, proxy) -> None:
    svc = service("sticky", CLUSTER_IP, sessionAffinity="ClientIP",
                  sessionAffinityConfig={"clientIP": {"timeoutSeconds": 600}})
    await publish(proxy, svc, pods_slice(topo, "sticky", ["pod1", "pod2", "pod3"]))
    for client in ("pod4", "pod1"):
        names = {topo.request(topo.pod(client).netns, CLUSTER_IP, 80)[0] for _ in range(12)}
        assert len(names) == 1, f"{client} was spread over {names}"
    (chosen,) = {topo.request(topo.pod("pod4").netns, CLUSTER_IP, 80)[0]}
    affinity_set = f"affinity-default/sticky/tcp/http__{topo.pod(chosen).ip}/8080"
    listing = topo.nft("list", "set", "ip", proxy.table, affinity_set)
    assert topo.pod("pod4").ip in listing and "expires" in listing


async def test_service_without_endpoints_is_refused_at_once(topo, proxy) -> None:
    await publish(proxy, nodeport_service("empty", CLUSTER_IP, 30082), endpoint_slice("empty", []))
    await publish(proxy, service("web", "10.203.0.11"), pods_slice(topo, "web", ["pod2"]))
    cases = [
        (topo.pod("pod1").netns, CLUSTER_IP, 80),  # forwarded traffic
        (topo.node, CLUSTER_IP, 80),  # local traffic
        (topo.client, NODE_CLIENT_IP, 30082),  # NodePort
        (topo.pod("pod1").netns, "10.203.0.11", 81),  # a ClusterIP on a port it does not serve
    ]
    for netns, ip, port in cases:
        started = time.monotonic()
        with pytest.raises((ConnectionRefusedError, OSError)) as info:
            topo.request(netns, ip, port, timeout=3)
        assert not isinstance(info.value, socket.timeout), f"{ip}:{port} timed out instead of being refused"
        assert time.monotonic() - started < 1.0
    # an unallocated address of the service CIDR is dropped, not answered
    with pytest.raises(socket.timeout):
        topo.request(topo.pod("pod1").netns, "10.203.9.9", 80, timeout=0.5)


async def test_external_traffic_policy_local_keeps_client_address(topo, proxy) -> None:
    svc = nodeport_service("local", CLUSTER_IP, 30083, externalTrafficPolicy="Local")
    await publish(proxy, svc, pods_slice(topo, "local", ["pod1", "pod3"]))  # pod3 claims to be on node-b
    for _ in range(10):
        name, seen = topo.request(topo.client, NODE_CLIENT_IP, 30083)
        assert (name, seen) == ("pod1", CLIENT_IP)
    # in-cluster traffic still reaches every endpoint
    names = {topo.request(topo.pod("pod2").netns, CLUSTER_IP, 80)[0] for _ in range(40)}
    assert names == {"pod1", "pod3"}


async def test_endpoint_removal_takes_effect_and_flushes_udp_conntrack(topo, proxy) -> None:
    svc = service("dns", CLUSTER_IP, ports=[{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}])
    ports = [{"name": "http", "port": 8080}, {"name": "dns", "port": 9090, "protocol": "UDP"}]
    slice_ = endpoint_slice("dns", [endpoint(topo.pod("pod2").ip)], ports=ports)
    await publish(proxy, svc, slice_)
    udp = topo.udp_request  # one socket: the same 5-tuple (and conntrack entry) throughout
    from .topology import ns_socket
    sock = ns_socket(topo.pod("pod1").netns, socket.SOCK_DGRAM)
    try:
        assert udp(topo.pod("pod1").netns, CLUSTER_IP, 53, sock=sock)[0] == "pod2"
        proxy.on_endpoint_slice("MODIFIED", endpoint_slice("dns", [endpoint(topo.pod("pod3").ip)], ports=ports))
        await proxy.sync_now()
        # pod2 still runs and would answer if the old conntrack entry had survived
        assert udp(topo.pod("pod1").netns, CLUSTER_IP, 53, sock=sock)[0] == "pod3"
    finally:
        sock.close()
    assert {topo.request(topo.pod("pod1").netns, CLUSTER_IP, 80)[0] for _ in range(10)} == {"pod3"}


async def test_host_port(topo, proxy) -> None:
    pod4 = topo.pod("pod4")
    proxy.set_host_ports([HostPortMapping("TCP", 8081, pod4.ip, 8080),
                          HostPortMapping("TCP", 8082, pod4.ip, 8080, host_ip=NODE_CLIENT_IP),
                          HostPortMapping("TCP", 8081, topo.pod("pod1").ip, 8080)])  # conflict: skipped
    await proxy.sync_now()
    # like the CNI portmap plugin: outside clients keep their address
    assert topo.request(topo.client, NODE_CLIENT_IP, 8081) == ("pod4", CLIENT_IP)
    assert topo.request(topo.client, NODE_CLIENT_IP, 8082)[0] == "pod4"
    # hairpin: the pod reaching its own hostPort sees the node, not itself
    assert topo.request(pod4.netns, NODE_BRIDGE_IP, 8081) == ("pod4", NODE_BRIDGE_IP)
    # bound to one address only
    with pytest.raises(OSError):
        topo.request(topo.pod("pod1").netns, NODE_BRIDGE_IP, 8082, timeout=1)
    assert "conflicts with" in proxy.describe()


async def test_hairpin_through_cluster_ip(topo, proxy) -> None:
    await publish(proxy, service("self", CLUSTER_IP), pods_slice(topo, "self", ["pod1"]))
    assert topo.request(topo.pod("pod1").netns, CLUSTER_IP, 80) == ("pod1", NODE_BRIDGE_IP)


async def test_restart_keeps_connections_and_does_not_duplicate_rules(topo, proxy) -> None:
    svc, slice_ = nodeport_service("keep", CLUSTER_IP, 30084), pods_slice(topo, "keep", ["pod2"])
    await publish(proxy, svc, slice_)
    before = topo.nft_json(proxy.table)
    sock, hello = topo.connect(topo.client, NODE_CLIENT_IP, 30084)
    try:
        assert hello.startswith("pod2 ")
        proxy.close()
        restarted = new_proxy(topo, proxy.table)  # a new agent process would do exactly this
        try:
            await publish(restarted, svc, slice_)
            assert topo.nft_json(proxy.table) == before
            await restarted.full_resync()
            assert topo.nft_json(proxy.table) == before
        finally:
            restarted.close()
        sock.sendall(b"still there?\n")
        assert read_line(sock) == "pod2 still there?"
    finally:
        sock.close()


async def test_deleted_table_is_restored_by_the_sync_loop(topo, proxy) -> None:
    proxy.on_service("ADDED", service("back", CLUSTER_IP))
    proxy.on_endpoint_slice("ADDED", pods_slice(topo, "back", ["pod2"]))
    task = asyncio.create_task(proxy.run())
    try:
        assert await asyncio.to_thread(wait_until, lambda: proxy.syncs >= 1, 5)
        sock, _ = topo.connect(topo.pod("pod1").netns, CLUSTER_IP, 80)
        topo.nft("delete", "table", "ip", proxy.table)
        assert await asyncio.to_thread(
            wait_until, lambda: run("ip", "netns", "exec", topo.node, "nft", "list", "table", "ip",
                                    proxy.table, check=False).returncode == 0, 5)
        assert topo.request(topo.pod("pod1").netns, CLUSTER_IP, 80)[0] == "pod2"
        # the connection opened before the deletion survived it
        sock.sendall(b"hello\n")
        assert read_line(sock) == "pod2 hello"
        sock.close()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    # cancelling the loop leaves the rules in place
    assert topo.request(topo.pod("pod1").netns, CLUSTER_IP, 80)[0] == "pod2"


async def test_invalid_service_is_skipped_and_others_keep_working(topo, proxy) -> None:
    await publish(proxy, service("good", CLUSTER_IP), pods_slice(topo, "good", ["pod2"]))
    bad = service("bad", "10.203.0.12", ports=[{"name": "http", "port": 70000}])
    await publish(proxy, bad, pods_slice(topo, "bad", ["pod3"]))
    await publish(proxy, service("good2", "10.203.0.13"), pods_slice(topo, "good2", ["pod3"]))
    assert [(e.service, e.field) for e in proxy.errors] == [("default/bad", "spec.ports[0].port")]
    assert topo.request(topo.pod("pod1").netns, CLUSTER_IP, 80)[0] == "pod2"
    assert topo.request(topo.pod("pod1").netns, "10.203.0.13", 80)[0] == "pod3"
    shown = proxy.describe()
    assert "default/good:http" in shown and f"{topo.pod('pod2').ip}:8080" in shown
    assert "service default/bad: spec.ports[0].port" in shown


async def test_failed_batch_leaves_rules_and_is_repaired_by_full_resync(topo, proxy) -> None:
    await publish(proxy, service("good", CLUSTER_IP), pods_slice(topo, "good", ["pod2"]))
    # someone creates, behind the proxy's back, an object the next batch also wants,
    # with another type: that batch must fail as a whole
    blocker = f"affinity-default/aff/tcp/http__{topo.pod('pod3').ip}/8080"
    from netplugin.proxy import kernel, nfnl
    sock = kernel.NftSocket(topo.node)
    batch = nfnl.Batch(first_seq=sock.next_seq(10))
    batch.new_set(proxy.table, blocker, flags=0, key_type=nfnl.TYPE_INET_SERVICE, key_len=2)
    sock.send_batch(batch)
    sock.close()
    before = topo.nft_json(proxy.table)
    aff = service("aff", "10.203.0.14", sessionAffinity="ClientIP")
    proxy.on_service("ADDED", aff)
    proxy.on_endpoint_slice("ADDED", pods_slice(topo, "aff", ["pod3"]))
    with pytest.raises(ProxySyncError):
        await proxy.sync_now()
    assert topo.nft_json(proxy.table) == before  # nothing of the failed batch applied
    assert topo.request(topo.pod("pod1").netns, CLUSTER_IP, 80)[0] == "pod2"
    # retries escalate: a full resync, then (this one cannot update the foreign set in
    # place either) a rebuild of the whole table in one transaction
    attempts = 1
    while True:
        attempts += 1
        try:
            await proxy.sync_now()
            break
        except ProxySyncError:
            assert attempts < 3
            assert topo.nft_json(proxy.table) == before
    assert topo.request(topo.pod("pod1").netns, "10.203.0.14", 80)[0] == "pod3"
    assert topo.request(topo.pod("pod1").netns, CLUSTER_IP, 80)[0] == "pod2"


async def test_cleanup_removes_everything(topo, proxy) -> None:
    proxy.set_host_ports([HostPortMapping("TCP", 8083, topo.pod("pod4").ip, 8080)])
    await publish(proxy, nodeport_service("gone", CLUSTER_IP, 30085), pods_slice(topo, "gone", ["pod2"]))
    # a pod route as PodRoutes makes it, and somebody else's route
    run("ip", "-n", topo.node, "route", "add", "10.202.77.0/24", "via", NODE_CLIENT_IP, "proto", "157")
    run("ip", "-n", topo.node, "route", "add", "10.202.78.0/24", "via", NODE_CLIENT_IP, "proto", "static")
    assert proxy.table in topo.nft("list", "tables")
    await cleanup(proxy.table, topo.node)
    await cleanup(proxy.table, topo.node)  # idempotent
    assert proxy.table not in topo.nft("list", "tables")
    routes = run("ip", "-n", topo.node, "route", "show").stdout
    assert "10.202.77.0/24" not in routes and "10.202.78.0/24" in routes
    run("ip", "-n", topo.node, "route", "del", "10.202.78.0/24")
    with pytest.raises(OSError):
        topo.request(topo.client, NODE_CLIENT_IP, 30085, timeout=1)


async def test_internal_traffic_policy_local(topo, proxy) -> None:
    await publish(proxy, service("near", CLUSTER_IP, internalTrafficPolicy="Local"),
                  pods_slice(topo, "near", ["pod2", "pod3"]))  # pod3 claims node-b
    assert {topo.request(topo.pod("pod1").netns, CLUSTER_IP, 80)[0] for _ in range(15)} == {"pod2"}


async def test_terminating_endpoint_serves_only_when_nothing_is_ready(topo, proxy) -> None:
    ready = endpoint(topo.pod("pod2").ip, node="node-a")
    going = endpoint(topo.pod("pod3").ip, node="node-b", ready=False, serving=True, terminating=True)
    await publish(proxy, service("drain", CLUSTER_IP), endpoint_slice("drain", [ready, going]))
    assert {topo.request(topo.pod("pod1").netns, CLUSTER_IP, 80)[0] for _ in range(15)} == {"pod2"}
    proxy.on_endpoint_slice("MODIFIED", endpoint_slice("drain", [going]))
    await proxy.sync_now()
    assert {topo.request(topo.pod("pod1").netns, CLUSTER_IP, 80)[0] for _ in range(5)} == {"pod3"}


async def test_pod_egress_is_masqueraded_outside_the_cluster(topo, proxy) -> None:
    await proxy.sync_now()
    # to a host outside the cluster CIDR: the node's address
    assert topo.request(topo.pod("pod1").netns, CLIENT_IP, 8080) == ("outside", NODE_CLIENT_IP)
    # to another pod: its own address
    assert topo.request(topo.pod("pod1").netns, topo.pod("pod2").ip, 8080) == ("pod2", topo.pod("pod1").ip)


async def test_standalone_services_through_the_proxy(topo, proxy, tmp_path) -> None:
    from netplugin.proxy import StandaloneServices

    standalone = StandaloneServices(state_dir=tmp_path, node_name="node-a", service_cidr="10.203.0.0/16")
    manifests = [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
                  "spec": {"type": "NodePort", "selector": {"app": "web"},
                           "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}},
                 {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "bad", "namespace": "default"},
                  "spec": {"selector": {"app": "web"}, "ports": [{"port": 99999}]}}]
    pods = [{"metadata": {"name": p, "namespace": "default", "labels": {"app": "web"}},
             "spec": {"nodeName": "node-a"},
             "status": {"phase": "Running", "podIP": topo.pod(p).ip,
                        "conditions": [{"type": "Ready", "status": "True"}]}} for p in ("pod1", "pod2")]
    errors = standalone.sync(proxy, manifests, pods)
    assert [(e.service, e.field) for e in errors] == [("default/bad", "spec.ports[0].port")]
    await proxy.sync_now()
    web = standalone.compute(manifests, pods).services[0]
    cluster_ip, node_port = web["spec"]["clusterIP"], web["spec"]["ports"][0]["nodePort"]
    assert {topo.request(topo.pod("pod4").netns, cluster_ip, 80)[0] for _ in range(20)} == {"pod1", "pod2"}
    assert topo.request(topo.client, NODE_CLIENT_IP, node_port)[0] in {"pod1", "pod2"}
    # a pod stops being ready: it stops receiving traffic
    pods[1]["status"]["conditions"][0]["status"] = "False"
    standalone.sync(proxy, manifests, pods)
    await proxy.sync_now()
    assert {topo.request(topo.pod("pod4").netns, cluster_ip, 80)[0] for _ in range(10)} == {"pod1"}
