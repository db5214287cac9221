"""Pure-Python parts of the runtime shim (no Docker needed)."""

from __future__ import annotations

import io
import os
import signal
import stat
import subprocess
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from runtime.docker import DockerRuntime, _matching_digest, container_name, sandbox_name
from runtime.imageref import normalize, parse_image_ref
from runtime.pause_image import PauseImageError, build_pause_binary, pause_rootfs_tar
from runtime.timeutil import parse_docker_time
from runtime.types import InvalidImageName, NotFound, PodRef


# --- timestamps -------------------------------------------------------------------------

def test_parse_docker_time_keeps_nanoseconds_and_offsets():
    base = datetime(2024, 5, 1, 10, 0, 0, tzinfo=timezone.utc).timestamp()
    assert parse_docker_time("2024-05-01T10:00:00.123456789Z") == pytest.approx(base + 0.123456789, abs=1e-9)
    assert parse_docker_time("2024-05-01T10:00:00Z") == base
    assert parse_docker_time("2024-05-01T12:00:00.5+02:00") == base + 0.5
    assert parse_docker_time("0001-01-01T00:00:00Z") is None
    assert parse_docker_time("") is None and parse_docker_time(None) is None
    with pytest.raises(ValueError):
        parse_docker_time("yesterday")


# --- image references -------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("busybox", "docker.io/library/busybox:latest"),
    ("busybox:1.35", "docker.io/library/busybox:1.35"),
    ("library/busybox", "docker.io/library/busybox:latest"),
    ("index.docker.io/foo/bar:1", "docker.io/foo/bar:1"),
    ("127.0.0.1:5000/busybox:pulltest", "127.0.0.1:5000/busybox:pulltest"),
    ("localhost/app", "localhost/app:latest"),
    ("gcr.io/a/b/c:v1.2-rc_3", "gcr.io/a/b/c:v1.2-rc_3"),
    ("[::1]:5000/x:y", "[::1]:5000/x:y"),
    ("x@sha256:" + "a" * 64, "docker.io/library/x@sha256:" + "a" * 64),
])
def test_normalize(text, expected):
    assert normalize(text) == expected


@pytest.mark.parametrize("text", [
    "", "Busybox", "a/B/c", "busybox:", ":tag", "x@sha256:abc", "x@md5:" + "a" * 32,
    "with space", "a//b", "-a", "a-", "a__-b", "host:port/x", "f" * 64, "x:" + "t" * 129,
    "a" * 256,
])
def test_invalid_references(text):
    with pytest.raises(InvalidImageName):
        parse_image_ref(text)


def test_pull_reference_prefers_the_digest():
    digest = "sha256:" + "b" * 64
    assert parse_image_ref(f"repo/app:1.0@{digest}").pull_reference() == f"docker.io/repo/app@{digest}"


def test_matching_repo_digest():
    digests = ["other.io/x@sha256:" + "1" * 64, "busybox@sha256:" + "2" * 64]
    assert _matching_digest(digests, "docker.io/library/busybox:1.35") == digests[1]
    assert _matching_digest(digests, "unrelated:1") == digests[0]


# --- naming -----------------------------------------------------------------------------

def test_docker_names():
    pod = PodRef("web", "prod", "1234-abcd")
    assert sandbox_name(pod, 0) == "k8s_POD_web_prod_1234-abcd_0"
    assert container_name(pod, "nginx", 3) == "k8s_nginx_web_prod_1234-abcd_3"


def test_user_strings():
    assert DockerRuntime._user(None, None) is None
    assert DockerRuntime._user(1000, None) == "1000"
    assert DockerRuntime._user(1000, 2000) == "1000:2000"
    assert DockerRuntime._user(None, 2000) == ":2000"


def test_runtime_rejects_an_empty_node_name():
    with pytest.raises(ValueError, match="node_name"):
        DockerRuntime("")


# --- pause image build ------------------------------------------------------------------

def test_missing_compiler_is_named(tmp_path):
    with pytest.raises(PauseImageError, match="/no/such/cc.*not found"):
        build_pause_binary(tmp_path / "pause", cc="/no/such/cc")


def test_missing_static_libc_is_named(tmp_path):
    fake_cc = tmp_path / "fake-cc"
    fake_cc.write_text("#!/bin/sh\necho '/usr/bin/ld: cannot find -lc: No such file' >&2\nexit 1\n")
    fake_cc.chmod(0o755)
    with pytest.raises(PauseImageError, match="libc6-dev"):
        build_pause_binary(tmp_path / "pause", cc=str(fake_cc))


def test_pause_rootfs_holds_only_the_binary(tmp_path):
    binary = build_pause_binary(tmp_path / "pause")
    assert os.stat(binary).st_mode & stat.S_IXUSR
    with tarfile.open(fileobj=io.BytesIO(pause_rootfs_tar(binary))) as tar:
        [member] = tar.getmembers()
        assert (member.name, member.mode, member.uid, member.size) == (
            "pause", 0o755, 0, binary.stat().st_size)


def test_pause_binary_exits_0_on_sigterm_and_sigint(tmp_path):
    binary = build_pause_binary(tmp_path / "pause")
    for sig in (signal.SIGTERM, signal.SIGINT):
        process = subprocess.Popen([str(binary)])
        time.sleep(0.1)
        assert process.poll() is None, "pause must keep running"
        process.send_signal(sig)
        assert process.wait(5) == 0
