"""Where a joined node keeps its credentials, and how they are written.

    <root-dir>/kubeconfig             the node's kubeconfig (its presence = joined)
    <root-dir>/bootstrap-kubeconfig   the bootstrap token, kept for the fallback when the
                                      client certificate expires while the API is away
    <root-dir>/pki/ca.crt             the pinned cluster CA
    <root-dir>/pki/kubelet-client-current.pem -> kubelet-client-<time>.pem  (cert + key)
    <root-dir>/pki/kubelet-server-current.pem -> kubelet-server-<time>.pem  (cert + key)
    <root-dir>/pki/kubelet-client.key.pending  key of a CSR not yet signed

Files are 0600 and directories 0700. Every file is written to a temporary file in the
same directory, fsynced, then renamed over the target, so a crash or a full disk leaves
either the old file or the new one, never half of one. Certificate and key share one
file (as kubelet's *-current.pem) so a rotation swaps both at once by replacing a
symlink."""

from __future__ import annotations

import datetime as dt
import os
import secrets
from pathlib import Path

from cryptography import x509

CLIENT_PREFIX = "kubelet-client"
SERVER_PREFIX = "kubelet-server"
KEEP_OLD = 1  # previous certificate files kept next to the current one


class Layout:
    def __init__(self, root_dir: str | os.PathLike) -> None:
        self.root = Path(root_dir)
        self.pki = self.root / "pki"
        self.kubeconfig = self.root / "kubeconfig"
        self.bootstrap_kubeconfig = self.root / "bootstrap-kubeconfig"
        self.ca = self.pki / "ca.crt"
        self.pending_key = self.pki / f"{CLIENT_PREFIX}.key.pending"
        self.pending_serving_key = self.pki / f"{SERVER_PREFIX}.key.pending"

    def current(self, prefix: str) -> Path:
        return self.pki / f"{prefix}-current.pem"

    @property
    def client_current(self) -> Path:
        return self.current(CLIENT_PREFIX)

    @property
    def server_current(self) -> Path:
        return self.current(SERVER_PREFIX)

    def make_dirs(self) -> None:
        for d in (self.root, self.pki):
            d.mkdir(parents=True, exist_ok=True)
        self.pki.chmod(0o700)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write `data` to `path` all-or-nothing (temporary file + fsync + rename)."""
    tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def write_pair(layout: Layout, prefix: str, cert_pem: bytes, key_pem: bytes) -> Path:
    """Store cert+key as <prefix>-<time>.pem and point <prefix>-current.pem at it."""
    layout.make_dirs()
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d-%H-%M-%S-%f")
    target = layout.pki / f"{prefix}-{stamp}.pem"
    atomic_write(target, cert_pem.rstrip(b"\n") + b"\n" + key_pem)
    link = layout.current(prefix)
    tmp_link = layout.pki / f".{link.name}.tmp-{secrets.token_hex(4)}"
    os.symlink(target.name, tmp_link)
    try:
        os.replace(tmp_link, link)
    except BaseException:
        os.unlink(tmp_link)
        raise
    _fsync_dir(layout.pki)
    _prune(layout, prefix, keep=target)
    return link


def _prune(layout: Layout, prefix: str, keep: Path) -> None:
    old = sorted(p for p in layout.pki.glob(f"{prefix}-2*.pem") if p != keep)
    for path in old[:max(0, len(old) - KEEP_OLD)]:
        try:
            path.unlink()
        except OSError:
            pass


def read_certificate(path: Path) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())[0]
    except (OSError, ValueError, IndexError):
        return None
