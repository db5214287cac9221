"""Manifest fuzzing throughput and the agent's peak RSS under adversarial input
(docs/BENCHMARKS.md, "Hostile manifests").

    .venv/bin/python bench/manifest_fuzz.py [--files 300] [--rounds 3] [--no-agent]

1. Throughput, in process: ManifestSource.scan() over a directory of --files
   adversarial files (random type confusion in a rich pod, random bytes, damaged YAML,
   alias bombs, deep nesting, wrong-typed Services; seeded, the same each run), against
   the same number of valid pod manifests scanned by a fresh source in the same round
   (the baseline). Rounds interleaved; medians reported as files/s.
2. Near the size limit, in process: files just under MAX_FILE_BYTES built to cost the
   most (tiny values, long scalars, anchors at the alias budget, JSON), files/s and
   MB/s.
3. Peak RSS of the real agent process (needs root and Docker; the e2e harness gives it
   its own node name, bridge, pod range guarded by an unreachable route, status port):
   three good pods run; VmHWM is read once they run (baseline, same run), then every
   near-limit file and the adversarial corpus are dropped one by one, then 20 near-limit
   files at once; VmHWM again at the end. Target: < 150 MB.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nodeagent.standalone import manifestfile  # noqa: E402
from nodeagent.standalone.manifests import ManifestSource  # noqa: E402

RICH = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {"name": "rich", "labels": {"app": "rich"}, "annotations": {"a": "b"}},
    "spec": {"terminationGracePeriodSeconds": 5, "volumes": [{"name": "v", "emptyDir": {}}],
             "containers": [{"name": "c", "image": "busybox:1.35", "command": ["sleep", "3600"],
                             "env": [{"name": "A", "value": "1"}],
                             "ports": [{"containerPort": 80, "name": "http"}],
                             "resources": {"limits": {"memory": "64Mi"}},
                             "volumeMounts": [{"name": "v", "mountPath": "/v"}]}]},
}
CONFUSING = [None, True, -1, 2**31, 10**30, float("nan"), float("inf"), "", "twelve", "x" * 300,
             [], ["x"], {}, {"a": 1}, [[["x"]]], 1.5]


def paths(value, prefix=()):
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += paths(v, prefix + (i,))
    return out


def mutate(rng: random.Random, base: dict) -> dict:
    doc = copy.deepcopy(base)
    for _ in range(rng.randint(1, 3)):
        where = rng.choice(paths(doc)[1:])
        parent = doc
        for step in where[:-1]:
            parent = parent[step]
        parent[where[-1]] = copy.deepcopy(rng.choice(CONFUSING))
    return doc


def bomb(levels: int = 9) -> str:
    lines = ["apiVersion: v1", "kind: Pod", "a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\nmetadata: {name: bomb}\n"


def adversarial_corpus(n: int, seed: int = 7) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
               "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}}
    text = yaml.safe_dump(RICH).encode()
    out = []
    for i in range(n):
        kind = i % 6
        if kind == 0:
            data = yaml.safe_dump(mutate(rng, RICH)).encode()
        elif kind == 1:
            data = rng.randbytes(rng.randint(1, 2000))
        elif kind == 2:
            damaged = bytearray(text)
            for _ in range(3):
                at = rng.randrange(len(damaged))
                damaged[at:at + 1] = rng.choice([b"&", b"*", b"\t", b"[", b"{", b":", b"\n-", b"\xff"])
            data = bytes(damaged)
        elif kind == 3:
            data = bomb(rng.randint(6, 10)).encode()
        elif kind == 4:
            depth = rng.randint(40, 5000)
            data = b"kind: Pod\nspec: " + b"[" * depth + b"]" * depth
        else:
            data = yaml.safe_dump(mutate(rng, service)).encode()
        out.append((f"adv{i:04d}.{'json' if kind == 1 and i % 12 == 1 else 'yaml'}", data))
    return out


def valid_corpus(n: int) -> list[tuple[str, bytes]]:
    out = []
    for i in range(n):
        doc = copy.deepcopy(RICH)
        doc["metadata"]["name"] = f"ok{i}"
        out.append((f"ok{i:04d}.yaml", yaml.safe_dump(doc).encode()))
    return out


def near_limit_corpus() -> list[tuple[str, bytes]]:
    limit = manifestfile.MAX_FILE_BYTES - 64
    values = b"kind: Pod\nx: [" + b"0," * (limit // 2) + b"0]"
    return [
        ("tiny-values.yaml", values[:limit] + b"0]"),
        ("block-values.yaml", (b"kind: Pod\nx:\n" + b"- 0\n" * (limit // 4))[:limit]),
        ("maps.yaml", (b"kind: Pod\nx: [" + b"{a: 0}," * (limit // 7))[:limit] + b"{}]"),
        ("long-scalar.yaml", b"kind: Pod\nmetadata: {name: s}\nx: " + b"a" * (limit - 40)),
        ("anchors.yaml", ("kind: Pod\nx: &a [" + ", ".join(["zz"] * 1000) + "]\ny: ["
                          + ", ".join(["*a"] * 19) + "]\n").encode()),
        ("values.json", (b'{"kind": "Pod", "x": [' + b"0," * (limit // 2))[:limit] + b"0]}"),
        ("deep.json", b'{"kind": "Pod", "x": ' + b"[" * (limit // 2 - 20) + b"]" * (limit // 2 - 20) + b"}"),
        ("too-big.yaml", b"kind: Pod\nx: " + b"a" * (manifestfile.MAX_FILE_BYTES + 1)),
    ]


def timed_scan(files: list[tuple[str, bytes]]) -> tuple[float, int, int]:
    with tempfile.TemporaryDirectory(prefix="manifest-fuzz-") as d:
        for name, data in files:
            Path(d, name).write_bytes(data)
        source = ManifestSource(d, "bench-node", lambda snap: None)
        started = time.perf_counter()
        snap = source.scan()
        elapsed = time.perf_counter() - started
    return elapsed, len(snap.pods), len(snap.errors)


def in_process(n: int, rounds: int) -> dict:
    import structlog

    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())  # logging is not measured
    adversarial, valid, big = adversarial_corpus(n), valid_corpus(n), near_limit_corpus()
    results: dict[str, list[float]] = {"valid": [], "adversarial": [], "near-limit": []}
    reported = 0
    for _ in range(rounds):
        t, _pods, _errors = timed_scan(valid)
        results["valid"].append(n / t)
        t, _pods, errors = timed_scan(adversarial)
        results["adversarial"].append(n / t)
        reported = errors
        t, _pods, _errors = timed_scan(big)
        results["near-limit"].append(len(big) / t)
    big_mb = sum(len(d) for _n, d in big) / 2**20
    med = {k: statistics.median(v) for k, v in results.items()}
    return {
        "files": n, "rounds": rounds,
        "valid_files_per_s": round(med["valid"], 1),
        "adversarial_files_per_s": round(med["adversarial"], 1),
        "ratio_adversarial_to_valid": round(med["adversarial"] / med["valid"], 2),
        "adversarial_errors_reported": reported,
        "near_limit_files_per_s": round(med["near-limit"], 2),
        "near_limit_mb_per_s": round(med["near-limit"] * big_mb / len(big), 2),
    }


def vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def agent_rss(n: int) -> dict:
    from tests.e2e.conftest import AgentProcess, busybox, pod_manifest

    with tempfile.TemporaryDirectory(prefix="manifest-fuzz-agent-") as d:
        agent = AgentProcess(Path(d))
        try:
            agent.start()
            for i in range(3):
                agent.write(f"good{i}.yaml", pod_manifest(f"good{i}", [busybox("c", "sleep 3600")],
                                                          terminationGracePeriodSeconds=0))
            for i in range(3):
                agent.wait_running_ready(f"good{i}", timeout=120)
            time.sleep(2)
            baseline = vm_hwm(agent.proc.pid)
            started = time.monotonic()
            files = near_limit_corpus() + adversarial_corpus(n)
            for name, data in files:
                path = agent.manifest_dir / name
                path.write_bytes(data)
                agent.wait_for(f"{name} handled", lambda: any(name in str(r.get("file") or "")
                                                               for r in agent.log_records()), timeout=60)
                path.unlink()
            limit_files = near_limit_corpus()[:4] * 5
            for i, (name, data) in enumerate(limit_files):
                (agent.manifest_dir / f"many{i}-{name}").write_bytes(data)
            agent.wait_for("20 files at once handled", lambda: sum("many" in str(r.get("file") or "")
                                                                     for r in agent.log_records()) >= 20,
                           timeout=300)
            elapsed = time.monotonic() - started
            status, _ = agent.healthz()
            alive = agent.proc.poll() is None
            peak = vm_hwm(agent.proc.pid)
            good_running = all((p := agent.pod(f"good{i}")) and p["status"]["phase"] == "Running" for i in range(3))
        finally:
            agent.cleanup()
    return {"files_dropped": len(files) + len(limit_files), "seconds": round(elapsed, 1),
            "baseline_vmhwm_mb": round(baseline / 2**20, 1), "peak_vmhwm_mb": round(peak / 2**20, 1),
            "alive": alive, "healthz": status, "good_pods_running": good_running}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--agent-files", type=int, default=60)
    parser.add_argument("--no-agent", action="store_true")
    args = parser.parse_args()
    print("load average before:", os.getloadavg())
    print(json.dumps(in_process(args.files, args.rounds), indent=1))
    if not args.no_agent:
        print(json.dumps(agent_rss(args.agent_files), indent=1))
    print("load average after:", os.getloadavg())


if __name__ == "__main__":
    main()
