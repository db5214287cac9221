"""README command 1 runs the agent on examples/: every example behaves as described."""

from __future__ import annotations

import shutil
import subprocess

import pytest

import urllib.request

from tests.e2e.conftest import REPO, docker


def _proxy_show(agent) -> str:
    with urllib.request.urlopen(agent.url + "/proxy", timeout=5) as resp:
        return resp.read().decode()

pytestmark = [pytest.mark.docker, pytest.mark.root]


def test_examples_run_as_documented(agent):
    for manifest in sorted((REPO / "examples").glob("*.yaml")):
        shutil.copy(manifest, agent.manifest_dir / manifest.name)

    web = agent.wait_running_ready("web")
    # Ready through its readiness probe: the node's GET reached httpd (its -v log
    # names the client, the node's address on the pod bridge).
    assert web["status"]["containerStatuses"][0]["ready"] is True
    httpd = agent.container_of("web", "httpd")

    def logs() -> str:
        out = subprocess.run(["docker", "logs", httpd["Id"]], capture_output=True, text=True, timeout=30)
        return out.stdout + out.stderr
    agent.wait_for("the readiness probe reached httpd", lambda: "response:200" in logs(), timeout=30)

    init = agent.wait_running_ready("init-demo")
    assert init["status"]["initContainerStatuses"][0]["state"]["terminated"]["reason"] == "Completed"
    app = agent.container_of("init-demo", "app")
    assert "prepared by init" in docker("logs", app["Id"])

    once = agent.wait_phase("once", "Succeeded", timeout=30)
    assert once["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0

    # The web Service got a ClusterIP and NodePort 30080 with the web pod behind it.
    show = agent.wait_for("web service programmed", lambda: (text := _proxy_show(agent)) and
                          web["status"]["podIP"] in text and text)
    assert "default/web" in show and "30080" in show

    crasher = agent.wait_for("crasher restarts", lambda: (p := agent.pod("crasher")) and
                             p["status"]["containerStatuses"][0]["restartCount"] >= 2 and p, timeout=40)
    assert crasher["status"]["containerStatuses"][0]["lastState"]["terminated"]["exitCode"] == 3
