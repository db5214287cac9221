"""A node, its pods and an outside client, entirely in network namespaces.

    client (10.202.200.2) --veth-- node [cli0 10.202.200.1]
                                   node [br0 10.202.1.1/24] --veths-- pod1..podN (10.202.1.11..)
                                   node [sink0] --veth-- sink (empty netns: service CIDR goes there)

Nothing has a route out of these namespaces: a fresh netns has no default route, the
client's and pods' default routes point at the node, and the node routes the service
CIDR into the sink namespace, which has no addresses and no routes. So no test packet
can leave the machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

CLUSTER_CIDR = "10.202.0.0/17"
SERVICE_CIDR = "10.203.0.0/16"
NODE_BRIDGE_IP = "10.202.1.1"
NODE_CLIENT_IP = "10.202.200.1"
CLIENT_IP = "10.202.200.2"
POD_PORT = 8080
PODSERVER = Path(__file__).with_name("podserver.py")


def run(*args: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {result.stderr.strip()}")
    return result


@contextlib.contextmanager
def in_netns(name: str):
    """Run the block with this thread inside netns ``name`` (sockets made here stay there)."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
        try:
            yield
        finally:
            if _libc.setns(home, CLONE_NEWNET) != 0:  # pragma: no cover - would be fatal
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(target)
        os.close(home)


def ns_socket(netns: str, kind: int = socket.SOCK_STREAM) -> socket.socket:
    with in_netns(netns):
        return socket.socket(socket.AF_INET, kind)


@dataclass
class Pod:
    name: str
    netns: str
    ip: str
    node: str  # the node name the EndpointSlice will claim for it
    process: subprocess.Popen | None = None


