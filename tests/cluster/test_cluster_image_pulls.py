"""Cluster mode pulls: a pod's imagePullSecrets (created with real `kubectl create
secret docker-registry`) authenticate its pull from a private registry; a missing pull
secret is reported as kubelet does and the pull fails on its own; the Node reports its
images in status.images. Every object the agent wrote is schema-checked."""

from __future__ import annotations

import subprocess

import pytest

from tests.cluster.test_cluster_support import (SLEEP_FOREVER, api_pod, busybox,  # noqa: F401
                                                cluster_agent_factory, cp_recording,
                                                kubectl_apply, rkubectl, schema_problems)
from tests.registry import running_registry, untag

pytestmark = [pytest.mark.docker, pytest.mark.root]

USER, PASSWORD = "cluster-puller", "cluster-pull-s3cret"


async def test_image_pull_secrets_and_node_images(cp_recording, rkubectl, cluster_agent_factory):
    cp, kubectl = cp_recording, rkubectl
    with running_registry(credentials=(USER, PASSWORD)) as registry:
        image = f"{registry.host}/private/busybox:cluster"
        try:
            registry.push("busybox:1.35", "private/busybox", "cluster")
            agent = await cluster_agent_factory(cp)
            await agent.wait_node_ready()
            await kubectl("create", "secret", "docker-registry", "regcred",
                          f"--docker-server={registry.host}", f"--docker-username={USER}",
                          f"--docker-password={PASSWORD}")
            container = busybox("app", SLEEP_FOREVER, image=image, imagePullPolicy="Always")
            await kubectl_apply(kubectl, api_pod("private", agent.node_name, [container],
                                                 imagePullSecrets=[{"name": "regcred"}]))
            await kubectl_apply(kubectl, api_pod("nosecret", agent.node_name, [dict(container)],
                                                 imagePullSecrets=[{"name": "absent"}]))
            running = await agent.wait_api_running_ready("private", 90)
            (cs,) = running["status"]["containerStatuses"]
            assert cs["imageID"].startswith(f"docker-pullable://{registry.host}/private/busybox@sha256:")
            # In-cluster clients find the API through the master Service's variables.
            env = subprocess.run(["docker", "exec", cs["containerID"].removeprefix("docker://"), "env"],
                                 capture_output=True, text=True, timeout=30).stdout.splitlines()
            assert "KUBERNETES_SERVICE_HOST=10.96.0.1" in env and "KUBERNETES_SERVICE_PORT=443" in env
            assert "KUBERNETES_PORT=tcp://10.96.0.1:443" in env

            def events(pod: str) -> list[dict]:
                return [e for e in cp.objects("events", "default")
                        if e["involvedObject"].get("name") == pod]

            await agent.wait("Pulled event", lambda: any(
                e["reason"] == "Pulled" and "Image size:" in e["message"] for e in events("private")), 20)

            # The missing secret is said; the anonymous pull then fails on its own.
            await agent.wait("FailedToRetrieveImagePullSecret", lambda: any(
                e["reason"] == "FailedToRetrieveImagePullSecret" and "absent" in e["message"]
                for e in events("nosecret")), 60)

            def waiting_reason():
                pod = agent.api_pod("nosecret") or {}
                statuses = (pod.get("status") or {}).get("containerStatuses") or []
                return statuses and (statuses[0]["state"].get("waiting") or {}).get("reason")
            assert await agent.wait("pull refused", lambda: waiting_reason() in
                                    ("ErrImagePull", "ImagePullBackOff"), 60)

            # status.images: names (digests first) and sizes, largest first, at most 50.
            def node_images():
                return ((agent.node_object() or {}).get("status") or {}).get("images") or []
            await agent.wait("status.images", lambda: any(
                "busybox:1.35" in i["names"] for i in node_images()), 30)
            images = node_images()
            assert len(images) <= 50
            assert [i["sizeBytes"] for i in images] == sorted((i["sizeBytes"] for i in images), reverse=True)
            assert schema_problems(cp) == []
        finally:
            untag(image)
