"""Memory and CPU of list+watch with 110 pods: the thin client (nodeagent.kube) versus
kubernetes_asyncio. Results are written up in docs/API_CLIENT.md.

    .venv/bin/python bench/api_client_compare.py [--kasync-python /path/to/python]

The parent runs the test control plane in-process, creates 110 realistic pods bound to
one node, and starts one child process per client. Each child imports its client, lists
the node's pods into a cache, opens a watch from the list's resourceVersion and reports
readiness; the parent then writes `--rounds` status updates to every pod and the child
counts the events until it has seen them all. The child reports RSS and CPU time (user +
system) after each phase. kubernetes_asyncio needs its own interpreter (it is not a
project dependency): create one with `python -m venv X && X/bin/pip install
kubernetes_asyncio psutil` and pass X/bin/python. Traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NODE = "bench-node"
PODS = 110

# --- child side (runs under either interpreter; only stdlib + psutil + the client) -------


def _usage() -> dict:
    import psutil

    proc = psutil.Process()
    cpu = proc.cpu_times()
    return {"rss_mb": round(proc.memory_info().rss / 2**20, 1), "cpu_s": round(cpu.user + cpu.system, 3)}


async def _child_thin(kubeconfig: str, expected: int) -> dict:
    phases = {"start": _usage()}
    sys.path.insert(0, str(REPO))
    from nodeagent.kube import KubeClient, load_kubeconfig  # noqa: PLC0415
    from nodeagent.kube import resources as R  # noqa: PLC0415

    phases["imported"] = _usage()
    client = KubeClient(load_kubeconfig(kubeconfig))
    listed = await client.list(R.PODS, field_selector=f"spec.nodeName={NODE}")
    cache = {(p["metadata"]["namespace"], p["metadata"]["name"]): p for p in listed["items"]}
    phases["listed"] = _usage()
    seen = 0
    async with client.watch(R.PODS, resource_version=listed["metadata"]["resourceVersion"],
                            field_selector=f"spec.nodeName={NODE}", timeout_seconds=600) as stream:
        print("READY", flush=True)
        started = time.monotonic()
        async for event in stream:
            if event.type in ("ADDED", "MODIFIED"):
                meta = event.object["metadata"]
                cache[(meta["namespace"], meta["name"])] = event.object
                seen += 1
                if seen >= expected:
                    break
        elapsed = time.monotonic() - started
    phases["watched"] = _usage()
    await client.close()
    return {"phases": phases, "events": seen, "watch_seconds": round(elapsed, 3), "cached": len(cache)}


async def _child_kasync(kubeconfig: str, expected: int) -> dict:
    phases = {"start": _usage()}
    from kubernetes_asyncio import client, config, watch  # noqa: PLC0415

    phases["imported"] = _usage()
    await config.load_kube_config(config_file=kubeconfig)
    api_client = client.ApiClient()
    v1 = client.CoreV1Api(api_client)
    listed = await v1.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={NODE}")
    cache = {(p.metadata.namespace, p.metadata.name): p for p in listed.items}
    phases["listed"] = _usage()
    seen = 0
    w = watch.Watch()
    print("READY", flush=True)
    started = time.monotonic()
    async for event in w.stream(v1.list_pod_for_all_namespaces, field_selector=f"spec.nodeName={NODE}",
                                resource_version=listed.metadata.resource_version, timeout_seconds=600):
        if event["type"] in ("ADDED", "MODIFIED"):
            obj = event["object"]
            cache[(obj.metadata.namespace, obj.metadata.name)] = obj
            seen += 1
            if seen >= expected:
                break
    elapsed = time.monotonic() - started
    w.stop()
    phases["watched"] = _usage()
    await api_client.close()
    return {"phases": phases, "events": seen, "watch_seconds": round(elapsed, 3), "cached": len(cache)}


def child_main(kind: str, kubeconfig: str, expected: int) -> None:
    runner = _child_thin if kind == "thin" else _child_kasync
    result = asyncio.run(runner(kubeconfig, expected))
    print("RESULT " + json.dumps(result), flush=True)


# --- parent side ------------------------------------------------------------------------

def bench_pod(i: int) -> dict:
    name = f"bench-{i:03d}"
    return {
        "metadata": {"name": name, "namespace": "default",
                     "labels": {"app": f"app-{i % 7}", "pod-template-hash": "5d9f8c7b6d"},
                     "annotations": {"kubernetes.io/config.source": "api"}},
        "spec": {"nodeName": NODE, "containers": [{
            "name": "main", "image": "busybox:1.35", "command": ["sh", "-c", "sleep 3600"],
            "env": [{"name": f"VAR_{k}", "value": f"value-{k}"} for k in range(5)],
            "ports": [{"containerPort": 8080, "name": "http"}],
            "resources": {"requests": {"cpu": "10m", "memory": "16Mi"},
                          "limits": {"cpu": "100m", "memory": "64Mi"}},
            "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}}}]},
    }


def status_patch(i: int, round_: int) -> bytes:
    return json.dumps({"status": {
        "phase": "Running", "podIP": f"10.244.0.{i + 2}", "podIPs": [{"ip": f"10.244.0.{i + 2}"}],
        "hostIP": "192.0.2.10", "startTime": "2024-01-01T00:00:00Z",
        "conditions": [{"type": t, "status": "True", "lastTransitionTime": "2024-01-01T00:00:00Z"}
                       for t in ("PodReadyToStartContainers", "Initialized", "ContainersReady", "Ready",
                                 "PodScheduled")],
        "containerStatuses": [{"name": "main", "ready": True, "restartCount": round_, "started": True,
                               "image": "busybox:1.35", "imageID": "docker-pullable://busybox@sha256:" + "0" * 64,
                               "containerID": f"docker://{i:064x}",
                               "state": {"running": {"startedAt": "2024-01-01T00:00:00Z"}}}]}}).encode()


async def run_child(python: str, kind: str, kubeconfig: Path, rounds: int, cp) -> dict:
    from tests.controlplane.resources import RESOURCES

    pods_rt = next(r for r in RESOURCES if r.plural == "pods" and r.group == "")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = await asyncio.create_subprocess_exec(
        python, str(Path(__file__).resolve()), "--child", kind, "--kubeconfig", str(kubeconfig),
        "--expected", str(PODS * rounds), stdout=asyncio.subprocess.PIPE, env=env)
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    if line.strip() != b"READY":
        raise RuntimeError(f"{kind} child did not get ready: {line!r}")
    await asyncio.sleep(0.3)  # let the watch request reach the server
    for round_ in range(1, rounds + 1):
        for i in range(PODS):
            cp.api.patch(pods_rt, "default", f"bench-{i:03d}", "application/strategic-merge-patch+json",
                         status_patch(i, round_), subresource="status")
            if i % 10 == 0:
                await asyncio.sleep(0)  # let the server stream events while writing
    result_line = await asyncio.wait_for(proc.stdout.readline(), 120)
    await proc.wait()
    return json.loads(result_line.decode().split(" ", 1)[1])


async def parent_main(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(REPO))
    import structlog

    from tests.controlplane import ControlPlane, Options
    from tests.controlplane.resources import RESOURCES

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    pods_rt = next(r for r in RESOURCES if r.plural == "pods" and r.group == "")
    results: dict[str, list[dict]] = {}
    async with ControlPlane(options=Options(validate_writes=False)) as cp:
        for i in range(PODS):
            cp.api.create(pods_rt, "default", bench_pod(i))
        clients = [("thin", sys.executable)]
        if args.kasync_python:
            clients.append(("kubernetes_asyncio", args.kasync_python))
        for _ in range(args.repeat):
            for kind, python in clients:
                results.setdefault(kind, []).append(
                    await run_child(python, kind, cp.admin_kubeconfig, args.rounds, cp))
    summary = {}
    for kind, runs in results.items():
        def med(phase: str, key: str, runs: list[dict] = runs) -> float:
            return statistics.median(r["phases"][phase][key] for r in runs)

        summary[kind] = {
            "rss_start_mb": med("start", "rss_mb"),
            "rss_after_import_mb": med("imported", "rss_mb"),
            "rss_after_list_mb": med("listed", "rss_mb"),
            "rss_after_watch_mb": med("watched", "rss_mb"),
            "cpu_import_s": round(med("imported", "cpu_s") - med("start", "cpu_s"), 3),
            "cpu_list_s": round(med("listed", "cpu_s") - med("imported", "cpu_s"), 3),
            "cpu_watch_s": round(med("watched", "cpu_s") - med("listed", "cpu_s"), 3),
            "events": runs[0]["events"],
            "watch_events_per_second": round(runs[0]["events"] / statistics.median(
                r["watch_seconds"] for r in runs)),
            "cpu_per_1000_events_s": round((med("watched", "cpu_s") - med("listed", "cpu_s"))
                                           / runs[0]["events"] * 1000, 3),
            "runs": len(runs),
        }
    print(json.dumps(summary, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kasync-python", help="interpreter with kubernetes_asyncio and psutil installed")
    parser.add_argument("--rounds", type=int, default=10, help="status updates per pod during the watch")
    parser.add_argument("--repeat", type=int, default=3, help="runs per client (median reported)")
    parser.add_argument("--child", choices=("thin", "kubernetes_asyncio"), help=argparse.SUPPRESS)
    parser.add_argument("--kubeconfig", help=argparse.SUPPRESS)
    parser.add_argument("--expected", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child, args.kubeconfig, args.expected)
    else:
        asyncio.run(parent_main(args))


if __name__ == "__main__":
    main()
