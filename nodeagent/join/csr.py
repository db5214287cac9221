"""Certificate signing requests: the node's key and CSR, creating the
certificates.k8s.io/v1 object and waiting for its certificate.

Used by `nodeagent join` (TLS bootstrap, authenticated by the bootstrap token) and by
certificate rotation (authenticated by the node's current certificate)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import time
from dataclasses import dataclass
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from nodeagent.backoff import Backoff
from nodeagent.kube import ApiConnectionError, ApiError, KubeClient
from nodeagent.kube.resources import CERTIFICATESIGNINGREQUESTS as CSRS

from .token import JoinError

CLIENT_SIGNER = "kubernetes.io/kube-apiserver-client-kubelet"
SERVING_SIGNER = "kubernetes.io/kubelet-serving"
# ECDSA keys: no "key encipherment" (kubelet asks for it only with RSA keys).
CLIENT_USAGES = ("digital signature", "client auth")
SERVING_USAGES = ("digital signature", "server auth")
PROGRESS_EVERY = 10.0


class CSRDenied(JoinError):
    pass


class CSRTimeout(JoinError):
    pass


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("not an EC private key")
    return key


@dataclass(frozen=True)
class CSRRequest:
    node_name: str
    signer: str
    usages: tuple[str, ...]
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()

    @property
    def common_name(self) -> str:
        return f"system:node:{self.node_name}"


def build_csr(req: CSRRequest, key: ec.EllipticCurvePrivateKey) -> bytes:
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:nodes"),
                         x509.NameAttribute(NameOID.COMMON_NAME, req.common_name)])
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in req.dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in req.ip_addresses]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def csr_name(req: CSRRequest, key: ec.EllipticCurvePrivateKey) -> str:
    """A name derived from the public key, subject and usages (as kubelet's bootstrap
    does): the same key asks again under the same name, so a re-run after an approval
    picks up the already signed certificate instead of leaving a second request."""
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashlib.sha512(spki + req.common_name.encode() + req.signer.encode()
                            + "|".join(req.usages).encode()).digest()
    prefix = "node-csr-" if req.signer == CLIENT_SIGNER else "node-serving-csr-"
    return prefix + base64.b32encode(digest[:20]).decode().lower().rstrip("=")


def _decision(csr: dict) -> tuple[str, str, str] | None:
    """('Denied'|'Failed', reason, message) for a refused CSR, else None."""
    for cond in (csr.get("status") or {}).get("conditions") or []:
        if cond.get("type") in ("Denied", "Failed") and cond.get("status", "True") == "True":
            return cond["type"], cond.get("reason") or "", cond.get("message") or ""
    return None


def _approved(csr: dict) -> bool:
    return any(c.get("type") == "Approved" for c in (csr.get("status") or {}).get("conditions") or [])


def _denied_by(csr: dict) -> str:
    """Who decided, when the API says so (the manager of the approval subresource)."""
    for entry in (csr.get("metadata") or {}).get("managedFields") or []:
        if entry.get("subresource") == "approval" and entry.get("manager"):
            return f" by {entry['manager']}"
    return ""


def certificate_of(csr: dict, name: str, key: ec.EllipticCurvePrivateKey) -> bytes | None:
    """The signed certificate PEM, None while pending; raises CSRDenied when refused."""
    decided = _decision(csr)
    if decided is not None:
        kind, reason, message = decided
        who = _denied_by(csr)
        raise CSRDenied(f"certificate signing request {name} was {kind.lower()}{who}: "
                        f"reason {reason or '(none)'}: {message or '(no message)'}")
    encoded = (csr.get("status") or {}).get("certificate")
    if not encoded:
        return None
    pem = base64.b64decode(encoded)
    cert = x509.load_pem_x509_certificates(pem)[0]
    ours = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    theirs = cert.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    if ours != theirs:
        raise JoinError(f"certificate signing request {name}: the issued certificate is not for "
                        "this node's key")
    return pem


async def create_csr(client: KubeClient, req: CSRRequest, key: ec.EllipticCurvePrivateKey) -> str:
    """Create the CSR (or find the one this key already made); returns its name."""
    name = csr_name(req, key)
    body = {"apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
            "metadata": {"name": name},
            "spec": {"request": base64.b64encode(build_csr(req, key)).decode(),
                     "signerName": req.signer, "usages": list(req.usages)}}
    try:
        await client.create(CSRS, body)
    except ApiError as exc:
        if not exc.is_already_exists:
            raise
    return name


async def wait_for_certificate(client: KubeClient, name: str, key: ec.EllipticCurvePrivateKey, *,
                               deadline: float | None,
                               progress: Callable[[str], None] | None = None) -> bytes:
    """Wait (watching the CSR) until it is signed; raises CSRDenied or CSRTimeout."""
    started = time.monotonic()
    last_progress = -PROGRESS_EVERY
    backoff = Backoff(base=0.5, cap=5.0, reset_after=30.0)
    while True:
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            raise CSRTimeout(f"certificate signing request {name} was not approved before the "
                             f"timeout (waited {now - started:.1f}s). An administrator can approve it with "
                             f"`kubectl certificate approve {name}`, then run the same command "
                             "again: it picks up the approved certificate.")
        if progress is not None and now - last_progress >= PROGRESS_EVERY:
            last_progress = now
            progress(f"waiting for certificate signing request {name} to be approved "
                     f"({now - started:.0f}s; approve with `kubectl certificate approve {name}`)")
        try:
            csr = await client.get(CSRS, name)
            pem = certificate_of(csr, name, key)
            if pem is not None:
                return pem
            remaining = None if deadline is None else deadline - time.monotonic()
            window = min(PROGRESS_EVERY, remaining) if remaining is not None else PROGRESS_EVERY
            if window <= 0:
                continue
            rv = (csr.get("metadata") or {}).get("resourceVersion")
            try:
                async with asyncio.timeout(window):
                    async with client.watch(CSRS, resource_version=rv,
                                            field_selector=f"metadata.name={name}",
                                            timeout_seconds=max(1, int(window) + 1)) as stream:
                        async for event in stream:
                            if event.type in ("ADDED", "MODIFIED"):
                                pem = certificate_of(event.object, name, key)
                                if pem is not None:
                                    return pem
                            elif event.type == "DELETED":
                                raise CSRDenied(f"certificate signing request {name} was deleted "
                                                "before it was signed")
            except TimeoutError:
                pass
        except ApiError as exc:
            if exc.is_not_found:
                raise CSRDenied(f"certificate signing request {name} no longer exists (deleted "
                                "before it was signed)") from exc
            if exc.is_unauthorized or exc.is_forbidden:
                raise JoinError(f"reading certificate signing request {name} was refused: "
                                f"{exc.status} {exc.reason}: {exc.message}") from exc
            if not exc.is_gone:
                await asyncio.sleep(backoff.record_failure("csr", time.monotonic()))
        except ApiConnectionError:
            await asyncio.sleep(backoff.record_failure("csr", time.monotonic()))
