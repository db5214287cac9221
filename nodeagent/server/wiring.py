"""Builds the node API from the agent's settings: on in cluster mode, and in standalone
mode only with a client CA (then certificate authentication and allow-all for verified
clients)."""

from __future__ import annotations

from pathlib import Path

import structlog

from nodeagent.server.auth import NodeAuth
from nodeagent.server.nodeapi import NodeApiServer
from nodeagent.server.tlscert import ensure_serving_cert, server_context

log = structlog.get_logger(__name__)


def _client_ca(agent) -> bytes | None:
    settings = agent.settings
    if settings.client_ca_file:
        return Path(settings.client_ca_file).read_bytes()
    if agent.cluster is not None:
        config = agent.cluster.client.config
        if config.ca_data:
            return config.ca_data
        if config.ca_file:
            return Path(config.ca_file).read_bytes()
    return None


def issued_serving_cert(settings) -> Path | None:
    """The kubelet-serving certificate a joined node got by TLS bootstrap (cert and key
    in one file), when no tls-cert-file is configured and it exists."""
    if settings.tls_cert_file:
        return None
    from nodeagent.certificate.wiring import serving_cert_paths

    path, _ = serving_cert_paths(settings)
    return path if path.is_file() else None


async def reload_serving_cert(settings, ctx, period: float = 30.0) -> None:
    """New handshakes use the kubelet-serving certificate as soon as it is issued or
    renewed (the certificate manager replaces the file); connections already open
    keep theirs."""
    import asyncio
    import ssl

    loaded: float | None = None
    while True:
        path = issued_serving_cert(settings)
        if path is not None:
            try:
                mtime = path.stat().st_mtime
                if mtime != loaded:
                    ctx.load_cert_chain(path, path)
                    log.info("node API serving certificate loaded", cert=str(path))
                    loaded = mtime
            except (OSError, ssl.SSLError) as exc:
                log.warning("node API serving certificate not loaded", cert=str(path), error=str(exc))
        await asyncio.sleep(period)


def build_node_api(agent) -> NodeApiServer | None:
    """Blocking (reads and maybe creates certificate files): call at start-up."""
    settings = agent.settings
    if agent.cluster is None and not settings.client_ca_file:
        return None
    issued = issued_serving_cert(settings)
    if issued is not None:
        cert = key = issued
    else:
        cert, key = ensure_serving_cert(settings.tls_cert_file, settings.tls_private_key_file,
                                        root_dir=settings.root_dir, node_name=settings.node_name,
                                        addresses=[agent.host_ip])
    client_ca = _client_ca(agent)
    if client_ca is None:
        log.warning("node API: no client CA; only bearer tokens can authenticate")
    client = agent.cluster.client if agent.cluster is not None else None
    auth = NodeAuth(settings.node_name, client, anonymous=settings.anonymous_auth)
    host, port = settings.node_api_host_port
    return NodeApiServer(
        host, port, node_name=settings.node_name, auth=auth,
        ssl_context=server_context(cert, key, client_ca), pods=agent.pod_list,
        runtime=agent.runtime, checks=agent.server._checks,
        max_streams=settings.node_api_max_streams, idle_timeout=settings.streaming_idle_timeout,
        extra_routes=_stats_routes(agent))


def _stats_routes(agent):
    """/metrics* and /stats/summary: the status server's handlers, behind the node API's
    authentication and kubelet's nodes/metrics and nodes/stats authorization."""
    handlers = getattr(agent, "stats_handlers", None)
    if handlers is None:
        return None
    return lambda app: app.router.add_routes(handlers.routes())
