"""The test control plane keeps its CA and objects in --state-dir across restarts, so
nodes joined before a restart stay joined (their client certificates still verify,
their Node and bootstrap-token Secret are still there)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from nodeagent.kube import ApiError, KubeClient, load_kubeconfig
from nodeagent.kube import resources as R
from tests.controlplane import ControlPlane


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_restart_with_state_dir_keeps_ca_credentials_and_objects(tmp_path):
    state = tmp_path / "cp"
    port = free_port()
    cp = ControlPlane(state, port=port)
    await cp.start()
    try:
        ca_before = cp.ca.cert_pem
        node_kubeconfig = cp.make_kubeconfig("system:node:node-a", ["system:nodes"], path=tmp_path / "node.conf")
        token = cp.create_bootstrap_token()
        async with KubeClient(load_kubeconfig(node_kubeconfig)) as client:
            node = await client.create(R.NODES, {"metadata": {"name": "node-a"}})
        rv_before = int(node["metadata"]["resourceVersion"])
    finally:
        await cp.stop()

    cp2 = ControlPlane(state, port=port)
    await cp2.start()
    try:
        assert cp2.restored and cp2.ca.cert_pem == ca_before
        # The node's certificate (signed before the restart) still authenticates.
        async with KubeClient(load_kubeconfig(node_kubeconfig)) as client:
            again = await client.get(R.NODES, "node-a")
            assert again["metadata"]["uid"] == node["metadata"]["uid"]
            assert int(again["metadata"]["resourceVersion"]) == rv_before
            other = await client.create(R.NODES, {"metadata": {"name": "node-b"}})
            assert int(other["metadata"]["resourceVersion"]) > rv_before
            # History is gone: a watch from before the restart must relist (410).
            with pytest.raises(ApiError) as exc:
                async with client.watch(R.NODES, resource_version=str(rv_before - 1)) as stream:
                    async for _ in stream:
                        break
            assert exc.value.is_gone
        token_id = token.split(".")[0]
        assert cp2.object("secrets", f"bootstrap-token-{token_id}", "kube-system") is not None
        # The admin kubeconfig written before the restart still works too.
        async with KubeClient(load_kubeconfig(state / "admin.kubeconfig")) as admin:
            assert (await admin.get(R.NAMESPACES, "kube-system"))["metadata"]["name"] == "kube-system"
    finally:
        await cp2.stop()


def test_state_dir_survives_the_command_line_server(tmp_path):
    """`python -m tests.controlplane --state-dir` twice: the same CA, objects kept."""
    state = tmp_path / "cp"
    port = free_port()

    def run_once(create: str | None) -> bytes:
        proc = subprocess.Popen([sys.executable, "-m", "tests.controlplane", "--port", str(port),
                                 "--state-dir", str(state)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            kubeconfig = proc.stdout.readline().decode().strip()
            assert kubeconfig.endswith("admin.kubeconfig")
            import asyncio

            async def act():
                async with KubeClient(load_kubeconfig(kubeconfig)) as client:
                    if create:
                        await client.create(R.CONFIGMAPS, {"metadata": {"name": create, "namespace": "default"}})
                        await asyncio.sleep(1.0)  # the periodic snapshot
                    return await client.get(R.CONFIGMAPS, "first", "default")

            found = asyncio.run(act())
            assert found["metadata"]["name"] == "first"
            return (state / "ca.crt").read_bytes()
        finally:
            proc.terminate()
            proc.wait(10)

    ca1 = run_once("first")
    time.sleep(0.2)
    ca2 = run_once(None)
    assert ca1 == ca2
