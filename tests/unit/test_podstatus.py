"""generate_pod_status: phases, conditions, container statuses, exact API shape."""

from __future__ import annotations

import copy
import itertools
import json

import pytest

from nodeagent.kubelet.hashing import container_hash
from nodeagent.kubelet.podstatus import _fallback_qos_class, generate_pod_status, get_phase, qos_class, rfc3339
from runtime.types import ContainerState, ContainerStatus, PodRef, SandboxState, SandboxStatus

UID = "uid-1"
REF = PodRef(name="web", namespace="default", uid=UID)
NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z
HOST = "192.0.2.10"
_ids = itertools.count(1)

POD_STATUS_KEYS = {"phase", "conditions", "message", "reason", "hostIP", "hostIPs", "podIP", "podIPs",
                   "startTime", "initContainerStatuses", "containerStatuses", "qosClass"}
CONTAINER_STATUS_KEYS = {"name", "state", "lastState", "ready", "restartCount", "image", "imageID",
                         "containerID", "started", "volumeMounts"}


def spec(name: str, **extra) -> dict:
    return {"name": name, "image": "busybox:1.35", "imagePullPolicy": "IfNotPresent", **extra}


def sidecar(name: str, **extra) -> dict:
    return spec(name, restartPolicy="Always", **extra)


def make_pod(containers=None, init=None, policy="Always", **spec_extra) -> dict:
    pod_spec = {"containers": containers if containers is not None else [spec("app")],
                "restartPolicy": policy, "terminationGracePeriodSeconds": 30, **spec_extra}
    if init:
        pod_spec["initContainers"] = init
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "namespace": "default", "uid": UID}, "spec": pod_spec}


def sandbox(ready=True, attempt=0) -> SandboxStatus:
    return SandboxStatus(id=f"sb{attempt}", pod=REF, attempt=attempt,
                         state=SandboxState.READY if ready else SandboxState.NOTREADY,
                         created_at=NOW - 100)


def ctr(name, *, attempt=0, state=ContainerState.RUNNING, created=None, started=None, finished=None,
        exit_code=None, error="", oom=False) -> ContainerStatus:
    created = created if created is not None else NOW - 50 + attempt
    if started is None and state in (ContainerState.RUNNING, ContainerState.EXITED) and not error:
        started = created + 1
    if state == ContainerState.EXITED:
        if finished is None and not error:
            finished = (started or created) + 2
        exit_code = 0 if exit_code is None else exit_code
    return ContainerStatus(id=f"id{next(_ids)}", pod=REF, name=name, attempt=attempt, state=state,
                           image="busybox:1.35", image_id="docker-pullable://busybox@sha256:feed",
                           created_at=created, started_at=started, finished_at=finished,
                           exit_code=exit_code, error=error, oom_killed=oom, spec_hash="h", sandbox_id="sb0")


def dead(name, code=0, **kw) -> ContainerStatus:
    return ctr(name, state=ContainerState.EXITED, exit_code=code, **kw)


def status_of(pod, sandboxes=(), containers=(), *, waiting=None, pod_ips=("10.244.0.5",), previous=None,
              now=NOW, start_time=NOW - 200, **kw) -> dict:
    return generate_pod_status(pod, list(sandboxes), list(containers), waiting=waiting or {},
                               pod_ips=list(pod_ips), host_ips=[HOST], previous=previous, now=now,
                               start_time=start_time, **kw)


def cond(status: dict, kind: str) -> dict:
    (c,) = [c for c in status["conditions"] if c["type"] == kind]
    return c


def cs(status: dict, name: str) -> dict:
    for c in status.get("initContainerStatuses", []) + status.get("containerStatuses", []):
        if c["name"] == name:
            return c
    raise KeyError(name)


