"""Container logs (issue 8, item 6): rotation, termination messages, `nodeagent logs`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

from tests.e2e.conftest import REPO, busybox, docker, pod_manifest


def _logs(agent, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nodeagent.cli", "logs", "--status-address", f"127.0.0.1:{agent.port}", *args],
        cwd=REPO, capture_output=True, timeout=timeout,
    )


def _terminated(agent, pod: str):
    def check():
        p = agent.pod(pod)
        statuses = (p or {}).get("status", {}).get("containerStatuses") or []
        return statuses and statuses[0]["state"].get("terminated")
    return agent.wait_for(f"{pod} terminated", check)


def test_rotation_messages_and_logs_command(agent_factory):
    agent = agent_factory(extra_config={"container-log-max-size": "16Ki", "container-log-max-files": 2})
    chatty = pod_manifest("chatty", [busybox(
        "c", "i=0; while [ $i -lt 4000 ]; do echo line-$i-padding-padding-padding; i=$((i+1)); done; "
             "echo FINISHED; sleep 3600")])
    multi = pod_manifest("multi", [
        busybox("a", "echo from-a; sleep 3600"),
        busybox("b", "echo from-b; sleep 3600"),
        busybox("crash", "n=$(cat /d/n 2>/dev/null || echo 0); n=$((n+1)); echo $n > /d/n; echo run-$n; sleep 1; exit 1",
                volumeMounts=[{"name": "d", "mountPath": "/d"}]),
    ], volumes=[{"name": "d", "emptyDir": {}}])
    message = pod_manifest("message", [busybox(
        "c", "echo to-stdout; printf 'all done' > /dev/termination-log; exit 3")], restartPolicy="Never")
    fallback = pod_manifest("fallback", [busybox(
        "c", "i=0; while [ $i -lt 100 ]; do echo out-$i; i=$((i+1)); done; exit 1",
        terminationMessagePolicy="FallbackToLogsOnError")], restartPolicy="Never")
    custom = pod_manifest("custom", [busybox(
        "c", "head -c 5000 /dev/zero | tr '\\0' x > /tmp/msg; printf END >> /tmp/msg; exit 0",
        terminationMessagePath="/tmp/msg")], restartPolicy="Never", securityContext={"runAsUser": 1000})
    agent.write("logs.yaml", chatty, multi, message, fallback, custom)

    # Termination messages.
    assert _terminated(agent, "message")["message"] == "all done"
    state = _terminated(agent, "fallback")
    lines = state["message"].splitlines()
    assert lines[-1] == "out-99" and len(state["message"]) <= 2048 and len(lines) <= 80
    state = _terminated(agent, "custom")
    assert state["reason"] == "Completed"
    assert len(state["message"]) == 4096 and state["message"].endswith("xEND")  # the last 4096 bytes

    # Rotation: json-file with kubelet-style limits, at most 2 files of ~16 KiB.
    chatty_c = agent.container_of("chatty", "c")
    assert chatty_c["HostConfig"]["LogConfig"] == {"Type": "json-file",
                                                   "Config": {"max-size": "16384", "max-file": "2"}}
    agent.wait_for("chatty finished", lambda: b"FINISHED" in _logs(agent, "chatty", "--tail", "1").stdout)
    log_path = chatty_c["LogPath"]
    files = [p for p in os.listdir(os.path.dirname(log_path)) if p.startswith(os.path.basename(log_path))]
    assert len(files) <= 2 and sum(os.path.getsize(os.path.join(os.path.dirname(log_path), f))
                                   for f in files) < 3 * 16384
    out = _logs(agent, "chatty", "--tail", "3")
    assert out.returncode == 0
    assert out.stdout.decode().splitlines() == ["line-3998-padding-padding-padding",
                                                "line-3999-padding-padding-padding", "FINISHED"]
    full = _logs(agent, f"chatty-{agent.node_name}").stdout.decode().splitlines()
    assert full[-1] == "FINISHED" and "line-0-padding-padding-padding" not in full  # rotated away
    out = _logs(agent, "chatty", "--tail", "1", "--timestamps")
    stamp, _, text = out.stdout.decode().strip().partition(" ")
    assert text == "FINISHED" and stamp.endswith("Z") and "T" in stamp
    assert _logs(agent, "chatty", "--limit-bytes", "5").stdout == b"line-"
    assert _logs(agent, "chatty", "--since", "1h", "--tail", "1").stdout == b"FINISHED\n"

    # Containers: default with a note, explicit, missing, previous.
    out = _logs(agent, "multi")
    assert out.stdout == b"from-a\n"
    assert b'Defaulted container "a" out of: a, b, crash' in out.stderr
    assert _logs(agent, "multi", "-c", "b").stdout == b"from-b\n"
    out = _logs(agent, "multi", "-c", "nope")
    assert out.returncode == 1 and b"container nope is not valid for pod multi-" in out.stderr
    out = _logs(agent, "nothere")
    assert out.returncode == 1 and out.stderr.strip() == b'Error from server (NotFound): pods "nothere" not found'

    def restarted():
        p = agent.pod("multi")
        cs = {c["name"]: c for c in p["status"]["containerStatuses"]}
        return cs["crash"]["restartCount"] >= 1 and cs["crash"]
    agent.wait_for("crash restarted", restarted)

    def previous_is_last_state():
        # --previous reads the instance the pod status names as lastState (kubelet).
        before = agent.pod("multi")["status"]["containerStatuses"]
        out = _logs(agent, "multi", "-c", "crash", "--previous")
        after = agent.pod("multi")["status"]["containerStatuses"]
        if before != after or out.returncode != 0:
            return None
        last = next(c for c in after if c["name"] == "crash")["lastState"]["terminated"]["containerID"]
        return out.stdout == docker("logs", last.split("://")[1]).encode() and out.stdout
    previous = agent.wait_for("previous logs", previous_is_last_state)
    assert re.fullmatch(rb"run-\d+\n", previous)
    out = _logs(agent, "multi", "-c", "a", "--previous")
    assert out.returncode == 1 and b'previous terminated container "a"' in out.stderr

    # -f returns when the container stops, with everything it wrote.
    agent.write("follow.yaml", pod_manifest("follow", [busybox(
        "c", "echo one; sleep 2; echo two")], restartPolicy="Never"))
    agent.wait_for("follow started", lambda: _logs(agent, "follow").stdout.startswith(b"one"))
    started = time.monotonic()
    out = _logs(agent, "follow", "-f")
    assert out.stdout == b"one\ntwo\n" and time.monotonic() - started < 40
