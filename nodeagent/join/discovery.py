"""Token discovery, as kubeadm does it:

1. GET kube-public/cluster-info with no credentials over TLS that trusts nothing yet
   (nothing secret travels: the request carries no Authorization header);
2. verify `jws-kubeconfig-<token id>`, a detached JWS (`header..signature`, HS256 keyed by
   the token secret): only someone holding the token could have signed the kubeconfig;
3. pin its CA: the SHA-256 of some CA certificate's DER SubjectPublicKeyInfo must be one
   of the --discovery-token-ca-cert-hash values (any match pins);
4. read cluster-info again over TLS verified by that CA and require the same kubeconfig.

Only then does the token itself go to the server (TLS bootstrap, csr.py)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import ssl
from dataclasses import dataclass

import aiohttp
import yaml
from cryptography import x509

from .token import BootstrapToken, JoinError, spki_sha256

CLUSTER_INFO_PATH = "/api/v1/namespaces/kube-public/configmaps/cluster-info"


class Retryable(JoinError):
    """Worth trying again until the timeout (server down, not yet signed ...)."""


@dataclass(frozen=True)
class ClusterInfo:
    server: str  # the API server address cluster-info advertises
    ca_pem: bytes
    pins: tuple[str, ...]  # SPKI hashes of the CA certificates
    kubeconfig: str


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def verify_detached_jws(jws: str, payload: str, token: BootstrapToken) -> str | None:
    """None when `jws` is a valid detached HS256 JWS of `payload` by `token`; else why not."""
    parts = jws.strip().split(".")
    if len(parts) != 3 or parts[1] != "":
        return "it is not a detached JWS (header..signature)"
    try:
        header = json.loads(_b64url_decode(parts[0]))
        signature = _b64url_decode(parts[2])
    except (ValueError, binascii.Error):
        return "its header or signature is not valid base64url JSON"
    if not isinstance(header, dict) or header.get("alg") != "HS256":
        return f"its algorithm is {header.get('alg') if isinstance(header, dict) else None!r}, not HS256"
    if header.get("kid") not in (None, token.token_id):
        return f"it names key id {header.get('kid')!r}, not {token.token_id!r}"
    signing_input = f"{parts[0]}.{_b64url(payload.encode())}".encode()
    expected = hmac.new(token.secret.encode(), signing_input, hashlib.sha256).digest()
    if not hmac.compare_digest(expected, signature):
        return "the signature does not match this token's secret"
    return None


def parse_cluster_info(kubeconfig: str, source: str) -> ClusterInfo:
    try:
        doc = yaml.safe_load(kubeconfig) or {}
        clusters = doc.get("clusters") or []
        if len(clusters) != 1:
            raise JoinError(f"{source}: the kubeconfig in cluster-info must hold exactly one "
                            f"cluster, found {len(clusters)}")
        cluster = clusters[0].get("cluster") or {}
        server = str(cluster.get("server") or "")
        ca_pem = base64.b64decode(cluster.get("certificate-authority-data") or "", validate=True)
        certs = x509.load_pem_x509_certificates(ca_pem)
    except (ValueError, AttributeError, yaml.YAMLError, binascii.Error) as exc:
        raise JoinError(f"{source}: the kubeconfig in cluster-info is unusable: {exc}") from exc
    if not server.startswith("https://"):
        raise JoinError(f"{source}: cluster-info names server {server!r}, not an https:// URL")
    return ClusterInfo(server.rstrip("/"), ca_pem, tuple(spki_sha256(c) for c in certs), kubeconfig)


def _insecure_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def pinned_context(ca_pem: bytes) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca_pem.decode())
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def _get_cluster_info(endpoint: str, ctx: ssl.SSLContext, timeout: float) -> dict:
    url = endpoint + CLUSTER_INFO_PATH
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
            # No Authorization header, no client certificate: anonymous on purpose.
            async with session.get(url, ssl=ctx, headers={"Accept": "application/json"}) as resp:
                body = await resp.read()
                status = resp.status
    except aiohttp.ClientConnectorCertificateError as exc:
        raise JoinError(f"{endpoint}: the server's certificate is not signed by the pinned "
                        f"cluster CA ({exc.certificate_error}); something other than the "
                        "cluster's API server answers at this address. Nothing was sent.") from exc
    except (aiohttp.ClientSSLError, ssl.SSLError) as exc:
        raise JoinError(f"{endpoint}: TLS with the pinned cluster CA failed ({exc}); "
                        "nothing was sent") from exc
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise Retryable(f"cannot reach the API server at {endpoint}: "
                        f"{exc.__class__.__name__}: {exc}") from exc
    if status == 404:
        raise Retryable(f"{endpoint}: there is no ConfigMap cluster-info in namespace kube-public "
                        "(is this a kubeadm-style cluster? `kubeadm init phase bootstrap-token` "
                        "creates it)")
    if status in (401, 403):
        raise Retryable(f"{endpoint}: reading kube-public/cluster-info anonymously was refused "
                        f"({status}); the cluster must let system:anonymous get it (kubeadm's RBAC "
                        "rule for cluster-info)")
    if status != 200:
        raise Retryable(f"{endpoint}: reading cluster-info answered HTTP {status}")
    try:
        return json.loads(body)
    except ValueError as exc:
        raise Retryable(f"{endpoint}: cluster-info is not JSON: {exc}") from exc


async def discover(endpoint: str, token: BootstrapToken, pins: list[str], *,
                   skip_ca_verification: bool = False, request_timeout: float = 10.0) -> ClusterInfo:
    """One discovery attempt (the caller retries Retryable errors until its timeout)."""
    configmap = await _get_cluster_info(endpoint, _insecure_context(), request_timeout)
    data = configmap.get("data") or {}
    kubeconfig = data.get("kubeconfig")
    if not isinstance(kubeconfig, str):
        raise Retryable(f"{endpoint}: cluster-info has no kubeconfig key")
    jws = data.get(f"jws-kubeconfig-{token.token_id}")
    if not jws:
        raise Retryable(f"{endpoint}: cluster-info holds no JWS signature for token id "
                        f"{token.token_id!r}: the token is unknown to this cluster, has expired, "
                        "or is not allowed for signing. Create one on the control plane with "
                        "`kubeadm token create --print-join-command`.")
    why = verify_detached_jws(jws, kubeconfig, token)
    if why is not None:
        raise JoinError(f"{endpoint}: the cluster-info signature for token id {token.token_id!r} "
                        f"is invalid ({why}): the token secret is wrong, or cluster-info was "
                        "tampered with. Nothing was sent.")
    info = parse_cluster_info(kubeconfig, endpoint)
    if not skip_ca_verification:
        if not set(info.pins) & set(pins):
            found = ", ".join("sha256:" + p for p in info.pins)
            raise JoinError(f"{endpoint}: the cluster CA in cluster-info ({found}) matches none of "
                            "the --discovery-token-ca-cert-hash values: refusing to trust this "
                            "server. No credential was sent. Check the hash on the control plane "
                            "(openssl x509 -pubkey -in ca.crt | openssl pkey -pubin -outform der "
                            "| sha256sum).")
        # The pinned CA must also verify the server we talk to, and serve the same cluster-info.
        again = await _get_cluster_info(endpoint, pinned_context(info.ca_pem), request_timeout)
        if (again.get("data") or {}).get("kubeconfig") != kubeconfig:
            raise JoinError(f"{endpoint}: cluster-info read over the pinned CA differs from the "
                            "one first read: refusing to continue")
    return info
