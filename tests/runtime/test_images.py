"""Image presence, pull policies, pulls from a local registry, and the pause image build."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid

import pytest

from runtime.docker import DockerRuntime
from runtime.engine import iter_json_lines, stream_error
from runtime.images import DockerImageService, RegistryAuth
from runtime.pause_image import ensure_pause_image
from runtime.types import (
    ImageNeverPull,
    ImagePullError,
    InvalidImageName,
    NotFound,
    PullPolicy,
)
from tests.registry import free_port as _free_port, running_registry
from tests.runtime.util import BUSYBOX, run_container, run_sandbox, wait_exited

pytestmark = pytest.mark.docker



@pytest.fixture
def local_registry(request):
    """A registry on 127.0.0.1:<free port> with temp storage (tests/registry.py);
    param: credentials or None."""
    with running_registry(credentials=getattr(request, "param", None)) as registry:
        yield registry.host


async def _push(runtime: DockerRuntime, source: str, repo: str, tag: str,
                auth: RegistryAuth | None, registry: str) -> None:
    await runtime.engine.call("tag", "POST", f"images/{source}/tag",
                              params={"repo": repo, "tag": tag})
    headers = {"X-Registry-Auth": (auth.header(registry) if auth else
                                   base64.urlsafe_b64encode(b"{}").decode())}
    response = await runtime.engine.open_stream("push", "POST", f"images/{repo}/push",
                                                params={"tag": tag}, headers=headers)
    try:
        async for message in iter_json_lines(response, "push"):
            assert stream_error(message) is None, message
    finally:
        response.close()


async def _untag_everything_for(runtime: DockerRuntime, repo: str) -> None:
    """Drop our tag and the repo digest the pull/push added to the shared busybox image."""
    info = await runtime.engine.call("inspect", "GET", f"images/{BUSYBOX}/json")
    refs = [r for r in info.get("RepoTags", []) + info.get("RepoDigests", [])
            if r.startswith(repo + ":") or r.startswith(repo + "@")]
    for ref in refs:
        await runtime.engine.call("untag", "DELETE", f"images/{ref}", params={"noprune": "1"},
                                  ok_statuses=(404, 409))


async def test_never_pull_and_if_not_present(images):
    absent = f"nodeagent-test/absent-{uuid.uuid4().hex[:8]}:1"
    with pytest.raises(ImageNeverPull) as raised:
        await images.ensure_image(absent, PullPolicy.NEVER)
    assert str(raised.value) == f'Container image "{absent}" is not present with pull policy of Never'
    assert raised.value.reason == "ErrImageNeverPull"
    assert await images.image_present(absent) is None

    present = await images.image_present(BUSYBOX)
    assert present is not None and present.startswith("sha256:")
    assert await images.ensure_image(BUSYBOX, PullPolicy.NEVER) == present
    assert await images.ensure_image(BUSYBOX, PullPolicy.IF_NOT_PRESENT) == present
    # Docker's normalized spelling names the same image.
    assert await images.image_present("docker.io/library/busybox:1.35") == present


@pytest.mark.parametrize("bad", [
    "Busybox:1.35", "busybox:", "busybox@sha256:1234", "busy box", "", "-x/y", "a//b",
    "busybox:" + "t" * 129, "registry.example.com:port/x",
])
async def test_invalid_image_names(images, bad):
    for call in (images.ensure_image(bad, PullPolicy.IF_NOT_PRESENT),
                 images.ensure_image(bad, PullPolicy.NEVER), images.image_present(bad)):
        with pytest.raises(InvalidImageName) as raised:
            await call
        assert raised.value.reason == "InvalidImageName"


async def test_pull_failure_is_an_image_pull_error(images):
    port = _free_port()  # nothing listens there
    with pytest.raises(ImagePullError) as raised:
        await images.ensure_image(f"127.0.0.1:{port}/nothing/here:1", PullPolicy.IF_NOT_PRESENT)
    assert raised.value.reason == "ErrImagePull"
    assert f"127.0.0.1:{port}/nothing/here:1" in str(raised.value)


async def test_pull_from_a_local_registry(runtime, images, local_registry):
    repo = f"{local_registry}/busybox"
    reference = f"{repo}:pulltest"
    await _push(runtime, BUSYBOX, repo, "pulltest", None, local_registry)
    try:
        await runtime.engine.call("untag", "DELETE", f"images/{reference}", params={"noprune": "1"})
        assert await images.image_present(reference) is None
        with pytest.raises(ImageNeverPull):
            await images.ensure_image(reference, PullPolicy.NEVER)

        # Concurrent requests share one pull.
        ids = await asyncio.gather(*(images.ensure_image(reference, PullPolicy.ALWAYS)
                                     for _ in range(5)))
        busybox_id = await images.image_present(BUSYBOX)
        assert set(ids) == {busybox_id}
        assert await images.image_present(reference) == busybox_id

        # A container of the pulled image reports the pullable digest as its image ID.
        sandbox = await run_sandbox(runtime)
        container_id = await run_container(runtime, sandbox, "pulled", "exit 0", image=reference)
        status = await wait_exited(runtime, container_id)
        assert status.image == reference
        assert status.image_id.startswith(f"docker-pullable://{repo}@sha256:")

        with pytest.raises(ImagePullError, match="not found|unknown"):
            await images.ensure_image(f"{repo}:no-such-tag", PullPolicy.IF_NOT_PRESENT)
    finally:
        await _untag_everything_for(runtime, repo)


@pytest.mark.parametrize("local_registry", [("puller", "s3cret-pass")], indirect=True)
async def test_pull_with_registry_credentials(runtime, images, local_registry):
    repo = f"{local_registry}/private/busybox"
    reference = f"{repo}:authtest"
    auth = RegistryAuth(username="puller", password="s3cret-pass")
    await _push(runtime, BUSYBOX, repo, "authtest", auth, local_registry)
    try:
        await runtime.engine.call("untag", "DELETE", f"images/{reference}", params={"noprune": "1"})
        with pytest.raises(ImagePullError, match="(?i)auth|denied|credentials"):
            await images.ensure_image(reference, PullPolicy.ALWAYS)
        wrong = RegistryAuth(username="puller", password="wrong")
        with pytest.raises(ImagePullError):
            await images.ensure_image(reference, PullPolicy.ALWAYS, auth=wrong)
        with_auth = DockerImageService(runtime, pull_timeout=60.0, auths={local_registry: auth})
        assert await with_auth.ensure_image(reference, PullPolicy.ALWAYS) == \
            await images.image_present(BUSYBOX)
    finally:
        await _untag_everything_for(runtime, repo)


async def test_pause_image_is_built_when_missing(runtime):
    image = f"nodeagent-test/pause:{uuid.uuid4().hex[:10]}"
    try:
        image_id = await ensure_pause_image(runtime.docker, image)
        info = await runtime.engine.call("inspect", "GET", f"images/{image}/json")
        assert info["Id"] == image_id
        assert info["Config"]["Entrypoint"] == ["/pause"]
        assert len(info["RootFS"]["Layers"]) == 1
        assert info["Size"] < 2 * 1024 * 1024  # one static binary, nothing else
        # Present now: no rebuild, same ID.
        assert await ensure_pause_image(runtime.docker, image) == image_id
    finally:
        await runtime.engine.call("rmi", "DELETE", f"images/{image}", ok_statuses=(404, 409))
    with pytest.raises(NotFound):
        await runtime.engine.call("inspect", "GET", f"images/{image}/json")


async def test_pull_has_its_own_deadline(runtime):
    """A registry that accepts and never answers: the pull gives up at pull_timeout."""
    connected = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connected.set()
        writers.append(writer)
        await reader.read()  # until Docker gives up (or we close below)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        # call_timeout stays large: the pull's own deadline is what must fire.
        images = DockerImageService(runtime, pull_timeout=1.5)
        started = time.monotonic()
        with pytest.raises(ImagePullError, match="within 1.5s"):
            await images.ensure_image(f"127.0.0.1:{port}/silent/app:1", PullPolicy.IF_NOT_PRESENT)
        assert 1.4 <= time.monotonic() - started < 4
        assert connected.is_set(), "Docker never reached the fake registry"
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()


async def test_parallel_pull_limit_serializes_different_images(runtime):
    """max_parallel_pulls=1 (kubelet's serializeImagePulls): a second image's pull does
    not reach its registry until the first pull has finished."""
    connected: dict[int, float] = {}
    writers: list[asyncio.StreamWriter] = []

    def silent_on(port_box: list[int]):
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connected.setdefault(port_box[0], time.monotonic())
            writers.append(writer)
            await reader.read()
        return silent

    boxes: list[list[int]] = [[0], [0]]
    servers = [await asyncio.start_server(silent_on(box), "127.0.0.1", 0) for box in boxes]
    for box, server in zip(boxes, servers):
        box[0] = server.sockets[0].getsockname()[1]
    try:
        images = DockerImageService(runtime, pull_timeout=2.0, max_parallel_pulls=1)
        started = time.monotonic()
        results = await asyncio.gather(
            *(images.ensure_image(f"127.0.0.1:{box[0]}/silent/app:{i}", PullPolicy.IF_NOT_PRESENT)
              for i, box in enumerate(boxes)),
            return_exceptions=True)
        assert all(isinstance(r, ImagePullError) for r in results), results
        first, second = sorted(connected.values())
        assert first - started < 1.9
        # The second registry was reached only after the first pull gave up (2 s).
        assert second - started >= 1.9, (first - started, second - started)
    finally:
        for server in servers:
            server.close()
        for writer in writers:
            writer.close()
        for server in servers:
            await server.wait_closed()


async def test_pull_reports_size_and_node_image_list(runtime, images, local_registry):
    repo = f"{local_registry}/info/busybox"
    await _push(runtime, BUSYBOX, repo, "info", None, local_registry)
    try:
        await runtime.engine.call("untag", "DELETE", f"images/{repo}:info", params={"noprune": "1"})
        await images.ensure_image(f"{repo}:info", PullPolicy.ALWAYS)
        info = images.last_pull[f"{repo}:info"]
        busybox = await runtime.engine.call("inspect", "GET", f"images/{BUSYBOX}/json")
        assert info.size_bytes == busybox["Size"] > 0
        assert 0 < info.seconds <= info.seconds_with_wait
        listed = await images.list_images()
        entry = next(i for i in listed if f"{repo}:info" in i["names"])
        assert entry["sizeBytes"] == busybox["Size"]
        assert any(n.startswith(f"{repo}@sha256:") for n in entry["names"])  # digests first
        assert entry["names"].index(f"{repo}:info") > 0
        sizes = [i["sizeBytes"] for i in listed]
        assert sizes == sorted(sizes, reverse=True) and len(listed) <= 50
    finally:
        await _untag_everything_for(runtime, repo)
