"""kubeconfig loading: server, CA, client certificate/key, bearer token or token file.

TLS is always verified. `insecure-skip-tls-verify: true` is refused unless the caller
passes allow_insecure=True, and plain http:// servers are refused the same way."""

from __future__ import annotations

import base64
import binascii
import os
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class KubeConfigError(ValueError):
    """The kubeconfig is unusable; the message names the file and the field."""


@dataclass(frozen=True)
class KubeConfig:
    server: str
    ca_data: bytes | None = None
    ca_file: str | None = None
    client_cert_data: bytes | None = None
    client_cert_file: str | None = None
    client_key_data: bytes | None = None
    client_key_file: str | None = None
    token: str | None = None
    token_file: str | None = None
    insecure_skip_tls_verify: bool = False
    tls_server_name: str | None = None
    namespace: str = "default"
    context: str = ""
    source: str = ""

    @property
    def has_client_cert(self) -> bool:
        return bool(self.client_cert_data or self.client_cert_file)

    def ssl_context(self) -> ssl.SSLContext | bool:
        """The TLS context for this server (False only for an explicitly allowed insecure
        plain-http server). Reads the CA and client certificate files: call at startup or
        off the event loop."""
        if self.server.startswith("http://"):
            return False
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.insecure_skip_tls_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        elif self.ca_data is not None:
            ctx.load_verify_locations(cadata=self.ca_data.decode())
        elif self.ca_file is not None:
            ctx.load_verify_locations(cafile=self.ca_file)
        # Without a CA, the system trust store (create_default_context) applies.
        if self.has_client_cert:
            _load_client_cert(ctx, self)
        return ctx


def _load_client_cert(ctx: ssl.SSLContext, cfg: KubeConfig) -> None:
    # ssl only loads certificate chains from files: inline data goes through a private
    # temporary directory that is removed right after loading.
    if cfg.client_cert_file and cfg.client_key_file:
        ctx.load_cert_chain(cfg.client_cert_file, cfg.client_key_file)
        return
    with tempfile.TemporaryDirectory(prefix="nodeagent-tls-") as tmp:
        os.chmod(tmp, 0o700)
        cert_path = cfg.client_cert_file or os.path.join(tmp, "client.crt")
        key_path = cfg.client_key_file or os.path.join(tmp, "client.key")
        if cfg.client_cert_data is not None:
            Path(cert_path).write_bytes(cfg.client_cert_data)
        if cfg.client_key_data is not None:
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(cfg.client_key_data)
        ctx.load_cert_chain(cert_path, key_path)


def _named(entries: Any, name: str, kind: str, source: str) -> dict:
    for entry in entries or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            return entry.get(kind) or {}
    raise KubeConfigError(f"kubeconfig {source}: no {kind} named {name!r} in {kind}s")


def _decode(value: Any, field: str, source: str) -> bytes:
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KubeConfigError(f"kubeconfig {source}: {field} is not valid base64") from exc


def _file(value: Any, field: str, base: Path, source: str) -> str:
    path = Path(str(value)).expanduser()
    if not path.is_absolute():
        path = base / path  # relative paths are relative to the kubeconfig file
    if not path.is_file():
        raise KubeConfigError(f"kubeconfig {source}: {field}: file {path} does not exist")
    if not os.access(path, os.R_OK):
        raise KubeConfigError(f"kubeconfig {source}: {field}: file {path} is not readable")
    return str(path)


