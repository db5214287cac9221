"""Helpers shared by the runtime tests (fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

from runtime.docker import DockerRuntime
from runtime.types import (
    ContainerConfig,
    ContainerState,
    ContainerStatus,
    PodRef,
    SandboxConfig,
    SandboxStatus,
)

PAUSE = "nodeagent/pause:1"
BUSYBOX = "busybox:1.35"
T = TypeVar("T")


def new_pod(name: str = "web", namespace: str = "default") -> PodRef:
    return PodRef(name=name, namespace=namespace, uid=str(uuid.uuid4()))


async def run_sandbox(runtime: DockerRuntime, pod: PodRef | None = None, **config) -> SandboxStatus:
    pod = pod or new_pod()
    config.setdefault("attempt", 0)
    config.setdefault("hostname", pod.name)
    sandbox_id = await runtime.run_pod_sandbox(SandboxConfig(pod=pod, **config), PAUSE)
    [sandbox] = [s for s in await runtime.list_pod_sandboxes(pod.uid) if s.id == sandbox_id]
    return sandbox


async def run_container(
    runtime: DockerRuntime, sandbox: SandboxStatus, name: str, script: str | None = None,
    **config,
) -> str:
    config.setdefault("attempt", 0)
    config.setdefault("image", BUSYBOX)
    if script is not None:
        config["cmd"] = ["sh", "-c", script]
    container_id = await runtime.create_container(sandbox, ContainerConfig(name=name, **config))
    await runtime.start_container(container_id)
    return container_id


async def eventually(
    probe: Callable[[], Awaitable[T]], accept: Callable[[T], bool], *, timeout: float = 15.0,
    interval: float = 0.05, what: str = "condition",
) -> T:
    """Poll ``probe`` until ``accept`` holds; fail with the last value seen."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if accept(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s; last value: {value!r}")
        await asyncio.sleep(interval)


async def wait_exited(runtime: DockerRuntime, container_id: str, timeout: float = 15.0) -> ContainerStatus:
    return await eventually(
        lambda: runtime.container_status(container_id),
        lambda s: s.state == ContainerState.EXITED,
        timeout=timeout, what=f"exit of {container_id[:12]}",
    )


async def container_pid(runtime: DockerRuntime, container_id: str) -> int:
    info = await runtime.engine.call("inspect", "GET", f"containers/{container_id}/json")
    return int(info["State"]["Pid"])


async def wait_signal_disposition(
    runtime: DockerRuntime, container_id: str, signum: int, *, ignored: bool = False,
    timeout: float = 5.0,
) -> None:
    """Wait until the container's main process caught (or ignores) ``signum``.

    A shell installs its ``trap`` a moment after the container starts; a stop signal
    sent before that would hit the default disposition and make the test flaky.
    """
    pid = await container_pid(runtime, container_id)
    field = "SigIgn:" if ignored else "SigCgt:"
    deadline = time.monotonic() + timeout
    while True:
        with open(f"/proc/{pid}/status") as f:
            line = next(l for l in f if l.startswith(field))
        if int(line.split()[1], 16) & (1 << (signum - 1)):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{container_id[:12]}: signal {signum} never {field[:-1]}")
        await asyncio.sleep(0.02)
