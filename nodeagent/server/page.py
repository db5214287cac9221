"""The status page at ``/`` for a person: the node, its pods (phase, readiness,
restarts, IP, age, CPU and memory with sparklines of the recent samples) and the recent
warnings. One self-contained HTML document: inline CSS and SVG, no scripts, no external
assets; ``?refresh=N`` adds a meta refresh every N seconds.
"""

from __future__ import annotations

import html
import os
import time
from typing import Any, Callable, Iterable

from aiohttp import web

from nodeagent.stats.sampler import StatsSampler

HealthCheck = Callable[[], tuple[bool, str]]

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.2em;color:#1d2330;background:#f6f7f9}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}
.meta{color:#5b6475}.cards{display:flex;gap:1em;flex-wrap:wrap;margin-top:.8em}
.card{background:#fff;border:1px solid #dde1e8;border-radius:6px;padding:.6em .9em;min-width:11em}
.card b{display:block;font-size:1.3em}.ok{color:#137333}.bad{color:#b3261e}
table{border-collapse:collapse;background:#fff;border:1px solid #dde1e8;width:100%}
th,td{padding:.3em .6em;border-bottom:1px solid #eceef2;text-align:left;white-space:nowrap}
th{background:#eef0f4;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
.phase-Running{color:#137333}.phase-Pending{color:#a06000}.phase-Failed{color:#b3261e}
.phase-Succeeded{color:#3559c7}svg{vertical-align:middle}td.msg{white-space:normal}
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_age(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    s = int(max(0, seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h{(s % 3600) // 60}m"
    return f"{s // 86400}d"


def sparkline(values: Iterable[float | None], *, width: int = 120, height: int = 22,
              color: str = "#3559c7", label: str = "", top: float | None = None) -> str:
    """An inline SVG polyline of ``values`` scaled to ``top`` (default: their maximum;
    gaps skipped)."""
    points = [v for v in values]
    known = [v for v in points if v is not None]
    if len(known) < 2:
        return f'<svg class="spark" width="{width}" height="{height}" role="img" aria-label="{_esc(label)}: not enough samples"></svg>'
    top = top or max(known) or 1.0
    step = width / max(1, len(points) - 1)
    coords = " ".join(f"{i * step:.1f},{height - 1 - (v / top) * (height - 2):.1f}"
                      for i, v in enumerate(points) if v is not None)
    return (f'<svg class="spark" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            f'role="img" aria-label="{_esc(label)}"><polyline fill="none" stroke="{color}" '
            f'stroke-width="1.5" points="{coords}"/></svg>')


def _parse_time(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    import calendar

    try:
        return float(calendar.timegm(time.strptime(value[:19], "%Y-%m-%dT%H:%M:%S")))
    except ValueError:
        return None


class StatusPage:
    def __init__(
        self,
        *,
        node_name: str,
        version: str,
        mode: str,
        pods: Callable[[], list[dict]],
        sampler: StatsSampler | None,
        checks: dict[str, HealthCheck],
        warnings: Callable[[], list[dict]] | None = None,
        started_at: float | None = None,
    ) -> None:
        self.node_name = node_name
        self.version = version
        self.mode = mode
        self._pods = pods
        self.sampler = sampler
        self._checks = checks
        self._warnings = warnings or (lambda: [])
        self.started_at = started_at or time.time()

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/", self.handle)]

    async def handle(self, request: web.Request) -> web.Response:
        raw = request.query.get("refresh")
        refresh = 0
        if raw is not None:
            try:
                refresh = int(raw)
                if not 0 <= refresh <= 3600:
                    raise ValueError
            except ValueError:
                raise web.HTTPBadRequest(text=f"query parameter refresh: expected seconds 0..3600, got {raw!r}\n")
        return web.Response(text=self.render(refresh), content_type="text/html", charset="utf-8")

    def render(self, refresh: int = 0) -> str:
        now = time.time()
        snap = self.sampler.latest if self.sampler else None
        pods = self._pods()
        health = []
        for name, check in self._checks.items():
            try:
                ok, detail = check()
            except Exception as exc:  # a broken check shows as failed, the page still renders
                ok, detail = False, str(exc)
            health.append((name, ok, detail))
        healthy = all(ok for _n, ok, _d in health)
        cpus = os.cpu_count() or 1
        out: list[str] = ["<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
                          f"<title>nodeagent {_esc(self.node_name)}</title>"]
        if refresh:
            out.append(f'<meta http-equiv="refresh" content="{refresh}">')
        out.append(f"<style>{_CSS}</style></head><body>")
        out.append(f'<h1 id="node-name">{_esc(self.node_name)}</h1>')
        out.append(f'<div class="meta">nodeagent {_esc(self.version)} · {_esc(self.mode)} mode · '
                   f'up {human_age(now - self.started_at)}'
                   + (f" · sampled {human_age(now - snap.time)} ago" if snap else " · no sample yet")
                   + "</div>")
        node = snap.node if snap else None
        node_hist = list(self.sampler.node_history) if self.sampler else []
        cpu_now = snap.node_cpu_nano_cores / 1e9 if snap and snap.node_cpu_nano_cores is not None else None
        running = sum(1 for p in pods if (p.get("status") or {}).get("phase") == "Running")
        out.append('<div class="cards">')
        out.append(f'<div class="card" id="health">health<b class="{"ok" if healthy else "bad"}">'
                   f'{"ok" if healthy else "failing"}</b>'
                   + "".join(f'<span class="{"ok" if ok else "bad"}" title="{_esc(d)}">'
                             f'{"✓" if ok else "✗"} {_esc(n)}</span> ' for n, ok, d in health) + "</div>")
        out.append(f'<div class="card" id="pods-card">pods<b>{running} / {len(pods)}</b>running / total</div>')
        out.append(f'<div class="card" id="cpu-card">CPU<b>{"–" if cpu_now is None else f"{cpu_now:.2f}"} / {cpus}</b>'
                   + sparkline([None if h[1] is None else h[1] / 1e9 for h in node_hist], label="node CPU", top=cpus) + "</div>")
        mem_total = node.memory_total if node else None
        out.append(f'<div class="card" id="memory-card">memory (working set)<b>{human_bytes(node.memory_working_set if node else None)}'
                   f' / {human_bytes(mem_total)}</b>'
                   + sparkline([h[2] for h in node_hist], color="#137333", label="node memory", top=mem_total) + "</div>")
        if snap and snap.errors:
            out.append(f'<div class="card" id="scrape-errors">scrape errors<b class="bad">{len(snap.errors)}</b>'
                       f'<span title="{_esc(snap.errors[0])}">{_esc(snap.errors[0][:60])}</span></div>')
        out.append("</div>")

        out.append("<h2>Pods</h2><table id=\"pods\"><thead><tr><th>namespace</th><th>pod</th><th>phase</th>"
                   "<th>ready</th><th>restarts</th><th>IP</th><th>age</th><th>CPU (cores)</th><th></th>"
                   "<th>memory</th><th></th></tr></thead><tbody>")
        for pod in pods:
            meta = pod.get("metadata") or {}
            status = pod.get("status") or {}
            uid = meta.get("uid", "")
            statuses = status.get("containerStatuses") or []
            ready = sum(1 for c in statuses if c.get("ready"))
            total = len((pod.get("spec") or {}).get("containers") or []) or len(statuses)
            restarts = sum(int(c.get("restartCount") or 0) for c in statuses)
            phase = status.get("phase", "Pending")
            started = _parse_time(status.get("startTime")) or _parse_time(meta.get("creationTimestamp"))
            stats = snap.pods.get(uid) if snap else None
            cpu = stats.cpu_nano_cores / 1e9 if stats and stats.cpu_nano_cores is not None else None
            mem = stats.total("memory_working_set") if stats else None
            hist = list(self.sampler.history.get(uid, [])) if self.sampler else []
            reason = status.get("reason")
            out.append(
                f'<tr data-uid="{_esc(uid)}"><td>{_esc(meta.get("namespace", "default"))}</td>'
                f'<td class="pod-name">{_esc(meta.get("name", ""))}</td>'
                f'<td class="phase phase-{_esc(phase)}">{_esc(phase)}{f" ({_esc(reason)})" if reason else ""}</td>'
                f'<td class="num">{ready}/{total}</td><td class="num restarts">{restarts}</td>'
                f'<td class="ip">{_esc(status.get("podIP", "–"))}</td><td class="num">{human_age(now - started if started else None)}</td>'
                f'<td class="num cpu">{"–" if cpu is None else f"{cpu:.3f}"}</td>'
                f'<td>{sparkline([None if h[1] is None else h[1] / 1e9 for h in hist], label="CPU of " + meta.get("name", ""))}</td>'
                f'<td class="num memory">{human_bytes(mem)}</td>'
                f'<td>{sparkline([h[2] for h in hist], color="#137333", label="memory of " + meta.get("name", ""))}</td></tr>')
        if not pods:
            out.append('<tr><td colspan="11">no pods</td></tr>')
        out.append("</tbody></table>")

        warnings = list(self._warnings())[-15:][::-1]
        out.append('<h2>Recent warnings</h2><table id="warnings"><thead><tr><th>age</th><th>pod</th>'
                   "<th>reason</th><th>message</th></tr></thead><tbody>")
        for w in warnings:
            out.append(f'<tr><td class="num">{human_age(now - w["time"])}</td>'
                       f'<td>{_esc(w["namespace"])}/{_esc(w["pod"])}</td><td>{_esc(w["reason"])}</td>'
                       f'<td class="msg">{_esc(w["message"])}</td></tr>')
        if not warnings:
            out.append('<tr><td colspan="4">none</td></tr>')
        out.append("</tbody></table>")
        out.append('<p class="meta">Machine-readable: <a href="/pods">/pods</a> · <a href="/stats/summary">/stats/summary</a>'
                   ' · <a href="/metrics">/metrics</a> · <a href="/metrics/cadvisor">/metrics/cadvisor</a>'
                   ' · <a href="/metrics/resource">/metrics/resource</a> · <a href="/healthz?verbose">/healthz</a></p>')
        out.append("</body></html>")
        return "".join(out)
