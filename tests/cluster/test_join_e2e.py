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

from tests.cluster.test_cluster_support import (SLEEP_FOREVER, ClusterAgent, api_pod, busybox,
                                                kubectl_apply)
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


async def test_certificates_rotate_without_disturbing_pods_or_watches(make_controlplane, tmp_path):
    """20-second client certificates (the control plane's signing duration): the node
    renews its certificate at 70-90 % of its lifetime through a new CSR, keeps every watch
    (no list or watch request after the first ones) and its pod, and keeps working once
    the old certificate has expired. The serving certificate waits for approval, saying
    so in a Node event, and lands under root-dir/pki once approved with kubectl."""
    import datetime as dt

    from cryptography import x509

    from tests.cluster.conftest import Kubectl, find_kubectl

    cp = await make_controlplane(options=Options(auto_approve_csrs=True, auto_approve_serving_csrs=False,
                                                 signing_duration=20))
    token = cp.create_bootstrap_token()
    workdir = tmp_path / "rotator"
    workdir.mkdir()
    agent = JoinAgent(workdir, cp, token)
    home = tmp_path / "kubectl-home"
    home.mkdir()
    kubectl = Kubectl(find_kubectl(), cp.admin_kubeconfig, home)
    node_user = f"system:node:{agent.node_name}"
    pki = agent.root_dir / "pki"

    def csrs(signer: str) -> list[dict]:
        return [c for c in cp.objects("certificatesigningrequests", group="certificates.k8s.io")
                if c["spec"]["signerName"] == signer]

    def reads() -> dict:
        return {k: v for k, v in cp.request_counts.items()
                if k[0] == node_user and k[1] in ("list", "watch")
                and k[2] != "certificatesigningrequests"}

    try:
        await agent.astart()
        await agent.wait_node_ready()
        await kubectl_apply(kubectl, api_pod("steady", agent.node_name, [busybox("app", SLEEP_FOREVER)]))
        steady = await agent.wait_api_running_ready("steady")
        container_id = steady["status"]["containerStatuses"][0]["containerID"]

        # The serving certificate is pending: the node says so.
        pending = await agent.wait("serving CSR", lambda: csrs("kubernetes.io/kubelet-serving"), 20)
        serving_name = pending[0]["metadata"]["name"]
        event = await agent.wait("pending event", lambda: [
            e for e in cp.objects("events", "default")
            if e.get("reason") == "CertificateSigningRequestPending" and serving_name in e.get("message", "")], 20)
        assert event[0]["type"] == "Warning" and f"kubectl certificate approve {serving_name}" in event[0]["message"]
        assert "certificate signing request pending" in agent.log_path.read_text()
        await kubectl("certificate", "approve", serving_name)
        serving = pki / "kubelet-server-current.pem"
        await agent.wait("serving certificate file", serving.exists, 20)
        cert = x509.load_pem_x509_certificates(serving.read_bytes())[0]
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert agent.node_name in sans.get_values_for_type(x509.DNSName)
        assert any(str(a) for a in sans.get_values_for_type(x509.IPAddress))
        assert x509.ExtendedKeyUsageOID.SERVER_AUTH in cert.extensions.get_extension_for_class(
            x509.ExtendedKeyUsage).value

        # Client certificate rotation.
        first_target = (pki / "kubelet-client-current.pem").resolve()
        first = x509.load_pem_x509_certificates(first_target.read_bytes())[0]
        await asyncio.sleep(2)  # informers settled: their list and watch are counted
        before = reads()
        assert before, "no list/watch by the node was counted"
        await agent.wait("a rotated client certificate",
                         lambda: (pki / "kubelet-client-current.pem").resolve() != first_target, 30)
        rotated_at = dt.datetime.now(dt.timezone.utc)
        lifetime = first.not_valid_after_utc - first.not_valid_before_utc
        elapsed = rotated_at - first.not_valid_before_utc
        assert 0.65 * lifetime <= elapsed <= 0.95 * lifetime + dt.timedelta(seconds=2), (elapsed, lifetime)
        clients = csrs("kubernetes.io/kube-apiserver-client-kubelet")
        assert len(clients) >= 2
        users = sorted(c["spec"]["username"] for c in clients)
        # One CSR at join (bootstrap token), the renewals as the node itself.
        assert users.count(f"system:bootstrap:{token.split('.')[0]}") == 1
        assert users.count(node_user) == len(clients) - 1
        # Past the old certificate's expiry, new requests work: a new pod runs.
        wait = (first.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)).total_seconds() + 1
        await asyncio.sleep(max(0.0, wait))
        await kubectl_apply(kubectl, api_pod("after", agent.node_name, [busybox("app", SLEEP_FOREVER)]))
        await agent.wait_api_running_ready("after")
        # Watches were never restarted from scratch: not one more list or watch request
        # (the CSR watches of the rotation itself aside).
        assert reads() == before
        steady_now = agent.api_pod("steady")
        status = steady_now["status"]["containerStatuses"][0]
        assert status["containerID"] == container_id and status["restartCount"] == 0
        assert "certificate rotated" in agent.log_path.read_text()
    finally:
        await agent.acleanup()
    assert token.split(".")[1] not in agent.log_path.read_text()
