"""Pulls from a real registry through the agent: the node's credential file, TLS,
one pull shared by many pods, ErrImagePull and ImagePullBackOff with the back-off
shape, and kubelet's digest imageID. The registry is Debian's docker-registry on
127.0.0.1 (tests/registry.py)."""

from __future__ import annotations

import base64
import datetime
import json

import pytest

from tests.e2e.conftest import pod_manifest
from tests.registry import running_registry, untag

pytestmark = [pytest.mark.docker, pytest.mark.root]

USER, PASSWORD = "puller", "s3cret-pull-pass"


def _credential_file(path, host: str, password: str) -> None:
    token = base64.b64encode(f"{USER}:{password}".encode()).decode()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"auths": {host: {"auth": token}}}))
    tmp.replace(path)


def _pull_times(agent, image: str) -> list[float]:
    return [datetime.datetime.fromisoformat(r["timestamp"]).timestamp()
            for r in agent.log_records()
            if r.get("event") == "pulling image" and r.get("image") == image]


def _waiting(agent, name: str) -> tuple[str, str] | None:
    pod = agent.pod(name)
    statuses = (pod or {}).get("status", {}).get("containerStatuses") or []
    waiting = statuses[0]["state"].get("waiting") if statuses else None
    return (waiting["reason"], waiting.get("message", "")) if waiting else None


def test_private_tls_registry_with_the_node_credential_file(agent_factory, tmp_path):
    with running_registry(credentials=(USER, PASSWORD), tls=True) as registry:
        image = f"{registry.host}/team/busybox:e2e"
        other = f"{registry.host}/team/busybox:other"
        agent = None
        try:
            registry.push("busybox:1.35", "team/busybox", "e2e")
            registry.push("busybox:1.35", "team/busybox", "other")
            creds = tmp_path / "registry-credentials.json"
            _credential_file(creds, registry.host, PASSWORD)
            agent = agent_factory(extra_config={"image-credential-file": str(creds),
                                                "max-parallel-image-pulls": 1})
            sleeper = {"name": "app", "image": image, "imagePullPolicy": "IfNotPresent",
                       "command": ["sh", "-c", "while true; do sleep 1; done"]}
            for i in range(3):
                agent.write(f"p{i}.yaml", pod_manifest(f"shared{i}", [dict(sleeper)],
                                                       terminationGracePeriodSeconds=1))
            for i in range(3):
                pod = agent.wait_phase(f"shared{i}", "Running", timeout=90)
            # Three pods, one image: pulled once.
            assert len(_pull_times(agent, image)) == 1
            status = pod["status"]["containerStatuses"][0]
            assert status["image"] == image
            assert status["imageID"].startswith(f"docker-pullable://{registry.host}/team/busybox@sha256:")

            # A tag the registry does not have: ErrImagePull, then ImagePullBackOff.
            missing = f"{registry.host}/team/busybox:no-such-tag"
            agent.write("missing.yaml", pod_manifest("missing", [dict(sleeper, image=missing)]))
            reason, message = agent.wait_for("ErrImagePull", lambda: (w := _waiting(agent, "missing"))
                                             and w[0] == "ErrImagePull" and w, timeout=60)
            assert "no-such-tag" in message and "not found" in message.lower()
            agent.wait_for("ImagePullBackOff",
                           lambda: (w := _waiting(agent, "missing")) and w[0] == "ImagePullBackOff", timeout=30)

            # Wrong credentials: the registry's refusal is the message, and the retries
            # back off 1 s, 2 s, 4 s (backoff-base 1 in the test config).
            _credential_file(creds, registry.host, "wrong-password")
            agent.write("denied.yaml", pod_manifest("denied", [dict(sleeper, image=other,
                                                                    imagePullPolicy="Always")]))
            reason, message = agent.wait_for("denied pull", lambda: (w := _waiting(agent, "denied"))
                                             and w[0] in ("ErrImagePull", "ImagePullBackOff")
                                             and "Failed" in w[1] and w, timeout=60)
            agent.wait_for("four pull attempts", lambda: len(_pull_times(agent, other)) >= 4, timeout=40)
            times = _pull_times(agent, other)
            gaps = [b - a for a, b in zip(times, times[1:])][:3]
            assert gaps[0] >= 0.9 and gaps[1] >= 1.8 and gaps[2] >= 3.6, gaps
            assert gaps[2] > gaps[1] > gaps[0], gaps
            log = agent.log_path.read_text()
            assert "unauthorized" in log.lower() or "authentication required" in log.lower()
            assert "wrong-password" not in log and PASSWORD not in log  # never logged

            # Fixed credentials: the next retry succeeds without touching the pod.
            _credential_file(creds, registry.host, PASSWORD)
            agent.wait_phase("denied", "Running", timeout=60)
        finally:
            if agent is not None:
                agent.stop()
            for ref in (image, other):
                untag(ref)
