"""The kubelet's pipelined pod start, in process against the real engine: with the
pause container slow to start, the app container is created meanwhile and started
only once the sandbox runs; when the sandbox cannot start, the sync fails, the app
container created early is never started, and the next sync replaces it."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from nodeagent.api.podspec import apply_defaults
from nodeagent.backoff import Backoff
from nodeagent.kubelet.containerconfig import NodeResources
from nodeagent.kubelet.kubelet import Kubelet
from nodeagent.kubelet.volumes import VolumeManager
from runtime.docker import DockerRuntime, StartContainerError
from tests.cluster.test_refs import HostNetworkOnly
from runtime.images import DockerImageService
from runtime.types import ContainerState, SandboxState

from .util import PAUSE

SLOW_START = 1.0


class SlowSandboxRuntime(DockerRuntime):
    """Pause containers take SLOW_START seconds to start (or fail to); every call's
    time is recorded."""

    def __init__(self, *args, fail_sandbox_start: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sandbox_ids: set[str] = set()
        self.calls: list[tuple[str, str, float]] = []
        self.fail_sandbox_start = fail_sandbox_start

    async def create_pod_sandbox(self, config, image):
        sandbox_id = await super().create_pod_sandbox(config, image)
        self.sandbox_ids.add(sandbox_id)
        return sandbox_id

    async def create_container(self, sandbox, config):
        container_id = await super().create_container(sandbox, config)
        self.calls.append(("create", config.name, time.monotonic()))
        return container_id

    async def start_container(self, container_id):
        is_sandbox = container_id in self.sandbox_ids
        if is_sandbox:
            await asyncio.sleep(SLOW_START)
            if self.fail_sandbox_start:
                self.calls.append(("start failed", "POD", time.monotonic()))
                raise StartContainerError("pause would not start (test)")
        await super().start_container(container_id)
        self.calls.append(("started", "POD" if is_sandbox else container_id, time.monotonic()))


def make_kubelet(runtime, tmp_path) -> Kubelet:
    async def sandbox_image() -> str:
        return PAUSE

    return Kubelet(
        node_name=runtime.node_name, runtime=runtime, images=DockerImageService(runtime),
        network=HostNetworkOnly(),
        volumes=VolumeManager(tmp_path / "volumes", node=NodeResources(
            cpu_millicores=2000, memory_bytes=8 << 30, ephemeral_storage_bytes=100 << 30)),
        backoff=Backoff(base=1.0, cap=8.0), pull_backoff=Backoff(base=1.0, cap=8.0),
        sandbox_image=sandbox_image, host_ip="127.0.0.1")


def host_network_pod() -> dict:
    return apply_defaults({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "pipe", "namespace": "default", "uid": str(uuid.uuid4())},
        "spec": {"hostNetwork": True, "terminationGracePeriodSeconds": 1,
                 "containers": [{"name": "app", "image": "busybox:1.35", "imagePullPolicy": "Never",
                                 "command": ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1 & wait; done"]}]}})


@pytest.fixture
def slow_runtime(make_node_name):
    made: list[DockerRuntime] = []

    def make(**kwargs) -> SlowSandboxRuntime:
        runtime = SlowSandboxRuntime(make_node_name(), **kwargs)
        made.append(runtime)
        return runtime

    yield make


async def test_the_app_is_created_while_the_sandbox_starts(slow_runtime, tmp_path):
    runtime = slow_runtime()
    kubelet = make_kubelet(runtime, tmp_path)
    pod = host_network_pod()
    kubelet.set_desired(pod)
    began = time.monotonic()
    try:
        await kubelet.sync_pod(pod)
        [(_, _, created_at)] = [c for c in runtime.calls if c[0] == "create"]
        [(_, _, pause_at)] = [c for c in runtime.calls if c[:2] == ("started", "POD")]
        [app_at] = [c[2] for c in runtime.calls if c[0] == "started" and c[1] != "POD"]
        assert created_at - began < SLOW_START * 0.8, "the app waited for the sandbox to be created *and* started"
        assert created_at < pause_at < app_at
        sandboxes, containers = await runtime.list_pod(pod["metadata"]["uid"])
        assert [s.state for s in sandboxes] == [SandboxState.READY]
        assert [c.state for c in containers] == [ContainerState.RUNNING]
        assert kubelet.pods[pod["metadata"]["uid"]].status["phase"] == "Running"
    finally:
        await kubelet.terminate_pod(pod["metadata"]["uid"], pod)
        await runtime.close()


async def test_a_sandbox_that_fails_to_start_leaves_no_started_container(slow_runtime, tmp_path):
    runtime = slow_runtime(fail_sandbox_start=True)
    kubelet = make_kubelet(runtime, tmp_path)
    pod = host_network_pod()
    uid = pod["metadata"]["uid"]
    kubelet.set_desired(pod)
    try:
        with pytest.raises(StartContainerError):
            await kubelet.sync_pod(pod)
        sandboxes, containers = await runtime.list_pod(uid)
        assert [c.state for c in containers] == [ContainerState.CREATED]  # created early, never started
        waiting = kubelet.pods[uid].status["containerStatuses"][0]["state"]["waiting"]
        assert waiting["reason"] == "ContainerCreating" and "failed to create pod sandbox" in waiting["message"]

        runtime.fail_sandbox_start = False
        await kubelet.sync_pod(pod)  # the worker's retry
        sandboxes, containers = await runtime.list_pod(uid)
        assert [c.state for c in containers] == [ContainerState.RUNNING]
        assert len([s for s in sandboxes if s.state == SandboxState.READY]) == 1
    finally:
        await kubelet.terminate_pod(uid, pod)
        assert await runtime.list_pod(uid) == ([], [])
        await runtime.close()
