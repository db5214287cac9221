"""The real agent process under a fake systemd: NOTIFY_SOCKET is a datagram socket the
test owns. READY=1 comes after the manifest source synced, with a STATUS= line;
WATCHDOG=1 pings follow at WATCHDOG_USEC/2; STOPPING=1 on SIGTERM."""

from __future__ import annotations

import time

import pytest

from tests.unit.test_systemd import Receiver

pytestmark = [pytest.mark.docker, pytest.mark.root]


def test_agent_reports_ready_and_pings_the_watchdog(agent_factory, tmp_path, monkeypatch):
    sock = tmp_path / "notify.sock"
    receiver = Receiver(str(sock))
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    try:
        agent = agent_factory(start=False)
        agent.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            msgs = [m for _, m in receiver.drain()]
            if any(m.startswith("READY=1") for m in msgs) and msgs.count("WATCHDOG=1") >= 3:
                break
            time.sleep(0.1)
        msgs = [m for _, m in receiver.drain()]
        ready = [m for m in msgs if m.startswith("READY=1")]
        assert len(ready) == 1, msgs
        assert "STATUS=pods running: 0; last sync:" in ready[0]
        pings = [t for t, m in receiver.messages if m == "WATCHDOG=1"]
        assert len(pings) >= 3 and max(b - a for a, b in zip(pings, pings[1:])) < 1.0
        agent.stop()
        assert receiver.drain()[-1][1] == "STOPPING=1"
    finally:
        receiver.close()
