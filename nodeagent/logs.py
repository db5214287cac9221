"""structlog setup: JSON lines when stderr is not a terminal, readable text when it is,
and native journal entries when stderr is the journal.

Under systemd, `$JOURNAL_STREAM` holds `<dev>:<inode>` of the stream the journal gave
us; when it matches stderr (where logs go), every entry is sent to journald's native
socket as fields instead: MESSAGE=, PRIORITY=, SYSLOG_IDENTIFIER=nodeagent, and one
upper-case field per structlog key. A `pod="<namespace>/<name>"` key becomes POD=<name>
and NAMESPACE=<namespace>, so `journalctl -u nodeagent POD=web` shows one pod's lines.
An entry the socket refuses (too big, journald away) goes to stderr as before."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import struct
import sys
from typing import Any

import structlog

JOURNAL_SOCKET = "/run/systemd/journal/socket"
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "exception": 3,
             "critical": 2, "fatal": 2}
_FIELD_BAD = re.compile(r"[^A-Z0-9_]")


def journal_stream_matches(fd: int, environ: dict[str, str] | None = None) -> bool:
    """True when `fd` is the stream systemd connected to the journal ($JOURNAL_STREAM)."""
    value = (environ if environ is not None else os.environ).get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


def _field_name(key: str) -> str:
    name = _FIELD_BAD.sub("_", key.upper()).lstrip("_")
    if not name or name[0].isdigit():
        name = "F_" + name
    return name[:64]


def journal_fields(event_dict: dict[str, Any]) -> dict[str, str]:
    """structlog event -> journal fields (also used by tests to check the mapping)."""
    event = dict(event_dict)
    level = str(event.pop("level", "info"))
    message = str(event.pop("event", ""))
    event.pop("timestamp", None)  # journald stamps entries itself
    fields = {"PRIORITY": str(_PRIORITY.get(level, 6)), "SYSLOG_IDENTIFIER": "nodeagent"}
    shown = []
    for key, value in event.items():
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        shown.append(f"{key}={text}")
        if key == "pod" and isinstance(value, str):
            namespace, sep, name = value.rpartition("/")
            fields["POD"] = name
            if sep:
                fields["NAMESPACE"] = namespace
            continue
        name = _field_name(key)
        if name in ("MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER"):
            name = "F_" + name
        fields.setdefault(name, text)
    fields["MESSAGE"] = " ".join([message, *shown]) if shown else message
    return fields


def encode_native(fields: dict[str, str]) -> bytes:
    """journald's native protocol: KEY=value lines; values with a newline are sent as
    KEY, newline, 64-bit little-endian length, the bytes, newline."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalLogger:
    """A structlog logger sending each entry as one datagram to journald."""

    def __init__(self, address: str = JOURNAL_SOCKET, fallback=None) -> None:
        self.address = address
        self.fallback = fallback or sys.stderr
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def msg(self, **fields: str) -> None:
        try:
            self.sock.sendto(encode_native(fields), self.address)
        except OSError:
            # Too large for one datagram, or journald is restarting: stderr still
            # reaches the journal, as plain text.
            print(fields.get("MESSAGE", ""), file=self.fallback, flush=True)

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


def _journal_renderer(_logger, _name, event_dict):
    return journal_fields(event_dict)


def configure_logging(level: str = "info", *, json_output: bool | None = None,
                      journal_socket: str | None = None) -> None:
    """`journal_socket`: send to this journald socket when stderr is the journal (None:
    the standard socket)."""
    numeric = logging.getLevelName(level.upper())
    logging.basicConfig(level=numeric, stream=sys.stderr, format="%(message)s")
    if journal_stream_matches(sys.stderr.fileno() if hasattr(sys.stderr, "fileno") else -1):
        address = journal_socket or JOURNAL_SOCKET
        structlog.configure(
            processors=[
                structlog.contextvars.merge_contextvars,
                structlog.processors.add_log_level,
                structlog.processors.format_exc_info,
                _journal_renderer,
            ],
            wrapper_class=structlog.make_filtering_bound_logger(numeric),
            logger_factory=lambda *args: JournalLogger(address),
            cache_logger_on_first_use=True,
        )
        return
    if json_output is None:
        json_output = not sys.stderr.isatty()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if json_output
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
