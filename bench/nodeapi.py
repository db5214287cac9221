"""The node API (issue 12): exec round trip, container logs throughput and memory,
port-forward throughput, each against a baseline measured in the same run.

    .venv/bin/python bench/nodeapi.py [--rounds 3] [--execs 15] [--log-mib 100] [--pf-mib 64]

One cluster agent (real agent process, test control plane in this process, real
kubectl, real Docker), one pod with two containers: `logs` writes --log-mib MiB of
1 KiB lines to stdout then sleeps; `http` serves a --pf-mib MiB file with busybox httpd.
Rounds interleave the measured path and its baseline:

* exec: `kubectl exec POD -- true` (kubectl -> WebSocket -> control plane -> SPDY ->
  node API -> Docker exec) vs `docker exec CONTAINER true` (Docker's CLI straight to the
  engine).
* logs: GET /containerLogs on the node API itself (HTTPS, the API server's client
  certificate) vs Docker's logs API on its unix socket, both read to the end; and
  `kubectl logs` end to end. The agent's RSS is sampled every 50 ms during the node
  API reads (target: flat, i.e. not growing with the log size).
* port-forward: HTTP GET of the file through `kubectl port-forward` (WebSocket tunnel ->
  control plane -> SPDY -> node -> pod netns) vs a direct GET to the pod IP (routed on
  the agent's bridge; the range is guarded by an unreachable route).

Everything is removed at the end. Traffic stays on loopback and the agent's bridge.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.cluster.conftest import Kubectl, find_kubectl  # noqa: E402
from tests.cluster.test_cluster_support import PODS_RT, ClusterAgent, api_pod, busybox  # noqa: E402
from tests.controlplane import ControlPlane  # noqa: E402

MIB = 1024 * 1024


async def read_all(response: aiohttp.ClientResponse) -> int:
    n = 0
    async for chunk in response.content.iter_chunked(1 << 20):
        n += len(chunk)
    return n


async def demux_rate(mib: int) -> float:
    """The node's own log de-framing alone: Docker's multiplexed format (1 KiB lines) fed
    from memory through an aiohttp StreamReader, read by containerlogs.demux (MiB/s)."""
    import struct

    from nodeagent.server.containerlogs import demux

    class _Proto:
        connected = True
        _reading_paused = False

        def pause_reading(self, **_: object) -> None: ...

        def resume_reading(self, **_: object) -> None: ...

    line = b"x" * 1023 + b"\n"
    block = (struct.pack(">BxxxL", 1, len(line)) + line) * 64
    reader = aiohttp.StreamReader(_Proto(), 1 << 22, loop=asyncio.get_running_loop())  # type: ignore[arg-type]

    async def produce() -> None:
        for i in range(mib * 16):
            reader.feed_data(block)
            if i % 64 == 0:
                await asyncio.sleep(0)
        reader.feed_eof()
    t = time.perf_counter()
    producer = asyncio.create_task(produce())
    got = 0
    async for chunk in demux(reader, False):
        got += len(chunk)
    await producer
    return got / MIB / (time.perf_counter() - t)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--execs", type=int, default=15)
    ap.add_argument("--log-mib", type=int, default=100)
    ap.add_argument("--pf-mib", type=int, default=64)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-nodeapi-"))
    cp = ControlPlane(work / "cp")
    await cp.start()
    kubectl = Kubectl(find_kubectl(), cp.admin_kubeconfig, work / "home")
    (work / "home").mkdir()
    (work / "agent").mkdir()
    agent = ClusterAgent(work / "agent", cp, extra_config={"node-ip": "127.0.0.1"})
    try:
        await agent.astart()
        await agent.wait_node_ready()
        line = "x" * 1023
        log_script = (f"yes {line} | head -c {args.log_mib * MIB}; echo; echo LOG-DONE; "
                      "trap 'exit 0' TERM; while true; do sleep 1; done")
        http_script = (f"mkdir -p /www && head -c {args.pf_mib * MIB} /dev/zero > /www/big && "
                       "exec httpd -f -p 8080 -h /www")
        cp.api.create(PODS_RT, "default", api_pod("bench", agent.node_name, [
            busybox("logs", log_script), busybox("http", http_script)]))
        pod = await agent.wait_api_running_ready("bench", timeout=600)
        pod_ip = pod["status"]["podIP"]
        containers = {c["name"]: c["containerID"].split("//")[1] for c in pod["status"]["containerStatuses"]}
        # Wait until the whole log is in Docker's log file.
        t0 = time.monotonic()
        while time.monotonic() - t0 < 600:
            out = subprocess.run(["docker", "logs", "--tail", "1", containers["logs"]],
                                 capture_output=True, text=True).stdout
            if "LOG-DONE" in out:
                break
            await asyncio.sleep(1)
        print(f"log written in {time.monotonic() - t0:.1f}s", flush=True)

        ssl_ctx = cp._kubelet_ssl()
        agent_proc = psutil.Process(agent.proc.pid)
        node = f"https://127.0.0.1:{agent.api_port}"
        res: dict[str, list[float]] = {k: [] for k in (
            "kubectl_exec", "docker_exec", "nodeapi_logs", "docker_logs", "kubectl_logs",
            "pf", "pf_node", "direct", "rss_before", "rss_peak")}

        for round_ in range(args.rounds):
            # --- exec round trip
            for _ in range(args.execs):
                t = time.perf_counter()
                await kubectl("exec", "bench", "-c", "logs", "--", "true")
                res["kubectl_exec"].append(time.perf_counter() - t)
                t = time.perf_counter()
                subprocess.run(["docker", "exec", containers["logs"], "true"], check=True)
                res["docker_exec"].append(time.perf_counter() - t)

            # --- logs
            async with aiohttp.ClientSession() as session:
                rss = [agent_proc.memory_info().rss]
                done = asyncio.Event()

                async def sample() -> None:
                    while not done.is_set():
                        rss.append(agent_proc.memory_info().rss)
                        await asyncio.sleep(0.05)
                sampler = asyncio.create_task(sample())
                t = time.perf_counter()
                async with session.get(f"{node}/containerLogs/default/bench/logs", ssl=ssl_ctx) as r:
                    n = await read_all(r)
                res["nodeapi_logs"].append(n / MIB / (time.perf_counter() - t))
                done.set()
                await sampler
                res["rss_before"].append(rss[0] / MIB)
                res["rss_peak"].append(max(rss) / MIB)
            conn = aiohttp.UnixConnector("/var/run/docker.sock")
            async with aiohttp.ClientSession(connector=conn) as session:
                t = time.perf_counter()
                async with session.get(f"http://docker/containers/{containers['logs']}/logs",
                                       params={"stdout": "1", "stderr": "1"}) as r:
                    n2 = await read_all(r)
                res["docker_logs"].append(n2 / MIB / (time.perf_counter() - t))
            t = time.perf_counter()
            env = dict(os.environ, KUBECONFIG=str(cp.admin_kubeconfig), HOME=str(work / "home"))
            proc = await asyncio.create_subprocess_exec(kubectl.binary, "logs", "bench", "-c", "logs",
                                                        stdout=asyncio.subprocess.PIPE, env=env)
            total = 0
            while chunk := await proc.stdout.read(1 << 20):
                total += len(chunk)
            await proc.wait()
            res["kubectl_logs"].append(total / MIB / (time.perf_counter() - t))

            # --- port-forward vs direct
            pf = await asyncio.create_subprocess_exec(
                kubectl.binary, "port-forward", "pod/bench", ":8080", stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=env)
            try:
                local = None
                while local is None:
                    m = re.match(rb"Forwarding from 127\.0\.0\.1:(\d+)", await asyncio.wait_for(pf.stdout.readline(), 20))
                    if m:
                        local = int(m.group(1))
                async with aiohttp.ClientSession() as session:
                    for kind, url in (("pf", f"http://127.0.0.1:{local}/big"), ("direct", f"http://{pod_ip}:8080/big")):
                        t = time.perf_counter()
                        async with session.get(url) as r:
                            n = await read_all(r)
                        assert n == args.pf_mib * MIB, (kind, n)
                        res[kind].append(n / MIB / (time.perf_counter() - t))
            finally:
                pf.kill()
                await pf.wait()
            # --- port-forward at the node API alone (an SPDY client in this process)
            from nodeagent.server.spdy import SpdySession
            from tests.controlplane.streaming import dial_upgrade

            status, _, _, reader, writer = await dial_upgrade(
                "127.0.0.1", agent.api_port, ssl_ctx, "/portForward/default/bench", ["portforward.k8s.io"])
            assert status == 101
            session = SpdySession(writer.write, writer.drain, server=False)

            async def feed() -> None:
                while chunk := await reader.read(1 << 20):
                    session.feed(chunk)
                session.feed_eof()
            feeder = asyncio.create_task(feed())
            try:
                await session.open_stream({"streamtype": "error", "port": "8080", "requestid": "0"})
                data = await session.open_stream({"streamtype": "data", "port": "8080", "requestid": "0"})
                t = time.perf_counter()
                await data.write(b"GET /big HTTP/1.0\r\n\r\n")
                n = 0
                while chunk := await data.read():
                    n += len(chunk)
                assert n > args.pf_mib * MIB, n
                res["pf_node"].append(args.pf_mib * MIB / MIB / (time.perf_counter() - t))
            finally:
                feeder.cancel()
                writer.close()
            print(f"round {round_ + 1} done", flush=True)

        med = {k: statistics.median(v) for k, v in res.items() if v}
        print("\nresults (median over rounds; exec: median over all calls)")
        print(f"exec round trip: kubectl exec {med['kubectl_exec'] * 1000:.0f} ms, "
              f"docker exec {med['docker_exec'] * 1000:.0f} ms, ratio {med['kubectl_exec'] / med['docker_exec']:.2f}")
        print(f"logs {args.log_mib} MiB: node API {med['nodeapi_logs']:.0f} MiB/s, Docker API "
              f"{med['docker_logs']:.0f} MiB/s (ratio {med['nodeapi_logs'] / med['docker_logs']:.2f}), "
              f"kubectl logs end to end {med['kubectl_logs']:.0f} MiB/s")
        print(f"agent RSS during node API log reads: before {med['rss_before']:.0f} MiB, "
              f"peak {max(res['rss_peak']):.0f} MiB")
        print(f"port-forward {args.pf_mib} MiB: kubectl port-forward {med['pf']:.0f} MiB/s, direct "
              f"{med['direct']:.0f} MiB/s, ratio {med['pf'] / med['direct']:.2f}; node API alone "
              f"(SPDY client -> node -> pod) {med['pf_node']:.0f} MiB/s, ratio {med['pf_node'] / med['direct']:.2f}")
        rates = [await demux_rate(args.log_mib) for _ in range(args.rounds)]
        print(f"node-side log de-framing alone (in memory, no Docker): {statistics.median(rates):.0f} MiB/s")
        print(f"load average: {os.getloadavg()}")
    finally:
        await agent.acleanup()
        await cp.stop()


if __name__ == "__main__":
    asyncio.run(main())
