"""Suite-wide checks: tests that need Docker or root fail loudly, never skip silently,
because a green run that skipped them would hide a broken setup."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def _docker_ok() -> str | None:
    if shutil.which("docker") is None:
        return "the docker CLI is not installed (run scripts/setup.sh)"
    out = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"],
                         capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        return f"the Docker engine is not reachable (run scripts/setup.sh): {out.stderr.strip()}"
    for image in ("busybox:1.35", "nodeagent/pause:1"):
        if subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode != 0:
            return f"image {image} is missing (run scripts/setup.sh)"
    return None


@pytest.fixture(scope="session")
def _docker_check():
    return _docker_ok()


@pytest.fixture(autouse=True)
def _require_environment(request, _docker_check):
    if request.node.get_closest_marker("root") and os.geteuid() != 0:
        pytest.fail("this test needs root (real netlink, namespaces, mounts)")
    if request.node.get_closest_marker("docker") and _docker_check:
        pytest.fail(_docker_check)
