"""Pod lifecycle states end to end: a pod re-added while terminating, and a finished
pod that releases its address at once but keeps its exited containers (also across a
kill -9 of the agent) until its manifest goes away."""

from __future__ import annotations

import time

from tests.e2e.conftest import busybox, docker, docker_time, pod_manifest

# Ignores SIGTERM: stopping it takes the whole grace period.
STUBBORN = "trap '' TERM; while true; do sleep 0.2; done"


def pods_named(agent, name: str) -> list[dict]:
    full = f"{name}-{agent.node_name}"
    return [p for p in agent.pods() if p["metadata"]["name"] == full]


def containers_of(agent, uid: str, name: str | None = None) -> list[dict]:
    return [c for c in agent.containers()
            if c["Config"]["Labels"].get("io.kubernetes.pod.uid") == uid
            and (name is None or c["Config"]["Labels"].get("io.kubernetes.container.name") == name)]


def ipam_holds(agent, uid: str) -> bool:
    return any(uid in p.read_text() for p in (agent.root_dir / "ipam").rglob("*") if p.is_file())


def test_pod_readded_while_terminating_runs_visibly_after_termination(agent):
    v1 = pod_manifest("flip", [busybox("c", STUBBORN)], terminationGracePeriodSeconds=3)
    v2 = pod_manifest("flip", [busybox("c", "echo v2; " + STUBBORN)], terminationGracePeriodSeconds=3)
    agent.write("flip.yaml", v1)
    first = agent.wait_running_ready("flip")
    uid1 = first["metadata"]["uid"]
    (old,) = containers_of(agent, uid1, "c")

    # Edit, then revert within the grace period: uid1 is re-added while terminating.
    agent.write("flip.yaml", v2)
    agent.wait_for("edit seen", lambda: any(p["metadata"]["uid"] != uid1 for p in pods_named(agent, "flip")))
    time.sleep(0.5)
    reverted_at = time.time()
    agent.write("flip.yaml", v1)

    # The re-added pod waits for its termination (grace period 3 s) and then runs
    # again, visible in /pods, with a new container.
    def rerun():
        pods = pods_named(agent, "flip")
        if [p["metadata"]["uid"] for p in pods] != [uid1]:
            return None
        pod = pods[0]
        if pod["metadata"].get("deletionTimestamp"):
            return None  # still the terminating instance
        conds = {c["type"]: c["status"] for c in pod["status"].get("conditions", [])}
        running = [c for c in containers_of(agent, uid1, "c")
                   if c["State"]["Running"] and c["Id"] != old["Id"]]
        if pod["status"].get("phase") == "Running" and conds.get("Ready") == "True" and running:
            return pod, running
        return None

    # While it terminates, /pods shows the terminating instance.
    agent.wait_for("terminating instance listed", lambda: any(
        p["metadata"]["uid"] == uid1 and p["metadata"].get("deletionTimestamp")
        for p in pods_named(agent, "flip")), 10)
    pod, running = agent.wait_for("re-added pod running and listed", rerun, 40)
    (new,) = running
    started = docker_time(new["State"]["StartedAt"])
    assert started >= reverted_at + 2.0, "the re-added pod started before its termination completed"
    assert pod["status"]["podIP"]
    assert ipam_holds(agent, uid1)
    # The old instance is gone with the termination; the edited version too.
    assert old["Id"] not in {c["Id"] for c in agent.containers()}
    agent.wait_for("edited version removed", lambda: all(
        c["Config"]["Labels"]["io.kubernetes.pod.uid"] == uid1 for c in agent.containers()))


def test_finished_pod_releases_its_ip_and_keeps_exited_containers(agent):
    agent.write("job.yaml", pod_manifest("job", [busybox("t", "echo finished-output; exit 3")],
                                         restartPolicy="Never"))
    pod = agent.wait_phase("job", "Failed")
    uid = pod["metadata"]["uid"]
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3

    # The address goes back at once (not when the pod is deleted); the sandbox stops.
    agent.wait_for("address released", lambda: not ipam_holds(agent, uid), 15)
    sandboxes = [c for c in containers_of(agent, uid)
                 if c["Config"]["Labels"].get("io.kubernetes.docker.type") == "podsandbox"
                 or "pause" in c["Config"]["Image"]]
    assert sandboxes and not any(s["State"]["Running"] for s in sandboxes)
    (app,) = containers_of(agent, uid, "t")
    assert app["State"]["ExitCode"] == 3
    assert "finished-output" in docker("logs", app["Id"])

    # kill -9 and restart: the finished pod is neither run again nor cleaned up.
    agent.kill9()
    agent.start()
    agent.wait_for("pod reported again", lambda: (p := agent.pod("job")) and p["status"].get("phase") == "Failed")
    time.sleep(5)  # two relists and a housekeeping pass
    (again,) = containers_of(agent, uid, "t")
    assert again["Id"] == app["Id"] and again["State"]["ExitCode"] == 3
    assert "finished-output" in docker("logs", again["Id"])
    status = agent.pod("job")["status"]
    assert status["phase"] == "Failed"
    assert status["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3
    assert not ipam_holds(agent, uid)
    assert not any(c["State"]["Running"] for c in containers_of(agent, uid))

    # Only the pod's removal takes its containers.
    agent.remove("job.yaml")
    agent.wait_for("containers removed with the pod", lambda: not containers_of(agent, uid), 20)
    # The pod stays listed until its termination completes (volumes, address, status),
    # a moment after the containers go.
    agent.wait_for("pod forgotten", lambda: agent.pod("job") is None, 10)
