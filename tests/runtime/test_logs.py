"""runtime.logs.read_logs against real containers: stdout+stderr, TTY, tail,
since, limit_bytes, follow, other nodes' containers, and the runAsNonRoot check."""

from __future__ import annotations

import asyncio
import time

import pytest

from runtime.logs import read_logs, tail_text
from runtime.types import ContainerConfigRefused, ContainerConfig, NotFound
from tests.runtime.util import run_container, run_sandbox, wait_exited

pytestmark = pytest.mark.docker


async def _read(runtime, cid, **kw) -> bytes:
    return b"".join([piece async for piece in read_logs(runtime, cid, **kw)])


async def test_read_logs_options(runtime, make_runtime):
    sandbox = await run_sandbox(runtime)
    cid = await run_container(runtime, sandbox, "c", "echo out1; echo err1 >&2; sleep 1; echo out2; echo late")
    await wait_exited(runtime, cid)
    # stdout and stderr are separate pipes: their relative order is not fixed.
    assert sorted((await _read(runtime, cid)).split()) == [b"err1", b"late", b"out1", b"out2"]
    assert (await _read(runtime, cid)).endswith(b"out2\nlate\n")
    assert await _read(runtime, cid, tail=2) == b"out2\nlate\n"
    assert await _read(runtime, cid, tail=2, limit_bytes=6) == b"out2\nl"
    stamped = (await _read(runtime, cid, timestamps=True)).decode().splitlines()
    assert sorted(line.split(" ", 1)[1] for line in stamped) == ["err1", "late", "out1", "out2"]
    assert all(line.split(" ", 1)[0].endswith("Z") for line in stamped)
    assert await tail_text(runtime, cid, lines=80, max_bytes=5) == "late\n"
    status = await runtime.container_status(cid)
    assert await _read(runtime, cid, since=status.finished_at - 0.5) == b"out2\nlate\n"

    tty = await run_container(runtime, sandbox, "t", "printf 'a\\nb\\n'", attempt=0, tty=True)
    await wait_exited(runtime, tty)
    assert (await _read(runtime, tty)).replace(b"\r", b"") == b"a\nb\n"

    other = make_runtime()
    with pytest.raises(NotFound):
        await _read(other, cid)


async def test_follow_ends_when_the_container_stops(runtime):
    sandbox = await run_sandbox(runtime)
    cid = await run_container(runtime, sandbox, "f", "echo one; sleep 1; echo two")
    started = time.monotonic()
    got = await asyncio.wait_for(_read(runtime, cid, follow=True), 15)
    assert got == b"one\ntwo\n" and time.monotonic() - started >= 0.5


async def test_run_as_non_root_checks_the_image_user(runtime):
    sandbox = await run_sandbox(runtime)
    with pytest.raises(ContainerConfigRefused, match="image will run as root"):
        await runtime.create_container(sandbox, ContainerConfig(name="r", image="busybox:1.35", attempt=0,
                                                                run_as_non_root=True))
    cid = await run_container(runtime, sandbox, "ok", "id -u", run_as_non_root=True, run_as_user=1234)
    await wait_exited(runtime, cid)
    assert await _read(runtime, cid) == b"1234\n"
