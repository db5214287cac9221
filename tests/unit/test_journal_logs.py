"""Logs as native journal entries when stderr is the journal ($JOURNAL_STREAM): checked
by a process whose stderr is a file named in JOURNAL_STREAM, logging to a datagram socket
the test owns in place of /run/systemd/journal/socket."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

from nodeagent.logs import encode_native, journal_fields, journal_stream_matches

REPO = Path(__file__).resolve().parents[2]


def parse_native(data: bytes) -> dict[str, str]:
    fields = {}
    while data:
        line, _, rest = data.partition(b"\n")
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value.decode()
            data = rest
        else:
            (size,) = struct.unpack("<Q", rest[:8])
            fields[line.decode()] = rest[8:8 + size].decode()
            data = rest[8 + size + 1:]
    return fields


def test_fields_and_native_encoding():
    fields = journal_fields({"event": "container started", "level": "warning",
                             "pod": "kube-system/web-1", "pod_uid": "u1", "restarts": 3,
                             "timestamp": "x", "error": "line one\nline two"})
    assert fields["POD"] == "web-1" and fields["NAMESPACE"] == "kube-system"
    assert fields["POD_UID"] == "u1" and fields["RESTARTS"] == "3" and fields["PRIORITY"] == "4"
    assert fields["MESSAGE"].startswith("container started pod=kube-system/web-1")
    assert "TIMESTAMP" not in fields
    assert parse_native(encode_native(fields)) == fields


def test_journal_stream_must_match_the_stream(tmp_path):
    f = open(tmp_path / "out", "w")
    st = os.fstat(f.fileno())
    assert journal_stream_matches(f.fileno(), {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert not journal_stream_matches(f.fileno(), {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
    assert not journal_stream_matches(f.fileno(), {})
    f.close()


def test_process_logs_to_the_journal_socket_when_stderr_is_the_journal(tmp_path):
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(tmp_path / "journal.sock"))
    journal.settimeout(10)
    stderr_file = open(tmp_path / "stderr", "w")
    st = os.fstat(stderr_file.fileno())
    script = (
        "import structlog; from nodeagent.logs import configure_logging;"
        f"configure_logging('info', journal_socket={str(tmp_path / 'journal.sock')!r});"
        "log = structlog.get_logger('t');"
        "log.info('pod started', pod='default/web', pod_uid='abc');"
        "log.debug('hidden');"
        "log.error('sync failed', pod='db', error='boom\\nsecond line')"
    )
    env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
    res = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, stderr=stderr_file,
                         timeout=30)
    stderr_file.close()
    assert res.returncode == 0, (tmp_path / "stderr").read_text()
    first = parse_native(journal.recv(65536))
    second = parse_native(journal.recv(65536))
    journal.close()
    assert first["MESSAGE"] == "pod started pod=default/web pod_uid=abc"
    assert first["POD"] == "web" and first["NAMESPACE"] == "default" and first["PRIORITY"] == "6"
    assert first["SYSLOG_IDENTIFIER"] == "nodeagent"
    assert second["POD"] == "db" and "NAMESPACE" not in second and second["PRIORITY"] == "3"
    assert second["ERROR"] == "boom\nsecond line"
    assert (tmp_path / "stderr").read_text() == ""  # nothing went to the plain stream
