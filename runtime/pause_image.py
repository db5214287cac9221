"""The pod sandbox image, built locally from ``runtime/pause/pause.c``.

No registry is needed: when the image is missing, the pause program is compiled
statically (``cc -static -Os``), packed alone as ``/pause`` into a tar, and imported
through the Docker API with ``ENTRYPOINT ["/pause"]``.

    python -m runtime.pause_image [--image NAME] [--docker-url URL] [--rebuild]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import aiodocker
import structlog

from runtime.engine import Engine, close_docker_client, iter_json_lines, make_docker_client, stream_error
from runtime.imageref import parse_image_ref
from runtime.types import NotFound, RuntimeError_

log = structlog.get_logger(__name__)

PAUSE_IMAGE = "nodeagent/pause:1"
PAUSE_SOURCE = Path(__file__).resolve().parent / "pause" / "pause.c"
_COMPILE_TIMEOUT = 120.0
_IMPORT_TIMEOUT = 120.0


class PauseImageError(RuntimeError_):
    """The pause image is missing and could not be built."""


def build_pause_binary(out_path: Path, *, cc: str | None = None,
                       source: Path = PAUSE_SOURCE) -> Path:
    """Compile pause.c statically into ``out_path`` (blocking; run it in a thread)."""
    compiler = cc or os.environ.get("CC") or "cc"
    compiler_path = shutil.which(compiler)
    if compiler_path is None:
        raise PauseImageError(
            f"cannot build the pause image: C compiler {compiler!r} not found on PATH "
            "(install gcc and libc6-dev, which provides the static libc)"
        )
    if not source.is_file():
        raise PauseImageError(f"cannot build the pause image: source {source} is missing")
    command = [compiler_path, "-static", "-Os", "-s", "-o", str(out_path), str(source)]
    try:
        result = subprocess.run(command, capture_output=True, text=True,
                                timeout=_COMPILE_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise PauseImageError(f"compiling {source.name} took over {_COMPILE_TIMEOUT:g}s") from None
    if result.returncode != 0:
        stderr = result.stderr.strip()
        if "cannot find -lc" in stderr or "crt1.o" in stderr or ("No such file" in stderr and ".h" in stderr):
            raise PauseImageError(
                "cannot build the pause image: no static C library for "
                f"{compiler} (install libc6-dev, which provides libc.a): {stderr[-500:]}"
            )
        raise PauseImageError(
            f"cannot build the pause image: {' '.join(command)} failed "
            f"(exit {result.returncode}): {stderr[-1000:]}"
        )
    return out_path


def pause_rootfs_tar(binary: Path) -> bytes:
    """A tar holding only ``/pause`` (root-owned, 0755)."""
    buffer = io.BytesIO()
    data = binary.read_bytes()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("pause")
        info.size = len(data)
        info.mode = 0o755
        info.mtime = int(time.time())
        info.uid = info.gid = 0
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _build_tar(cc: str | None) -> bytes:
    with tempfile.TemporaryDirectory(prefix="nodeagent-pause-") as tmp:
        binary = build_pause_binary(Path(tmp) / "pause", cc=cc)
        return pause_rootfs_tar(binary)


async def ensure_pause_image(
    docker: aiodocker.Docker,
    image: str = PAUSE_IMAGE,
    *,
    rebuild: bool = False,
    cc: str | None = None,
) -> str:
    """The image ID of ``image``, building and importing it first when missing."""
    ref = parse_image_ref(image)
    engine = Engine(client=docker, call_timeout=30.0)
    if not rebuild:
        try:
            info = await engine.inspect_image(f"inspect image {image}", image)
            return str(info["Id"])
        except NotFound:
            pass
    log.info("building pause image", image=image, source=str(PAUSE_SOURCE))
    tar_bytes = await asyncio.to_thread(_build_tar, cc)
    tag = ref.tag or ("latest" if ref.digest is None else None)
    if tag is None:
        raise PauseImageError(f"pause image {image!r} must be named by tag, not digest")
    what = f"import pause image {image}"
    params = {"fromSrc": "-", "repo": ref.name, "tag": tag, "changes": 'ENTRYPOINT ["/pause"]'}
    async with asyncio.timeout(_IMPORT_TIMEOUT):
        response = await engine.open_stream(
            what, "POST", "images/create", params=params, data=tar_bytes,
            headers={"Content-Type": "application/x-tar"}, timeout=_IMPORT_TIMEOUT,
        )
        try:
            async for message in iter_json_lines(response, what):
                error = stream_error(message)
                if error:
                    raise PauseImageError(f"{what}: {error}")
        finally:
            response.close()
    info = await engine.inspect_image(f"inspect image {image}", image)
    log.info("pause image imported", image=image, image_id=info["Id"])
    return str(info["Id"])


async def _main(image: str, docker_url: str | None, rebuild: bool) -> str:
    docker = make_docker_client(docker_url)
    try:
        return await ensure_pause_image(docker, image, rebuild=rebuild)
    finally:
        await close_docker_client(docker)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.pause_image",
                                     description="Build and import the pod sandbox image.")
    parser.add_argument("--image", default=PAUSE_IMAGE, help=f"image name (default {PAUSE_IMAGE})")
    parser.add_argument("--docker-url", default=None, help="unix:///var/run/docker.sock by default")
    parser.add_argument("--rebuild", action="store_true", help="build even when the image exists")
    args = parser.parse_args(argv)
    try:
        image_id = asyncio.run(_main(args.image, args.docker_url, args.rebuild))
    except RuntimeError_ as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.image} {image_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
