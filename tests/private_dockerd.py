"""A private Docker engine for tests that must not touch the machine's: its own data
root, exec root, pid file, socket and containerd namespace, no bridge and no iptables
(the agent brings its own pod network). Seeded with the test images by save/load."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psutil

SEED_IMAGES = ("busybox:1.35", "nodeagent/pause:1")


def kill_leftovers(*marks: str) -> None:
    """Kill what an engine leaves when it dies before its containers (a SIGKILLed or
    slow-to-stop dockerd): containerd and the shims, found by their namespace or
    directory on the command line."""
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if any(mark in cmdline for mark in marks) and proc.pid != os.getpid():
            try:
                proc.kill()
            except psutil.Error:
                pass


@contextmanager
def private_dockerd(seed: tuple[str, ...] = SEED_IMAGES) -> Iterator[str]:
    """Yields the engine's URL (``unix:///.../docker.sock``)."""
    # A short path: unix socket paths are limited to 108 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="pdk-", dir="/tmp"))
    sock = workdir / "docker.sock"
    # containerd namespaces allow no "_" or "-" next to another separator, which
    # mkdtemp's random suffix may produce.
    ns = f"nodeagent-test-{secrets.token_hex(6)}"
    log = open(workdir / "dockerd.log", "wb")
    proc = subprocess.Popen(
        ["dockerd", "--data-root", str(workdir / "data"), "--exec-root", str(workdir / "exec"),
         "--pidfile", str(workdir / "dockerd.pid"), "-H", f"unix://{sock}",
         "--bridge", "none", "--iptables=false", "--ip-masq=false",
         "--containerd-namespace", ns, "--containerd-plugins-namespace", f"{ns}-plugins"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"unix://{sock}"
    try:
        deadline = time.monotonic() + 30
        while subprocess.run(["docker", "-H", url, "version"], capture_output=True).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"private dockerd did not start: {(workdir / 'dockerd.log').read_text()[-2000:]}")
            time.sleep(0.2)
        if seed:
            save = subprocess.Popen(["docker", "save", *seed], stdout=subprocess.PIPE)
            load = subprocess.run(["docker", "-H", url, "load"], stdin=save.stdout, capture_output=True)
            save.wait(60)
            if load.returncode != 0:
                raise AssertionError(f"seeding the private engine failed: {load.stderr!r}")
        yield url
    finally:
        ids = subprocess.run(["docker", "-H", url, "ps", "-aq"], capture_output=True, text=True).stdout.split()
        for cid in ids:  # one at a time (Docker 20.10 libnetwork, moby/moby#46661)
            subprocess.run(["docker", "-H", url, "rm", "-f", cid], capture_output=True, timeout=60)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        kill_leftovers(f"-namespace {ns} ", str(workdir) + "/")
        log.close()
        subprocess.run(["sh", "-c", f"grep -F '{workdir}' /proc/mounts | cut -d' ' -f2 | sort -r | xargs -r -n1 umount -l"],
                       capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)
