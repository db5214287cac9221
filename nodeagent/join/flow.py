"""`nodeagent join`: discovery, TLS bootstrap, credentials on disk. One timeout bounds
everything (retries while the control plane is down, and the wait for approval)."""

from __future__ import annotations

import asyncio
import os
import base64
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from nodeagent.backoff import Backoff
from nodeagent.kube import ApiConnectionError, ApiError, KubeClient, KubeConfig

from . import csr as csrs
from .discovery import ClusterInfo, Retryable, discover
from .files import CLIENT_PREFIX, Layout, atomic_write, write_pair
from .token import BootstrapToken, JoinError, UsageError

DEFAULT_TIMEOUT = 300.0


class AlreadyJoined(JoinError):
    exit_code = 0


@dataclass
class JoinOptions:
    endpoint: str
    token: BootstrapToken
    pins: list[str]
    node_name: str
    root_dir: str
    skip_ca_verification: bool = False
    force: bool = False
    timeout: float = DEFAULT_TIMEOUT
    progress: Callable[[str], None] = field(default=lambda message: None)


@dataclass
class JoinResult:
    server: str
    node_name: str
    kubeconfig: Path
    csr_name: str


def parse_duration(text: str) -> float:
    """'90', '90s', '5m', '1h30m' -> seconds."""
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise UsageError(f"--timeout {text!r}: expected a duration such as 30s, 5m or 1h")
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * scale[u] for n, u in parts)


def kubeconfig_yaml(server: str, ca_pem: bytes, user: dict) -> bytes:
    doc = {
        "apiVersion": "v1", "kind": "Config", "preferences": {},
        "clusters": [{"name": "default-cluster", "cluster": {
            "server": server, "certificate-authority-data": base64.b64encode(ca_pem).decode()}}],
        "users": [{"name": "default-auth", "user": user}],
        "contexts": [{"name": "default-context",
                      "context": {"cluster": "default-cluster", "user": "default-auth"}}],
        "current-context": "default-context",
    }
    return yaml.safe_dump(doc, sort_keys=False).encode()


def joined_server(layout: Layout) -> str | None:
    try:
        doc = yaml.safe_load(layout.kubeconfig.read_text()) or {}
        return str(doc["clusters"][0]["cluster"]["server"])
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError):
        return "(unreadable kubeconfig)" if layout.kubeconfig.exists() else None


async def _discover(opts: JoinOptions, deadline: float) -> ClusterInfo:
    backoff = Backoff(base=0.5, cap=10.0, reset_after=3600.0)
    while True:
        try:
            return await discover(opts.endpoint, opts.token, opts.pins,
                                  skip_ca_verification=opts.skip_ca_verification,
                                  request_timeout=max(0.5, min(10.0, deadline - time.monotonic())))
        except Retryable as exc:
            delay = backoff.record_failure("discovery", time.monotonic())
            if time.monotonic() + delay >= deadline:
                raise JoinError(f"{exc} (gave up after --timeout {opts.timeout:g}s)") from None
            opts.progress(f"{exc}; retrying in {delay:.1f}s")
            await asyncio.sleep(delay)


def _api_refusal(exc: ApiError, token: BootstrapToken) -> JoinError:
    if exc.is_unauthorized:
        return JoinError(f"the API server refused bootstrap token {token.token_id!r} "
                         f"({exc.status} {exc.reason}: {exc.message}): the token is unknown, has "
                         "expired, or its secret is wrong. Create a new one on the control plane "
                         "with `kubeadm token create --print-join-command`.")
    if exc.is_forbidden:
        return JoinError(f"bootstrap token {token.token_id!r} may not create certificate signing "
                         f"requests ({exc.message}); it needs the system:bootstrappers group and "
                         "the RBAC binding for node bootstrap")
    return JoinError(f"creating the certificate signing request failed: {exc}")


async def _create_csr(client: KubeClient, req: csrs.CSRRequest, key, opts: JoinOptions,
                      deadline: float) -> str:
    backoff = Backoff(base=0.5, cap=10.0, reset_after=3600.0)
    while True:
        try:
            return await csrs.create_csr(client, req, key)
        except ApiError as exc:
            if exc.status < 500 and exc.status != 429:
                raise _api_refusal(exc, opts.token) from None
            reason: str = str(exc)
        except ApiConnectionError as exc:
            if exc.tls:
                raise JoinError(str(exc)) from None
            reason = str(exc)
        delay = backoff.record_failure("csr", time.monotonic())
        if time.monotonic() + delay >= deadline:
            raise JoinError(f"cannot create the certificate signing request: {reason} "
                            f"(gave up after --timeout {opts.timeout:g}s)")
        opts.progress(f"cannot create the certificate signing request ({reason}); "
                      f"retrying in {delay:.1f}s")
        await asyncio.sleep(delay)


def _pending_key(layout: Layout):
    """The key of an earlier, unfinished join (so its CSR can still be picked up)."""
    try:
        return csrs.load_key(layout.pending_key.read_bytes())
    except (OSError, ValueError):
        return None


async def join(opts: JoinOptions) -> JoinResult:
    layout = Layout(opts.root_dir)
    existing = joined_server(layout)
    if existing is not None and not opts.force:
        raise AlreadyJoined(f"this node has already joined {existing} (kubeconfig {layout.kubeconfig}); "
                            "nothing was changed. Use --force to join again.")
    deadline = time.monotonic() + opts.timeout
    if opts.skip_ca_verification:
        opts.progress("WARNING: --discovery-token-unsafe-skip-ca-verification: the cluster CA is "
                      "NOT pinned; anyone who can answer at this address and knows the token can "
                      "pose as the control plane. Use --discovery-token-ca-cert-hash instead.")
    opts.progress(f"reading cluster-info from {opts.endpoint} (token id {opts.token.token_id})")
    info = await _discover(opts, deadline)
    opts.progress(f"cluster CA pinned (sha256:{info.pins[0]}); server {info.server}")

    layout.make_dirs()
    atomic_write(layout.bootstrap_kubeconfig,
                 kubeconfig_yaml(info.server, info.ca_pem, {"token": opts.token.value}))
    key = _pending_key(layout)
    if key is None:
        key = csrs.new_key()
        atomic_write(layout.pending_key, csrs.key_pem(key))
    req = csrs.CSRRequest(opts.node_name, csrs.CLIENT_SIGNER, csrs.CLIENT_USAGES)
    config = KubeConfig(server=info.server, ca_data=info.ca_pem, token=opts.token.value,
                        source=str(layout.bootstrap_kubeconfig))
    async with KubeClient(config, qps=0, timeout=max(1.0, min(30.0, opts.timeout))) as client:
        name = await _create_csr(client, req, key, opts, deadline)
        opts.progress(f"created certificate signing request {name} for system:node:{opts.node_name}")
        try:
            cert_pem = await csrs.wait_for_certificate(client, name, key, deadline=deadline,
                                                       progress=opts.progress)
        except ApiError as exc:
            raise _api_refusal(exc, opts.token) from None
    opts.progress(f"certificate signing request {name} approved; writing credentials")
    link = write_pair(layout, CLIENT_PREFIX, cert_pem, csrs.key_pem(key))
    atomic_write(layout.ca, info.ca_pem)
    # The kubeconfig last: it is what marks the node as joined.
    atomic_write(layout.kubeconfig, kubeconfig_yaml(info.server, info.ca_pem, {
        "client-certificate": os.path.abspath(link),
        "client-key": os.path.abspath(link)}))
    try:
        layout.pending_key.unlink()
    except OSError:
        pass
    return JoinResult(info.server, opts.node_name, layout.kubeconfig, name)
