"""Idle cost of the agent with N pods: CPU (% of one core) and RSS of the agent process
once the pods run and the start-up work is over.

    .venv/bin/python bench/idle_cost.py --pods 110 --rounds 2 [--code DIR ...]

Each round starts a fresh standalone agent (its own node name, root dir, bridge
``naidle0`` and pod CIDR 10.244.250.0/24, as ``bench/pod_startup.py``'s ``agent_cmd``)
on N manifests of pause + one busybox container that sleeps, waits until all N app
containers run, waits ``--settle`` seconds (the first stats round inspects every new
container, the first relist sees them all: that is start-up, not idle), then samples
the agent's CPU time and RSS for ``--window`` seconds (60 by default: one full cycle of
every periodic task — 10 s relist, stats and housekeeping, the 60 s filesystem walk).

``--code DIR`` (repeatable) runs the agent from another checkout of this repository
(e.g. a ``git worktree`` of an older commit) with this repository's virtualenv; rounds
go through the checkouts in turn, so an old/new comparison is interleaved. No traffic
is sent anywhere. The agent is stopped with SIGTERM and every container of the round's
node is removed one at a time (Docker 20.10's network-exit deadlock), then the bridge
and the agent's nftables table (``nodeagent cleanup``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from pod_startup import agent_cmd, cleanup_network, free_port  # noqa: E402

BRIDGE = "naidle0"
APP = ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 3600 & wait $!; done"]


def app_containers(node: str) -> list[str]:
    return subprocess.run(
        ["docker", "ps", "-q", "--filter", f"label=io.nodeagent.node={node}",
         "--filter", "label=io.kubernetes.container.name=app"],
        capture_output=True, text=True, check=True).stdout.split()


def cleanup(node: str, workdir: Path) -> None:
    ids = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=io.nodeagent.node={node}"],
                         capture_output=True, text=True).stdout.split()
    for cid in ids:
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True, timeout=60)
    cleanup_network(workdir)


def one_round(code: Path, pods: int, settle: float, window: float, workdir: Path) -> dict:
    node = f"idle-{os.getpid()}-{int(time.time())}"
    subprocess.run(["rm", "-rf", str(workdir)], check=True)
    (workdir / "m").mkdir(parents=True)
    for i in range(pods):
        manifest = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"p{i}"},
                    "spec": {"terminationGracePeriodSeconds": 1, "containers": [
                        {"name": "app", "image": "busybox:1.35", "imagePullPolicy": "IfNotPresent",
                         "command": APP}]}}
        (workdir / "m" / f"p{i}.yaml").write_text(yaml.safe_dump(manifest))
    log = open(workdir / "agent.log", "wb")
    proc = subprocess.Popen(agent_cmd(workdir, node, free_port(), BRIDGE), cwd=code, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + max(300.0, 3.0 * pods)
        while len(app_containers(node)) < pods:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pods did not all start; see {workdir / 'agent.log'}")
            time.sleep(1.0)
        time.sleep(settle)
        agent = psutil.Process(proc.pid)
        cpu0, t0 = sum(agent.cpu_times()[:2]), time.monotonic()
        rss = []
        while time.monotonic() - t0 < window:
            time.sleep(1.0)
            rss.append(agent.memory_info().rss)
        cpu = (sum(agent.cpu_times()[:2]) - cpu0) / (time.monotonic() - t0)
        return {"code": str(code), "pods": pods, "cpu_percent_of_one_core": round(cpu * 100, 2),
                "rss_mb_max": round(max(rss) / 2**20, 1)}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
        cleanup(node, workdir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, default=110)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--settle", type=float, default=20.0)
    ap.add_argument("--window", type=float, default=60.0)
    ap.add_argument("--code", type=Path, action="append", help="a checkout to run the agent from (repeatable)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/nodeagent-idle-bench"))
    args = ap.parse_args()
    codes = args.code or [REPO]
    results = []
    for r in range(args.rounds):
        for code in codes:
            result = one_round(code.resolve(), args.pods, args.settle, args.window, args.workdir)
            results.append({"round": r + 1, **result})
            print(json.dumps(results[-1]), flush=True)
    subprocess.run(["rm", "-rf", str(args.workdir)])
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
