"""sd_notify against a real datagram socket (path and abstract addresses), the watchdog
pinged from the event loop (a blocked loop misses its pings), and the unit file passing
`systemd-analyze verify`."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nodeagent.systemd import Notifier, ServiceNotifier, render_unit

REPO = Path(__file__).resolve().parents[2]


class Receiver:
    """The systemd side: a bound datagram socket collecting (time, message) pairs."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)
        self.messages: list[tuple[float, str]] = []

    def drain(self) -> list[tuple[float, str]]:
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return self.messages
            self.messages.append((time.monotonic(), data.decode()))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def path_receiver(tmp_path):
    r = Receiver(str(tmp_path / "notify.sock"))
    yield r, str(tmp_path / "notify.sock")
    r.close()


def test_notify_over_a_path_socket(path_receiver):
    receiver, path = path_receiver
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled and n.watchdog_interval is None
    assert n.ready("pods running: 0") and n.watchdog() and n.status("x")
    n.close()
    assert [m for _, m in receiver.drain()] == ["READY=1\nSTATUS=pods running: 0", "WATCHDOG=1", "STATUS=x"]


def test_notify_over_an_abstract_socket():
    name = f"nodeagent-test-{secrets.token_hex(4)}"
    receiver = Receiver(b"\0" + name.encode())
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.ready()
        n.close()
        assert [m for _, m in receiver.drain()] == ["READY=1"]
    finally:
        receiver.close()


def test_not_under_systemd_sends_nothing_and_foreign_watchdog_is_ignored(path_receiver):
    receiver, path = path_receiver
    assert not Notifier({}).enabled and not Notifier({}).ready()
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert n.watchdog_interval is None  # meant for another process
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())})
    assert n.watchdog_interval == 0.5
    # A receiver that went away: a failed send is reported, never raised.
    receiver.close()
    os.unlink(path)
    assert n.watchdog() is False


async def test_ready_after_sync_watchdog_pings_and_a_blocked_loop_misses_them(path_receiver):
    receiver, path = path_receiver
    watchdog_usec = 200_000  # systemd would kill us after 0.2 s without a ping
    synced = False
    running = [2]
    sn = ServiceNotifier(Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": str(watchdog_usec)}),
                         ready=lambda: synced, status=lambda: f"pods running: {running[0]}; last sync: 0s ago",
                         status_period=0.3)
    # Read as systemd does, as soon as a datagram arrives (the socket queue is short).
    asyncio.get_running_loop().add_reader(receiver.sock, receiver.drain)
    task = asyncio.create_task(sn.run())
    await asyncio.sleep(0.35)
    assert not any("READY=1" in m for _, m in receiver.drain()), "READY=1 before the sources synced"
    synced = True
    await asyncio.sleep(0.3)
    running[0] = 3
    await asyncio.sleep(0.3)
    time.sleep(0.7)  # the event loop is blocked: no coroutine runs, no ping goes out
    await asyncio.sleep(0.4)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    asyncio.get_running_loop().remove_reader(receiver.sock)
    msgs = receiver.drain()
    ready = [m for _, m in msgs if m.startswith("READY=1")]
    assert ready == ["READY=1\nSTATUS=pods running: 2; last sync: 0s ago"]
    pings = [t for t, m in msgs if m == "WATCHDOG=1"]
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert len(pings) >= 8
    # While the loop runs, pings come every WATCHDOG_USEC/2 (well within the timeout) ...
    assert sorted(gaps)[len(gaps) // 2] < watchdog_usec / 1e6
    # ... and the blocked stretch shows as one gap longer than the watchdog timeout:
    # systemd would have killed and restarted the agent.
    blocked = [g for g in gaps if g >= 0.65]
    assert len(blocked) == 1 and blocked[0] > watchdog_usec / 1e6
    assert msgs[-1][1] == "STOPPING=1"
    assert "STATUS=pods running: 3; last sync: 0s ago" in [m for _, m in msgs]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("root-dir: /var/lib/nodeagent\n")
    unit = tmp_path / "nodeagent.service"
    exe = Path(sys.executable).parent / "nodeagent"
    unit.write_text(render_unit(str(config), str(exe)))
    text = unit.read_text()
    for directive in ("Type=notify", "WatchdogSec=", "Restart=always", "KillMode=process",
                      "After=docker.service", "Wants=docker.service",
                      "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK"):
        assert directive in text, directive
    assert f"ExecStart={exe} run --config {config}" in text
    res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    # A broken unit fails the same check (the check can fail).
    unit.write_text(text.replace("Type=notify", "Type=notifyy"))
    res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert "notifyy" in res.stderr


def test_install_service_writes_the_unit(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("root-dir: /var/lib/nodeagent\n")
    res = subprocess.run([sys.executable, "-m", "nodeagent.cli", "install-service", "--config", str(config),
                          "--unit-dir", str(tmp_path / "units"), "--no-enable"],
                         cwd=REPO, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert f"run --config {config}" in (tmp_path / "units" / "nodeagent.service").read_text()
    res = subprocess.run([sys.executable, "-m", "nodeagent.cli", "install-service", "--config",
                          str(tmp_path / "missing.yaml"), "--unit-dir", str(tmp_path / "u2")],
                         cwd=REPO, capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "does not exist" in res.stderr


@pytest.mark.root
@pytest.mark.skipif(shutil.which("systemd-nspawn") is None or not os.environ.get("NODEAGENT_NSPAWN_TEST"),
                    reason="opt-in (NODEAGENT_NSPAWN_TEST=1, ~30 s): needs systemd-nspawn (Debian "
                           "systemd-container)")
def test_unit_under_a_real_systemd():
    """systemd/check-under-systemd.sh: the unit under systemd in systemd-nspawn: READY=1 and
    STATUS=, the hardening leaving netlink/nftables/Docker usable, watchdog restart."""
    res = subprocess.run(["bash", str(REPO / "systemd" / "check-under-systemd.sh")],
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "OK: Type=notify" in res.stdout
