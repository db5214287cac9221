"""The "proxy synced" line is info only when the kernel's ruleset changed."""

from __future__ import annotations

import secrets

import pytest
from structlog.testing import capture_logs

from netplugin.proxy import cleanup

from .conftest import new_proxy
from .helpers import endpoint, endpoint_slice, service
from .topology import Topology

pytestmark = pytest.mark.root


async def test_synced_is_info_on_change_and_debug_when_nothing_changed() -> None:
    topology = Topology()
    netns = topology._add_ns("node")
    table = f"np4l{secrets.token_hex(3)}"
    proxy = new_proxy(topology, table)
    try:
        proxy.on_service("ADDED", service("web", "10.203.0.10"))
        proxy.on_endpoint_slice("ADDED", endpoint_slice("web", [endpoint("10.202.1.10")]))
        with capture_logs() as first:
            await proxy.sync_now()
        with capture_logs() as again:
            await proxy.full_resync()  # the periodic full resync: everything in place
            await proxy.sync_now()
        synced = [(e["log_level"], e["full"]) for e in first if e["event"] == "proxy synced"]
        assert synced == [("info", True)]
        synced = [(e["log_level"], e["full"]) for e in again if e["event"] == "proxy synced"]
        assert synced == [("debug", True), ("debug", False)]
    finally:
        proxy.close()
        await cleanup(table, netns)
        topology.destroy()
