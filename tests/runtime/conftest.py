"""Fixtures for the Docker runtime shim tests.

Every test gets its own node name; everything created under it (label
io.nodeagent.node) is removed afterwards, whatever the test left behind.
"""

from __future__ import annotations

import asyncio
import subprocess
import uuid

import pytest

from runtime.docker import DockerRuntime
from runtime.images import DockerImageService
from runtime.labels import NODE
from runtime.pause_image import PAUSE_IMAGE, ensure_pause_image
from runtime.engine import close_docker_client, make_docker_client


def remove_node_objects(node: str) -> None:
    listed = subprocess.run(
        ["docker", "ps", "-aq", "--no-trunc", "--filter", f"label={NODE}={node}"],
        capture_output=True, text=True, timeout=60,
    )
    ids = listed.stdout.split()
    if ids:
        subprocess.run(["docker", "rm", "-f", "-v", *ids], capture_output=True, timeout=120)


@pytest.fixture(scope="session", autouse=True)
def pause_image_built():
    """The suite's sandbox image (setup.sh builds it too; this keeps the tests self-sufficient)."""

    async def build() -> str:
        docker = make_docker_client()
        try:
            return await ensure_pause_image(docker, PAUSE_IMAGE)
        finally:
            await close_docker_client(docker)

    try:
        return asyncio.run(build())
    except Exception as exc:  # reported by the docker-marked tests' environment check
        return exc


@pytest.fixture
def make_node_name():
    names: list[str] = []

    def make(prefix: str = "rtest") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        names.append(name)
        return name

    yield make
    for name in names:
        remove_node_objects(name)


@pytest.fixture
def node_name(make_node_name) -> str:
    return make_node_name()


@pytest.fixture
async def runtime(node_name):
    rt = DockerRuntime(node_name, call_timeout=20.0)
    yield rt
    await rt.close()


@pytest.fixture
async def make_runtime(make_node_name):
    """Extra runtimes (another node, or a fresh instance of the same node)."""
    runtimes: list[DockerRuntime] = []

    def make(node: str | None = None, **kwargs) -> DockerRuntime:
        rt = DockerRuntime(node or make_node_name(), **kwargs)
        runtimes.append(rt)
        return rt

    yield make
    for rt in runtimes:
        await rt.close()


@pytest.fixture
async def images(runtime):
    return DockerImageService(runtime, pull_timeout=60.0)
