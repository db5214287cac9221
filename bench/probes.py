"""Cost of probing: 100 pods with an httpGet readiness probe every second and an exec
liveness probe every 10 s, against the same 100 pods without probes, in the same run.

    .venv/bin/python bench/probes.py [--pods 100] [--rounds 3] [--round-seconds 30]

Two agents run side by side (own node names, bridges, pod CIDRs, state dirs), one
with the probed pods and one with the same pods without probes, so both see the same
machine load. After every pod is running (and, with probes, Ready), CPU time of each
agent process is sampled over ``--rounds`` rounds of ``--round-seconds``; the probe
scheduling lateness (how late each worker tick fired) comes from the agent's
``probe timing`` log lines (one per 30 s window: p50, p99, max).

Network safety: each pod CIDR is first reserved by an ``unreachable`` route; probes go
from the node to the pods on the agent's own bridge; nothing else is sent. Everything
created carries the run's node labels and is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]

# Baseline for lateness: an idle asyncio process with the same tick pattern (100 timers
# every 1 s, 100 every 10 s) doing no work, run during the same rounds. It shows how
# late this machine wakes any asyncio timer at the moment; the agent's probe
# lateness is read against it.
TIMER_BASELINE = r"""
import asyncio, json, random, sys, time
async def main(seconds):
    loop = asyncio.get_running_loop()
    late = []
    async def ticker(period):
        nxt = loop.time() + random.uniform(0, period)
        while True:
            await asyncio.sleep(max(0, nxt - loop.time()))
            late.append(loop.time() - nxt)
            nxt += period
    tasks = [asyncio.create_task(ticker(1.0)) for _ in range(100)]
    tasks += [asyncio.create_task(ticker(10.0)) for _ in range(100)]
    await asyncio.sleep(seconds)
    late.sort()
    n = len(late)
    print(json.dumps({"ticks": n, "late_p50_ms": round(late[n // 2] * 1000, 2),
                      "late_p99_ms": round(late[int(n * 0.99)] * 1000, 2),
                      "late_max_ms": round(late[-1] * 1000, 2)}))
asyncio.run(main(float(sys.argv[1])))
"""


def pod(name: str, probes: bool) -> dict:
    container = {
        "name": "web", "image": "busybox:1.35",
        "command": ["sh", "-c", "mkdir -p /www && echo ok > /www/index.html && exec httpd -f -p 8080 -h /www"],
        "ports": [{"name": "http", "containerPort": 8080}],
    }
    if probes:
        container["readinessProbe"] = {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1}
        container["livenessProbe"] = {"exec": {"command": ["true"]}, "periodSeconds": 10}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"terminationGracePeriodSeconds": 1, "containers": [container]}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unused_subnets(n: int) -> list[int]:
    taken = subprocess.run(["ip", "-4", "route", "show"], capture_output=True, text=True).stdout
    return random.sample([i for i in range(10, 250) if f"10.244.{i}.0/24" not in taken], n)


class Agent:
    def __init__(self, workdir: Path, probes: bool, subnet: int) -> None:
        token = secrets.token_hex(3)
        self.node = f"pbench-{token}"
        self.probes = probes
        self.dir = workdir / ("probes" if probes else "plain")
        (self.dir / "m").mkdir(parents=True)
        self.cidr = f"10.244.{subnet}.0/24"
        self.port = free_port()
        self.config = self.dir / "config.yaml"
        self.config.write_text(yaml.safe_dump({
            "bridge-name": f"nap{token}", "proxy": False, "proxy-table": f"np{token}",
            "manifest-poll-period": 1.0}))
        self.log_path = self.dir / "agent.log"
        # Network safety: the range sinks locally if the bridge route is ever missing.
        subprocess.run(["ip", "route", "replace", "unreachable", self.cidr, "metric", "4000"], check=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nodeagent.cli", "run", "--manifest-dir", str(self.dir / "m"),
             "--node-name", self.node, "--pod-cidr", self.cidr, "--status-address", f"127.0.0.1:{self.port}",
             "--root-dir", str(self.dir / "root"), "--config", str(self.config), "--log-level", "info"],
            cwd=REPO, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT)
        self.ps = psutil.Process(self.proc.pid)

    def write_pods(self, n: int) -> None:
        for i in range(n):
            tmp = self.dir / "m" / f".p{i}.tmp"
            tmp.write_text(yaml.safe_dump(pod(f"p{i}", self.probes)))
            os.replace(tmp, self.dir / "m" / f"p{i}.yaml")

    def pods(self) -> list[dict]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/pods", timeout=10) as resp:
            return json.load(resp)["items"]

    def settled(self, n: int) -> bool:
        try:
            pods = self.pods()
        except OSError:
            return False
        ok = 0
        for p in pods:
            conds = {c["type"]: c["status"] for c in p["status"].get("conditions", [])}
            if p["status"].get("phase") == "Running" and conds.get("Ready") == "True":
                ok += 1
        return ok == n

    def cpu_seconds(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def timing_windows(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("event") == "probe timing":
                out.append(rec)
        return out

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        def ids(kind: str) -> list[str]:
            return subprocess.run(["docker", "ps", "-aq", "--filter", f"label=io.nodeagent.node={self.node}",
                                   "--filter", f"label=io.kubernetes.docker.type={kind}"],
                                  capture_output=True, text=True).stdout.split()
        apps = ids("container")
        if apps:  # they hold no network endpoint: removed together
            subprocess.run(["docker", "rm", "-f", *apps], capture_output=True)
        for cid in ids("podsandbox"):  # one at a time (Docker 20.10 libnetwork, moby/moby#46661)
            subprocess.run(["docker", "rm", "-f", cid], capture_output=True)
        subprocess.run([sys.executable, "-m", "nodeagent.cli", "cleanup", "--config", str(self.config)],
                       cwd=REPO, capture_output=True, timeout=120)
        subprocess.run(["ip", "route", "del", "unreachable", self.cidr, "metric", "4000"], capture_output=True)
        subprocess.run(["sh", "-c", f"grep -F '{self.dir}' /proc/mounts | cut -d' ' -f2 | xargs -r -n1 umount -l"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pods", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--round-seconds", type=float, default=30.0)
    args = ap.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="nodeagent-probe-bench-"))
    subnets = unused_subnets(2)
    agents = [Agent(workdir, True, subnets[0]), Agent(workdir, False, subnets[1])]
    load = os.getloadavg()
    results: dict = {"machine": f"{platform.node()} {os.cpu_count()} cores, kernel {platform.release()}",
                     "pods": args.pods, "loadavg_at_start": load}
    try:
        time.sleep(3)
        for a in agents:
            a.write_pods(args.pods)
        t0 = time.monotonic()
        deadline = t0 + 600
        while not all(a.settled(args.pods) for a in agents):
            if time.monotonic() > deadline:
                raise SystemExit("pods did not all become ready within 10 minutes")
            time.sleep(2)
        results["all_ready_after_s"] = round(time.monotonic() - t0, 1)
        print(f"all pods ready after {results['all_ready_after_s']} s", flush=True)
        time.sleep(10)  # let start-up work finish
        rounds = []
        windows_before = len(agents[0].timing_windows())
        for r in range(args.rounds):
            start = [a.cpu_seconds() for a in agents]
            timer = subprocess.Popen([sys.executable, "-c", TIMER_BASELINE, str(args.round_seconds)],
                                     stdout=subprocess.PIPE, text=True)
            t = time.monotonic()
            time.sleep(args.round_seconds)
            elapsed = time.monotonic() - t
            cpu = [(a.cpu_seconds() - s) / elapsed * 100 for a, s in zip(agents, start)]
            baseline = json.loads(timer.communicate(timeout=60)[0])
            rounds.append({"with_probes_cpu_pct": round(cpu[0], 2), "without_probes_cpu_pct": round(cpu[1], 2),
                           "idle_timer_late_p99_ms": baseline["late_p99_ms"],
                           "idle_timer_late_p50_ms": baseline["late_p50_ms"],
                           "loadavg": os.getloadavg()[0]})
            print(json.dumps(rounds[-1]), flush=True)
        results["rounds"] = rounds
        windows = agents[0].timing_windows()[windows_before:]
        results["probe_timing_windows"] = [
            {k: w[k] for k in ("ticks", "late_p50_ms", "late_p99_ms", "late_max_ms")} for w in windows]
        with_p = sorted(r["with_probes_cpu_pct"] for r in rounds)
        without_p = sorted(r["without_probes_cpu_pct"] for r in rounds)
        results["summary"] = {
            "with_probes_cpu_pct_median": with_p[len(with_p) // 2],
            "without_probes_cpu_pct_median": without_p[len(without_p) // 2],
            "probe_cost_cpu_pct": round(with_p[len(with_p) // 2] - without_p[len(without_p) // 2], 2),
            "late_p99_ms_worst_window": max((w["late_p99_ms"] for w in windows), default=None),
            "late_max_ms": max((w["late_max_ms"] for w in windows), default=None),
            "idle_timer_late_p99_ms_worst_round": max(r["idle_timer_late_p99_ms"] for r in rounds),
        }
    finally:
        for a in agents:
            a.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