def assert_no_none(value, path="status"):
    """Only lastProbeTime may be null (the API writes it so)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if v is None:
                assert k == "lastProbeTime", f"{path}.{k} is None"
            else:
                assert_no_none(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            assert_no_none(v, f"{path}[{i}]")


# --- a new pod ---------------------------------------------------------------------------


def test_new_pod_without_sandbox_is_pending_and_creating():
    pod = make_pod([spec("a"), spec("b")])
    st = status_of(pod, pod_ips=())
    assert st["phase"] == "Pending"
    assert [c["type"] for c in st["conditions"]] == [
        "PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady", "PodScheduled"]
    assert cond(st, "PodReadyToStartContainers")["status"] == "False"
    assert cond(st, "Initialized")["status"] == "True"
    for kind in ("Ready", "ContainersReady"):
        c = cond(st, kind)
        assert (c["status"], c["reason"], c["message"]) == (
            "False", "ContainersNotReady", "containers with unready status: [a b]")
    assert cond(st, "PodScheduled")["status"] == "True"
    for c in st["conditions"]:
        assert c["lastProbeTime"] is None and c["lastTransitionTime"] == "2023-11-14T22:13:20Z"
    assert "podIP" not in st and "podIPs" not in st
    assert st["hostIP"] == HOST and st["hostIPs"] == [{"ip": HOST}]
    assert st["startTime"] == rfc3339(NOW - 200)
    assert st["qosClass"] == "BestEffort"
    assert "initContainerStatuses" not in st
    a = cs(st, "a")
    assert a == {"name": "a", "state": {"waiting": {"reason": "ContainerCreating"}}, "lastState": {},
                 "ready": False, "restartCount": 0, "image": "busybox:1.35", "imageID": "", "started": False}
    assert_no_none(st)


def test_running_pod_shape():
    pod = make_pod([spec("a", volumeMounts=[{"name": "v", "mountPath": "/v", "readOnly": True},
                                             {"name": "w", "mountPath": "/w"}])],
                   volumes=[{"name": "v", "emptyDir": {}}, {"name": "w", "emptyDir": {}}])
    run = ctr("a", started=NOW - 30)
    st = status_of(pod, [sandbox()], [run])
    assert st["phase"] == "Running"
    assert st["podIP"] == "10.244.0.5" and st["podIPs"] == [{"ip": "10.244.0.5"}]
    for kind in ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady", "PodScheduled"):
        c = cond(st, kind)
        assert c["status"] == "True" and "reason" not in c and "message" not in c
    a = cs(st, "a")
    assert a == {
        "name": "a", "state": {"running": {"startedAt": rfc3339(NOW - 30)}}, "lastState": {},
        "ready": True, "restartCount": 0, "image": "busybox:1.35",
        "imageID": "docker-pullable://busybox@sha256:feed", "containerID": f"docker://{run.id}",
        "started": True,
        "volumeMounts": [{"name": "v", "mountPath": "/v", "readOnly": True, "recursiveReadOnly": "Disabled"},
                         {"name": "w", "mountPath": "/w"}],
    }
    assert set(st) <= POD_STATUS_KEYS and set(a) <= CONTAINER_STATUS_KEYS
    json.dumps(st)  # JSON-ready
    assert_no_none(st)


def test_status_validates_against_the_official_pod_schema():
    from tests.controlplane.schema import validate_object

    pod = make_pod([spec("a"), spec("b", readinessProbe={"exec": {"command": ["true"]}})],
                   init=[spec("i"), sidecar("s")])
    conts = [dead("i", 0), ctr("s"), ctr("a"), dead("b", 1, attempt=0),
             ctr("b", attempt=1, state=ContainerState.EXITED, exit_code=127, started=None,
                 error="exec failed", finished=None)]
    st = status_of(pod, [sandbox()], conts, waiting={"b": ("CrashLoopBackOff", "back-off 10s ...")})
    obj = copy.deepcopy(pod)
    obj["status"] = st
    assert validate_object(obj) == []
    obj["status"]["containerStatuses"][0]["lastTerminationState"] = {}
    assert validate_object(obj)  # the checker does catch unknown keys


# --- phases ------------------------------------------------------------------------------


def test_init_running_keeps_pod_pending_and_apps_initializing():
    pod = make_pod([spec("app")], init=[spec("i1"), spec("i2")])
    st = status_of(pod, [sandbox()], [dead("i1", 0), ctr("i2")])
    assert st["phase"] == "Pending"
    init = cond(st, "Initialized")
    assert (init["status"], init["reason"], init["message"]) == (
        "False", "ContainersNotInitialized", "containers with incomplete status: [i2]")
    assert cs(st, "app")["state"] == {"waiting": {"reason": "PodInitializing"}}
    assert cs(st, "i1")["ready"] is True and cs(st, "i1")["started"] is False
    assert cs(st, "i1")["state"]["terminated"]["reason"] == "Completed"
    assert cs(st, "i2")["ready"] is False and cs(st, "i2")["started"] is True
    assert [c["name"] for c in st["initContainerStatuses"]] == ["i1", "i2"]


def test_init_not_yet_run_shows_pod_initializing():
    pod = make_pod([spec("app")], init=[spec("i1")])
    st = status_of(pod, [], [])
    assert cs(st, "i1")["state"] == {"waiting": {"reason": "PodInitializing"}}
    assert st["phase"] == "Pending"


def test_sidecar_and_app_running():
    pod = make_pod([spec("app")], init=[spec("first"), sidecar("side")])
    st = status_of(pod, [sandbox()], [dead("first", 0), ctr("side"), ctr("app")])
    assert st["phase"] == "Running"
    side = cs(st, "side")
    assert side["started"] is True and side["ready"] is True and "running" in side["state"]
    assert cond(st, "Initialized")["status"] == "True"
    assert cond(st, "Ready")["status"] == "True"


def test_unready_sidecar_makes_the_pod_unready():
    pod = make_pod([spec("app")], init=[sidecar("side", readinessProbe={"exec": {"command": ["true"]}})])
    st = status_of(pod, [sandbox()], [ctr("side"), ctr("app")])
    c = cond(st, "ContainersReady")
    assert (c["status"], c["message"]) == ("False", "containers with unready status: [side]")
    st = status_of(pod, [sandbox()], [ctr("side"), ctr("app")], readiness={"side": True})
    assert cond(st, "ContainersReady")["status"] == "True"


def test_sidecar_waiting_to_start_keeps_pod_pending():
    pod = make_pod([spec("app")], init=[sidecar("side")])
    st = status_of(pod, [sandbox()], [])
    assert st["phase"] == "Pending"
    assert cond(st, "Initialized")["message"] == "containers with incomplete status: [side]"


@pytest.mark.parametrize("code,phase,reason", [(0, "Succeeded", "PodCompleted"), (3, "Failed", "PodFailed")])
def test_never_pod_completion(code, phase, reason):
    pod = make_pod([spec("a")], policy="Never")
    st = status_of(pod, [sandbox(ready=False)], [dead("a", code)])
    assert st["phase"] == phase
    for kind in ("Ready", "ContainersReady"):
        c = cond(st, kind)
        assert (c["status"], c["reason"]) == ("False", reason) and "message" not in c
    term = cs(st, "a")["state"]["terminated"]
    assert term["exitCode"] == code and term["reason"] == ("Completed" if code == 0 else "Error")
    assert cond(st, "PodReadyToStartContainers")["status"] == "False"
    if code == 0:
        assert (cond(st, "Initialized")["status"], cond(st, "Initialized")["reason"]) == ("True", "PodCompleted")


def test_sidecars_do_not_count_for_completion():
    pod = make_pod([spec("app")], init=[sidecar("side")], policy="Never")
    # app done, sidecar still running: still Running (the node is about to stop it)
    st = status_of(pod, [sandbox()], [ctr("side"), dead("app", 0)])
    assert st["phase"] == "Running"
    # sidecar stopped with SIGTERM's 137: the pod succeeded all the same
    st = status_of(pod, [sandbox(ready=False)], [dead("side", 137), dead("app", 0)])
    assert st["phase"] == "Succeeded"


def test_failed_init_with_never_fails_pod():
    pod = make_pod([spec("app")], init=[spec("fails")], policy="Never")
    st = status_of(pod, [sandbox(ready=False)], [dead("fails", 7)])
    assert st["phase"] == "Failed"
    term = cs(st, "fails")["state"]["terminated"]
    assert (term["exitCode"], term["reason"]) == (7, "Error")
    assert cs(st, "app")["state"] == {"waiting": {"reason": "PodInitializing"}}


def test_failed_init_with_onfailure_is_pending_in_crash_loop():
    pod = make_pod([spec("app")], init=[spec("fails")], policy="OnFailure")
    st = status_of(pod, [sandbox()], [dead("fails", 7, attempt=2)],
                   waiting={"fails": ("CrashLoopBackOff", "back-off 40s restarting failed container=fails")})
    assert st["phase"] == "Pending"
    fails = cs(st, "fails")
    assert fails["state"] == {"waiting": {"reason": "CrashLoopBackOff",
                                          "message": "back-off 40s restarting failed container=fails"}}
    assert fails["lastState"]["terminated"]["exitCode"] == 7 and fails["restartCount"] == 2


@pytest.mark.parametrize("policy,phase", [("Always", "Running"), ("OnFailure", "Running"), ("Never", "Failed")])
def test_all_containers_dead_with_a_failure(policy, phase):
    pod = make_pod([spec("a"), spec("b")], policy=policy)
    st = status_of(pod, [sandbox()], [dead("a", 0), dead("b", 1)])
    assert st["phase"] == phase


def test_always_pod_with_all_succeeded_is_running():
    pod = make_pod([spec("a")], policy="Always")
    assert status_of(pod, [sandbox()], [dead("a", 0)])["phase"] == "Running"
    assert status_of(pod, [sandbox()], [dead("a", 0)], pod_is_terminal=True)["phase"] == "Succeeded"


def test_terminal_phase_is_never_left():
    pod = make_pod([spec("a")], policy="Never")
    first = status_of(pod, [sandbox()], [dead("a", 0)])
    assert first["phase"] == "Succeeded"
    # the instances were garbage-collected; the status stays Succeeded with its state
    later = status_of(pod, [], [], previous=first, now=NOW + 60)
    assert later["phase"] == "Succeeded"
    assert cs(later, "a")["state"] == cs(first, "a")["state"]
    assert cs(later, "a")["containerID"] == cs(first, "a")["containerID"]


def test_get_phase_unknown_container_is_pending():
    pod = make_pod([spec("a"), spec("b")])
    statuses = {"a": {"name": "a", "state": {"running": {}}}}
    assert get_phase(pod, statuses) == "Pending"


# --- container states ----------------------------------------------------------------------


def test_terminated_reasons():
    pod = make_pod([spec("ok"), spec("err"), spec("oom"), spec("cant")], policy="Never")
    cant = ctr("cant", state=ContainerState.EXITED, exit_code=128, started=None, finished=None,
               error='OCI runtime create failed: exec: "nope": not found', created=NOW - 10)
    st = status_of(pod, [sandbox()], [dead("ok", 0), dead("err", 2), dead("oom", 137, oom=True), cant])
    assert cs(st, "ok")["state"]["terminated"]["reason"] == "Completed"
    assert cs(st, "err")["state"]["terminated"]["reason"] == "Error"
    oom = cs(st, "oom")["state"]["terminated"]
    assert (oom["reason"], oom["exitCode"]) == ("OOMKilled", 137)
    c = cs(st, "cant")["state"]["terminated"]
    assert c["reason"] == "ContainerCannotRun" and c["exitCode"] == 128
    assert c["message"] == 'OCI runtime create failed: exec: "nope": not found'
    assert c["startedAt"] == "1970-01-01T00:00:00Z" and c["finishedAt"] == rfc3339(NOW - 10)
    assert set(c) == {"exitCode", "reason", "message", "startedAt", "finishedAt", "containerID"}
    err = cs(st, "err")["state"]["terminated"]
    assert set(err) == {"exitCode", "reason", "startedAt", "finishedAt", "containerID"}
    assert err["containerID"] == cs(st, "err")["containerID"]


def test_cannot_run_as_the_docker_shim_reports_it():
    # runtime/docker.py: exited, start = finish = creation time, Docker's error text
    pod = make_pod([spec("a")], policy="Never")
    t = NOW - 5
    failed = ctr("a", state=ContainerState.EXITED, exit_code=127, error="exec: not found",
                 created=t, started=t, finished=t)
    term = cs(status_of(pod, [sandbox()], [failed]), "a")["state"]["terminated"]
    assert (term["reason"], term["message"], term["exitCode"]) == ("ContainerCannotRun", "exec: not found", 127)
    # an error text on a container that really ran is just an Error exit
    ran = ctr("a", state=ContainerState.EXITED, exit_code=1, error="x", created=t, started=t + 1, finished=t + 3)
    assert cs(status_of(pod, [sandbox()], [ran]), "a")["state"]["terminated"]["reason"] == "Error"


def test_created_with_start_error_counts_as_cannot_run():
    pod = make_pod([spec("a")], policy="Never")
    failed = ctr("a", state=ContainerState.CREATED, exit_code=127, error="exec: not found", started=None)
    st = status_of(pod, [sandbox()], [failed])
    assert cs(st, "a")["state"]["terminated"]["reason"] == "ContainerCannotRun"
    assert st["phase"] == "Failed"


def test_crash_loop_shows_waiting_with_last_termination_and_restart_count():
    pod = make_pod([spec("app")])
    older = dead("app", 2, attempt=2, created=NOW - 40)
    newest = dead("app", 2, attempt=3, created=NOW - 20, started=NOW - 19, finished=NOW - 18)
    msg = f"back-off 1m20s restarting failed container=app pod=web_default({UID})"
    st = status_of(pod, [sandbox()], [older, newest], waiting={"app": ("CrashLoopBackOff", msg)})
    app = cs(st, "app")
    assert app["state"] == {"waiting": {"reason": "CrashLoopBackOff", "message": msg}}
    assert app["lastState"] == {"terminated": {
        "exitCode": 2, "reason": "Error", "startedAt": rfc3339(NOW - 19),
        "finishedAt": rfc3339(NOW - 18), "containerID": f"docker://{newest.id}"}}
    assert app["restartCount"] == 3 and app["ready"] is False and app["started"] is False
    assert app["containerID"] == f"docker://{newest.id}"
    assert st["phase"] == "Running"  # kubectl shows CrashLoopBackOff for a Running pod


def test_last_state_comes_from_the_previous_dead_instance():
    pod = make_pod([spec("app")])
    old = dead("app", 1, attempt=4, created=NOW - 40)
    run = ctr("app", attempt=5, created=NOW - 10)
    app = cs(status_of(pod, [sandbox()], [run, old]), "app")
    assert "running" in app["state"] and app["restartCount"] == 5
    assert app["lastState"]["terminated"]["containerID"] == f"docker://{old.id}"


def test_waiting_reason_for_never_created_container():
    pod = make_pod([spec("a")])
    st = status_of(pod, [sandbox()], [], waiting={"a": ("ErrImageNeverPull", 'image "x" is not present')})
    assert cs(st, "a")["state"] == {"waiting": {"reason": "ErrImageNeverPull",
                                                "message": 'image "x" is not present'}}
    assert st["phase"] == "Pending"


def test_waiting_entry_does_not_hide_a_running_container():
    pod = make_pod([spec("a")])
    st = status_of(pod, [sandbox()], [ctr("a")], waiting={"a": ("ErrImagePull", "x")})
    assert "running" in cs(st, "a")["state"]


def test_created_never_started_container_is_waiting():
    pod = make_pod([spec("a")])
    st = status_of(pod, [sandbox()], [ctr("a", state=ContainerState.CREATED, started=None)])
    assert cs(st, "a")["state"] == {"waiting": {"reason": "ContainerCreating"}}
    assert st["phase"] == "Pending"


def test_readiness_probe_gates_ready():
    pod = make_pod([spec("a", readinessProbe={"httpGet": {"port": 80}})])
    st = status_of(pod, [sandbox()], [ctr("a")])
    assert cs(st, "a")["ready"] is False and cs(st, "a")["started"] is True
    assert cond(st, "Ready")["message"] == "containers with unready status: [a]"
    st = status_of(pod, [sandbox()], [ctr("a")], readiness={"a": True})
    assert cs(st, "a")["ready"] is True and cond(st, "Ready")["status"] == "True"


def test_vanished_running_container_is_reported_unknown_and_restarted():
    pod = make_pod([spec("a")])
    first = status_of(pod, [sandbox()], [ctr("a")])
    st = status_of(pod, [sandbox()], [], previous=first)
    a = cs(st, "a")
    assert a["lastState"]["terminated"]["reason"] == "ContainerStatusUnknown"
    assert a["restartCount"] == 1 and "waiting" in a["state"]


def test_readiness_gates():
    pod = make_pod([spec("a")], readinessGates=[{"conditionType": "example.com/lb"}])
    st = status_of(pod, [sandbox()], [ctr("a")])
    ready = cond(st, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ReadinessGatesNotReady")
    assert cond(st, "ContainersReady")["status"] == "True"
    pod["status"] = {"conditions": [{"type": "example.com/lb", "status": "True"}]}
    st = status_of(pod, [sandbox()], [ctr("a")])
    assert cond(st, "Ready")["status"] == "True"
    assert st["conditions"][0] == {"type": "example.com/lb", "status": "True"}  # kept, first


# --- transitions and times -------------------------------------------------------------------


def test_last_transition_time_kept_while_status_unchanged():
    pod = make_pod([spec("a")])
    t0 = status_of(pod, [sandbox()], [], now=NOW)
    t1 = status_of(pod, [sandbox()], [ctr("a")], previous=t0, now=NOW + 30)
    assert cond(t1, "PodScheduled")["lastTransitionTime"] == rfc3339(NOW)
    assert cond(t1, "PodReadyToStartContainers")["lastTransitionTime"] == rfc3339(NOW)
    assert cond(t1, "Ready")["lastTransitionTime"] == rfc3339(NOW + 30)
    assert cond(t1, "ContainersReady")["lastTransitionTime"] == rfc3339(NOW + 30)
    t2 = status_of(pod, [sandbox()], [ctr("a")], previous=t1, now=NOW + 90)
    assert t2["conditions"] == t1["conditions"]
    t3 = status_of(pod, [sandbox()], [dead("a", 1)], previous=t2, now=NOW + 120,
                   waiting={"a": ("CrashLoopBackOff", "back-off 10s")})
    assert cond(t3, "Ready")["lastTransitionTime"] == rfc3339(NOW + 120)
    assert cond(t3, "PodScheduled")["lastTransitionTime"] == rfc3339(NOW)


def test_start_time_kept_and_not_moved_by_an_agent_restart():
    pod = make_pod([spec("a")])
    first = status_of(pod, [sandbox()], [ctr("a")], start_time=NOW - 500)
    assert first["startTime"] == rfc3339(NOW - 500)
    assert status_of(pod, [sandbox()], [ctr("a")], previous=first, start_time=NOW)["startTime"] == rfc3339(NOW - 500)
    # no memory at all: the sandbox's creation is the best evidence
    assert status_of(pod, [sandbox()], [ctr("a")], start_time=NOW)["startTime"] == rfc3339(NOW - 100)
    assert "startTime" not in status_of(pod, [], [], start_time=None)


def test_phase_reason_and_message_are_kept_with_the_phase():
    pod = make_pod([spec("a")])
    prev = status_of(pod, [sandbox()], [ctr("a")])
    prev["reason"], prev["message"] = "Special", "kept"
    st = status_of(pod, [sandbox()], [ctr("a")], previous=prev)
    assert (st["reason"], st["message"]) == ("Special", "kept")
    # the phase changed: its reason and message went with it
    st = status_of(pod, [sandbox()], [ctr("a")], previous={**prev, "phase": "Pending"})
    assert st["phase"] == "Running" and "reason" not in st and "message" not in st


def test_host_network_pod_gets_the_host_address():
    pod = make_pod([spec("a")], hostNetwork=True)
    st = status_of(pod, [], [], pod_ips=())
    assert st["podIP"] == HOST and st["podIPs"] == [{"ip": HOST}]


def test_rejected_manifest_still_gets_a_status():
    pod = make_pod([{"name": "c", "image": "busybox", "resources": {"limits": {"memory": "12Mx"}}},
                    {"image": "nameless"}])
    st = status_of(pod, [], [], pod_ips=(), start_time=None)
    assert [c["name"] for c in st["containerStatuses"]] == ["c"]
    assert st["qosClass"] in ("BestEffort", "Burstable", "Guaranteed")
    assert qos_class(pod) in ("BestEffort", "Burstable", "Guaranteed")


# --- QoS --------------------------------------------------------------------------------------


@pytest.mark.parametrize("containers,expected", [
    ([spec("a")], "BestEffort"),
    ([spec("a", resources={"requests": {"cpu": "100m"}})], "Burstable"),
    ([spec("a", resources={"limits": {"memory": "16Mi"}, "requests": {"memory": "16Mi"}})], "Burstable"),
    ([spec("a", resources={"limits": {"cpu": "1", "memory": "1Gi"}, "requests": {"cpu": "1000m", "memory": "1Gi"}})],
     "Guaranteed"),
    ([spec("a", resources={"limits": {"cpu": "1", "memory": "1Gi"}, "requests": {"cpu": "500m", "memory": "1Gi"}})],
     "Burstable"),
    ([spec("a", resources={"limits": {"cpu": "1", "memory": "1Gi"}, "requests": {"cpu": "1", "memory": "1Gi"}}),
      spec("b")], "Burstable"),
])
def test_fallback_qos_class(containers, expected):
    assert _fallback_qos_class(make_pod(containers)) == expected


def test_rfc3339():
    assert rfc3339(0) == "1970-01-01T00:00:00Z"
    assert rfc3339(NOW + 0.9) == "2023-11-14T22:13:20Z"


def test_container_status_uses_spec_image_and_spec_order():
    pod = make_pod([spec("z", image="busybox:1.35"), spec("a", image="other:2")])
    st = status_of(pod, [sandbox()], [ctr("a"), ctr("z")])
    assert [(c["name"], c["image"]) for c in st["containerStatuses"]] == [("z", "busybox:1.35"), ("a", "other:2")]
    assert container_hash(spec("a")) != ""
