"""The standalone pod lifecycle against real Docker and the real kernel."""

from __future__ import annotations

import re
import subprocess
import time
from datetime import datetime

import pytest

from tests.e2e.conftest import busybox, docker, exec_in, pod_manifest

pytestmark = [pytest.mark.docker, pytest.mark.root]

SLEEP_FOREVER = "while true; do sleep 3600; done"


def test_sidecar_reaches_app_on_localhost_and_status_shape(agent):
    agent.write("web.yaml", pod_manifest(
        "web",
        [busybox("httpd", "mkdir -p /www && echo hello-$(POD) > /www/index.html && exec httpd -f -p 8080 -h /www",
                 env=[{"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}])],
        initContainers=[busybox("probe", "while true; do wget -q -O - http://127.0.0.1:8080/ > /tmp/last 2>&1 && cat /tmp/last; sleep 0.5; done",
                                restartPolicy="Always")],
    ))
    pod = agent.wait_running_ready("web")
    status = pod["status"]
    assert status["qosClass"] == "BestEffort"
    assert {c["type"] for c in status["conditions"]} >= {
        "PodReadyToStartContainers", "Initialized", "ContainersReady", "Ready", "PodScheduled"}
    assert status["podIP"].startswith(f"10.244.{agent.subnet}.")
    assert status["podIPs"] == [{"ip": status["podIP"]}]
    (app,) = status["containerStatuses"]
    assert app["ready"] is True and app["started"] is True and app["restartCount"] == 0
    assert set(app["state"]) == {"running"}
    assert app["containerID"].startswith("docker://")
    (sidecar,) = status["initContainerStatuses"]
    assert set(sidecar["state"]) == {"running"}

    # The sidecar's wget reached httpd over the pod's shared loopback.
    probe = agent.container_of("web", "probe")
    expected = f"hello-web-{agent.node_name}"
    agent.wait_for("sidecar output", lambda: expected in docker("logs", probe["Id"]))

    # Containers join the pause container's network and IPC namespaces.
    httpd = agent.container_of("web", "httpd")
    sandbox = agent.container_of("web", "POD")
    assert httpd["HostConfig"]["NetworkMode"] == f"container:{sandbox['Id']}"
    assert httpd["HostConfig"]["IpcMode"] == f"container:{sandbox['Id']}"
    assert sandbox["HostConfig"]["IpcMode"] == "shareable"
    assert httpd["Name"] == f"/k8s_httpd_web-{agent.node_name}_default_{pod['metadata']['uid']}_0"

    # The host reaches the pod on its own address through the node bridge.
    out = subprocess.run(["curl", "-s", "-m", "3", f"http://{status['podIP']}:8080/"],
                         capture_output=True, text=True, timeout=10)
    assert out.stdout.strip() == expected


def test_share_process_namespace(agent):
    agent.write("pidns.yaml", pod_manifest(
        "pidns",
        [busybox("a", "exec sleep 4242"), busybox("b", SLEEP_FOREVER)],
        shareProcessNamespace=True,
    ))
    agent.wait_running_ready("pidns")
    b = agent.container_of("pidns", "b")
    ps = exec_in(b["Id"], "ps", "-o", "args").stdout
    assert "sleep 4242" in ps
    assert "/pause" in ps
    # Without sharing, processes stay private.
    agent.write("private.yaml", pod_manifest("private", [busybox("a", "exec sleep 4343"), busybox("b", SLEEP_FOREVER)]))
    agent.wait_running_ready("private")
    b = agent.container_of("private", "b")
    assert "sleep 4343" not in exec_in(b["Id"], "ps", "-o", "args").stdout


def test_init_containers_run_in_order_with_sidecar_started_first(agent):
    agent.write("init.yaml", pod_manifest(
        "init",
        [busybox("app", "cat /shared/log; " + SLEEP_FOREVER, volumeMounts=[{"name": "shared", "mountPath": "/shared"}])],
        initContainers=[
            busybox("first", "echo first >> /shared/log", volumeMounts=[{"name": "shared", "mountPath": "/shared"}]),
            busybox("side", "echo side >> /shared/log; exec sleep 100000", restartPolicy="Always",
                    volumeMounts=[{"name": "shared", "mountPath": "/shared"}]),
            busybox("second", "grep -q side /shared/log && echo second >> /shared/log",
                    volumeMounts=[{"name": "shared", "mountPath": "/shared"}]),
        ],
        volumes=[{"name": "shared", "emptyDir": {}}],
    ))
    pod = agent.wait_running_ready("init")
    app = agent.container_of("init", "app")
    assert docker("logs", app["Id"]).split() == ["first", "side", "second"]
    inits = {c["name"]: c for c in pod["status"]["initContainerStatuses"]}
    assert inits["first"]["state"]["terminated"]["reason"] == "Completed"
    assert inits["second"]["state"]["terminated"]["exitCode"] == 0
    assert "running" in inits["side"]["state"]
    # Start order on the engine matches the spec order.
    started = {n: agent.container_of("init", n)["State"]["StartedAt"] for n in ("first", "side", "second", "app")}
    assert started["first"] < started["side"] < started["second"] < started["app"]


def test_failed_init_with_restart_never_fails_pod(agent):
    agent.write("badinit.yaml", pod_manifest(
        "badinit",
        [busybox("app", SLEEP_FOREVER)],
        initContainers=[busybox("fails", "exit 7")],
        restartPolicy="Never",
    ))
    pod = agent.wait_phase("badinit", "Failed")
    (init,) = pod["status"]["initContainerStatuses"]
    assert init["state"]["terminated"]["exitCode"] == 7
    assert init["state"]["terminated"]["reason"] == "Error"
    with pytest.raises(KeyError):
        agent.container_of("badinit", "app")


def test_run_to_completion_and_restart_policies(agent):
    agent.write("jobs.yaml",
                pod_manifest("ok", [busybox("t", "echo done")], restartPolicy="Never"),
                pod_manifest("bad", [busybox("t", "exit 3")], restartPolicy="Never"),
                pod_manifest("onfail", [busybox("t", "exit 0")], restartPolicy="OnFailure"))
    ok = agent.wait_phase("ok", "Succeeded")
    term = ok["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 0 and term["reason"] == "Completed"
    assert term["containerID"].startswith("docker://")
    bad = agent.wait_phase("bad", "Failed")
    assert bad["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3
    onfail = agent.wait_phase("onfail", "Succeeded")
    assert onfail["status"]["containerStatuses"][0]["restartCount"] == 0
    time.sleep(2.5)
    assert agent.pod("onfail")["status"]["containerStatuses"][0]["restartCount"] == 0


def test_crash_loop_backoff_intervals(agent):
    # backoff-base is 1 s in tests: like kubelet, the first restart is immediate, then
    # restarts come after ~1, 2, 4 s.
    agent.write("crash.yaml", pod_manifest("crash", [busybox("c", "exit 2")]))

    def restarted(n):
        p = agent.pod("crash")
        return p and p["status"]["containerStatuses"][0]["restartCount"] >= n and p
    pod = agent.wait_for("4 restarts", lambda: restarted(4), timeout=40)
    cs = pod["status"]["containerStatuses"][0]
    assert cs["lastState"]["terminated"]["exitCode"] == 2
    waiting = agent.wait_for("CrashLoopBackOff", lambda: (s := agent.pod("crash")["status"]["containerStatuses"][0]["state"]).get("waiting") and s)
    assert waiting["waiting"]["reason"] == "CrashLoopBackOff"
    assert "back-off" in waiting["waiting"]["message"]

    # Gaps between one start and the next grow: ~0, ~1 s, ~2 s, ~4 s.
    ids = docker("ps", "-aq", "--filter", f"label=io.nodeagent.node={agent.node_name}",
                 "--filter", "label=io.kubernetes.container.name=c").split()
    # Old instances are garbage-collected; read the gaps from the agent's starts instead.
    starts = [r for r in agent.log_records() if r.get("event") == "starting container" and r.get("container") == "c"]
    times = [datetime.fromisoformat(r["timestamp"].replace("Z", "+00:00")).timestamp() for r in starts]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(gaps) >= 4, starts
    assert gaps[0] < 2.0, gaps  # immediate, plus sync latency under load
    assert 0.9 <= gaps[1] < 3.0, gaps
    assert gaps[2] > gaps[1] + 0.5, gaps
    assert gaps[3] > gaps[2] + 1.0, gaps
    assert len(ids) <= 2  # newest + one dead instance kept


def test_grace_period_then_sigkill(agent):
    agent.write("grace.yaml",
                pod_manifest("stubborn", [busybox("c", "trap '' TERM; while true; do sleep 0.2; done")],
                             terminationGracePeriodSeconds=3),
                pod_manifest("polite", [busybox("c", "trap 'exit 0' TERM; while true; do sleep 0.2; done")],
                             terminationGracePeriodSeconds=30))
    agent.wait_running_ready("stubborn")
    agent.wait_running_ready("polite")
    stubborn = agent.container_of("stubborn", "c")["Id"]
    polite = agent.container_of("polite", "c")["Id"]
    t0 = time.monotonic()
    agent.remove("grace.yaml")
    agent.wait_for("both pods gone", lambda: agent.pod("stubborn") is None and agent.pod("polite") is None, timeout=30)
    elapsed = time.monotonic() - t0
    assert 2.5 <= elapsed < 15, elapsed
    for cid in (stubborn, polite):
        assert docker("ps", "-aq", "--filter", f"id={cid}").strip() == ""
    stops = [r for r in agent.log_records() if r.get("event") == "pod removed"]
    assert len(stops) >= 2


def test_oom_killed_is_reported(agent):
    hungry = "exec awk 'BEGIN { s = \"xxxxxxxxxxxxxxxx\"; while (1) { s = s s } }'"
    agent.write("oom.yaml", pod_manifest(
        "oom", [busybox("eat", hungry, resources={"limits": {"memory": "16Mi", "cpu": "100m"}})],
        restartPolicy="Never"))
    pod = agent.wait_phase("oom", "Failed", timeout=60)
    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["reason"] == "OOMKilled"
    assert term["exitCode"] == 137
    assert pod["status"]["qosClass"] == "Guaranteed"


def test_resources_volumes_env_reach_docker(agent, tmp_path):
    host_dir = tmp_path / "hostdata"
    host_dir.mkdir()
    (host_dir / "greeting").write_text("from-host")
    agent.write("res.yaml", pod_manifest(
        "res",
        [busybox("c", SLEEP_FOREVER,
                 env=[{"name": "A", "value": "alpha"}, {"name": "B", "value": "$(A)-beta"},
                      {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                      {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                 workingDir="/cache",
                 resources={"requests": {"cpu": "250m", "memory": "32Mi"}, "limits": {"cpu": "500m", "memory": "64Mi"}},
                 volumeMounts=[{"name": "cache", "mountPath": "/cache"}, {"name": "host", "mountPath": "/host", "readOnly": True}])],
        volumes=[{"name": "cache", "emptyDir": {"medium": "Memory"}},
                 {"name": "host", "hostPath": {"path": str(host_dir), "type": "Directory"}}],
    ))
    pod = agent.wait_running_ready("res")
    assert pod["status"]["qosClass"] == "Burstable"
    c = agent.container_of("res", "c")
    hc = c["HostConfig"]
    assert hc["Memory"] == 64 * 1024 * 1024
    assert hc["CpuShares"] == 256
    assert hc["CpuQuota"] == 50000 and hc["CpuPeriod"] == 100000
    env = dict(e.split("=", 1) for e in c["Config"]["Env"])
    assert env["B"] == "alpha-beta"
    assert env["NODE"] == agent.node_name
    assert env["IP"] == pod["status"]["podIP"]
    assert c["Config"]["WorkingDir"] == "/cache"
    mounts = exec_in(c["Id"], "cat", "/proc/mounts").stdout
    assert re.search(r"^tmpfs /cache tmpfs", mounts, re.M), mounts
    assert exec_in(c["Id"], "cat", "/host/greeting").stdout == "from-host"
    assert exec_in(c["Id"], "sh", "-c", "echo x > /host/new").returncode != 0  # read-only


def test_host_network_pod_uses_host_namespace(agent):
    agent.write("hostnet.yaml", pod_manifest("hostnet", [busybox("c", SLEEP_FOREVER)], hostNetwork=True))
    pod = agent.wait_running_ready("hostnet")
    assert pod["status"]["podIP"] == pod["status"]["hostIP"]
    sandbox = agent.container_of("hostnet", "POD")
    assert sandbox["HostConfig"]["NetworkMode"] == "host"
    c = agent.container_of("hostnet", "c")
    links = exec_in(c["Id"], "ip", "link").stdout
    assert agent.bridge in links  # the host's links are visible


def test_manifest_add_edit_remove_and_ip_release(agent):
    path = agent.write("m.yaml", pod_manifest("m", [busybox("c", SLEEP_FOREVER)]))
    first = agent.wait_running_ready("m")
    uid1, ip1 = first["metadata"]["uid"], first["status"]["podIP"]
    ipam_dir = agent.root_dir / "ipam"
    assert any(uid1 in p.read_text() for p in ipam_dir.rglob("*") if p.is_file())

    # An edit replaces the pod: new uid, old containers gone.
    agent.write("m.yaml", pod_manifest("m", [busybox("c", "echo v2; " + SLEEP_FOREVER)]))
    second = agent.wait_for("new version", lambda: (p := agent.pod("m")) and p["metadata"]["uid"] != uid1
                            and p["status"].get("phase") == "Running" and p)
    agent.wait_for("old containers removed", lambda: not [
        c for c in agent.containers() if c["Config"]["Labels"]["io.kubernetes.pod.uid"] == uid1])
    assert "v2" in docker("logs", agent.container_of("m", "c")["Id"])

    # Removal deletes the pod and frees its address.
    uid2 = second["metadata"]["uid"]
    path.unlink()
    agent.wait_for("pod gone", lambda: agent.pod("m") is None and not agent.containers())
    agent.wait_for("address released", lambda: not any(
        uid2 in p.read_text() or uid1 in p.read_text() for p in ipam_dir.rglob("*") if p.is_file()))
    assert ip1  # first address was allocated


def test_image_never_pull_waits(agent):
    agent.write("never.yaml", pod_manifest(
        "never", [{"name": "c", "image": "nodeagent.invalid/absent:1", "imagePullPolicy": "Never"}]))
    pod = agent.wait_for("ErrImageNeverPull", lambda: (p := agent.pod("never")) and
                         p["status"].get("containerStatuses") and
                         p["status"]["containerStatuses"][0]["state"].get("waiting", {}).get("reason") == "ErrImageNeverPull" and p)
    assert pod["status"]["phase"] == "Pending"
    assert "nodeagent.invalid/absent:1" in pod["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
