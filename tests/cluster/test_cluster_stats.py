"""Stats, metrics, the status page and `nodeagent status` in cluster mode: API pods are
sampled under their API identity, the API client, watches and the status manager show
up in /metrics, and warnings recorded for the API also reach the page."""

from __future__ import annotations

import asyncio
import json
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster.test_cluster_support import (SLEEP_FOREVER, api_pod, busybox,  # noqa: F401
                                                cluster_agent_factory, cp_recording,
                                                kubectl_apply, rkubectl)
from tests.e2e.conftest import REPO

pytestmark = [pytest.mark.docker, pytest.mark.root]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


async def test_stats_metrics_page_and_status_command_in_cluster_mode(cp_recording, rkubectl,
                                                                     cluster_agent_factory):
    cp, kubectl = cp_recording, rkubectl
    agent = await cluster_agent_factory(cp, extra_config={"stats-interval": 1.0, "proxy": False})
    await agent.wait_node_ready()
    await kubectl_apply(kubectl, api_pod("web", agent.node_name, [busybox("app", SLEEP_FOREVER)]))
    missing = busybox("app", SLEEP_FOREVER, image="nodeagent-test/absent:1", imagePullPolicy="Never")
    await kubectl_apply(kubectl, api_pod("broken", agent.node_name, [missing]))
    web = await agent.wait_api_running_ready("web")
    uid = web["metadata"]["uid"]

    async def sampled():
        body = json.loads(await asyncio.to_thread(_get, agent.url + "/stats/summary"))
        return next((p for p in body["pods"] if p["podRef"]["uid"] == uid and "cpu" in p
                     and p.get("containers")), None)

    pod = None
    for _ in range(40):
        pod = await sampled()
        if pod and pod["cpu"].get("usageNanoCores") is not None:
            break
        await asyncio.sleep(0.5)
    assert pod is not None and pod["podRef"] == {"name": "web", "namespace": "default", "uid": uid}
    assert pod["containers"][0]["name"] == "app" and pod["memory"]["workingSetBytes"] > 0

    text = (await asyncio.to_thread(_get, agent.url + "/metrics")).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = families["rest_client_requests"].samples
    assert any(s.labels["resource"] == "pods/status" and s.labels["code"] == "200" and s.value > 0
               for s in requests), requests
    watch = families["nodeagent_watch_events"].samples
    assert any(s.labels["resource"] == "pods" and s.value > 0 for s in watch)
    writes = {s.labels["result"]: s.value for s in families["nodeagent_status_manager_writes"].samples}
    assert writes["patches"] > 0
    assert families["kubelet_running_pods"].samples[0].value == 2  # broken has its sandbox too

    page = ""
    for _ in range(30):
        page = (await asyncio.to_thread(_get, agent.url + "/")).decode()
        if "ErrImageNeverPull" in page or "absent" in page:
            break
        await asyncio.sleep(0.5)
    assert "cluster mode" in page and ">web<" in page and ">broken<" in page
    warnings = page.split('id="warnings"')[1]
    assert "broken" in warnings and "nodeagent-test/absent:1" in warnings

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nodeagent.cli", "status", "--status-address", f"127.0.0.1:{agent.port}",
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err
    rows = {line.split()[1]: line.split() for line in out.decode().splitlines() if line.startswith("default ")}
    assert rows["web"][2] == "Running" and rows["broken"][2] == "Pending"
