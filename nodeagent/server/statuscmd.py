"""``nodeagent status [--watch]``: the status page as a terminal table, for a machine
without a browser. Reads a running agent's endpoints (/healthz, /pods,
/stats/summary, and machine_cpu_cores/machine_memory_bytes from /metrics/cadvisor), so
it works the same in standalone and cluster mode."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from nodeagent.server.page import _parse_time, human_age, human_bytes

BAR = 10


def bar(fraction: float | None, width: int = BAR) -> str:
    if fraction is None:
        return "[" + " " * width + "]"
    filled = max(0, min(width, round(fraction * width)))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _get(base: str, path: str, timeout: float) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(base + path, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def fetch(address: str, timeout: float = 5.0) -> dict[str, Any]:
    base = f"http://{address}"
    health_code, health = _get(base, "/healthz?verbose", timeout)
    _c, pods = _get(base, "/pods", timeout)
    _c, summary = _get(base, "/stats/summary", timeout)
    _c, cadvisor = _get(base, "/metrics/cadvisor", timeout)
    machine: dict[str, float] = {}
    for line in cadvisor.decode(errors="replace").splitlines():
        if line.startswith(("machine_cpu_cores ", "machine_memory_bytes ")):
            name, _, value = line.partition(" ")
            machine[name] = float(value)
    return {"healthy": health_code == 200, "health": health.decode(errors="replace"),
            "pods": json.loads(pods).get("items", []), "summary": json.loads(summary),
            "machine": machine}


def render(data: dict[str, Any], now: float | None = None, color: bool = False) -> str:
    now = now or time.time()
    summary = data["summary"]
    node = summary.get("node", {})
    cores = data["machine"].get("machine_cpu_cores")
    mem_total = data["machine"].get("machine_memory_bytes")
    cpu = (node.get("cpu") or {}).get("usageNanoCores")
    ws = (node.get("memory") or {}).get("workingSetBytes")
    cpu_cores = cpu / 1e9 if cpu is not None else None
    health = "ok" if data["healthy"] else "FAILING"
    if color:
        health = f"\033[32m{health}\033[0m" if data["healthy"] else f"\033[31m{health}\033[0m"
    lines = [
        f"NODE {node.get('nodeName', '?')}   health {health}",
        f"  CPU    {bar(cpu_cores / cores if cpu_cores is not None and cores else None)} "
        f"{'-' if cpu_cores is None else f'{cpu_cores:.2f}'} / {cores or '?':g} cores"
        if cores else f"  CPU    {bar(None)} {'-' if cpu_cores is None else f'{cpu_cores:.2f}'} cores",
        f"  MEMORY {bar(ws / mem_total if ws is not None and mem_total else None)} "
        f"{human_bytes(ws)} / {human_bytes(mem_total)} working set",
    ]
    if not data["healthy"]:
        lines += ["  " + line for line in data["health"].splitlines() if line.startswith("[-]")]
    usage = {(p["podRef"]["namespace"], p["podRef"]["name"]): p for p in summary.get("pods", [])}
    rows = [("NAMESPACE", "POD", "PHASE", "READY", "RESTARTS", "IP", "AGE", "CPU", "", "MEMORY", "")]
    for pod in data["pods"]:
        meta, status = pod.get("metadata", {}), pod.get("status", {})
        key = (meta.get("namespace", "default"), meta.get("name", ""))
        statuses = status.get("containerStatuses") or []
        total = len((pod.get("spec") or {}).get("containers") or []) or len(statuses)
        stats = usage.get(key, {})
        pcpu = (stats.get("cpu") or {}).get("usageNanoCores")
        pmem = (stats.get("memory") or {}).get("workingSetBytes")
        started = _parse_time(status.get("startTime"))
        rows.append((
            key[0], key[1], status.get("phase", "Pending"),
            f"{sum(1 for c in statuses if c.get('ready'))}/{total}",
            str(sum(int(c.get("restartCount") or 0) for c in statuses)),
            status.get("podIP", "-"), human_age(now - started if started else None),
            bar(pcpu / 1e9 / cores if pcpu is not None and cores else None),
            "-" if pcpu is None else f"{pcpu / 1e9:.3f}",
            bar(pmem / mem_total if pmem is not None and mem_total else None),
            human_bytes(pmem),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines.append("")
    for r in rows:
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip())
    if len(rows) == 1:
        lines.append("(no pods)")
    return "\n".join(lines) + "\n"


def main(address: str, watch: float | None) -> int:
    tty = sys.stdout.isatty()
    try:
        while True:
            try:
                text = render(fetch(address), color=tty)
            except (OSError, ValueError) as exc:
                print(f"nodeagent: cannot read the agent at http://{address}: {exc}", file=sys.stderr)
                if watch is None:
                    return 1
                text = None
            if text is not None:
                if watch is not None and tty:
                    sys.stdout.write("\033[H\033[2J")
                sys.stdout.write(text)
                if watch is not None:
                    sys.stdout.write(f"-- every {watch:g}s, Ctrl-C to stop; {time.strftime('%H:%M:%S')}\n")
                sys.stdout.flush()
            if watch is None:
                return 0
            time.sleep(watch)
    except KeyboardInterrupt:
        return 0


