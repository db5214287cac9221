"""The node API's serving certificate: the configured files (in cluster mode usually
issued by the kubelet-serving signer), or a self-signed one made on first start and
kept under the root directory, as kubelet does without --tls-cert-file."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from pathlib import Path

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = structlog.get_logger(__name__)


def default_paths(root_dir: str) -> tuple[Path, Path]:
    pki = Path(root_dir) / "pki"
    return pki / "kubelet.crt", pki / "kubelet.key"


def ensure_serving_cert(cert_file: str | None, key_file: str | None, *, root_dir: str,
                        node_name: str, addresses: list[str]) -> tuple[Path, Path]:
    """The (cert, key) paths to serve with. Configured files must exist; the defaults
    are created self-signed when missing (blocking: call off the event loop)."""
    if cert_file or key_file:
        if not (cert_file and key_file):
            raise ValueError("tls-cert-file and tls-private-key-file must be given together")
        for path in (cert_file, key_file):
            if not Path(path).is_file():
                raise ValueError(f"serving certificate file {path} does not exist")
        return Path(cert_file), Path(key_file)
    cert_path, key_path = default_paths(root_dir)
    if cert_path.is_file() and key_path.is_file():
        return cert_path, key_path
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    # kubelet names its self-signed certificate <host>@<unix time>; so do we.
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{node_name}@{int(now.timestamp())}")])
    sans: list[x509.GeneralName] = [x509.DNSName(node_name)]
    for address in addresses:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(address)))
        except ValueError:
            sans.append(x509.DNSName(address))
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(key, hashes.SHA256())
    )
    tmp_key = key_path.with_suffix(".tmp")
    tmp_key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    tmp_key.chmod(0o600)
    os.replace(tmp_key, key_path)
    tmp_cert = cert_path.with_suffix(".tmp")
    tmp_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp_cert, cert_path)
    log.warning("created a self-signed serving certificate for the node API",
                cert=str(cert_path), key=str(key_path))
    return cert_path, key_path


def server_context(cert_path: Path, key_path: Path, client_ca: bytes | None) -> ssl.SSLContext:
    """TLS 1.2+; client certificates are optional (bearer tokens are the alternative)
    but when one is sent it must chain to the client CA and be valid, or the handshake
    fails before any request is read."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_path, key_path)
    if client_ca:
        ctx.load_verify_locations(cadata=client_ca.decode())
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx
