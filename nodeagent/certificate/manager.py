"""One certificate kept fresh: requested when missing, renewed at a jittered 70-90 % of
its lifetime (kubelet's certificate manager: notBefore + total * (0.7 + 0.2 * U[0,1))),
written atomically (cert + key in one file behind a symlink), then `on_rotated` runs
(the API client rebuilds its TLS context for new connections; open watches keep
streaming on their existing connections).

If the client certificate has expired and the API cannot be reached with it, the
bootstrap kubeconfig (the join token) is used for the CSR when it still exists;
otherwise the log says exactly what to do."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import random
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import structlog
from cryptography import x509

from nodeagent.backoff import Backoff
from nodeagent.join import csr as csrs
from nodeagent.join.files import Layout, read_certificate, write_pair
from nodeagent.kube import ApiConnectionError, ApiError, KubeClient, load_kubeconfig

log = structlog.get_logger(__name__)

NodeEvent = Callable[[str, str, str], None]  # (type, reason, message)


def rotation_deadline(cert: x509.Certificate, rng: Callable[[], float] = random.random) -> dt.datetime:
    """When to renew: a random point in [70 %, 90 %) of the certificate's lifetime."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return start + (end - start) * (0.7 + 0.2 * rng())


@dataclass
class RotationStats:
    rotations: int = 0
    failures: int = 0
    last_rotation: float | None = None  # monotonic
    last_error: str = ""
    used_bootstrap: int = 0


class CertificateManager:
    def __init__(self, *, kind: str, layout: Layout, prefix: str,
                 request: Callable[[], csrs.CSRRequest], client: KubeClient,
                 on_rotated: Callable[[], Awaitable[None]] | None = None,
                 node_event: NodeEvent | None = None, fallback_to_bootstrap: bool = False,
                 rng: Callable[[], float] = random.random, max_retry_delay: float = 300.0) -> None:
        self.kind = kind  # "client" or "serving", for logs and events
        self.layout = layout
        self.prefix = prefix
        self.request = request
        self.client = client
        self.on_rotated = on_rotated
        self.node_event = node_event or (lambda *_: None)
        self.fallback_to_bootstrap = fallback_to_bootstrap
        self.rng = rng
        self.backoff = Backoff(base=1.0, cap=max_retry_delay, reset_after=3600.0)
        self.stats = RotationStats()
        self.current_path = layout.current(prefix)
        self._log = log.bind(certificate=kind)
        self._told_expired = False

    async def _current(self) -> x509.Certificate | None:
        return await asyncio.to_thread(read_certificate, self.current_path)

    async def run(self) -> None:
        while True:
            cert = await self._current()
            if cert is not None:
                deadline = rotation_deadline(cert, self.rng)
                self._log.info("certificate rotation scheduled", expires=cert.not_valid_after_utc.isoformat(),
                               rotate_at=deadline.isoformat())
                while (wait := (deadline - dt.datetime.now(dt.timezone.utc)).total_seconds()) > 0:
                    # Wall-clock deadline: re-check at least every minute (suspend, clock jumps).
                    await asyncio.sleep(min(wait, 60.0))
            try:
                await self.rotate(cert)
                self.backoff.reset("rotate")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure is retried
                self.stats.failures += 1
                self.stats.last_error = str(exc)
                delay = self.backoff.record_failure("rotate", time.monotonic())
                self._log.warning("certificate renewal failed; retrying", error=str(exc),
                                  retry_in=round(delay, 1))
                await asyncio.sleep(delay)

    def _expired(self, cert: x509.Certificate | None) -> bool:
        return cert is not None and cert.not_valid_after_utc <= dt.datetime.now(dt.timezone.utc)

    async def rotate(self, cert: x509.Certificate | None) -> None:
        key = csrs.new_key()
        req = self.request()
        client, temporary = self.client, False
        try:
            try:
                name = await csrs.create_csr(client, req, key)
            except (ApiConnectionError, ApiError) as exc:
                unreachable = isinstance(exc, ApiConnectionError) or exc.is_unauthorized
                if not (unreachable and self._expired(cert) and self.kind == "client"):
                    raise
                client = await self._bootstrap_client(cert)
                temporary = True
                name = await csrs.create_csr(client, req, key)
            self._log.info("certificate signing request created", csr=name, signer=req.signer)
            told = False

            def pending(message: str) -> None:
                nonlocal told
                self._log.info("certificate signing request pending", csr=name, signer=req.signer)
                if not told:
                    told = True
                    self.node_event("Warning" if self.kind == "serving" else "Normal",
                                    "CertificateSigningRequestPending",
                                    f"{self.kind} certificate request {name} ({req.signer}) is waiting "
                                    f"for approval: kubectl certificate approve {name}")

            cert_pem = await csrs.wait_for_certificate(client, name, key, deadline=None, progress=pending)
        finally:
            if temporary:
                await client.close()
        await asyncio.to_thread(write_pair, self.layout, self.prefix, cert_pem, csrs.key_pem(key))
        self.stats.rotations += 1
        self.stats.last_rotation = time.monotonic()
        new = x509.load_pem_x509_certificates(cert_pem)[0]
        self._log.info("certificate rotated", csr=name, expires=new.not_valid_after_utc.isoformat(),
                       path=str(self.current_path))
        if told:
            self.node_event("Normal", "CertificateIssued",
                            f"{self.kind} certificate request {name} was approved and signed")
        if self.on_rotated is not None:
            await self.on_rotated()

    async def _bootstrap_client(self, cert: x509.Certificate | None) -> KubeClient:
        path = self.layout.bootstrap_kubeconfig
        expired = cert.not_valid_after_utc.isoformat() if cert is not None else "?"
        if not self.fallback_to_bootstrap or not path.exists():
            message = (f"the node's client certificate expired at {expired} and could not be renewed "
                       f"with it; no bootstrap credentials remain ({path}). On the control plane run "
                       "`kubeadm token create --print-join-command`, then on this node `nodeagent join "
                       "<server> --token <new token> --discovery-token-ca-cert-hash <hash> --force`.")
            if not self._told_expired:
                self._told_expired = True
                self._log.error("client certificate expired", action=message)
            raise RuntimeError(message)
        self._log.warning("client certificate expired; renewing with the bootstrap token",
                          expired=expired, bootstrap_kubeconfig=str(path))
        self.stats.used_bootstrap += 1
        config = await asyncio.to_thread(load_kubeconfig, path)
        return KubeClient(config, qps=0)


def managed_client_certificate(kubeconfig_path: str, root_dir: str) -> bool:
    """True when the kubeconfig uses the client certificate join wrote (then it rotates)."""
    layout = Layout(root_dir)
    try:
        cfg = load_kubeconfig(kubeconfig_path)
    except Exception:  # noqa: BLE001 - the agent reports kubeconfig errors elsewhere
        return False
    return bool(cfg.client_cert_file) and (
        os.path.abspath(cfg.client_cert_file) == os.path.abspath(layout.client_current))
