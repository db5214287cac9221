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


def build_node_api(agent) -> NodeApiServer | None:
    """Blocking (reads and maybe creates certificate files): call at start-up."""
    settings = agent.settings
    if agent.cluster is None and not settings.client_ca_file:
        return None
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
        max_streams=settings.node_api_max_streams, idle_timeout=settings.streaming_idle_timeout)
