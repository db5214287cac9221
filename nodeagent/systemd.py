"""systemd integration: sd_notify (READY=1, WATCHDOG=1, STATUS=, STOPPING=1) and
`nodeagent install-service`.

sd_notify is a few lines over a datagram unix socket, so it is implemented here rather
than pulled in as a dependency: `$NOTIFY_SOCKET` is a path, or an abstract address when it
starts with `@` (a leading NUL byte on the wire). The watchdog is pinged from a coroutine
on the agent's own event loop, so a loop blocked by a bug stops the pings and systemd
restarts the agent (WatchdogSec in systemd/nodeagent.service)."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Mapping

import structlog

log = structlog.get_logger(__name__)

UNIT_NAME = "nodeagent.service"
UNIT_TEMPLATE = Path(__file__).resolve().parent.parent / "systemd" / UNIT_NAME
STATUS_PERIOD = 10.0


def _socket_address(value: str) -> str | bytes | None:
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock and other transports are not used on the nodes this runs on


class Notifier:
    """Sends sd_notify messages; does nothing when not started by systemd."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_usec = 0
        pid = env.get("WATCHDOG_PID")
        if env.get("WATCHDOG_USEC", "").isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog_usec = int(env["WATCHDOG_USEC"])
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """How often to ping: half the watchdog timeout, as sd_watchdog_enabled(3) advises."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def notify(self, *assignments: str) -> bool:
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)  # never block the event loop on a full queue
            self._sock.sendto("\n".join(assignments).encode(), self.address)
            return True
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("sd_notify failed", socket=repr(self.address), error=str(exc))
            return False

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class ServiceNotifier:
    """READY=1 once `ready()` holds (every source synced once), then WATCHDOG=1 pings and
    STATUS= lines from the event loop until cancelled (then STOPPING=1)."""

    def __init__(self, notifier: Notifier, *, ready: Callable[[], bool],
                 status: Callable[[], str], status_period: float = STATUS_PERIOD) -> None:
        self.notifier = notifier
        self._ready = ready
        self._status = status
        self.status_period = status_period
        self.ready_sent = False

    async def run(self) -> None:
        if not self.notifier.enabled:
            return
        interval = self.notifier.watchdog_interval
        tick = min(interval, 0.5) if interval else 0.5
        last_ping = last_status = 0.0
        last_text = ""
        try:
            while True:
                now = time.monotonic()
                if interval and now - last_ping >= interval:
                    self.notifier.watchdog()
                    last_ping = now
                if not self.ready_sent and self._ready():
                    self.ready_sent = True
                    last_text = self._status()
                    self.notifier.ready(last_text)
                    last_status = now
                    log.info("systemd notified: ready", status=last_text)
                elif self.ready_sent and now - last_status >= self.status_period:
                    text = self._status()
                    if text != last_text or now - last_status >= 6 * self.status_period:
                        self.notifier.status(text)
                        last_text = text
                    last_status = now
                await asyncio.sleep(tick)
        finally:
            self.notifier.stopping()
            self.notifier.close()


# --- install-service ---------------------------------------------------------------------

def add_install_parser(sub) -> None:
    p = sub.add_parser("install-service",
                       help="install, enable and start nodeagent as a systemd service")
    p.add_argument("--config", default="/etc/nodeagent/config.yaml",
                   help="config file the service runs with (default /etc/nodeagent/config.yaml)")
    p.add_argument("--unit-dir", default="/etc/systemd/system",
                   help="where the unit goes (default /etc/systemd/system)")
    p.add_argument("--no-enable", action="store_true",
                   help="only write the unit; do not enable or start it")


def render_unit(config: str, executable: str | None = None) -> str:
    """The unit of systemd/nodeagent.service with ExecStart pointing at this installation."""
    exe = executable or shutil.which("nodeagent") or str(Path(sys.executable).parent / "nodeagent")
    lines = []
    for line in UNIT_TEMPLATE.read_text().splitlines():
        if line.startswith("ExecStart="):
            line = f"ExecStart={exe} run --config {config}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def install_service(args: argparse.Namespace) -> int:
    config = os.path.abspath(args.config)
    if not Path(config).is_file():
        print(f"nodeagent install-service: config file {config} does not exist; create it "
              "(e.g. `root-dir: /var/lib/nodeagent` after `nodeagent join --no-start`)",
              file=sys.stderr)
        return 2
    unit_dir = Path(args.unit_dir)
    unit_dir.mkdir(parents=True, exist_ok=True)
    target = unit_dir / UNIT_NAME
    tmp = target.with_suffix(".tmp")
    tmp.write_text(render_unit(config))
    tmp.chmod(0o644)
    os.replace(tmp, target)
    print(f"wrote {target}")
    if args.no_enable:
        return 0
    if not Path("/run/systemd/system").is_dir() or shutil.which("systemctl") is None:
        print("nodeagent install-service: systemd is not running on this host (no "
              "/run/systemd/system); the unit is written but not enabled. Run "
              f"`nodeagent run --config {config}` another way.", file=sys.stderr)
        return 1
    for cmd in (["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", "--no-block", UNIT_NAME]):
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            print(f"nodeagent install-service: {' '.join(cmd)} failed: {res.stderr.strip()}",
                  file=sys.stderr)
            return 1
    # --no-block: READY=1 waits for the first sync, which waits for the API server.
    print("nodeagent is enabled and starting. Follow its log with: journalctl -u nodeagent -f "
          "(one pod: journalctl -u nodeagent POD=<name>)")
    return 0


def for_agent(agent) -> ServiceNotifier:
    """The agent's notifier: ready once every pod source has synced once; STATUS= says
    how many pods run and when the runtime was last listed."""

    def status() -> str:
        running = sum(1 for record in agent.kubelet.pods.values()
                      if (record.status or {}).get("phase") == "Running")
        last = agent.pleg.last_relist
        age = f"{time.monotonic() - last:.0f}s ago" if last is not None else "not yet"
        return f"pods running: {running}; last sync: {age}"

    return ServiceNotifier(Notifier(), ready=agent._sources_synced, status=status)
