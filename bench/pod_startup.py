"""Pod start latency and idle cost of the standalone agent, against direct Docker calls.

    .venv/bin/python bench/pod_startup.py [--runs 10] [--pods 110] [--rounds 3] [--idle-seconds 30]

Measures, in one run:
1. one pod (pause + one container, image present): manifest written -> app container
   running (Docker's `start` event), median over --runs, against the same Docker calls
   (create+start pause, create+start app joined to it) made directly with aiodocker;
2. --pods pods written at once -> all app containers running, against the same direct
   sequence for that many pods run concurrently. Both start from zero pods of the run
   on the engine (the previous round's pods are removed first) and use the same
   aiodocker connection pool (``runtime.engine.make_docker_client``: unbounded, as the
   agent's); --rounds rounds, agent and direct interleaved, medians reported;
3. the agent's RSS and CPU while idle with those pods running (after the first agent
   round, before its pods are removed).

Everything it creates carries a per-run node label and is removed at the end. No
traffic is sent anywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiodocker
import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from runtime.engine import close_docker_client, make_docker_client  # noqa: E402
IMAGE = "busybox:1.35"
PAUSE = "nodeagent/pause:1"


def pod(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "app", "image": IMAGE,
                                     "command": ["sh", "-c", "while true; do sleep 3600; done"]}]}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Watcher:
    """Docker `start` events of app containers with our node label, by pod name."""

    def __init__(self, docker: aiodocker.Docker, node: str) -> None:
        self.docker = docker
        self.node = node
        self.started: dict[str, float] = {}
        self.changed = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        sub = self.docker.events.subscribe(filters={
            "type": ["container"], "event": ["start"],
            "label": [f"io.nodeagent.node={self.node}", "io.kubernetes.container.name=app"]})
        ready = asyncio.Event()

        async def loop():
            ready.set()
            while True:
                ev = await sub.get()
                if ev is None:
                    return
                labels = ev["Actor"]["Attributes"]
                self.started[labels["io.kubernetes.pod.name"]] = ev["timeNano"] / 1e9
                self.changed.set()
        self._task = asyncio.create_task(loop())
        await ready.wait()
        await asyncio.sleep(0.2)

    async def wait(self, names: set[str], timeout: float) -> dict[str, float]:
        async with asyncio.timeout(timeout):
            while not names <= set(self.started):
                self.changed.clear()
                await self.changed.wait()
        return {n: self.started[n] for n in names}

    async def stop(self):
        if self._task:
            self._task.cancel()


async def direct_sequence(docker: aiodocker.Docker, tag: str, i: int) -> float:
    t0 = time.time()
    labels = {"nodeagent.bench": tag}
    sandbox = await docker.containers.create(
        {"Image": PAUSE, "Labels": labels,
         "HostConfig": {"NetworkMode": "none", "IpcMode": "shareable"}},
        name=f"bench_{tag}_pause_{i}")
    await sandbox.start()
    app = await docker.containers.create(
        {"Image": IMAGE, "Labels": labels, "Cmd": ["sh", "-c", "while true; do sleep 3600; done"],
         "HostConfig": {"NetworkMode": f"container:{sandbox.id}", "IpcMode": f"container:{sandbox.id}"}},
        name=f"bench_{tag}_app_{i}")
    await app.start()
    return time.time() - t0


async def remove_labelled(docker: aiodocker.Docker, label: str) -> None:
    # One at a time: Docker 20.10's libnetwork deadlocks on concurrent network exits.
    for c in await docker.containers.list(all=True, filters={"label": [label]}):
        try:
            await c.delete(force=True)
        except aiodocker.DockerError:
            pass


def agent_cmd(workdir: Path, node: str, port: int, bridge: str) -> list[str]:
    cfg = workdir / "config.yaml"
    # Its own nftables table too (named after the bridge): never the default "nodeagent"
    # of an agent that may run on this host, and removed with the bridge afterwards.
    cfg.write_text(yaml.safe_dump({"bridge-name": bridge, "proxy-table": bridge, "manifest-poll-period": 1.0}))
    return [sys.executable, "-m", "nodeagent.cli", "run", "--manifest-dir", str(workdir / "m"),
            "--node-name", node, "--pod-cidr", "10.244.250.0/24",
            "--status-address", f"127.0.0.1:{port}", "--root-dir", str(workdir / "root"),
            "--config", str(cfg), "--log-level", "warning"]


def cleanup_network(workdir: Path) -> None:
    """The agent's bridge, nftables table and forwarding rules (``nodeagent cleanup``)."""
    subprocess.run([sys.executable, "-m", "nodeagent.cli", "cleanup", "--config", str(workdir / "config.yaml")],
                   cwd=REPO, capture_output=True, timeout=60)


