"""Certificate manager pieces without an agent: the jittered 70-90 % deadline, the
bootstrap fallback for an expired client certificate, and the exact instructions when
no bootstrap credentials remain. (Rotation inside a running node: test_join_e2e.py.)"""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from cryptography import x509

from nodeagent.certificate.manager import CertificateManager, rotation_deadline
from nodeagent.join import csr as csrs
from nodeagent.join.files import CLIENT_PREFIX, Layout, read_certificate
from nodeagent.join.flow import JoinOptions, join
from nodeagent.join.token import parse_token
from nodeagent.kube import KubeClient, load_kubeconfig
from tests.controlplane import Options
from tests.controlplane.pki import CertificateAuthority


def test_rotation_deadline_is_70_to_90_percent_of_the_lifetime():
    ca = CertificateAuthority.generate()
    _, pem = ca.issue("x", validity=dt.timedelta(days=10))
    cert = x509.load_pem_x509_certificates(pem)[0]
    start, total = cert.not_valid_before_utc, cert.not_valid_after_utc - cert.not_valid_before_utc
    assert rotation_deadline(cert, lambda: 0.0) == start + total * 0.7
    assert rotation_deadline(cert, lambda: 0.999999) - (start + total * 0.9) < dt.timedelta(seconds=1)
    import random
    rng = random.Random(1)
    points = [(rotation_deadline(cert, rng.random) - start) / total for _ in range(200)]
    assert 0.7 <= min(points) < 0.72 and 0.88 < max(points) < 0.9  # jittered across the window


async def test_expired_client_certificate_falls_back_to_the_bootstrap_token(make_controlplane, tmp_path):
    cp = await make_controlplane(options=Options(auto_approve_csrs=True, signing_duration=3))
    token = cp.create_bootstrap_token()
    root = tmp_path / "root"
    await join(JoinOptions(endpoint=cp.url, token=parse_token(token), pins=[cp.ca.spki_sha256()[7:]],
                           node_name="lapsed", root_dir=str(root), timeout=10))
    layout = Layout(root)
    cert = read_certificate(layout.client_current)
    client = KubeClient(load_kubeconfig(layout.kubeconfig), qps=0, max_retries=0)
    events: list[tuple[str, str, str]] = []
    manager = CertificateManager(
        kind="client", layout=layout, prefix=CLIENT_PREFIX,
        request=lambda: csrs.CSRRequest("lapsed", csrs.CLIENT_SIGNER, csrs.CLIENT_USAGES),
        client=client, on_rotated=client.reload_tls, node_event=lambda *e: events.append(e),
        fallback_to_bootstrap=True)
    try:
        await asyncio.sleep((cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)).total_seconds() + 0.5)
        await manager.rotate(cert)  # the node's own certificate no longer works
        assert manager.stats.used_bootstrap == 1
        renewed = read_certificate(layout.client_current)
        assert renewed.not_valid_after_utc > dt.datetime.now(dt.timezone.utc)
        users = sorted(c["spec"]["username"] for c in cp.objects("certificatesigningrequests",
                                                                 group="certificates.k8s.io"))
        assert users == [f"system:bootstrap:{token.split('.')[0]}"] * 2
        # Without bootstrap credentials: the exact steps to recover.
        layout.bootstrap_kubeconfig.unlink()
        await asyncio.sleep((renewed.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)).total_seconds() + 0.5)
        with pytest.raises(RuntimeError) as exc:
            await manager.rotate(renewed)
        message = str(exc.value)
        assert "no bootstrap credentials remain" in message and "kubeadm token create" in message
        assert "nodeagent join" in message and "--force" in message
    finally:
        await client.close()
