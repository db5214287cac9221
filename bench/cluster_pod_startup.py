"""Cluster mode: API pod start latency against the standalone path, API requests per pod
start, agent RSS with 110 pods, and the watch event rate the agent keeps up with.

    .venv/bin/python bench/cluster_pod_startup.py [--runs 20] [--pods 110] [--rss-seconds 20]
                                                  [--rates 500,1000,2000,4000] [--rate-seconds 10]

One run, same machine, same Docker, one after the other:

A. Standalone agent (manifest directory): a manifest is written -> the pod's status on
   the agent's /pods says Running (polled every 20 ms for one pod, 50 ms for the burst).
   One pod at a time (--runs), then --pods manifests at once.
B. Cluster agent (--kubeconfig, test control plane in this process, node identity
   system:node:<node>): a pod bound to the node is created through the API (HTTPS, as the
   admin) -> a watcher (an Informer in this process) sees status.phase Running. Same
   one-pod runs and burst. The control plane counts every request the node makes, so
   requests per pod start come from its counters. Then the agent's RSS and CPU with the
   burst's pods running.
C. Watch throughput, with those pods still running: 100 pods bound to the node that it
   rejected at admission (a nodeSelector that does not match) get their annotations
   changed at a fixed rate, each change a MODIFIED event the agent receives, parses,
   caches, compares and hands to the pod's worker. Every 0.5 s a marker pod (also
   rejected) is created; the time until the agent's Failed status for it is stored is
   the lag of the agent's event processing. "Keeps up" = the marker lag at the end of the
   window is not growing (last 2 s p50 < 2x first 2 s p50 + 0.1 s) and the watch was
   never cut for falling behind.

Everything created carries the run's node label and is removed at the end (Docker
objects one at a time). No traffic leaves loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
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
import urllib.request
from pathlib import Path

import aiodocker
import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nodeagent.kube import Informer, KubeClient, load_kubeconfig  # noqa: E402
from nodeagent.kube import resources as R  # noqa: E402
from tests.controlplane import ControlPlane  # noqa: E402
from tests.controlplane import resources as cp_resources  # noqa: E402

IMAGE = "busybox:1.35"
PODS_RT = cp_resources.find("", "v1", "pods")
POD_CIDR = "10.247.250.0/24"
SCRIPT = "while true; do sleep 3600; done"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def summary(values: list[float], samples: bool = False) -> dict:
    out = {"n": len(values), "p50_s": round(pct(values, 50), 3), "p99_s": round(pct(values, 99), 3),
           "max_s": round(max(values), 3), "mean_s": round(statistics.mean(values), 3)}
    if samples:
        out["all_s"] = [round(v, 3) for v in values]
    return out


class StoredRunning:
    """When the control plane stored each pod's first status with phase Running (the
    agent's status patch arriving), from the store's own listener: no watch in between."""

    def __init__(self, cp: ControlPlane) -> None:
        self.at: dict[str, float] = {}
        self._cp = cp
        cp.store.listeners.append(self._listen)

    def _listen(self, ev) -> None:
        if ev.storage == "/pods" and (ev.obj.get("status") or {}).get("phase") == "Running":
            self.at.setdefault(ev.obj["metadata"]["name"], time.time())

    def close(self) -> None:
        self._cp.store.listeners.remove(self._listen)


def manifest(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "app", "image": IMAGE, "command": ["sh", "-c", SCRIPT]}]}}


def api_pod(name: str, node: str, **spec) -> dict:
    body = manifest(name)
    body["metadata"]["namespace"] = "default"
    body["spec"].update(nodeName=node, automountServiceAccountToken=False, **spec)
    return body


class Agent:
    def __init__(self, workdir: Path, node: str, *, kubeconfig: Path | None, manifests: bool = True,
                 extra_config: dict | None = None) -> None:
        self.workdir = workdir
        self.node = node
        self.port = free_port()
        token = secrets.token_hex(3)
        self.bridge = f"nab{token}"
        # The service proxy stays on (the agent's default) in its own nftables table.
        self.proxy_table = f"nab{token}"
        self.manifests = workdir / "m"
        self.manifests.mkdir(parents=True, exist_ok=True)
        cfg = workdir / "config.yaml"
        cfg.write_text(yaml.safe_dump({"bridge-name": self.bridge, "manifest-poll-period": 1.0,
                                       "proxy-table": self.proxy_table, **(extra_config or {})}))
        self.cmd = [sys.executable, "-m", "nodeagent.cli", "run", "--node-name", node,
                    "--pod-cidr", POD_CIDR, "--status-address", f"127.0.0.1:{self.port}",
                    "--root-dir", str(workdir / "root"), "--config", str(cfg), "--log-level", "warning"]
        if kubeconfig:
            self.cmd += ["--kubeconfig", str(kubeconfig)]
        if manifests or not kubeconfig:
            self.cmd += ["--manifest-dir", str(self.manifests)]
        self.proc: subprocess.Popen | None = None

    async def start(self) -> None:
        log = open(self.workdir / "agent.log", "w")
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdout=log, stderr=log)
        for _ in range(150):
            try:
                await asyncio.to_thread(self.pods)
                return
            except OSError:
                await asyncio.sleep(0.2)
        raise RuntimeError("agent did not come up")

    def pods(self) -> list[dict]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/pods", timeout=5) as resp:
            return json.load(resp)["items"]

    def write(self, name: str) -> float:
        """Write a static pod manifest; returns when it appeared (the clock's start)."""
        tmp = self.manifests / f".{name}.tmp"
        tmp.write_text(yaml.safe_dump(manifest(name)))
        t0 = time.time()
        os.replace(tmp, self.manifests / f"{name}.yaml")
        return t0

    async def wait_running(self, started: dict[str, float], interval: float) -> dict[str, float]:
        """Poll /pods until each named pod's status says Running; seconds from start."""
        seen: dict[str, float] = {}
        deadline = time.monotonic() + 600
        while set(started) - set(seen):
            pods = await asyncio.to_thread(self.pods)
            now = time.time()
            for p in pods:
                n = p["metadata"]["name"]
                if n in started and n not in seen and p["status"].get("phase") == "Running":
                    seen[n] = now - started[n]
            if time.monotonic() > deadline:
                raise TimeoutError(f"not running on /pods: {sorted(set(started) - set(seen))[:5]}")
            await asyncio.sleep(interval)
        return seen

    async def stop(self, docker: aiodocker.Docker) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, 20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        await remove_labelled(docker, f"io.nodeagent.node={self.node}")
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        subprocess.run(["nft", "delete", "table", "ip", self.proxy_table], capture_output=True)
        subprocess.run(["sh", "-c", f"grep -F '{self.workdir}' /proc/mounts | cut -d' ' -f2 | xargs -r -n1 umount -l"])


async def remove_labelled(docker: aiodocker.Docker, label: str) -> None:
    # One at a time: Docker 20.10's libnetwork deadlocks on concurrent network exits.
    for c in await docker.containers.list(all=True, filters={"label": [label]}):
        try:
            await c.delete(force=True)
        except aiodocker.DockerError:
            pass


async def wait_no_containers(docker, node: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while await docker.containers.list(all=True, filters={"label": [f"io.nodeagent.node={node}"]}):
        if time.monotonic() > deadline:
            raise TimeoutError("containers were not removed")
        await asyncio.sleep(0.2)


# --- A. standalone -------------------------------------------------------------------


async def standalone(args, docker, root: Path, tag: str) -> dict:
    node = f"bench-sa-{tag}"
    agent = Agent(root / "standalone", node, kubeconfig=None)
    await agent.start()
    out: dict = {}
    try:
        await asyncio.sleep(2)
        one = []
        for i in range(args.runs):
            full = f"one{i}-{node}"
            t0 = agent.write(f"one{i}")
            one.append((await agent.wait_running({full: t0}, 0.02))[full])
            (agent.manifests / f"one{i}.yaml").unlink()
            await wait_no_containers(docker, node)
        out["one_pod"] = summary(one, samples=True)
        print("standalone one pod", json.dumps(out["one_pod"]), flush=True)

        started = {f"burst{i}-{node}": agent.write(f"burst{i}") for i in range(args.pods)}
        burst = await agent.wait_running(started, 0.05)
        out["burst"] = summary(list(burst.values()))
        print("standalone burst", json.dumps(out["burst"]), flush=True)
    finally:
        await agent.stop(docker)
    return out


# --- B. cluster ----------------------------------------------------------------------


class RunningWatcher:
    """An Informer on pods in this process: the first time each pod shows phase Running."""

    def __init__(self, client: KubeClient) -> None:
        self.informer = Informer(client, R.PODS)
        self.informer.add_handler(self._handle)
        self.running: dict[str, float] = {}
        self.changed = asyncio.Event()

    def _handle(self, event: str, obj: dict, old) -> None:
        name = obj["metadata"]["name"]
        if event != "DELETED" and (obj.get("status") or {}).get("phase") == "Running" and name not in self.running:
            self.running[name] = time.time()
            self.changed.set()

    async def wait(self, names: set[str], timeout: float = 600) -> None:
        async with asyncio.timeout(timeout):
            while not names <= set(self.running):
                self.changed.clear()
                await self.changed.wait()


def node_requests(cp: ControlPlane, user: str) -> dict[str, int]:
    return {f"{verb} {res}": n for (u, verb, res), n in cp.request_counts.items() if u == user}


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


async def cluster(args, docker, root: Path, tag: str) -> dict:
    node = f"bench-cl-{tag}"
    user = f"system:node:{node}"
    cp = ControlPlane(root / "controlplane")
    await cp.start()
    admin = KubeClient(load_kubeconfig(cp.admin_kubeconfig), qps=0)
    watcher = RunningWatcher(admin)
    watcher.informer.start()
    stored = StoredRunning(cp)
    agent = Agent(root / "cluster", node, kubeconfig=cp.make_kubeconfig(user, ["system:nodes"]))
    out: dict = {}
    try:
        await agent.start()
        await cp.wait_for(lambda: any(c["type"] == "Ready" and c["status"] == "True" for c in
                                      ((cp.object("nodes", node) or {}).get("status") or {}).get("conditions") or []),
                          timeout=60, what="node Ready")
        await asyncio.sleep(2)

        # Background requests (lease, node status) over 10 s, to subtract from windows.
        before = node_requests(cp, user)
        await asyncio.sleep(10)
        background = delta(node_requests(cp, user), before)
        out["background_requests_per_10s"] = background

        one, one_stored, static_one, per_start = [], [], [], []
        for i in range(args.runs):
            # The same agent's manifest path right before, under the same conditions.
            full = f"sone{i}-{node}"
            t0 = agent.write(f"sone{i}")
            static_one.append((await agent.wait_running({full: t0}, 0.02))[full])
            (agent.manifests / f"sone{i}.yaml").unlink()
            await wait_no_containers(docker, node)
            await cp.wait_for(lambda: cp.object("pods", full, "default") is None, timeout=60, what="mirror gone")

            name = f"one{i}"
            before = node_requests(cp, user)
            t0 = time.time()
            await admin.create(R.PODS, api_pod(name, node))
            await watcher.wait({name})
            one.append(watcher.running[name] - t0)
            one_stored.append(stored.at[name] - t0)
            await asyncio.sleep(1.0)  # let the statuses and events of this start settle
            per_start.append(delta(node_requests(cp, user), before))
            await admin.delete(R.PODS, name, "default")
            await cp.wait_for(lambda: cp.object("pods", name, "default") is None, timeout=60, what="pod deleted")
            await wait_no_containers(docker, node)
        out["one_pod"] = summary(one, samples=True)
        out["one_pod_until_status_stored"] = summary(one_stored, samples=True)
        out["one_pod_static_same_agent"] = summary(static_one, samples=True)
        keys = sorted({k for d in per_start for k in d})
        out["requests_per_single_pod_start"] = {k: statistics.mean(d.get(k, 0) for d in per_start) for k in keys}
        print("cluster one pod", json.dumps(out["one_pod"]), json.dumps(out["requests_per_single_pod_start"]),
              flush=True)

        names = [f"burst{i}" for i in range(args.pods)]
        created: dict[str, float] = {}
        before = node_requests(cp, user)

        async def create(name: str) -> None:
            created[name] = time.time()
            await admin.create(R.PODS, api_pod(name, node))

        t_burst = time.time()
        await asyncio.gather(*(create(n) for n in names))
        await watcher.wait(set(names))
        burst = {n: watcher.running[n] - created[n] for n in names}
        all_running = max(watcher.running[n] for n in names) - t_burst
        await asyncio.sleep(3)
        burst_requests = delta(node_requests(cp, user), before)
        out["burst"] = dict(summary(list(burst.values())), all_running_s=round(all_running, 2))
        out["burst_until_status_stored"] = summary([stored.at[n] - created[n] for n in names])
        out["requests_per_pod_in_burst"] = {k: round(v / args.pods, 2) for k, v in sorted(burst_requests.items())}
        out["requests_per_pod_in_burst_total"] = round(sum(burst_requests.values()) / args.pods, 2)
        print("cluster burst", json.dumps(out["burst"]), json.dumps(out["requests_per_pod_in_burst"]), flush=True)

        proc = psutil.Process(agent.proc.pid)
        proc.cpu_percent(None)
        rss = []
        t_idle = time.monotonic()
        while time.monotonic() - t_idle < args.rss_seconds:
            await asyncio.sleep(1)
            rss.append(proc.memory_info().rss)
        out["idle_110"] = {"pods_running": args.pods, "rss_mb_max": round(max(rss) / 2**20, 1),
                           "cpu_percent_of_one_core": round(proc.cpu_percent(None), 2),
                           "seconds": args.rss_seconds}
        print("cluster idle", json.dumps(out["idle_110"]), flush=True)

        out["watch"] = await watch_throughput(args, cp, node, user, proc)
        out["rss_mb_after_watch_flood"] = round(proc.memory_info().rss / 2**20, 1)
        await agent.stop(docker)
        out["mixed_burst"] = await mixed_burst(args, docker, root, tag, cp, admin, watcher, stored)
    finally:
        stored.close()
        await watcher.informer.stop()
        await admin.close()
        await agent.stop(docker)
        await cp.stop()
    return out


async def mixed_burst(args, docker, root: Path, tag: str, cp: ControlPlane, admin: KubeClient,
                      watcher: "RunningWatcher", stored: StoredRunning) -> dict:
    """Half the burst from the API, half from manifests, created interleaved on one
    cluster-mode agent: both paths under the very same Docker contention."""
    node = f"bench-mx-{tag}"
    user = f"system:node:{node}"
    agent = Agent(root / "mixed", node, kubeconfig=cp.make_kubeconfig(user, ["system:nodes"]))
    try:
        await agent.start()
        await cp.wait_for(lambda: any(c["type"] == "Ready" and c["status"] == "True" for c in
                                      ((cp.object("nodes", node) or {}).get("status") or {}).get("conditions") or []),
                          timeout=60, what="node Ready")
        await asyncio.sleep(2)
        static_started: dict[str, float] = {}
        api_started: dict[str, float] = {}
        for i in range(args.pods // 2):
            static_started[f"ms{i}-{node}"] = agent.write(f"ms{i}")
            api_started[f"ma{i}"] = time.time()
            await admin.create(R.PODS, api_pod(f"ma{i}", node))
        static_task = asyncio.create_task(agent.wait_running(static_started, 0.05))
        await watcher.wait(set(api_started))
        static = await static_task
        api = [watcher.running[n] - t for n, t in api_started.items()]
        result = {"pods": len(static_started) + len(api_started),
                  "static_manifest_to_running_on_pods": summary(list(static.values())),
                  "api_create_to_running_in_api": summary(api),
                  "api_create_to_status_stored": summary([stored.at[n] - t for n, t in api_started.items()])}
        result["api_path_adds_p50_s"] = round(result["api_create_to_running_in_api"]["p50_s"]
                                              - result["static_manifest_to_running_on_pods"]["p50_s"], 3)
        result["api_path_adds_p99_s"] = round(result["api_create_to_running_in_api"]["p99_s"]
                                              - result["static_manifest_to_running_on_pods"]["p99_s"], 3)
        print("mixed burst", json.dumps(result), flush=True)
        return result
    finally:
        await agent.stop(docker)


# --- C. watch throughput -------------------------------------------------------------


async def watch_throughput(args, cp: ControlPlane, node: str, user: str, proc: psutil.Process) -> list[dict]:
    never = {"nodeSelector": {"bench.nodeagent.io/never": "true"}}
    targets = [f"flood{i}" for i in range(100)]
    for name in targets:
        cp.api.create(PODS_RT, "default", api_pod(name, node, **never))
    await cp.wait_for(lambda: all((cp.object("pods", n, "default")["status"].get("phase") == "Failed")
                                  for n in targets), timeout=120, what="flood pods rejected")
    # The generator's writes skip schema validation: the control plane shares this
    # process with the generator, and what is measured is the agent.
    cp.options.validate_writes = False
    failed_at: dict[str, float] = {}

    def listener(ev) -> None:
        if ev.storage == "/pods" and ev.obj["metadata"]["name"].startswith("marker") \
                and (ev.obj.get("status") or {}).get("phase") == "Failed":
            failed_at.setdefault(ev.obj["metadata"]["name"], time.time())
    cp.store.listeners.append(listener)
    results = []
    loop = asyncio.get_running_loop()
    seq = 0
    try:
        for rate in args.rates:
            watches_before = cp.request_counts[(user, "watch", "pods")]
            markers: dict[str, float] = {}
            proc.cpu_percent(None)
            sent = 0
            tick = 0.01
            carry = 0.0
            start = loop.time()
            next_tick = start
            next_marker = start
            while loop.time() - start < args.rate_seconds:
                carry += rate * tick
                while carry >= 1:
                    seq += 1
                    cp.api.patch(PODS_RT, "default", targets[seq % len(targets)], "application/merge-patch+json",
                                 {"metadata": {"annotations": {"bench.nodeagent.io/seq": str(seq)}}})
                    sent += 1
                    carry -= 1
                if loop.time() >= next_marker:
                    name = f"marker-{rate}-{len(markers)}"
                    markers[name] = time.time()
                    cp.api.create(PODS_RT, "default", api_pod(name, node, **never))
                    next_marker += 0.5
                next_tick += tick
                await asyncio.sleep(max(0.0, next_tick - loop.time()))
            elapsed = loop.time() - start
            cpu = proc.cpu_percent(None)
            await asyncio.sleep(5)  # let the last markers through
            lags = [(markers[m], failed_at[m] - markers[m]) for m in markers if m in failed_at]
            missing = [m for m in markers if m not in failed_at]
            lags.sort()
            first = [lag for t, lag in lags if t - lags[0][0] <= 2.0] if lags else []
            last = [lag for t, lag in lags if lags[-1][0] - t <= 2.0] if lags else []
            watches = cp.request_counts[(user, "watch", "pods")] - watches_before
            row = {"target_events_per_s": rate, "achieved_events_per_s": round(sent / elapsed),
                   "markers": len(markers), "markers_without_status": len(missing),
                   "lag_first_2s_p50_s": round(statistics.median(first), 3) if first else None,
                   "lag_last_2s_p50_s": round(statistics.median(last), 3) if last else None,
                   "lag_max_s": round(max(lag for _, lag in lags), 3) if lags else None,
                   "agent_cpu_percent_of_one_core": round(cpu, 1),
                   "watch_restarts": watches}
            row["keeps_up"] = bool(first and last and not missing and watches == 0
                                   and row["lag_last_2s_p50_s"] < 2 * row["lag_first_2s_p50_s"] + 0.1)
            results.append(row)
            print("watch", json.dumps(row), flush=True)
    finally:
        cp.store.listeners.remove(listener)
        cp.options.validate_writes = True
    return results


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--pods", type=int, default=110)
    ap.add_argument("--rss-seconds", type=float, default=20)
    ap.add_argument("--rates", type=lambda s: [int(x) for x in s.split(",")], default=[500, 1000, 2000, 4000])
    ap.add_argument("--rate-seconds", type=float, default=10)
    ap.add_argument("--skip-standalone", action="store_true")
    args = ap.parse_args()

    # SIGTERM/SIGINT cancel the run, so the cleanup in the finally blocks still happens.
    task = asyncio.current_task()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, task.cancel)
    tag = secrets.token_hex(3)
    root = Path(tempfile.mkdtemp(prefix="nodeagent-cluster-bench-"))
    docker = aiodocker.Docker()
    results: dict = {"machine": f"{platform.node()} {os.cpu_count()} cores, kernel {platform.release()}",
                     "args": vars(args)}
    try:
        if not args.skip_standalone:
            results["standalone"] = await standalone(args, docker, root, tag)
        results["cluster"] = await cluster(args, docker, root, tag)
        cl = results["cluster"]
        results["api_path_adds_same_agent_one_pod"] = {
            "p50_s": round(cl["one_pod"]["p50_s"] - cl["one_pod_static_same_agent"]["p50_s"], 3),
            "p99_s": round(cl["one_pod"]["p99_s"] - cl["one_pod_static_same_agent"]["p99_s"], 3)}
        if "standalone" in results:
            sa = results["standalone"]
            results["api_path_adds_vs_standalone_agent"] = {
                "one_pod_p50_s": round(cl["one_pod"]["p50_s"] - sa["one_pod"]["p50_s"], 3),
                "one_pod_p99_s": round(cl["one_pod"]["p99_s"] - sa["one_pod"]["p99_s"], 3),
                "burst_p50_s": round(cl["burst"]["p50_s"] - sa["burst"]["p50_s"], 3),
                "burst_p99_s": round(cl["burst"]["p99_s"] - sa["burst"]["p99_s"], 3),
            }
    finally:
        await docker.close()
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
