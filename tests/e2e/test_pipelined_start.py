"""The agent's pipelined start and short teardown seen from Docker's event stream:
the pause is created once and started before the app container starts (whether the
app's create lands before or after the pause's start is a race; the in-process
test_kubelet_pipeline pins the overlap with a slow pause); a deleted pod's app
container gets one stop signal and exits before the pause is killed."""

from __future__ import annotations

import json
import subprocess
import time

from tests.e2e.conftest import busybox, pod_manifest

QUICK_EXIT = "trap 'exit 0' TERM; while true; do sleep 1 & wait; done"


def events(agent, since: float, until: float) -> list[tuple[str, str, str]]:
    """(action, container name label, pod name) of the agent's containers, in order."""
    out = subprocess.run(
        ["docker", "events", "--since", f"{since:.3f}", "--until", f"{until:.3f}", "--format", "{{json .}}",
         "--filter", "type=container", "--filter", f"label=io.nodeagent.node={agent.node_name}"],
        capture_output=True, text=True, timeout=60, check=True).stdout
    found = []
    for line in out.splitlines():
        ev = json.loads(line)
        attrs = ev["Actor"]["Attributes"]
        found.append((ev["Action"], attrs.get("io.kubernetes.container.name"), attrs.get("io.kubernetes.pod.name")))
    return found


def test_pod_start_and_delete_in_dockers_event_stream(agent):
    since = time.time()
    agent.write("p.yaml", pod_manifest("p", [busybox("app", QUICK_EXIT)], terminationGracePeriodSeconds=5))
    agent.wait_running_ready("p")
    seen = [(a, c) for a, c, _pod in events(agent, since, time.time()) if a in ("create", "start")]
    assert seen.index(("start", "POD")) < seen.index(("start", "app")), seen
    assert len([e for e in seen if e == ("create", "POD")]) == 1

    since = time.time()
    agent.remove("p.yaml")
    agent.wait_for("pod gone", lambda: agent.pod("p") is None, 30)
    time.sleep(0.5)
    gone = events(agent, since, time.time())
    actions = [(a, c) for a, c, _pod in gone]
    # The app stopped with its own signal within the grace period, then the pause
    # went (on Docker < 20.10.27 stopped alone first, the network-exit guard).
    assert actions.index(("die", "app")) < actions.index(("kill", "POD"))
    assert ("destroy", "POD") in actions and ("destroy", "app") in actions
    assert len([a for a in actions if a == ("kill", "app")]) == 1, actions
