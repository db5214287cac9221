"""Fault suite: kill -9 at random moments, a Docker daemon that stops and starts, and a
damaged IPAM store, against the real agent, engine and kernel.

Every scenario ends with the same invariants (``assert_converged``): each pod Running
once (one ready sandbox, one running container per name), distinct pod addresses, an
IPAM store holding exactly the live pods, and no dead sandbox left behind.

The Docker restart runs against a private engine (own data root, exec root, socket,
pidfile and containerd namespace; no bridge, no iptables) so the machine's engine is
never touched. Randomness is seeded and the seed is printed, so a failure can be rerun.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import busybox, pod_manifest
from tests.private_dockerd import kill_leftovers

pytestmark = [pytest.mark.docker, pytest.mark.root]

# Exits on SIGTERM within a second, so terminations and daemon stops are quick.
QUICK_STOP = "trap 'exit 0' TERM; while true; do sleep 1; done"
KILLS = 20
PODS = 20


def quick_pod(name: str, **env: str) -> dict:
    container = busybox("c", QUICK_STOP, env=[{"name": k, "value": v} for k, v in env.items()])
    return pod_manifest(name, [container], terminationGracePeriodSeconds=2)


def seeded() -> random.Random:
    seed = int(os.environ.get("FAULT_SEED") or time.time_ns() % 1_000_000)
    print(f"fault suite seed: FAULT_SEED={seed}")
    return random.Random(seed)


def ipam_store(agent) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (agent.root_dir / "ipam").iterdir() if p.name[0].isdigit()}


def node_containers(node_name: str, *host: str) -> list[dict]:
    """Every container of the node; ones removed between list and inspect are skipped."""
    base = ["docker", *host]
    ids = subprocess.run([*base, "ps", "-aq", "--filter", f"label=io.nodeagent.node={node_name}"],
                         capture_output=True, text=True, timeout=60, check=True).stdout.split()
    if not ids:
        return []
    out = subprocess.run([*base, "inspect", *ids], capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout or "[]")


def labels(c: dict) -> dict:
    return c["Config"]["Labels"]


def assert_converged(agent, names: list[str], containers_of=None, timeout: float = 90.0) -> dict[str, tuple[str, str]]:
    """Wait until the node shows exactly ``names`` running once; return name -> (uid, ip)."""
    containers_of = containers_of or (lambda: node_containers(agent.node_name))
    full = {f"{n}-{agent.node_name}" for n in names}

    def check():
        pods = {p["metadata"]["name"]: p for p in agent.pods()}
        if set(pods) != full:
            return None
        for p in pods.values():
            conds = {c["type"]: c["status"] for c in p["status"].get("conditions", [])}
            if p["status"].get("phase") != "Running" or conds.get("Ready") != "True":
                return None
        uids = {p["metadata"]["uid"]: name for name, p in pods.items()}
        state = {name: (p["metadata"]["uid"], p["status"].get("podIP")) for name, p in pods.items()}
        everything = containers_of()
        sandboxes = [c for c in everything if labels(c)["io.kubernetes.container.name"] == "POD"]
        apps = [c for c in everything if labels(c)["io.kubernetes.container.name"] != "POD"]
        # One running sandbox per pod; nothing of a pod that no longer exists; a dead
        # sandbox only while it still holds a pod's last dead containers (kubelet-style
        # GC removes the others: superseded, never started, of gone pods).
        if any(labels(s)["io.kubernetes.pod.uid"] not in uids for s in sandboxes):
            return None
        live = sorted(labels(s)["io.kubernetes.pod.uid"] for s in sandboxes if s["State"]["Running"])
        if live != sorted(uids):
            return None
        holding = {labels(c).get("io.kubernetes.sandbox.id") for c in apps}
        if any(not s["State"]["Running"] and s["Id"] not in holding for s in sandboxes):
            return None
        running = [labels(c)["io.kubernetes.pod.uid"] for c in apps if c["State"]["Running"]]
        if sorted(running) != sorted(uids):
            return None
        if any(labels(c)["io.kubernetes.pod.uid"] not in uids for c in apps):
            return None
        # Addresses: distinct, and the store holds exactly the live pods' (no leak).
        ips = [ip for _uid, ip in state.values()]
        if None in ips or len(set(ips)) != len(ips):
            return None
        if ipam_store(agent) != {ip: f"{uid}\n".encode() for uid, ip in state.values()}:
            return None
        return state

    return agent.wait_for(f"{len(names)} pods converged (one sandbox, one container, one address each)",
                          check, timeout)


def test_kill9_at_random_points_during_a_20_pod_burst(agent):
    rng = seeded()
    names = [f"b{i}" for i in range(PODS)]
    for name in names:
        agent.write(f"{name}.yaml", quick_pod(name))
    for _ in range(KILLS):
        time.sleep(rng.uniform(0.0, 0.8))
        agent.kill9()
        agent.start()
    t0 = time.monotonic()
    state = assert_converged(agent, names)
    print(f"converged {time.monotonic() - t0:.1f} s after the last kill")
    assert len(state) == PODS


def test_kill9_while_20_manifests_are_edited_leaves_no_sandboxes_behind(agent):
    rng = seeded()
    names = [f"e{i}" for i in range(PODS)]
    for name in names:
        agent.write(f"{name}.yaml", quick_pod(name, GEN="0"))
    stop = threading.Event()
    edits = 0

    def editor() -> None:
        nonlocal edits
        generation = 0
        while not stop.is_set():
            generation += 1
            for name in names:
                if stop.is_set():
                    return
                agent.write(f"{name}.yaml", quick_pod(name, GEN=str(generation)))  # a new uid each time
                edits += 1
                # An edit every 1.5 s: across the kills every manifest changes at
                # least once and the agent dies in the middle of replacing pods, while
                # the pods left to clean up stay few enough to converge quickly.
                time.sleep(1.5)

    thread = threading.Thread(target=editor, daemon=True)
    thread.start()
    try:
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.0, 0.8))
            agent.kill9()
            agent.start()
    finally:
        stop.set()
        thread.join(10)
    final = {name: quick_pod(name, GEN="final") for name in names}
    for name, pod in final.items():
        agent.write(f"{name}.yaml", pod)
    print(f"{edits} edits during {KILLS} kills")
    t0 = time.monotonic()
    state = assert_converged(agent, names, timeout=120)
    print(f"converged {time.monotonic() - t0:.1f} s after the last kill")
    for name in names:
        pod = agent.pod(name)
        assert pod["spec"]["containers"][0]["env"] == [{"name": "GEN", "value": "final"}], name
    assert len(state) == PODS


def test_damaged_ipam_store_heals_at_start(agent):
    names = ["ia", "ib", "ic"]
    for name in names:
        agent.write(f"{name}.yaml", quick_pod(name))
    before = assert_converged(agent, names, timeout=60)
    (a_uid, a_ip), (b_uid, b_ip), (c_uid, c_ip) = (before[f"{n}-{agent.node_name}"] for n in names)
    agent.kill9()
    store = agent.root_dir / "ipam"
    prefix = agent.pod_cidr.rsplit(".", 1)[0]
    (store / "network").write_text(agent.pod_cidr[:6])  # truncated marker
    (store / a_ip).write_text(f"{b_uid}\n")  # a's address file names b
    (store / c_ip).write_bytes(b"\0" * 37)  # zero-filled
    (store / f"{prefix}.250").write_bytes(b"\0" * 37)  # zero-filled, used by nobody

    t0 = time.monotonic()
    agent.start()
    agent.wait_for("healthy", lambda: agent.healthz()[0] == 200, timeout=10)
    agent.wait_for("pods listed", lambda: len(agent.pods()) == 3, timeout=10)
    print(f"healthy and listing pods {time.monotonic() - t0:.1f} s after start")
    agent.write("id.yaml", quick_pod("id"))
    after = assert_converged(agent, [*names, "id"], timeout=60)
    # The running pods kept their addresses; the new pod got none of theirs; the
    # stray address is free again; nobody holds two.
    for name in names:
        assert after[f"{name}-{agent.node_name}"] == before[f"{name}-{agent.node_name}"]
    assert (store / "network").read_text() == f"{agent.pod_cidr}\n"
    assert f"{prefix}.250" not in ipam_store(agent)
    records = [r for r in agent.log_records() if r.get("event") == "ipam store repaired from the runtime's view"]
    assert records and f"{a_ip}={a_uid} (was {b_uid})" in records[0]["recorded"]


# ------------------------------------------------------------------ private engine


class PrivateDocker:
    """A second dockerd with its own roots and socket; the test may stop and start it."""

    def __init__(self) -> None:
        # Under /tmp with a short name: the socket path must fit sun_path (108 bytes).
        self.root = Path(tempfile.mkdtemp(prefix="nad-", dir="/tmp"))
        self.socket = self.root / "docker.sock"
        self.url = f"unix://{self.socket}"
        self.proc: subprocess.Popen | None = None
        # Not the mkdtemp suffix: containerd namespaces refuse "_" next to "-".
        self.namespace = f"nodeagent-test-{secrets.token_hex(6)}"

    def docker(self, *args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["docker", "-H", self.url, *args], capture_output=True,
                              timeout=60, check=check, **kwargs)

    def start(self) -> None:
        log = open(self.root / "dockerd.log", "a")
        self.proc = subprocess.Popen(
            ["dockerd", "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "exec"),
             "--pidfile", str(self.root / "docker.pid"), "-H", self.url,
             "--bridge", "none", "--iptables=false", "--ip-masq=false",
             "--containerd-namespace", self.namespace,
             "--containerd-plugins-namespace", f"{self.namespace}-plugins",
             "--shutdown-timeout", "2"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.docker("version", check=False).returncode == 0:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"private dockerd did not come up:\n{(self.root / 'dockerd.log').read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def containers(self, node_name: str) -> list[dict]:
        return node_containers(node_name, "-H", self.url)

    def destroy(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            ids = self.docker("ps", "-aq", check=False).stdout.split()
            for cid in ids:
                self.docker("rm", "-f", cid.decode(), check=False)
        self.stop()
        kill_leftovers(f"-namespace {self.namespace} ", str(self.root) + "/")
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                  if line.split()[1].startswith(str(self.root))]
        for mount in sorted(mounts, reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def private_docker():
    engine = PrivateDocker()
    try:
        engine.start()
        images = subprocess.Popen(["docker", "save", "nodeagent/pause:1", "busybox:1.35"], stdout=subprocess.PIPE)
        engine.docker("load", stdin=images.stdout)
        assert images.wait(60) == 0
        yield engine
    finally:
        engine.destroy()


def test_docker_daemon_stopped_and_started(private_docker, agent_factory):
    engine = private_docker
    agent = agent_factory(start=False, extra_config={"docker-url": engine.url, "runtime-call-timeout": 5.0})
    names = [f"d{i}" for i in range(6)]
    for name in names:
        agent.write(f"{name}.yaml", quick_pod(name))
    agent.start()
    before = assert_converged(agent, names, lambda: engine.containers(agent.node_name), timeout=60)
    old_ids = {c["Id"] for c in engine.containers(agent.node_name)}

    engine.stop()  # every container of the engine stops with it
    agent.wait_for("unhealthy while Docker is down", lambda: agent.healthz()[0] == 500, timeout=30)
    engine.start()
    t0 = time.monotonic()
    after = assert_converged(agent, names, lambda: engine.containers(agent.node_name), timeout=60)
    print(f"converged {time.monotonic() - t0:.1f} s after the engine came back")
    # Same pods, same addresses, in new sandboxes; the dead ones were cleaned up.
    assert after == before
    assert not old_ids & {c["Id"] for c in engine.containers(agent.node_name) if c["State"]["Running"]}
    agent.wait_for("healthy again", lambda: agent.healthz()[0] == 200, timeout=20)
