"""Certificates for the test control plane: a self-signed CA, the serving certificate,
client certificates and signing of CertificateSigningRequests.

EC P-256 keys keep generation fast (a fixture builds a fresh CA for every test)."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Usages as named in certificates.k8s.io/v1 CertificateSigningRequest.spec.usages.
_EXTENDED_USAGES = {
    "client auth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "server auth": ExtendedKeyUsageOID.SERVER_AUTH,
}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def new_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_csr(common_name: str, organizations: list[str] | tuple[str, ...] = (),
             key: ec.EllipticCurvePrivateKey | None = None,
             dns_names: list[str] | tuple[str, ...] = (),
             ip_addresses: list[str] | tuple[str, ...] = ()) -> tuple[bytes, bytes]:
    """Build a PEM CSR (as a kubelet does for TLS bootstrap); returns (key_pem, csr_pem)."""
    key = key or new_private_key()
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs))
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    csr = builder.sign(key, hashes.SHA256())
    return key_to_pem(key), csr.public_bytes(serialization.Encoding.PEM)


class CSRSigningError(ValueError):
    """The CSR cannot be signed (malformed, or it breaks its signer's rules)."""


@dataclass
class CertificateAuthority:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def generate(cls, common_name: str = "nodeagent-test-ca") -> "CertificateAuthority":
        key = new_private_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=True,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key=key, cert=cert)

    @property
    def cert_pem(self) -> bytes:
        return cert_to_pem(self.cert)

    @property
    def key_pem(self) -> bytes:
        return key_to_pem(self.key)

    def spki_sha256(self) -> str:
        """kubeadm's `--discovery-token-ca-cert-hash` value: sha256 over the CA's DER SPKI."""
        spki = self.cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return "sha256:" + hashlib.sha256(spki).hexdigest()

    def _sign(self, subject: x509.Name, public_key, *, client: bool, server: bool,
              dns_names: list[str] | tuple[str, ...], ip_addresses: list[str] | tuple[str, ...],
              validity: dt.timedelta, backdate: dt.timedelta = dt.timedelta(minutes=5)) -> x509.Certificate:
        now = _now()
        usages = []
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - backdate)
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=True,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if usages:
            builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def issue(self, common_name: str, organizations: list[str] | tuple[str, ...] = (), *,
              client: bool = True, server: bool = False,
              dns_names: list[str] | tuple[str, ...] = (),
              ip_addresses: list[str] | tuple[str, ...] = (),
              validity: dt.timedelta = dt.timedelta(days=365)) -> tuple[bytes, bytes]:
        """Issue a key pair and certificate; returns (key_pem, cert_pem)."""
        key = new_private_key()
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
        cert = self._sign(x509.Name(attrs), key.public_key(), client=client, server=server,
                          dns_names=dns_names, ip_addresses=ip_addresses, validity=validity)
        return key_to_pem(key), cert_to_pem(cert)

    def sign_csr(self, csr_pem: bytes, usages: list[str], *,
                 validity: dt.timedelta = dt.timedelta(days=365)) -> bytes:
        """Sign a PEM CSR as the kube-controller-manager's CSR signer would; returns cert PEM.
        notBefore is backdated for clock skew, by at most a tenth of the lifetime so that
        short-lived test certificates still rotate at 70-90 % of a meaningful lifetime."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise CSRSigningError(f"spec.request is not a PEM certificate request: {exc}") from exc
        if not csr.is_signature_valid:
            raise CSRSigningError("spec.request: the CSR signature does not verify")
        unknown = [u for u in usages if u not in _EXTENDED_USAGES
                   and u not in ("digital signature", "key encipherment", "signing")]
        if unknown:
            raise CSRSigningError(f"spec.usages: unsupported usages {unknown}")
        dns: list[str] = []
        ips: list[str] = []
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            dns = san.get_values_for_type(x509.DNSName)
            ips = [str(a) for a in san.get_values_for_type(x509.IPAddress)]
        except x509.ExtensionNotFound:
            pass
        cert = self._sign(csr.subject, csr.public_key(), client="client auth" in usages,
                          server="server auth" in usages, dns_names=dns, ip_addresses=ips,
                          validity=validity, backdate=min(dt.timedelta(minutes=5), validity / 10))
        return cert_to_pem(cert)


def csr_subject(csr_pem: bytes) -> tuple[str, list[str]]:
    """(common name, organizations) of a PEM CSR."""
    csr = x509.load_pem_x509_csr(csr_pem)
    cn = [a.value for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    orgs = [a.value for a in csr.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
    return (str(cn[0]) if cn else ""), [str(o) for o in orgs]


def csr_has_sans(csr_pem: bytes) -> bool:
    csr = x509.load_pem_x509_csr(csr_pem)
    try:
        csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        return True
    except x509.ExtensionNotFound:
        return False
