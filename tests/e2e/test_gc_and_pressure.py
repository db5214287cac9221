"""Image garbage collection on a private Docker engine (it removes images, so never on
the machine's), with the thresholds set around the disk's current use; and node
pressure on a standalone node: reported on /healthz?verbose, static pods never evicted."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import time

import pytest

from tests.e2e.conftest import busybox, pod_manifest
from tests.private_dockerd import private_dockerd

pytestmark = [pytest.mark.docker, pytest.mark.root]

SLEEP_FOREVER = "while true; do sleep 3600; done"


def _import(url: str, ref: str, marker: str) -> str:
    """A small distinct image: busybox's binary plus a marker file (its own image id)."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        tar.add("/bin/busybox", arcname="bin/busybox")
        for applet in ("sh", "sleep", "true"):
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
        blob = marker.encode()
        info = tarfile.TarInfo("marker")
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
    out = subprocess.run(["docker", "-H", url, "import", "-c", "ENV PATH=/bin", "-", ref],
                         input=data.getvalue(), capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.decode().strip()


def _images(url: str) -> set[str]:
    out = subprocess.run(["docker", "-H", url, "images", "--format", "{{.Repository}}:{{.Tag}}"],
                         capture_output=True, text=True, timeout=30)
    return set(out.stdout.split())


def _used_percent(path: str) -> float:
    st = os.statvfs(path)
    return 100 * (st.f_blocks - st.f_bavail) / st.f_blocks


def test_image_gc_removes_unused_images_and_keeps_what_pods_need(agent_factory):
    with private_dockerd() as url:
        _import(url, "gc/unused:1", "unused")
        _import(url, "gc/needed:1", "needed")
        used = _used_percent("/tmp")
        # At or above the high threshold now; the low one below: GC must run.
        high = max(0, int(used))
        # With a minimum age of 0 only the pods decide what stays: the manifest is in
        # place before the agent starts (GC waits for the first sync of every source).
        agent = agent_factory(start=False, extra_config={
            "docker-url": url, "image-gc-high-threshold": high, "image-gc-low-threshold": max(0, high - 1),
            "image-minimum-gc-age": 0, "image-gc-period": 1.0})
        # The app container waits behind an init container that never ends: its image
        # is needed by the pod but used by no container yet.
        agent.write("waiting.yaml", pod_manifest(
            "waiting", [{"name": "app", "image": "gc/needed:1", "imagePullPolicy": "Never",
                         "command": ["sh", "-c", SLEEP_FOREVER]}],
            initContainers=[busybox("init", SLEEP_FOREVER)], terminationGracePeriodSeconds=1))
        agent.start()
        agent.wait_for("init container running", lambda: (p := agent.pod("waiting")) and any(
            "running" in s["state"] for s in p["status"].get("initContainerStatuses") or []), 60)
        agent.wait_for("gc/unused:1 removed", lambda: "gc/unused:1" not in _images(url), 30)
        time.sleep(2.5)  # two more GC rounds
        assert {"gc/needed:1", "busybox:1.35", "nodeagent/pause:1"} <= _images(url)
        removed = [r for r in agent.log_records() if r.get("event") == "removed unused image"]
        assert [r["tags"] for r in removed] == [["gc/unused:1"]]
        agent.stop()


def test_standalone_pressure_is_reported_and_static_pods_stay(agent_factory):
    agent = agent_factory(extra_config={"eviction-hard": "memory.available<100%,pid.available<1",
                                        "eviction-monitoring-interval": 0.5})
    agent.write("p.yaml", pod_manifest("p", [busybox("app", SLEEP_FOREVER)]))
    pod = agent.wait_phase("p", "Running", 60)
    code, body = agent.healthz()
    deadline = time.monotonic() + 10
    while "MemoryPressure=True" not in body and time.monotonic() < deadline:
        time.sleep(0.3)
        code, body = agent.healthz()
    assert code == 200  # pressure is a condition, not an unhealthy agent
    assert "[i]MemoryPressure=True" in body and "[i]DiskPressure=False" in body
    assert "[i]threshold met: memory.available available " in body and "< 100%" in body
    time.sleep(2)  # several eviction rounds
    again = agent.pod("p")
    assert again["status"]["phase"] == "Running"
    assert again["metadata"]["uid"] == pod["metadata"]["uid"]
    assert any(r.get("event") == "no pod can be evicted" for r in agent.log_records())
