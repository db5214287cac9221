"""A private image registry for tests: Debian's ``docker-registry`` on 127.0.0.1 and a
free port, optionally with basic auth (htpasswd, bcrypt) and TLS (a self-signed
certificate the test makes), storage in a temp directory. Images are pushed with the
Docker CLI under a private ``--config`` directory so no login touches the machine's."""

from __future__ import annotations

import datetime
import ipaddress
import json
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

REGISTRY_BINARY = "/usr/bin/docker-registry"
DOCKER_CERTS_D = Path("/etc/docker/certs.d")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def htpasswd_line(user: str, password: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # stdlib until 3.13; glibc's libxcrypt does bcrypt
    return f"{user}:{crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))}"


def self_signed(workdir: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nodeagent-test-registry")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = workdir / "registry.crt", workdir / "registry.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@dataclass
class Registry:
    host: str  # "127.0.0.1:PORT"
    workdir: Path
    credentials: tuple[str, str] | None
    tls: bool

    @property
    def docker_config(self) -> Path:
        return self.workdir / "docker-cli"

    def _docker(self, *args: str, stdin: str | None = None) -> str:
        out = subprocess.run(["docker", "--config", str(self.docker_config), *args], input=stdin,
                             capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)}: {out.stderr}")
        return out.stdout

    def push(self, source: str, repo: str, tag: str) -> str:
        """Push ``source`` as HOST/repo:tag, then drop the local tag again; returns the
        reference."""
        ref = f"{self.host}/{repo}:{tag}"
        if self.credentials:
            self._docker("login", "-u", self.credentials[0], "--password-stdin", self.host,
                         stdin=self.credentials[1])
        self._docker("tag", source, ref)
        try:
            self._docker("push", ref)
        finally:
            untag(ref)
        return ref

    def access_log(self) -> str:
        return (self.workdir / "registry.log").read_text(errors="replace")


def untag(ref: str) -> None:
    """Remove a tag and the repo digest a pull or push added (never the image itself,
    which other tags of the shared test images keep)."""
    repo = ref.rsplit(":", 1)[0]
    info = subprocess.run(["docker", "image", "inspect", "--format", "{{json .RepoDigests}}", ref],
                          capture_output=True, text=True)
    digests = json.loads(info.stdout or "[]") if info.returncode == 0 else []
    for r in [ref, *[d for d in digests if d.startswith(repo + "@")]]:
        subprocess.run(["docker", "rmi", "--no-prune", r], capture_output=True)


def _up(port: int, tls: bool) -> bool:
    scheme = "https" if tls else "http"
    ctx = ssl._create_unverified_context() if tls else None
    try:
        with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/v2/", timeout=1, context=ctx) as r:
            return r.status == 200
    except urllib.error.HTTPError as exc:
        return exc.code == 401
    except OSError:
        return False


@contextmanager
def running_registry(credentials: tuple[str, str] | None = None, tls: bool = False) -> Iterator[Registry]:
    workdir = Path(tempfile.mkdtemp(prefix="na-registry-"))
    port = free_port()
    config: dict = {
        "version": 0.1,
        "log": {"level": "info"},
        "storage": {"filesystem": {"rootdirectory": str(workdir / "data")}, "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": uuid.uuid4().hex},
    }
    certs_dir = DOCKER_CERTS_D / f"127.0.0.1:{port}"
    if tls:
        cert, key = self_signed(workdir)
        config["http"]["tls"] = {"certificate": str(cert), "key": str(key)}
        # How an operator makes Docker trust a registry's CA.
        certs_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(cert, certs_dir / "ca.crt")
    if credentials:
        (workdir / "htpasswd").write_text(htpasswd_line(*credentials) + "\n")
        config["auth"] = {"htpasswd": {"realm": "nodeagent-test", "path": str(workdir / "htpasswd")}}
    (workdir / "config.yml").write_text(json.dumps(config))
    log = open(workdir / "registry.log", "wb")
    process = subprocess.Popen([REGISTRY_BINARY, "serve", str(workdir / "config.yml")],
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while not _up(port, tls):
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"docker-registry did not come up: {(workdir / 'registry.log').read_text()}")
            time.sleep(0.05)
        yield Registry(f"127.0.0.1:{port}", workdir, credentials, tls)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(certs_dir, ignore_errors=True)
