"""What the test control plane keeps in a ``--state-dir`` across restarts.

A real control plane keeps its CA, its service-account signing key and etcd; joined
nodes hold credentials signed by that CA (and bootstrap tokens stored as Secrets), so a
restart must not replace them. With a state directory given, the control plane loads
``ca.crt``/``ca.key``, ``sa.key`` and ``admin-token`` when present (else creates and
writes them), and snapshots its object store to ``store.json`` (written atomically
shortly after each change and at stop; read at start). After a restart the store's
resourceVersion continues where it was; its watch history is not kept, so a watch
from an older resourceVersion gets 410 Expired and relists, as after an etcd
compaction.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .pki import CertificateAuthority, key_to_pem
from .store import Store

STORE_FILE = "store.json"


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def load_or_create_ca(state_dir: Path) -> CertificateAuthority:
    cert_path, key_path = state_dir / "ca.crt", state_dir / "ca.key"
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return CertificateAuthority(key=key, cert=cert)
    ca = CertificateAuthority.generate()
    _write_private(key_path, ca.key_pem)
    cert_path.write_bytes(ca.cert_pem)
    return ca


def load_or_create_sa_key(state_dir: Path) -> ec.EllipticCurvePrivateKey:
    path = state_dir / "sa.key"
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key
    key = ec.generate_private_key(ec.SECP256R1())
    _write_private(path, key_to_pem(key))
    return key


def load_or_create_admin_token(state_dir: Path, given: str | None, new: str) -> str:
    path = state_dir / "admin-token"
    if given is None and path.exists():
        return path.read_text().strip()
    token = given or new
    _write_private(path, token.encode())
    return token


def save_store(store: Store, state_dir: Path) -> None:
    data = {"resourceVersion": store.rv,
            "objects": {storage: list(bucket.values()) for storage, bucket in store._objects.items()}}
    tmp = state_dir / (STORE_FILE + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, state_dir / STORE_FILE)


def load_store(store: Store, state_dir: Path) -> bool:
    path = state_dir / STORE_FILE
    if not path.exists():
        return False
    data = json.loads(path.read_text())
    for storage, objects in data["objects"].items():
        store._objects[storage] = {Store._key(obj): obj for obj in objects}
    store.rv = int(data["resourceVersion"])
    store.floor_rv = store.rv  # no history survives: older watches relist
    return True
