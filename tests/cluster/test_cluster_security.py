"""Cluster mode: a refused sysctl, a honoured securityContext and a termination
message, as the API sees them (kubectl, official schemas)."""

from __future__ import annotations

import pytest

from tests.cluster.test_cluster_support import (SLEEP_FOREVER, api_pod, busybox,  # noqa: F401
                                                cluster_agent_factory, cp_recording,
                                                kubectl_apply, rkubectl, schema_problems)

pytestmark = [pytest.mark.docker, pytest.mark.root]


async def test_security_refusal_and_termination_message(cp_recording, rkubectl, cluster_agent_factory):
    cp, kubectl = cp_recording, rkubectl
    agent = await cluster_agent_factory(cp)
    await agent.wait_node_ready()
    node = agent.node_name

    await kubectl_apply(kubectl, api_pod("unsafe", node, [busybox("app", SLEEP_FOREVER)],
                                         securityContext={"sysctls": [{"name": "kernel.sem", "value": "1 2 3 4"}]}))
    await kubectl_apply(kubectl, api_pod("done", node, [busybox(
        "app", "grep NoNewPrivs /proc/self/status > /dev/termination-log; id -u >> /dev/termination-log; exit 2",
        securityContext={"allowPrivilegeEscalation": False, "runAsUser": 4321})], restartPolicy="Never"))

    unsafe = await agent.wait_api_phase("unsafe", "Failed", 30)
    assert unsafe["status"]["reason"] == "SysctlForbidden"
    assert unsafe["status"]["message"].startswith('Pod was rejected: forbidden sysctl: "kernel.sem" not allowlisted')
    assert "SysctlForbidden" in (await kubectl("get", "pod", "unsafe")).stdout
    assert await agent.docker_containers(unsafe["metadata"]["uid"]) == []

    done = await agent.wait_api_phase("done", "Failed", 60)
    terminated = done["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 2
    assert terminated["message"] == "NoNewPrivs:\t1\n4321\n"

    assert schema_problems(cp) == []
