"""Tokens: bootstrap tokens and their cluster-info JWS signatures, and the ES256 JWTs
returned by the TokenRequest API (bound service account tokens)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

BOOTSTRAP_TOKEN = re.compile(r"^([a-z0-9]{6})\.([a-z0-9]{16})$")
BOOTSTRAP_SECRET_PREFIX = "bootstrap-token-"
BOOTSTRAP_SECRET_TYPE = "bootstrap.kubernetes.io/token"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_bootstrap_token() -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    token_id = "".join(secrets.choice(alphabet) for _ in range(6))
    token_secret = "".join(secrets.choice(alphabet) for _ in range(16))
    return f"{token_id}.{token_secret}"


def detached_jws(payload: str, token_id: str, token_secret: str) -> str:
    """Detached JWS (compact form without the payload), HS256 keyed by the token secret,
    `kid` = token id: what the bootstrap signer writes into cluster-info."""
    header = b64url(json.dumps({"alg": "HS256", "kid": token_id}, separators=(",", ":")).encode())
    body = b64url(payload.encode())
    signature = hmac.new(token_secret.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}..{b64url(signature)}"


def verify_detached_jws(jws: str, payload: str, token_id: str, token_secret: str) -> bool:
    try:
        header_b64, empty, signature_b64 = jws.split(".")
    except ValueError:
        return False
    if empty:
        return False
    header = json.loads(b64url_decode(header_b64))
    if header.get("alg") != "HS256" or header.get("kid") != token_id:
        return False
    expected = hmac.new(token_secret.encode(),
                        f"{header_b64}.{b64url(payload.encode())}".encode(), hashlib.sha256).digest()
    return hmac.compare_digest(expected, b64url_decode(signature_b64))


class ServiceAccountSigner:
    """Signs and verifies ES256 JWTs for service accounts."""

    def __init__(self, key: ec.EllipticCurvePrivateKey | None = None) -> None:
        self.key = key or ec.generate_private_key(ec.SECP256R1())
        digest = hashlib.sha256(self.key.public_key().public_numbers().x.to_bytes(32, "big")).digest()
        self.key_id = b64url(digest[:16])

    def sign(self, claims: dict[str, Any]) -> str:
        header = b64url(json.dumps({"alg": "ES256", "kid": self.key_id},
                                   separators=(",", ":")).encode())
        body = b64url(json.dumps(claims, separators=(",", ":")).encode())
        der = self.key.sign(f"{header}.{body}".encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return f"{header}.{body}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def verify(self, token: str) -> dict[str, Any] | None:
        """Claims of a valid, unexpired token signed by this signer; None otherwise."""
        parts = token.split(".")
        if len(parts) != 3:
            return None
        try:
            raw = b64url_decode(parts[2])
            if len(raw) != 64:
                return None
            der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
            self.key.public_key().verify(der, f"{parts[0]}.{parts[1]}".encode(), ec.ECDSA(hashes.SHA256()))
            claims = json.loads(b64url_decode(parts[1]))
        except (InvalidSignature, ValueError):
            return None
        if claims.get("exp", 0) < time.time():
            return None
        return claims