def load_kubeconfig(path: str | os.PathLike, context: str | None = None, *,
                    allow_insecure: bool = False) -> KubeConfig:
    """Parse a kubeconfig file (blocking file reads: call at startup or via to_thread)."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise KubeConfigError(f"kubeconfig {source}: cannot read: {exc.strerror}") from exc
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise KubeConfigError(f"kubeconfig {source}: not valid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise KubeConfigError(f"kubeconfig {source}: top level must be a mapping")
    base = Path(path).resolve().parent
    context_name = context or doc.get("current-context") or ""
    if not context_name:
        contexts = doc.get("contexts") or []
        if len(contexts) == 1 and isinstance(contexts[0], dict):
            context_name = contexts[0].get("name", "")
        else:
            raise KubeConfigError(f"kubeconfig {source}: current-context is not set and no context was given")
    ctx = _named(doc.get("contexts"), context_name, "context", source)
    cluster_name, user_name = ctx.get("cluster"), ctx.get("user")
    if not cluster_name:
        raise KubeConfigError(f"kubeconfig {source}: contexts[name={context_name}].context.cluster is empty")
    cluster = _named(doc.get("clusters"), cluster_name, "cluster", source)
    user = _named(doc.get("users"), user_name, "user", source) if user_name else {}
    where_c = f"clusters[name={cluster_name}].cluster"
    where_u = f"users[name={user_name}].user"

    server = str(cluster.get("server") or "")
    if not server:
        raise KubeConfigError(f"kubeconfig {source}: {where_c}.server is empty")
    if not server.startswith(("https://", "http://")):
        raise KubeConfigError(f"kubeconfig {source}: {where_c}.server {server!r} must be an https:// URL")
    insecure = bool(cluster.get("insecure-skip-tls-verify"))
    if (insecure or server.startswith("http://")) and not allow_insecure:
        what = "insecure-skip-tls-verify: true" if insecure else f"plain http server {server}"
        raise KubeConfigError(f"kubeconfig {source}: {where_c}: {what} is refused; TLS must be "
                              "verified (pass allow_insecure=True to override)")
    fields: dict[str, Any] = {"server": server.rstrip("/"), "insecure_skip_tls_verify": insecure,
                              "context": context_name, "source": source,
                              "namespace": ctx.get("namespace") or "default",
                              "tls_server_name": cluster.get("tls-server-name")}
    if cluster.get("certificate-authority-data"):
        fields["ca_data"] = _decode(cluster["certificate-authority-data"],
                                    f"{where_c}.certificate-authority-data", source)
    elif cluster.get("certificate-authority"):
        fields["ca_file"] = _file(cluster["certificate-authority"], f"{where_c}.certificate-authority",
                                  base, source)
    if user.get("client-certificate-data"):
        fields["client_cert_data"] = _decode(user["client-certificate-data"],
                                             f"{where_u}.client-certificate-data", source)
    elif user.get("client-certificate"):
        fields["client_cert_file"] = _file(user["client-certificate"], f"{where_u}.client-certificate",
                                           base, source)
    if user.get("client-key-data"):
        fields["client_key_data"] = _decode(user["client-key-data"], f"{where_u}.client-key-data", source)
    elif user.get("client-key"):
        fields["client_key_file"] = _file(user["client-key"], f"{where_u}.client-key", base, source)
    has_cert = "client_cert_data" in fields or "client_cert_file" in fields
    has_key = "client_key_data" in fields or "client_key_file" in fields
    if has_cert != has_key:
        raise KubeConfigError(f"kubeconfig {source}: {where_u}: a client certificate needs both "
                              "the certificate and the key")
    if user.get("token"):
        fields["token"] = str(user["token"]).strip()
    elif user.get("tokenFile"):
        fields["token_file"] = _file(user["tokenFile"], f"{where_u}.tokenFile", base, source)
    for unsupported in ("exec", "auth-provider", "username", "password"):
        if user.get(unsupported):
            raise KubeConfigError(f"kubeconfig {source}: {where_u}.{unsupported} is not supported; "
                                  "use a client certificate, token or tokenFile")
    _refuse_exposed_keys(fields, Path(path), source, where_u)
    # Without a CA the system trust store verifies the server.
    return KubeConfig(**fields)


def _refuse_exposed_keys(fields: dict[str, Any], path: Path, source: str, where_u: str) -> None:
    """A private key anyone on the host can read is a leaked key: refuse it, as ssh does."""
    checks = []
    if "client_key_file" in fields:
        checks.append((Path(fields["client_key_file"]), f"{where_u}.client-key"))
    for file, field in checks:
        try:
            mode = file.stat().st_mode & 0o777
        except OSError:
            continue
        if mode & 0o004:
            raise KubeConfigError(f"kubeconfig {source}: {field}: {file} is world-readable "
                                  f"(mode {mode:04o}); a private key must not be: "
                                  f"chmod 600 {file}")
