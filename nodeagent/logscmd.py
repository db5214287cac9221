"""``nodeagent logs``: kubectl logs for a standalone node.

The command asks the running agent's status server (``/pods`` to find the pod and
its containers, ``/containerLogs/{ns}/{pod}/{container}`` for the bytes) rather than
Docker: the agent knows which Docker containers belong to which pod instance on this
node (several agents may share one engine), the CLI needs no Docker socket access or
config file, and the path is kubelet's own, so the same server code will answer the
API server's ``kubectl logs`` in cluster mode.

Semantics follow kubectl: without ``-c`` a single-container pod's container is used;
otherwise the ``kubectl.kubernetes.io/default-container`` annotation or the first
container, with a "Defaulted container" note on stderr. A static pod may be named
without its ``-<node>`` suffix.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.error
import urllib.parse
import urllib.request

DEFAULT_CONTAINER_ANNOTATION = "kubectl.kubernetes.io/default-container"
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Go's time.ParseDuration (``5s``, ``2m30s``, ``1.5h``) in seconds."""
    text = text.strip()
    if not text:
        raise ValueError("empty duration")
    pos, total = 0, 0.0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or text == "0":
        if text == "0":
            return 0.0
        raise ValueError(f"invalid duration {text!r} (use e.g. 10s, 5m, 1h30m)")
    return total


def add_parser(sub) -> None:
    logs = sub.add_parser("logs", help="print the logs of a container in a pod (like kubectl logs)")
    logs.add_argument("pod", help="pod name (a static pod may omit its -<node> suffix)")
    logs.add_argument("-n", "--namespace", default="default")
    logs.add_argument("-c", "--container", help="container name (default: the pod's only or default container)")
    logs.add_argument("-f", "--follow", action="store_true", help="stream the log until the container stops")
    logs.add_argument("-p", "--previous", action="store_true",
                      help="the previous terminated instance of the container")
    logs.add_argument("--tail", type=int, default=-1, help="lines of recent log to show (-1: all)")
    logs.add_argument("--since", help="only logs newer than a relative duration like 5s, 2m or 3h")
    logs.add_argument("--since-time", help="only logs after an RFC 3339 time (e.g. 2026-01-02T15:04:05Z)")
    logs.add_argument("--timestamps", action="store_true", help="prefix each line with its RFC 3339 time")
    logs.add_argument("--limit-bytes", type=int, default=0, help="maximum bytes of logs to return (0: no limit)")
    logs.add_argument("--status-address", default="127.0.0.1:10255",
                      help="the running agent's status endpoint (default 127.0.0.1:10255)")


def _error(message: str) -> int:
    print(message, file=sys.stderr)
    return 1


def _find_pod(pods: list[dict], namespace: str, name: str) -> dict | None:
    in_ns = [p for p in pods if (p.get("metadata") or {}).get("namespace", "default") == namespace]
    exact = [p for p in in_ns if p["metadata"].get("name") == name]
    if exact:
        return exact[0]
    # kubelet names a static pod <name>-<node>.
    static = [p for p in in_ns
              if p["metadata"].get("name") == f"{name}-{(p.get('spec') or {}).get('nodeName')}"]
    return static[0] if len(static) == 1 else None


def _pick_container(pod: dict, wanted: str | None) -> tuple[str | None, str | None]:
    """(container, note for stderr) — kubectl's default-container rules."""
    spec = pod.get("spec") or {}
    if wanted:
        return wanted, None
    apps = [c["name"] for c in spec.get("containers") or []]
    inits = [c["name"] for c in spec.get("initContainers") or []]
    annotated = ((pod.get("metadata") or {}).get("annotations") or {}).get(DEFAULT_CONTAINER_ANNOTATION)
    if annotated and annotated in apps + inits:
        return annotated, None
    if len(apps) == 1 and not inits:
        return apps[0], None
    if not apps:
        return None, None
    names = ", ".join(apps + [f"{n} (init)" for n in inits])
    return apps[0], f'Defaulted container "{apps[0]}" out of: {names}'


def run(args: argparse.Namespace) -> int:
    base = f"http://{args.status_address}"
    try:
        with urllib.request.urlopen(base + "/pods", timeout=10) as resp:
            pods = json.load(resp).get("items") or []
    except (OSError, ValueError) as exc:
        return _error(f"nodeagent: cannot reach the agent at {base}: {exc}")
    pod = _find_pod(pods, args.namespace, args.pod)
    if pod is None:
        return _error(f'Error from server (NotFound): pods "{args.pod}" not found')
    container, note = _pick_container(pod, args.container)
    if container is None:
        return _error(f"error: pod {pod['metadata']['name']} has no containers")
    if note:
        print(note, file=sys.stderr)
    query: dict[str, str] = {}
    if args.follow:
        query["follow"] = "true"
    if args.previous:
        query["previous"] = "true"
    if args.timestamps:
        query["timestamps"] = "true"
    if args.tail is not None and args.tail >= 0:
        query["tailLines"] = str(args.tail)
    if args.limit_bytes and args.limit_bytes > 0:
        query["limitBytes"] = str(args.limit_bytes)
    if args.since:
        try:
            seconds = parse_duration(args.since)
        except ValueError as exc:
            return _error(f"error: invalid argument {args.since!r} for \"--since\" flag: {exc}")
        query["sinceSeconds"] = str(max(1, int(seconds + 0.999)))
    if args.since_time:
        if args.since:
            return _error("error: at most one of `sinceTime` or `sinceSeconds` may be specified")
        query["sinceTime"] = args.since_time
    name = pod["metadata"]["name"]
    path = "/containerLogs/{}/{}/{}".format(*(urllib.parse.quote(p, safe="") for p in (args.namespace, name,
                                                                                          container)))
    url = base + path + ("?" + urllib.parse.urlencode(query) if query else "")
    try:
        with urllib.request.urlopen(url, timeout=None if args.follow else 60) as resp:
            out = sys.stdout.buffer
            while True:
                chunk = resp.read1(65536) if hasattr(resp, "read1") else resp.read(65536)
                if not chunk:
                    break
                out.write(chunk)
                out.flush()
    except urllib.error.HTTPError as exc:
        message = exc.read().decode(errors="replace").strip()
        if exc.code == 404 and not message.startswith(("pods", "container")):
            return _error(f"nodeagent: the agent at {base} does not serve logs (its status address "
                          "must be a loopback address)")
        kind = {400: "BadRequest", 404: "NotFound"}.get(exc.code, "InternalError")
        return _error(f"Error from server ({kind}): {message}")
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        return _error(f"nodeagent: reading logs from {base}: {exc}")
    return 0
