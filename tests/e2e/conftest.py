"""Runs the real agent as a process against the real Docker engine and kernel.

Each agent gets a per-run node name (Docker objects are labelled with it), its own
bridge, pod CIDR, state directory and status port, so runs never see each other.
Pod CIDRs are connected routes on the agent's own bridge: traffic to them never
leaves the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def unused_pod_subnet() -> int:
    """A random N for 10.244.N.0/24 with no route on the host yet, so parallel runs
    (and leftovers of a killed run) never share a range."""
    import random

    taken = subprocess.run(["ip", "-4", "route", "show"], capture_output=True, text=True).stdout
    candidates = [n for n in range(10, 250) if f"10.244.{n}.0/24" not in taken]
    return random.choice(candidates)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def docker(*args: str, check: bool = True) -> str:
    out = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60)
    if check and out.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {out.stderr}")
    return out.stdout


class AgentProcess:
    def __init__(self, workdir: Path, *, extra_config: dict | None = None) -> None:
        token = secrets.token_hex(3)
        self.node_name = f"e2e-{token}"
        self.workdir = workdir
        self.manifest_dir = workdir / "manifests"
        self.manifest_dir.mkdir(exist_ok=True)
        self.root_dir = workdir / "root"
        self.port = free_port()
        self.subnet = unused_pod_subnet()
        self.pod_cidr = f"10.244.{self.subnet}.0/24"
        self.bridge = f"nae{token}"
        self.log_path = workdir / "agent.log"
        config = {
            "bridge-name": self.bridge,
            "backoff-base": 1.0,
            "backoff-cap": 8.0,
            "relist-period": 2.0,
            "manifest-poll-period": 0.3,
            "runtime-call-timeout": 20.0,
            "proxy-table": f"na{token}",
            # Node-pressure eviction (kubelet's defaults) would refuse and evict pods on
            # a CI machine whose disk is fuller than 85-90 %: tests that are not about
            # eviction must not depend on the machine's free space.
            "eviction-hard": "memory.available<1Mi,nodefs.available<1%,imagefs.available<1%",
        }
        config.update(extra_config or {})
        self.config_path = workdir / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen | None = None
        self._guarded: list[str] = []
        self.guard_range(self.pod_cidr)

    def guard_range(self, cidr: str) -> None:
        """Network safety: reserve the range with an unreachable route before any
        traffic can go to it. The agent's bridge route (metric 0) wins while it exists;
        if the bridge vanished, packets fail locally instead of following the default
        route off the machine."""
        subprocess.run(["ip", "route", "replace", "unreachable", cidr, "metric", "4000"],
                       capture_output=True, check=True)
        self._guarded.append(cidr)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nodeagent.cli", "run",
             "--manifest-dir", str(self.manifest_dir),
             "--node-name", self.node_name,
             "--pod-cidr", self.pod_cidr,
             "--status-address", f"127.0.0.1:{self.port}",
             "--root-dir", str(self.root_dir),
             "--config", str(self.config_path)],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited early:\n{self.log_path.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(self.url + "/pods", timeout=1).read()
                return
            except OSError:
                time.sleep(0.2)
        raise AssertionError("agent status endpoint did not come up")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(60)  # a loaded machine can take long to reap it

    # --- manifests -----------------------------------------------------------------

    def write(self, filename: str, *docs: dict | str) -> Path:
        path = self.manifest_dir / filename
        text = "\n---\n".join(d if isinstance(d, str) else yaml.safe_dump(d) for d in docs)
        tmp = path.with_name("." + path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        return path

    def remove(self, filename: str) -> None:
        (self.manifest_dir / filename).unlink()

    # --- observation ---------------------------------------------------------------

    def pods(self) -> list[dict]:
        with urllib.request.urlopen(self.url + "/pods", timeout=5) as resp:
            return json.load(resp)["items"]

    def pod(self, name: str, namespace: str = "default") -> dict | None:
        full = f"{name}-{self.node_name}"
        for p in self.pods():
            if p["metadata"]["name"] == full and p["metadata"]["namespace"] == namespace:
                return p
        return None

    def healthz(self) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + "/healthz?verbose", timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def wait_for(self, what: str, predicate: Callable[[], object], timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        last_exc: Exception | None = None
        while time.monotonic() < deadline:
            try:
                result = predicate()
                if result:
                    return result
            except (OSError, KeyError, IndexError, TypeError) as exc:
                last_exc = exc
            time.sleep(0.3)
        pods = ""
        try:
            pods = json.dumps([{"name": p["metadata"]["name"], "status": p.get("status")} for p in self.pods()], indent=1)[-4000:]
        except OSError:
            pass
        raise AssertionError(
            f"timed out waiting for {what} (last error: {last_exc})\npods: {pods}\n"
            f"agent log tail:\n{self.log_path.read_text()[-4000:]}"
        )

    def wait_phase(self, name: str, phase: str, timeout: float = 60.0) -> dict:
        return self.wait_for(
            f"pod {name} phase {phase}",
            lambda: (p := self.pod(name)) and p["status"].get("phase") == phase and p,
            timeout,
        )

    def wait_running_ready(self, name: str, timeout: float = 60.0) -> dict:
        def ready():
            p = self.pod(name)
            if not p or p["status"].get("phase") != "Running":
                return None
            conds = {c["type"]: c["status"] for c in p["status"].get("conditions", [])}
            return p if conds.get("Ready") == "True" else None
        return self.wait_for(f"pod {name} running and ready", ready, timeout)

    def containers(self, all_states: bool = True) -> list[dict]:
        args = ["ps", "-q", "--filter", f"label=io.nodeagent.node={self.node_name}"]
        if all_states:
            args.insert(1, "-a")
        ids = docker(*args).split()
        if not ids:
            return []
        # A container may go between the list and the inspect (the agent is removing
        # it): inspect prints the ones that still exist and fails for the rest.
        out = subprocess.run(["docker", "inspect", *ids], capture_output=True, text=True, timeout=60)
        return json.loads(out.stdout or "[]")

    def container_of(self, pod_name: str, container: str) -> dict:
        full = f"{pod_name}-{self.node_name}"
        matches = [
            c for c in self.containers()
            if c["Config"]["Labels"].get("io.kubernetes.pod.name") == full
            and c["Config"]["Labels"].get("io.kubernetes.container.name") == container
        ]
        matches.sort(key=lambda c: c["Created"])
        if not matches:
            raise KeyError(f"no container {container} of pod {pod_name}")
        return matches[-1]

    def log_records(self) -> list[dict]:
        records = []
        for line in self.log_path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records

    def cleanup(self) -> None:
        self.stop()
        # One at a time: Docker 20.10's libnetwork can deadlock when many containers
        # leave the same network at once (moby/moby#46661).
        for cid in docker("ps", "-aq", "--filter", f"label=io.nodeagent.node={self.node_name}").split():
            docker("rm", "-f", cid, check=False)
        for cidr in self._guarded:
            subprocess.run(["ip", "route", "del", "unreachable", cidr, "metric", "4000"], capture_output=True)
        # The agent's own uninstall: its nftables table, bridge and forwarding rules.
        subprocess.run([sys.executable, "-m", "nodeagent.cli", "cleanup", "--config", str(self.config_path)],
                       cwd=REPO, capture_output=True, timeout=60)
        subprocess.run(["sh", "-c", f"grep -F '{self.root_dir}' /proc/mounts | cut -d' ' -f2 | xargs -r -n1 umount -l"],
                       capture_output=True)


@pytest.fixture
def agent_factory(tmp_path):
    made: list[AgentProcess] = []

    def make(start: bool = True, **kwargs) -> AgentProcess:
        workdir = tmp_path / f"agent{len(made)}"
        workdir.mkdir()
        a = AgentProcess(workdir, **kwargs)
        made.append(a)
        if start:
            a.start()
        return a

    yield make
    for a in made:
        a.cleanup()


@pytest.fixture
def agent(agent_factory) -> AgentProcess:
    return agent_factory()


def docker_time(stamp: str) -> float:
    """Seconds since the epoch of Docker's RFC 3339 stamp, nanoseconds kept: a
    comparison made to the second can be off by almost one second."""
    from datetime import datetime

    head, _, frac = stamp.rstrip("Z").partition(".")
    return datetime.fromisoformat(head + "+00:00").timestamp() + float("0." + (frac or "0"))


def pod_manifest(name: str, containers: list[dict], **spec) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": containers, **spec},
    }


def busybox(name: str, script: str, **extra) -> dict:
    return {"name": name, "image": "busybox:1.35", "command": ["sh", "-c", script], **extra}


def exec_in(container_id: str, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", "exec", container_id, *cmd], capture_output=True, text=True, timeout=30)
