"""Bootstrap token and CA pin parsing: done before any network call."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization

TOKEN_RE = re.compile(r"^([a-z0-9]{6})\.([a-z0-9]{16})$")
PIN_RE = re.compile(r"^sha256:([0-9a-f]{64})$")


class JoinError(Exception):
    """Joining failed; the message says what happened and what to do."""

    exit_code = 1


class UsageError(JoinError):
    exit_code = 2


@dataclass(frozen=True)
class BootstrapToken:
    token_id: str
    # repr=False: a token printed by accident (a log line, a traceback) shows only its id.
    secret: str = field(repr=False)

    @property
    def value(self) -> str:
        return f"{self.token_id}.{self.secret}"

    @property
    def username(self) -> str:
        return f"system:bootstrap:{self.token_id}"

    def __str__(self) -> str:
        return f"{self.token_id}.<secret>"


def parse_token(text: str) -> BootstrapToken:
    m = TOKEN_RE.match(text.strip())
    if not m:
        # Never echo the value: it may be a real secret with a typo.
        raise UsageError("--token: a bootstrap token has the form <id>.<secret>: 6 then 16 "
                         "characters from [a-z0-9] (e.g. abcdef.0123456789abcdef); "
                         "`kubeadm token create` on the control plane prints one")
    return BootstrapToken(m.group(1), m.group(2))


def parse_pins(values: list[str]) -> list[str]:
    """`sha256:<hex>` pins, normalised to lower-case hex digests."""
    pins = []
    for value in values:
        m = PIN_RE.match(value.strip().lower())
        if not m:
            raise UsageError(f"--discovery-token-ca-cert-hash {value!r}: expected sha256:<64 hex "
                             "digits> (the SHA-256 of the CA certificate's DER "
                             "SubjectPublicKeyInfo)")
        pins.append(m.group(1))
    return pins


def spki_sha256(cert: x509.Certificate) -> str:
    """Hex SHA-256 of the certificate's DER SubjectPublicKeyInfo (kubeadm's CA pin)."""
    der = cert.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def normalise_server(text: str) -> str:
    """HOST:PORT or https://HOST:PORT -> https://HOST:PORT."""
    server = text.strip().rstrip("/")
    if server.startswith("http://"):
        raise UsageError(f"{text}: the API server must be reached over https")
    if not server.startswith("https://"):
        server = "https://" + server
    hostport = server[len("https://"):]
    if not hostport or "/" in hostport:
        raise UsageError(f"{text}: expected HOST:PORT or https://HOST:PORT")
    return server
