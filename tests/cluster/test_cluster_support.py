"""Support for the cluster-mode end-to-end tests (this module holds no tests).

`ClusterAgent` runs the real agent process with `--kubeconfig` (node identity
`system:node:<node>`) against the in-process test control plane, real Docker and the
real kernel. Each agent gets its own node name, bridge, pod CIDR (10.247.N.0/24, a range
no other test suite here uses), state directory and status port; pod addresses are
connected routes on that bridge only, and tests talk to 127.0.0.1 and those addresses.

Every wait is async (the control plane runs on the test's event loop), bounded in time.
Fixtures: `cluster_agent_factory` (and `cp_recording`, a control plane that records and
schema-checks writes). Import them into a test module to use them.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import random
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from tests.controlplane import Options
from tests.controlplane import resources as cp_resources
from tests.e2e.conftest import REPO, AgentProcess, docker

_SUBNETS = iter(random.sample(range(1, 250), 249))

PODS_RT = cp_resources.find("", "v1", "pods")
NODES_RT = cp_resources.find("", "v1", "nodes")
SLEEP_FOREVER = "trap 'exit 0' TERM; while true; do sleep 1; done"
IGNORE_TERM = "trap '' TERM; while true; do sleep 1; done"


def busybox(name: str, script: str, **extra: Any) -> dict:
    return {"name": name, "image": "busybox:1.35", "imagePullPolicy": "IfNotPresent",
            "command": ["sh", "-c", script], **extra}


def api_pod(name: str, node: str, containers: list[dict], *, namespace: str = "default",
            grace: int = 5, **spec: Any) -> dict:
    """A pod bound to `node`. No service-account token volume: this suite tests the
    pod lifecycle, not projected tokens (covered by the references tests)."""
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": {"nodeName": node, "automountServiceAccountToken": False,
                 "terminationGracePeriodSeconds": grace, "containers": containers, **spec},
    }


class ClusterAgent(AgentProcess):
    def __init__(self, workdir: Path, controlplane, *, manifests: bool = False,
                 extra_config: dict | None = None) -> None:
        config = {
            "node-status-update-period": 2.0,
            "lease-renew-period": 2.0,
            "node-registration-wait": 10.0,
        }
        # The node API (HTTPS) on a free loopback port; tests reach it at api_port.
        from tests.e2e.conftest import free_port  # noqa: PLC0415

        self.api_port = free_port()
        config["node-api-address"] = f"127.0.0.1:{self.api_port}"
        config.update(extra_config or {})
        super().__init__(workdir, extra_config=config)
        self.controlplane = controlplane
        self.with_manifests = manifests
        self.subnet = next(_SUBNETS)
        self.pod_cidr = f"10.247.{self.subnet}.0/24"
        self.guard_range(self.pod_cidr)
        self.kubeconfig = controlplane.make_kubeconfig(
            f"system:node:{self.node_name}", ["system:nodes"], path=workdir / "node.kubeconfig")

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "nodeagent.cli", "run",
               "--kubeconfig", str(self.kubeconfig),
               "--node-name", self.node_name,
               "--pod-cidr", self.pod_cidr,
               "--status-address", f"127.0.0.1:{self.port}",
               "--root-dir", str(self.root_dir),
               "--config", str(self.config_path)]
        if self.with_manifests:
            cmd += ["--manifest-dir", str(self.manifest_dir)]
        return cmd

    async def astart(self) -> None:
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(self.command(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited early:\n{self.log_path.read_text()[-3000:]}")
            try:
                await asyncio.to_thread(lambda: urllib.request.urlopen(self.url + "/pods", timeout=1).read())
                return
            except OSError:
                await asyncio.sleep(0.2)
        raise AssertionError("agent status endpoint did not come up")

    def start(self) -> None:  # the sync start would block the control plane's loop
        raise RuntimeError("use `await agent.astart()` in cluster tests")

    async def acleanup(self) -> None:
        await asyncio.to_thread(self.cleanup)

    # --- API-side observation ----------------------------------------------------------

    def api_pod(self, name: str, namespace: str = "default") -> dict | None:
        return self.controlplane.object("pods", name, namespace)

    def node_object(self) -> dict | None:
        return self.controlplane.object("nodes", self.node_name)

    def lease(self) -> dict | None:
        return self.controlplane.object("leases", self.node_name, "kube-node-lease",
                                        group="coordination.k8s.io")

    async def wait(self, what: str, predicate: Callable[[], Any], timeout: float = 60.0,
                   interval: float = 0.1) -> Any:
        deadline = time.monotonic() + timeout
        last_exc: Exception | None = None
        while time.monotonic() < deadline:
            try:
                result = predicate()
                if inspect.isawaitable(result):
                    result = await result
                if result:
                    return result
            except (OSError, KeyError, IndexError, TypeError, AssertionError) as exc:
                last_exc = exc
            if self.proc is not None and self.proc.poll() is not None:
                break
            await asyncio.sleep(interval)
        pods = json.dumps([{"name": p["metadata"]["name"], "status": p.get("status")}
                           for p in self.controlplane.objects("pods")], indent=1)[-3000:]
        raise AssertionError(
            f"timed out waiting for {what} (last error: {last_exc!r}; agent alive: "
            f"{self.proc is not None and self.proc.poll() is None})\nAPI pods: {pods}\n"
            f"agent log tail:\n{self.log_path.read_text()[-5000:]}")

    async def wait_api_phase(self, name: str, phase: str, timeout: float = 60.0,
                             namespace: str = "default") -> dict:
        return await self.wait(
            f"API pod {namespace}/{name} phase {phase}",
            lambda: (p := self.api_pod(name, namespace)) and (p.get("status") or {}).get("phase") == phase and p,
            timeout)

    async def wait_api_running_ready(self, name: str, timeout: float = 60.0) -> dict:
        def ready():
            p = self.api_pod(name)
            status = (p or {}).get("status") or {}
            conds = {c["type"]: c["status"] for c in status.get("conditions") or []}
            return p if status.get("phase") == "Running" and conds.get("Ready") == "True" else None
        return await self.wait(f"API pod {name} running and ready", ready, timeout)

    async def wait_node_ready(self, timeout: float = 30.0) -> dict:
        def ready():
            node = self.node_object()
            conds = {c["type"]: c["status"] for c in ((node or {}).get("status") or {}).get("conditions") or []}
            return node if conds.get("Ready") == "True" else None
        return await self.wait(f"node {self.node_name} Ready", ready, timeout)

    # --- runtime-side observation ------------------------------------------------------

    async def docker_containers(self, pod_uid: str | None = None, running_only: bool = False) -> list[dict]:
        def read() -> list[dict]:
            args = ["ps", "-q", "--filter", f"label=io.nodeagent.node={self.node_name}"]
            if pod_uid:
                args += ["--filter", f"label=io.kubernetes.pod.uid={pod_uid}"]
            if not running_only:
                args.insert(1, "-a")
            ids = docker(*args).split()
            if not ids:
                return []
            # A container may go between ps and inspect: inspect reports the others.
            out = docker("inspect", *ids, check=False).strip()
            return json.loads(out) if out else []
        return await asyncio.to_thread(read)

    def log_records(self) -> list[dict]:
        return super().log_records()


@pytest.fixture
async def cp_recording(make_controlplane):
    """A control plane that records every non-admin write for schema checks."""
    return await make_controlplane(options=Options(record_writes=True))


@pytest.fixture
def rkubectl(cp_recording, tmp_path):
    """Real kubectl against `cp_recording` (as cluster admin)."""
    from tests.cluster.conftest import Kubectl, find_kubectl

    home = tmp_path / "kubectl-rec-home"
    home.mkdir(exist_ok=True)
    return Kubectl(find_kubectl(), cp_recording.admin_kubeconfig, home)


@pytest.fixture
async def cluster_agent_factory(tmp_path):
    made: list[ClusterAgent] = []

    async def make(controlplane, *, start: bool = True, manifests: bool = False,
                   extra_config: dict | None = None) -> ClusterAgent:
        workdir = tmp_path / f"cluster-agent{len(made)}"
        workdir.mkdir()
        agent = ClusterAgent(workdir, controlplane, manifests=manifests, extra_config=extra_config)
        made.append(agent)
        if start:
            await agent.astart()
        return agent

    yield make
    for agent in made:
        await agent.acleanup()


async def kubectl_apply(kubectl, obj: dict):
    return await kubectl("apply", "-f", "-", input=yaml.safe_dump(obj))


def schema_problems(controlplane) -> list[str]:
    return [f"{w.verb} {w.resource} {w.namespace}/{w.name}: {problems}"
            for w, problems in controlplane.schema_problems_in_recorded_writes()]


def is_running(container: dict) -> bool:
    return bool(container.get("State", {}).get("Running"))


__all__ = ["ClusterAgent", "api_pod", "busybox", "cluster_agent_factory", "cp_recording", "rkubectl",
           "kubectl_apply", "schema_problems", "is_running", "PODS_RT", "NODES_RT",
           "SLEEP_FOREVER", "IGNORE_TERM", "os"]
