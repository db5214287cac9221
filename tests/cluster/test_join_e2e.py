"""End to end: an empty root directory, `nodeagent join` (the real CLI process) against
the test control plane with auto-approval, the Node Ready, a pod running, and real
kubectl showing it on the node. The whole output of the process never holds the token
secret."""

from __future__ import annotations

import asyncio
import stat
import subprocess
import sys

import pytest

from tests.cluster.test_cluster_support import (SLEEP_FOREVER, ClusterAgent, api_pod, busybox,  # noqa: F401
                                                kubectl_apply, rkubectl)
from tests.controlplane import Options
from tests.e2e.conftest import REPO

pytestmark = [pytest.mark.docker, pytest.mark.root]


class JoinAgent(ClusterAgent):
    """The agent started by `nodeagent join` (no kubeconfig given: join makes one)."""

    def __init__(self, workdir, controlplane, token: str, **kwargs) -> None:
        super().__init__(workdir, controlplane, **kwargs)
        self.token = token
        self.kubeconfig.unlink()  # the harness's ready-made identity is not used
        import yaml
        config = yaml.safe_load(self.config_path.read_text())
        config.update({"pod-cidr": self.pod_cidr, "status-address": f"127.0.0.1:{self.port}"})
        self.config_path.write_text(yaml.safe_dump(config))

    def command(self) -> list[str]:
        return [sys.executable, "-m", "nodeagent.cli", "join", self.controlplane.url,
                "--token", self.token,
                "--discovery-token-ca-cert-hash", self.controlplane.ca.spki_sha256(),
                "--node-name", self.node_name, "--root-dir", str(self.root_dir),
                "--config", str(self.config_path), "--timeout", "30s"]


@pytest.fixture
async def join_cp(make_controlplane):
    return await make_controlplane(options=Options(auto_approve_csrs=True, record_writes=True))


async def test_join_from_empty_root_dir_runs_a_pod(join_cp, tmp_path):
    from tests.cluster.conftest import Kubectl, find_kubectl

    cp = join_cp
    token = cp.create_bootstrap_token()
    workdir = tmp_path / "joiner"
    workdir.mkdir()
    agent = JoinAgent(workdir, cp, token)
    assert not agent.root_dir.exists()
    try:
        await agent.astart()
        node = await agent.wait_node_ready()
        assert node["metadata"]["name"] == agent.node_name
        home = tmp_path / "kubectl-home"
        home.mkdir()
        kubectl = Kubectl(find_kubectl(), cp.admin_kubeconfig, home)
        await kubectl_apply(kubectl, api_pod("joined-web", agent.node_name, [busybox("app", SLEEP_FOREVER)]))
        await agent.wait_api_running_ready("joined-web")
        wide = (await kubectl("get", "pod", "joined-web", "-o", "wide")).stdout
        row = next(line.split() for line in wide.splitlines() if line.startswith("joined-web"))
        assert row[2] == "Running" and agent.node_name in row
        # Everything the node wrote went out as the node identity the CSR produced.
        users = {w.user for w in cp.recorded_writes}
        token_id = token.split(".")[0]
        assert users == {f"system:bootstrap:{token_id}", f"system:node:{agent.node_name}"}
        # Credentials: 0600 files in a 0700 directory.
        pki = agent.root_dir / "pki"
        assert stat.S_IMODE(pki.stat().st_mode) == 0o700
        for path in [agent.root_dir / "kubeconfig", *pki.glob("*.pem")]:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        # Joining again: says so, changes nothing, starts nothing.
        again = await asyncio.to_thread(
            subprocess.run, agent.command(), cwd=REPO, capture_output=True, text=True, timeout=30)
        assert again.returncode == 0 and "already joined" in again.stderr
        assert token.split(".")[1] not in again.stdout + again.stderr
    finally:
        await agent.acleanup()
    log = agent.log_path.read_text()
    assert "created certificate signing request node-csr-" in log
    assert token.split(".")[1] not in log, "the token secret appeared in the join log"