def write_manifest(directory: Path, name: str) -> None:
    tmp = directory / f".{name}.tmp"
    tmp.write_text(yaml.safe_dump(pod(name)))
    os.replace(tmp, directory / f"{name}.yaml")


async def wait_gone(docker, label: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not await docker.containers.list(all=True, filters={"label": [label]}):
            return
        await asyncio.sleep(0.2)
    raise TimeoutError("containers were not removed")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--pods", type=int, default=110)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--idle-seconds", type=float, default=30)
    args = ap.parse_args()

    tag = secrets.token_hex(3)
    node = f"bench-{tag}"
    bridge = f"nab{tag}"
    node_label = f"io.nodeagent.node={node}"
    # The agent's own client factory: the same unbounded pool for agent and baseline.
    docker = make_docker_client()
    workdir = Path(tempfile.mkdtemp(prefix="nodeagent-bench-"))
    (workdir / "m").mkdir()
    port = free_port()
    log = open(workdir / "agent.log", "w")
    proc = subprocess.Popen(agent_cmd(workdir, node, port, bridge), cwd=REPO, stdout=log, stderr=log)
    watcher = Watcher(docker, node)
    await watcher.start()
    results: dict = {"machine": f"{platform.node()} {os.cpu_count()} cores, kernel {platform.release()}",
                     "load_average_at_start": os.getloadavg()}
    try:
        await asyncio.sleep(2)
        # 1. one pod at a time
        agent_times, direct_times = [], []
        for i in range(args.runs):
            name = f"one{i}"
            t0 = time.time()
            write_manifest(workdir / "m", name)
            started = await watcher.wait({f"{name}-{node}"}, 60)
            agent_times.append(started[f"{name}-{node}"] - t0)
            (workdir / "m" / f"{name}.yaml").unlink()
            await wait_gone(docker, node_label)
            direct_times.append(await direct_sequence(docker, tag, i))
            await remove_labelled(docker, f"nodeagent.bench={tag}")
        results["one_pod"] = {
            "agent_median_s": statistics.median(agent_times),
            "direct_median_s": statistics.median(direct_times),
            "ratio": statistics.median(agent_times) / statistics.median(direct_times),
            "agent_all": agent_times, "direct_all": direct_times}
        print(json.dumps(results["one_pod"]), flush=True)

        # 2. bursts, agent and direct interleaved, each from zero pods
        agent_bursts, direct_bursts = [], []
        for r in range(args.rounds):
            names = {f"burst{r}-{i}-{node}" for i in range(args.pods)}
            t0 = time.time()
            for i in range(args.pods):
                write_manifest(workdir / "m", f"burst{r}-{i}")
            started = await watcher.wait(names, 600)
            agent_bursts.append(max(started.values()) - t0)
            print(json.dumps({"round": r, "agent_s": agent_bursts[-1]}), flush=True)
            if r == 0:
                # 3. idle cost with the burst running
                await asyncio.sleep(5)
                agent_ps = psutil.Process(proc.pid)
                agent_ps.cpu_percent(None)
                rss = []
                t_idle = time.monotonic()
                while time.monotonic() - t_idle < args.idle_seconds:
                    await asyncio.sleep(1)
                    rss.append(agent_ps.memory_info().rss)
                cpu = agent_ps.cpu_percent(None)
                results["idle"] = {"pods": args.pods, "rss_mb_max": max(rss) / 2**20,
                                   "cpu_percent_of_one_core": cpu, "seconds": args.idle_seconds}
                print(json.dumps(results["idle"]), flush=True)
            for i in range(args.pods):
                (workdir / "m" / f"burst{r}-{i}.yaml").unlink()
            await wait_gone(docker, node_label, timeout=600)

            t1 = time.time()
            await asyncio.gather(*(direct_sequence(docker, tag, 1000 * (r + 1) + i) for i in range(args.pods)))
            direct_bursts.append(time.time() - t1)
            print(json.dumps({"round": r, "direct_s": direct_bursts[-1]}), flush=True)
            await remove_labelled(docker, f"nodeagent.bench={tag}")
        results["burst"] = {"pods": args.pods, "rounds": args.rounds,
                            "agent_median_s": statistics.median(agent_bursts),
                            "direct_median_s": statistics.median(direct_bursts),
                            "ratio": statistics.median(agent_bursts) / statistics.median(direct_bursts),
                            "agent_all": agent_bursts, "direct_all": direct_bursts}
        results["load_average_at_end"] = os.getloadavg()
        print(json.dumps(results["burst"]), flush=True)
    finally:
        await watcher.stop()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        await remove_labelled(docker, node_label)
        await remove_labelled(docker, f"nodeagent.bench={tag}")
        await close_docker_client(docker)
        cleanup_network(workdir)
        subprocess.run(["sh", "-c", f"grep -F '{workdir}' /proc/mounts | cut -d' ' -f2 | xargs -r -n1 umount -l"])
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