@dataclass
class Topology:
    run_id: str = field(default_factory=lambda: secrets.token_hex(3))
    pods: list[Pod] = field(default_factory=list)
    created: list[str] = field(default_factory=list)

    def ns(self, role: str) -> str:
        return f"np4t{self.run_id}-{role}"

    @property
    def node(self) -> str:
        return self.ns("node")

    @property
    def client(self) -> str:
        return self.ns("client")

    def _add_ns(self, role: str) -> str:
        name = self.ns(role)
        run("ip", "netns", "add", name)
        self.created.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def create(self, pods: list[tuple[str, str]]) -> None:
        """``pods``: (name, node it is said to run on)."""
        node = self._add_ns("node")
        client = self._add_ns("client")
        sink = self._add_ns("sink")
        for key, value in (("net.ipv4.ip_forward", "1"), ("net.bridge.bridge-nf-call-iptables", "1"),
                           ("net.ipv4.conf.all.send_redirects", "0")):
            run("ip", "netns", "exec", node, "sysctl", "-qw", f"{key}={value}")
        run("ip", "-n", node, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", node, "addr", "add", f"{NODE_BRIDGE_IP}/24", "dev", "br0")
        run("ip", "-n", node, "link", "set", "br0", "up")
        # client side
        run("ip", "-n", node, "link", "add", "cli0", "type", "veth", "peer", "name", "eth0", "netns", client)
        run("ip", "-n", node, "addr", "add", f"{NODE_CLIENT_IP}/24", "dev", "cli0")
        run("ip", "-n", node, "link", "set", "cli0", "up")
        run("ip", "-n", client, "addr", "add", f"{CLIENT_IP}/24", "dev", "eth0")
        run("ip", "-n", client, "link", "set", "eth0", "up")
        run("ip", "-n", client, "route", "add", "default", "via", NODE_CLIENT_IP)
        # the service CIDR leads into an empty namespace
        run("ip", "-n", node, "link", "add", "sink0", "type", "veth", "peer", "name", "eth0", "netns", sink)
        run("ip", "-n", node, "link", "set", "sink0", "up")
        run("ip", "-n", sink, "link", "set", "eth0", "up")
        run("ip", "-n", node, "route", "add", SERVICE_CIDR, "dev", "sink0")
        for i, (name, node_name) in enumerate(pods):
            pod_ns = self._add_ns(name)
            ip = f"10.202.1.{11 + i}"
            run("ip", "-n", node, "link", "add", f"vp{i}", "type", "veth", "peer", "name", "eth0", "netns", pod_ns)
            run("ip", "-n", node, "link", "set", f"vp{i}", "master", "br0", "up")
            # as the pod network does: with br_netfilter, a pod reaching itself through
            # a service is bridged back out of the port it came in on
            run("ip", "-n", node, "link", "set", f"vp{i}", "type", "bridge_slave", "hairpin", "on")
            run("ip", "-n", pod_ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            run("ip", "-n", pod_ns, "link", "set", "eth0", "up")
            run("ip", "-n", pod_ns, "route", "add", "default", "via", NODE_BRIDGE_IP)
            self.pods.append(Pod(name, pod_ns, ip, node_name))
        for pod in self.pods:
            self.start_server(pod)
        # something outside the cluster to talk to (pod egress)
        self.outside = Pod("outside", client, CLIENT_IP, "")
        self.start_server(self.outside)

    def start_server(self, pod: Pod, ports: tuple[int, ...] = (POD_PORT, 9090)) -> None:
        args = ["ip", "netns", "exec", pod.netns, sys.executable, str(PODSERVER), "--name", pod.name]
        for port in ports:
            args += ["--port", str(port)]
        pod.process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert pod.process.stdout is not None
        line = pod.process.stdout.readline()
        assert line.strip() == "ready", f"pod server {pod.name} did not start: {line!r}"

    def destroy(self) -> None:
        for pod in self.pods + ([self.outside] if getattr(self, "outside", None) else []):
            if pod.process is not None and pod.process.poll() is None:
                pod.process.kill()
                pod.process.wait(timeout=5)
        for name in reversed(self.created):
            run("ip", "netns", "del", name, check=False)
        self.created.clear()

    def pod(self, name: str) -> Pod:
        return next(p for p in self.pods if p.name == name)

    # ------------------------------------------------------------------ traffic

    def connect(self, netns: str, ip: str, port: int, timeout: float = 2.0) -> tuple[socket.socket, str]:
        """Open a TCP connection from ``netns``; returns it and the server's hello line."""
        sock = ns_socket(netns)
        sock.settimeout(timeout)
        try:
            sock.connect((ip, port))
            return sock, read_line(sock)
        except BaseException:
            sock.close()
            raise

    def request(self, netns: str, ip: str, port: int, timeout: float = 2.0) -> tuple[str, str]:
        """(pod name, source address the pod saw) of one TCP connection."""
        sock, hello = self.connect(netns, ip, port, timeout)
        sock.close()
        name, peer = hello.split()
        return name, peer

    def udp_request(self, netns: str, ip: str, port: int, timeout: float = 2.0,
                    sock: socket.socket | None = None) -> tuple[str, str]:
        own = sock is None
        sock = sock or ns_socket(netns, socket.SOCK_DGRAM)
        try:
            sock.settimeout(timeout)
            sock.sendto(b"hi", (ip, port))
            data, _ = sock.recvfrom(4096)
            name, peer = data.decode().split()
            return name, peer
        finally:
            if own:
                sock.close()

    # ------------------------------------------------------------------ inspection

    def nft(self, *args: str) -> str:
        return run("ip", "netns", "exec", self.node, "nft", *args).stdout

    def nft_json(self, table: str) -> list[dict]:
        """The table's objects without handles, in a comparable form."""
        data = json.loads(self.nft("-j", "list", "table", "ip", table))["nftables"]
        out = []
        for item in data:
            if "metainfo" in item:
                continue
            ((kind, body),) = item.items()
            body = {k: v for k, v in body.items() if k != "handle"}
            out.append({kind: body})
        return out

    def conntrack_count(self, *filters: str) -> int:
        result = run("ip", "netns", "exec", self.node, "conntrack", "-L", *filters, check=False)
        return sum(1 for line in result.stdout.splitlines() if line.strip())


def read_line(sock: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"connection closed after {data!r}")
        data += chunk
    return data.decode().strip()


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
