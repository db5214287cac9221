"""Which certificate managers a cluster-mode agent runs.

* client: when the kubeconfig uses <root-dir>/pki/kubelet-client-current.pem (written by
  `nodeagent join`) and `rotate-certificates` is on (default, as kubelet's
  rotateCertificates in kubeadm clusters);
* serving: on such a joined node, with `server-tls-bootstrap` (default on here;
  kubelet's serverTLSBootstrap) unless `tls-cert-file` is set. The node API (HTTPS) reads `serving_cert_paths()`:
  <root-dir>/pki/kubelet-server-current.pem holding certificate and key, or the
  configured tls-cert-file / tls-private-key-file."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from nodeagent.join import csr as csrs
from nodeagent.join.files import CLIENT_PREFIX, SERVER_PREFIX, Layout

from .manager import CertificateManager, managed_client_certificate

if TYPE_CHECKING:  # pragma: no cover
    from nodeagent.cluster.mode import ClusterMode
    from nodeagent.config import Settings


def serving_cert_paths(settings: "Settings") -> tuple[Path, Path]:
    """(certificate file, key file) of the node API's TLS."""
    if settings.tls_cert_file:
        return Path(settings.tls_cert_file), Path(settings.tls_private_key_file or settings.tls_cert_file)
    current = Layout(settings.root_dir).server_current
    return current, current


def _serving_request(cluster: "ClusterMode") -> csrs.CSRRequest:
    """SANs: the node name and host name (when they are DNS names) and node addresses."""
    names: list[str] = []
    for name in (cluster.node_name, socket.gethostname().lower()):
        if name and name not in names:
            try:
                ipaddress.ip_address(name)
            except ValueError:
                names.append(name)
    addresses = [a for a in {cluster.host_ip} if a]
    return csrs.CSRRequest(cluster.node_name, csrs.SERVING_SIGNER, csrs.SERVING_USAGES,
                           dns_names=tuple(names), ip_addresses=tuple(addresses))


def certificate_managers(cluster: "ClusterMode") -> list[CertificateManager]:
    settings = cluster.settings
    layout = Layout(settings.root_dir)
    managers = []

    def node_event(type_: str, reason: str, message: str) -> None:
        cluster.events.node_event(type_, reason, message)

    joined = managed_client_certificate(settings.kubeconfig, settings.root_dir)
    if settings.rotate_certificates and joined:
        managers.append(CertificateManager(
            kind="client", layout=layout, prefix=CLIENT_PREFIX,
            request=lambda: csrs.CSRRequest(cluster.node_name, csrs.CLIENT_SIGNER, csrs.CLIENT_USAGES),
            client=cluster.client, on_rotated=cluster.client.reload_tls, node_event=node_event,
            fallback_to_bootstrap=True))
    # Serving certificates by TLS bootstrap on nodes that joined with a token (a node
    # given a hand-made kubeconfig brings its own tls-cert-file, as kubelet).
    if joined and settings.server_tls_bootstrap and not settings.tls_cert_file:
        managers.append(CertificateManager(
            kind="serving", layout=layout, prefix=SERVER_PREFIX,
            request=lambda: _serving_request(cluster), client=cluster.client, node_event=node_event))
    return managers
