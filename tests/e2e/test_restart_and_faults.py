"""Restart safety (kill -9 at any moment), bad manifests, and Docker going away."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import busybox, docker, pod_manifest

pytestmark = [pytest.mark.docker, pytest.mark.root]

SLEEP_FOREVER = "while true; do sleep 3600; done"


def _pod_state(agent) -> dict[str, tuple[str, str]]:
    """pod name -> (uid, ip) for every pod the agent reports running."""
    return {
        p["metadata"]["name"]: (p["metadata"]["uid"], p["status"].get("podIP"))
        for p in agent.pods() if p["status"].get("phase") == "Running"
    }


def test_kill9_adopts_running_pods_without_duplicates(agent):
    agent.write("a.yaml", pod_manifest("a", [busybox("c", SLEEP_FOREVER)]))
    agent.write("b.yaml", pod_manifest("b", [busybox("c", SLEEP_FOREVER)],
                                       initContainers=[busybox("i", "true")]))
    agent.wait_running_ready("a")
    agent.wait_running_ready("b")
    before_state = _pod_state(agent)
    before_ids = sorted(c["Id"] for c in agent.containers())

    agent.kill9()
    agent.remove("b.yaml")  # changed while the agent is dead
    agent.start()

    agent.wait_for("b removed", lambda: agent.pod("b") is None and not [
        c for c in agent.containers() if c["Config"]["Labels"]["io.kubernetes.pod.uid"] == before_state[f"b-{agent.node_name}"][0]])
    pod_a = agent.wait_running_ready("a")
    # Same uid, same IP, same containers: adopted, nothing created twice.
    assert (pod_a["metadata"]["uid"], pod_a["status"]["podIP"]) == before_state[f"a-{agent.node_name}"]
    a_ids = sorted(c["Id"] for c in agent.containers())
    assert set(a_ids) <= set(before_ids)
    assert len([c for c in agent.containers() if c["Config"]["Labels"]["io.kubernetes.container.name"] == "POD"]) == 1
    assert pod_a["status"]["containerStatuses"][0]["restartCount"] == 0


def test_kill9_during_pod_creation_is_repaired(agent):
    # Kill the agent repeatedly while 6 pods are being created; in the end every pod runs
    # exactly once, with distinct, persistent addresses.
    for i in range(6):
        agent.write(f"p{i}.yaml", pod_manifest(f"p{i}", [busybox("c", SLEEP_FOREVER)],
                                               initContainers=[busybox("i", "sleep 0.2")]))
    for delay in (0.4, 0.9, 1.5):
        time.sleep(delay)
        agent.kill9()
        agent.start()
    for i in range(6):
        agent.wait_running_ready(f"p{i}", timeout=90)
    state = _pod_state(agent)
    ips = [ip for _uid, ip in state.values()]
    assert len(set(ips)) == 6
    sandboxes = [c for c in agent.containers(all_states=False) if c["Config"]["Labels"]["io.kubernetes.container.name"] == "POD"]
    assert len(sandboxes) == 6
    apps = [c for c in agent.containers(all_states=False) if c["Config"]["Labels"]["io.kubernetes.container.name"] == "c"]
    assert len(apps) == 6
    # IPAM holds exactly the 6 live pods.
    owners = [p.read_text().strip() for p in (agent.root_dir / "ipam").rglob("*")
              if p.is_file() and p.name[0].isdigit()]
    assert sorted(o for o in owners if o) == sorted(uid for uid, _ip in state.values())

    agent.kill9()
    agent.start()
    time.sleep(3)
    assert _pod_state(agent) == state  # same uids and IPs after a restart


BAD_MANIFESTS = {
    "notyaml.yaml": ("apiVersion: v1\nkind: Pod\nmetadata: {name: x\n  bad", "not valid YAML"),
    "notpod.yaml": ("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n", "kind"),
    "badname.yaml": ("apiVersion: v1\nkind: Pod\nmetadata: {name: Bad_Name}\nspec:\n  containers: [{name: c, image: busybox:1.35}]\n", "metadata.name"),
    "badqty.yaml": ("apiVersion: v1\nkind: Pod\nmetadata: {name: badqty}\nspec:\n  containers:\n  - name: c\n    image: busybox:1.35\n    resources: {limits: {memory: 12Mx}}\n", "spec.containers[0].resources.limits.memory"),
    "badmount.yaml": ("apiVersion: v1\nkind: Pod\nmetadata: {name: badmount}\nspec:\n  containers:\n  - name: c\n    image: busybox:1.35\n    volumeMounts: [{name: nope, mountPath: /x}]\n", "spec.containers[0].volumeMounts[0].name"),
    "dup.yaml": ("apiVersion: v1\nkind: Pod\nmetadata: {name: good}\nspec:\n  containers: [{name: c, image: busybox:1.35}]\n", "duplicate"),
}


def test_bad_manifests_are_reported_and_others_keep_running(agent):
    agent.write("good.yaml", pod_manifest("good", [busybox("c", SLEEP_FOREVER)]))
    agent.write("badimage.yaml", pod_manifest("badimage", [{"name": "c", "image": "UPPER/Case::bad"}]))
    agent.wait_running_ready("good")
    good_id = agent.container_of("good", "c")["Id"]
    for name, (text, _needle) in BAD_MANIFESTS.items():
        (agent.manifest_dir / name).write_text(text)

    def all_reported():
        errors = [r for r in agent.log_records() if r.get("event") == "bad manifest"]
        return all(any(name in (r.get("file") or "") and needle in r.get("error", "")
                       for r in errors) for name, (_t, needle) in BAD_MANIFESTS.items()) and errors
    errors = agent.wait_for("every bad manifest reported", all_reported, timeout=20)
    by_file = {name: [r for r in errors if name in r["file"]] for name in BAD_MANIFESTS}
    assert by_file["badqty.yaml"][0]["field"] == "spec.containers[0].resources.limits.memory"
    assert by_file["badmount.yaml"][0]["field"] == "spec.containers[0].volumeMounts[0].name"

    # Pods that exist but cannot run carry the reason in their status.
    badqty = agent.wait_phase("badqty", "Failed")
    assert badqty["status"]["reason"] == "InvalidManifest"
    assert "badqty.yaml" in badqty["status"]["message"] and "12Mx" in badqty["status"]["message"]
    badimage = agent.wait_for("InvalidImageName", lambda: (p := agent.pod("badimage")) and p["status"].get("containerStatuses")
                              and p["status"]["containerStatuses"][0]["state"].get("waiting", {}).get("reason") == "InvalidImageName" and p)
    assert badimage["status"]["phase"] == "Pending"

    # The good pod was never disturbed and the agent is healthy.
    time.sleep(1.5)
    assert agent.container_of("good", "c")["Id"] == good_id
    assert agent.container_of("good", "c")["State"]["Running"]
    assert agent.healthz()[0] == 200
    assert agent.pod("x") is None and agent.pod("d") is None


def test_invalid_edit_keeps_previous_version_running(agent):
    agent.write("keep.yaml", pod_manifest("keep", [busybox("c", SLEEP_FOREVER)]))
    pod = agent.wait_running_ready("keep")
    (agent.manifest_dir / "keep.yaml").write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: keep\n")
    agent.wait_for("error logged", lambda: any(
        r.get("event", "").startswith("bad manifest") and "keep.yaml" in r.get("file", "") for r in agent.log_records()))
    time.sleep(1.5)
    assert agent.pod("keep")["metadata"]["uid"] == pod["metadata"]["uid"]
    assert agent.pod("keep")["status"]["phase"] == "Running"


class DockerSocketProxy:
    """A unix-socket forwarder to the real engine that a test can cut and restore,
    so 'Docker goes away' is simulated without touching the shared engine."""

    def __init__(self, path: Path, *, hang_on: bytes | None = None) -> None:
        self.path = path
        # Requests whose bytes contain this marker are never forwarded: a Docker call
        # that hangs for one pod only.
        self.hang_on = hang_on
        self.hung = 0
        self._loop = asyncio.new_event_loop()
        self._server = None
        self._conns: set = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _pipe(self, reader, writer, *, upstream: bool = False):
        try:
            while data := await reader.read(65536):
                if upstream and self.hang_on and self.hang_on in data:
                    self.hung += 1
                    await asyncio.Event().wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader, writer):
        try:
            up_r, up_w = await asyncio.open_unix_connection("/var/run/docker.sock")
        except OSError:
            writer.close()
            return
        self._conns.update({writer, up_w})
        await asyncio.gather(self._pipe(reader, up_w, upstream=True), self._pipe(up_r, writer))

    async def _start(self):
        self._server = await asyncio.start_unix_server(self._handle, path=str(self.path))

    async def _stop(self):
        self._server.close()
        for w in list(self._conns):
            w.close()
        self._conns.clear()
        if self.path.exists():
            os.unlink(self.path)

    def up(self):
        self._call(self._start())

    def down(self):
        self._call(self._stop())

    def close(self):
        try:
            self.down()
        except Exception:
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)


def test_docker_down_at_start_and_later(agent_factory, tmp_path):
    sock = tmp_path / "docker-proxy.sock"
    proxy = DockerSocketProxy(sock)
    try:
        a = agent_factory(start=False, extra_config={"docker-url": f"unix://{sock}", "runtime-call-timeout": 5.0})
        a.write("d.yaml", pod_manifest("d", [busybox("c", SLEEP_FOREVER)]))
        a.start()  # Docker is unreachable
        code, body = a.wait_for("unhealthy", lambda: (h := a.healthz())[0] == 500 and h, timeout=20)
        assert "pleg failed" in body and "container runtime unavailable" in body

        proxy.up()
        a.wait_running_ready("d", timeout=60)
        a.wait_for("healthy", lambda: a.healthz()[0] == 200, timeout=15)
        ids = sorted(c["Id"] for c in a.containers())

        proxy.down()
        a.wait_for("unhealthy again", lambda: a.healthz()[0] == 500, timeout=40)
        a.write("e.yaml", pod_manifest("e", [busybox("c", SLEEP_FOREVER)]))
        time.sleep(2)
        proxy.up()
        a.wait_running_ready("e", timeout=60)
        a.wait_for("healthy", lambda: a.healthz()[0] == 200, timeout=40)
        # The first pod's containers were adopted, not duplicated.
        d_ids = sorted(c["Id"] for c in a.containers()
                       if c["Config"]["Labels"]["io.kubernetes.pod.name"] == f"d-{a.node_name}")
        assert d_ids == ids
    finally:
        proxy.close()


def test_hung_docker_call_stalls_only_its_pod(agent_factory, tmp_path):
    sock = tmp_path / "docker-proxy.sock"
    proxy = DockerSocketProxy(sock, hang_on=b"k8s_c_stuck-")
    proxy.up()
    try:
        a = agent_factory(start=False, extra_config={"docker-url": f"unix://{sock}", "runtime-call-timeout": 4.0})
        a.write("stuck.yaml", pod_manifest("stuck", [busybox("c", SLEEP_FOREVER)]))
        a.start()
        a.wait_for("the stuck pod's create call hangs", lambda: proxy.hung >= 1, timeout=30)
        # Other pods start while that call hangs, and the node stays healthy.
        t0 = time.monotonic()
        a.write("fine.yaml", pod_manifest("fine", [busybox("c", SLEEP_FOREVER)]))
        a.wait_running_ready("fine", timeout=30)
        assert time.monotonic() - t0 < 15
        assert a.healthz()[0] == 200
        # The stuck pod alone reports why.
        stuck = a.wait_for("stuck pod reports the timeout", lambda: (p := a.pod("stuck")) and
                           p["status"].get("containerStatuses") and
                           p["status"]["containerStatuses"][0]["state"].get("waiting", {}).get("reason") == "CreateContainerError"
                           and p, timeout=30)
        message = stuck["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
        assert "did not answer" in message or "timed out" in message, message
        assert stuck["status"]["phase"] == "Pending"
        assert a.healthz()[0] == 200
    finally:
        proxy.close()
