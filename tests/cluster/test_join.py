"""`nodeagent join` against the test control plane: discovery (JWS, CA pin), TLS
bootstrap, approval/denial/timeout, refusal of a server posing as the control plane,
bad tokens, credentials on disk. The end-to-end join that runs a pod is
test_join_e2e.py."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import os
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from aiohttp import web

from nodeagent.join.csr import CSRDenied, CSRTimeout
from nodeagent.join.discovery import CLUSTER_INFO_PATH
from nodeagent.join.files import Layout, atomic_write
from nodeagent.join.flow import AlreadyJoined, JoinOptions, join
from nodeagent.join.token import JoinError, parse_token
from nodeagent.kube import KubeClient, KubeConfigError, load_kubeconfig
from nodeagent.kube import resources as R
from tests.cluster.conftest import Kubectl, find_kubectl
from tests.controlplane import Options
from tests.controlplane.pki import CertificateAuthority
from tests.controlplane.tokens import detached_jws
from tests.e2e.conftest import REPO, free_port


def _opts(cp_url: str, token: str, pins: list[str], root: Path, lines: list[str], **kw) -> JoinOptions:
    return JoinOptions(endpoint=cp_url, token=parse_token(token), pins=[p.split(":", 1)[1] for p in pins],
                       node_name=kw.pop("node_name", "joiner"), root_dir=str(root),
                       timeout=kw.pop("timeout", 10.0), progress=lines.append, **kw)


def _pin(cp) -> str:
    return cp.ca.spki_sha256()


async def test_join_writes_private_credentials_that_work(make_controlplane, tmp_path):
    cp = await make_controlplane(options=Options(auto_approve_csrs=True, record_writes=True))
    token = cp.create_bootstrap_token()
    lines: list[str] = []
    other_ca = CertificateAuthority.generate("unrelated")
    # Several pins: any match pins the CA.
    result = await join(_opts(cp.url, token, [other_ca.spki_sha256(), _pin(cp)], tmp_path / "root", lines))
    layout = Layout(tmp_path / "root")
    assert result.kubeconfig == layout.kubeconfig and result.server == cp.url
    for path in (layout.kubeconfig, layout.bootstrap_kubeconfig, layout.client_current.resolve(), layout.ca):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(layout.pki.stat().st_mode) == 0o700
    assert not layout.pending_key.exists()
    assert not [p for p in layout.root.rglob("*") if ".tmp-" in p.name]
    # The CSR went out as the bootstrap user, with kubelet's subject, signer and usages.
    (csr,) = cp.objects("certificatesigningrequests", group="certificates.k8s.io")
    token_id = token.split(".")[0]
    assert csr["spec"]["username"] == f"system:bootstrap:{token_id}"
    assert csr["spec"]["signerName"] == "kubernetes.io/kube-apiserver-client-kubelet"
    assert csr["spec"]["usages"] == ["digital signature", "client auth"]
    assert csr["metadata"]["name"] == result.csr_name
    # The kubeconfig authenticates as the node.
    async with KubeClient(load_kubeconfig(layout.kubeconfig)) as client:
        node = await client.create(R.NODES, {"metadata": {"name": "joiner"}})
    assert node["metadata"]["name"] == "joiner"
    (create,) = [w for w in cp.recorded_writes if w.resource == "nodes"]
    assert create.user == "system:node:joiner"
    # A plain `nodeagent run --root-dir ...` of a joined node finds its kubeconfig.
    from nodeagent.config import build_settings
    assert build_settings(None, {"root_dir": str(tmp_path / "root")}).kubeconfig == str(layout.kubeconfig)
    # The secret never shows in what join says.
    assert token.split(".")[1] not in "\n".join(lines)
    # Joining again changes nothing.
    before = {p: p.stat().st_mtime_ns for p in layout.root.rglob("*") if p.is_file()}
    with pytest.raises(AlreadyJoined, match="already joined"):
        await join(_opts(cp.url, token, [_pin(cp)], tmp_path / "root", lines))
    assert {p: p.stat().st_mtime_ns for p in layout.root.rglob("*") if p.is_file()} == before
    # --force joins again with a new key and certificate.
    old_cert = layout.client_current.resolve().read_bytes()
    await join(_opts(cp.url, token, [_pin(cp)], tmp_path / "root", lines, force=True))
    assert layout.client_current.resolve().read_bytes() != old_cert


class PosingServer:
    """An HTTPS server with a certificate from another CA, posing as the control plane.
    It records every request (to prove no credential reached it)."""

    def __init__(self, tmp_path: Path, cluster_info: dict | None) -> None:
        self.ca = CertificateAuthority.generate("attacker-ca")
        key_pem, cert_pem = self.ca.issue("kube-apiserver", client=False, server=True,
                                          ip_addresses=["127.0.0.1"])
        (tmp_path / "mitm.crt").write_bytes(cert_pem)
        (tmp_path / "mitm.key").write_bytes(key_pem)
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(tmp_path / "mitm.crt", tmp_path / "mitm.key")
        self.cluster_info = cluster_info
        self.requests: list[tuple[str, str, dict]] = []
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path, dict(request.headers)))
        if request.path == CLUSTER_INFO_PATH and self.cluster_info is not None:
            return web.json_response(self.cluster_info)
        return web.json_response({"kind": "Status", "code": 404}, status=404)

    async def __aenter__(self) -> "PosingServer":
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port, ssl_context=self.ctx).start()
        return self

    async def __aexit__(self, *exc) -> None:
        assert self.runner is not None
        await self.runner.cleanup()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def assert_no_credentials(self) -> None:
        assert self.requests, "the posing server saw no request at all"
        for method, path, headers in self.requests:
            assert method == "GET" and path == CLUSTER_INFO_PATH, (method, path)
            assert "Authorization" not in headers, headers


async def test_server_posing_with_another_ca_is_refused_before_any_credential(controlplane, tmp_path):
    token = controlplane.create_bootstrap_token()
    token_id, secret = token.split(".")
    # An insider who knows the token signs a cluster-info that names its own CA.
    async with PosingServer(tmp_path, None) as mitm:
        kubeconfig = yaml.safe_dump({"apiVersion": "v1", "kind": "Config", "clusters": [
            {"name": "", "cluster": {"server": mitm.url,
                                     "certificate-authority-data": base64.b64encode(mitm.ca.cert_pem).decode()}}]})
        mitm.cluster_info = {"kind": "ConfigMap", "data": {
            "kubeconfig": kubeconfig, f"jws-kubeconfig-{token_id}": detached_jws(kubeconfig, token_id, secret)}}
        lines: list[str] = []
        with pytest.raises(JoinError, match="matches none of the --discovery-token-ca-cert-hash") as exc:
            await join(_opts(mitm.url, token, [_pin(controlplane)], tmp_path / "root", lines))
        assert mitm.ca.spki_sha256() in str(exc.value)
        mitm.assert_no_credentials()
    assert not (tmp_path / "root" / "kubeconfig").exists()
    assert not (tmp_path / "root" / "bootstrap-kubeconfig").exists()


async def test_server_relaying_genuine_cluster_info_is_refused_by_the_pinned_ca(controlplane, tmp_path):
    token = controlplane.create_bootstrap_token()
    genuine = controlplane.object("configmaps", "cluster-info", "kube-public")
    async with PosingServer(tmp_path, genuine) as mitm:
        with pytest.raises(JoinError, match="not signed by the pinned cluster CA"):
            await join(_opts(mitm.url, token, [_pin(controlplane)], tmp_path / "root", []))
        mitm.assert_no_credentials()
        # The same with the CA check switched off: the relayed cluster-info is trusted, and
        # the bootstrap goes to the real server cluster-info names (not to the relay).
    assert not (tmp_path / "root" / "kubeconfig").exists()


async def test_bad_tokens_get_clear_errors(controlplane, tmp_path):
    token = controlplane.create_bootstrap_token()
    token_id = token.split(".")[0]
    root = tmp_path / "root"
    # Wrong secret for a known id: the JWS does not verify.
    with pytest.raises(JoinError, match="does not match this token's secret"):
        await join(_opts(controlplane.url, f"{token_id}.{'0' * 16}", [_pin(controlplane)], root, []))
    # Unknown id: cluster-info holds no signature for it (retried until the timeout).
    lines: list[str] = []
    with pytest.raises(JoinError, match="no JWS signature for token id 'zzzzzz'.*gave up") as exc:
        await join(_opts(controlplane.url, "zzzzzz.0123456789abcdef", [_pin(controlplane)], root, lines,
                         timeout=1.5))
    assert "kubeadm token create" in str(exc.value) and any("retrying" in l for l in lines)
    # Expired: the bootstrap signer dropped its signature.
    expired = controlplane.create_bootstrap_token(ttl=dt.timedelta(seconds=-60))
    with pytest.raises(JoinError, match="has expired"):
        await join(_opts(controlplane.url, expired, [_pin(controlplane)], root, [], timeout=1.0))
    # Valid for signing but not for authentication: the API server refuses the token.
    secret_name = f"bootstrap-token-{token_id}"
    secrets_rt = next(r for r in __import__("tests.controlplane", fromlist=["RESOURCES"]).RESOURCES
                      if r.plural == "secrets" and r.group == "")
    current = controlplane.api.get(secrets_rt, "kube-system", secret_name)
    current["data"]["usage-bootstrap-authentication"] = base64.b64encode(b"false").decode()
    controlplane.api.update(secrets_rt, "kube-system", secret_name, current)
    with pytest.raises(JoinError, match="refused bootstrap token"):
        await join(_opts(controlplane.url, token, [_pin(controlplane)], root, [], timeout=3.0))
    assert not (root / "kubeconfig").exists()


def _run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nodeagent.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


async def test_token_format_is_checked_before_any_network_call(tmp_path):
    seen: list[bool] = []

    async def accept(reader, writer):
        seen.append(True)
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        for bad in ("qwerty.99", "QWERTY.zzzzzzzzzzzzzzzz", "qwerty:zzzzzzzzzzzzzzzz"):
            res = await asyncio.to_thread(_run_cli, "join", f"127.0.0.1:{port}", "--token", bad,
                                          "--discovery-token-ca-cert-hash", "sha256:" + "0" * 64,
                                          "--root-dir", str(tmp_path / "root"), "--no-start")
            assert res.returncode == 2 and "<id>.<secret>" in res.stderr
            assert bad not in res.stderr
        res = await asyncio.to_thread(_run_cli, "join", f"127.0.0.1:{port}", "--token",
                                      "abcdef.0123456789abcdef", "--root-dir", str(tmp_path / "root"))
        assert res.returncode == 2 and "--discovery-token-ca-cert-hash" in res.stderr
        res = await asyncio.to_thread(_run_cli, "join", f"127.0.0.1:{port}", "--token",
                                      "abcdef.0123456789abcdef", "--discovery-token-ca-cert-hash",
                                      "md5:abc", "--root-dir", str(tmp_path / "root"))
        assert res.returncode == 2 and "sha256:<64 hex" in res.stderr
    assert seen == []
    assert not (tmp_path / "root").exists()


async def test_denied_csr_names_the_decision(controlplane, tmp_path):
    token = controlplane.create_bootstrap_token()
    kubectl = Kubectl(find_kubectl(), controlplane.admin_kubeconfig, tmp_path / "kube-home")
    (tmp_path / "kube-home").mkdir()
    lines: list[str] = []
    task = asyncio.create_task(join(_opts(controlplane.url, token, [_pin(controlplane)], tmp_path / "root",
                                          lines, timeout=30)))
    csr = await controlplane.wait_for(lambda: controlplane.objects("certificatesigningrequests",
                                                                   group="certificates.k8s.io"), 10)
    name = csr[0]["metadata"]["name"]
    await kubectl("certificate", "deny", name)
    with pytest.raises(CSRDenied) as exc:
        await asyncio.wait_for(task, 15)
    assert name in str(exc.value) and "denied" in str(exc.value) and "KubectlDeny" in str(exc.value)
    assert not (tmp_path / "root" / "kubeconfig").exists()


async def test_csr_never_approved_times_out_with_instructions_then_rerun_picks_it_up(controlplane, tmp_path):
    token = controlplane.create_bootstrap_token()
    lines: list[str] = []
    root = tmp_path / "root"
    with pytest.raises(CSRTimeout) as exc:
        await join(_opts(controlplane.url, token, [_pin(controlplane)], root, lines, timeout=2.0))
    (csr,) = controlplane.objects("certificatesigningrequests", group="certificates.k8s.io")
    name = csr["metadata"]["name"]
    assert f"kubectl certificate approve {name}" in str(exc.value)
    assert any(f"waiting for certificate signing request {name}" in l for l in lines)
    assert not (root / "kubeconfig").exists()
    # The administrator approves; the same command run again takes the certificate.
    controlplane.approve_csr(name)
    result = await join(_opts(controlplane.url, token, [_pin(controlplane)], root, lines, timeout=10.0))
    assert result.csr_name == name
    assert len(controlplane.objects("certificatesigningrequests", group="certificates.k8s.io")) == 1


async def test_control_plane_down_is_retried_within_the_timeout(make_controlplane, tmp_path):
    cp = await make_controlplane(options=Options(auto_approve_csrs=True))
    token = cp.create_bootstrap_token()
    await cp.stop_serving()
    lines: list[str] = []
    with pytest.raises(JoinError, match="cannot reach the API server.*gave up after --timeout 2.5s"):
        await join(_opts(cp.url, token, [_pin(cp)], tmp_path / "a", lines, timeout=2.5))
    assert sum("retrying in" in l for l in lines) >= 2

    async def come_back():
        await asyncio.sleep(1.0)
        await cp.start_serving()

    back = asyncio.create_task(come_back())
    result = await join(_opts(cp.url, token, [_pin(cp)], tmp_path / "b", [], timeout=15))
    await back
    assert result.kubeconfig.exists()


@pytest.mark.root
def test_full_disk_leaves_no_half_written_file(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    try:
        target = mnt / "kubeconfig"
        atomic_write(target, b"old: content\n")
        with pytest.raises(OSError) as exc:
            atomic_write(target, b"x" * 200_000)
        assert exc.value.errno == 28  # ENOSPC
        assert target.read_bytes() == b"old: content\n"
        assert sorted(p.name for p in mnt.iterdir()) == ["kubeconfig"]
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


async def test_world_readable_key_file_is_refused(controlplane, tmp_path):
    cert, key = controlplane.issue_client_cert("system:node:x", ["system:nodes"])
    path = controlplane.make_kubeconfig(cert=(cert, key), embed=False, path=tmp_path / "kc")
    load_kubeconfig(path)
    os.chmod(key, 0o644)
    with pytest.raises(KubeConfigError, match=r"world-readable \(mode 0644\).*chmod 600"):
        load_kubeconfig(path)


async def test_missing_cluster_info_is_reported(controlplane, tmp_path):
    token = controlplane.create_bootstrap_token()
    from tests.controlplane import RESOURCES
    configmaps = next(r for r in RESOURCES if r.plural == "configmaps" and r.group == "")
    await asyncio.sleep(0.3)  # the bootstrap signer has handled the new token's Secret
    controlplane.api.delete(configmaps, "kube-public", "cluster-info")
    with pytest.raises(JoinError, match="no ConfigMap cluster-info in namespace kube-public.*gave up"):
        await join(_opts(controlplane.url, token, [_pin(controlplane)], tmp_path / "root", [], timeout=1.0))
