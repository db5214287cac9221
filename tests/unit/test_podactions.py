"""compute_pod_actions / termination_order against synthetic runtime state."""

from __future__ import annotations

import itertools

import pytest

from nodeagent.backoff import Backoff
from nodeagent.kubelet.hashing import container_hash
from nodeagent.kubelet.podactions import (
    KillAction,
    PodActions,
    StartAction,
    compute_pod_actions,
    go_duration,
    termination_order,
)
from runtime.types import ContainerState, ContainerStatus, PodRef, SandboxState, SandboxStatus

UID = "uid-1"
REF = PodRef(name="web", namespace="default", uid=UID)
NOW = 10_000.0
_ids = itertools.count(1)


def spec(name: str, **extra) -> dict:
    return {"name": name, "image": "busybox:1.35", "imagePullPolicy": "IfNotPresent", **extra}


def sidecar(name: str) -> dict:
    return spec(name, restartPolicy="Always")


def make_pod(containers=None, init=None, policy="Always", **spec_extra) -> dict:
    pod_spec = {
        "containers": containers if containers is not None else [spec("app")],
        "restartPolicy": policy,
        "terminationGracePeriodSeconds": 30,
        **spec_extra,
    }
    if init:
        pod_spec["initContainers"] = init
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "namespace": "default", "uid": UID}, "spec": pod_spec}


def sandbox(attempt=0, ready=True, created=100.0, sid=None) -> SandboxStatus:
    return SandboxStatus(
        id=sid or f"sb{attempt}", pod=REF, attempt=attempt,
        state=SandboxState.READY if ready else SandboxState.NOTREADY, created_at=created,
    )


def ctr(pod: dict, name: str, *, attempt=0, state=ContainerState.RUNNING, created=None,
        started=None, finished=None, exit_code=None, error="", sandbox_id="sb0",
        spec_hash=None, oom=False) -> ContainerStatus:
    all_specs = {c["name"]: c for c in pod["spec"].get("containers", []) + pod["spec"].get("initContainers", [])}
    created = created if created is not None else 200.0 + attempt
    if started is None and state in (ContainerState.RUNNING, ContainerState.EXITED) and not error:
        started = created + 0.1
    if state == ContainerState.EXITED:
        finished = finished if finished is not None else (started or created) + 1.0
        exit_code = 0 if exit_code is None else exit_code
    return ContainerStatus(
        id=f"c{next(_ids)}", pod=REF, name=name, attempt=attempt, state=state,
        image="busybox:1.35", image_id="docker://sha256:abc", created_at=created,
        started_at=started, finished_at=finished, exit_code=exit_code, error=error,
        spec_hash=spec_hash if spec_hash is not None else (container_hash(all_specs[name]) if name in all_specs else "x"),
        sandbox_id=sandbox_id, oom_killed=oom,
    )


def exited(pod, name, code=0, **kw) -> ContainerStatus:
    return ctr(pod, name, state=ContainerState.EXITED, exit_code=code, **kw)


def starts(actions: PodActions) -> list[tuple[str, str, int]]:
    return [(s.name, s.kind, s.attempt) for s in actions.to_start]


def compute(pod, sandboxes, containers, *, now=NOW, backoff=None, **kw) -> PodActions:
    return compute_pod_actions(pod, sandboxes, containers, backoff or Backoff(), now, **kw)


# --- sandbox ------------------------------------------------------------------------


def test_new_pod_creates_sandbox_and_starts_all_app_containers_in_one_sync():
    pod = make_pod([spec("a"), spec("b")])
    a = compute(pod, [], [])
    assert a.kill_pod and a.create_sandbox and a.sandbox_attempt == 0
    assert starts(a) == [("a", "app", 0), ("b", "app", 0)]
    assert a.to_kill == [] and a.to_remove == [] and a.waiting == {} and a.requeue_after is None


def test_healthy_pod_needs_nothing():
    pod = make_pod([spec("a"), spec("b")])
    a = compute(pod, [sandbox()], [ctr(pod, "a"), ctr(pod, "b")])
    assert a == PodActions(sandbox_id="sb0")


def test_dead_sandbox_is_recreated_with_next_attempt_and_containers_restarted():
    pod = make_pod([spec("a")])
    old = [sandbox(0, ready=False, created=100), sandbox(1, ready=False, created=150, sid="sb1")]
    a = compute(pod, old, [ctr(pod, "a", attempt=0, sandbox_id="sb1")])
    assert a.kill_pod and a.create_sandbox and a.sandbox_attempt == 2
    assert starts(a) == [("a", "app", 1)]


def test_two_ready_sandboxes_are_replaced():
    pod = make_pod()
    a = compute(pod, [sandbox(0), sandbox(1, created=150, sid="sb1")], [ctr(pod, "app")])
    assert a.kill_pod and a.create_sandbox and a.sandbox_attempt == 2


def test_ready_sandbox_that_is_not_the_newest_is_replaced():
    pod = make_pod()
    a = compute(pod, [sandbox(0), sandbox(1, ready=False, created=150, sid="sb1")], [ctr(pod, "app")])
    assert a.create_sandbox and a.sandbox_attempt == 2


def test_recreated_sandbox_reruns_init_containers_from_the_first():
    pod = make_pod([spec("app")], init=[spec("i1"), spec("i2")])
    old = [exited(pod, "i1", sandbox_id="sb0"), exited(pod, "i2", sandbox_id="sb0"),
           ctr(pod, "app", sandbox_id="sb0")]
    a = compute(pod, [sandbox(0, ready=False)], old)
    assert a.kill_pod and a.create_sandbox and a.sandbox_attempt == 1
    assert starts(a) == [("i1", "init", 1)]
    # old init instances are purged so they cannot count as progress later
    assert set(a.to_remove) == {old[0].id, old[1].id}


def test_init_instances_of_an_older_sandbox_do_not_count_as_progress():
    pod = make_pod([spec("app")], init=[spec("i1"), spec("i2")])
    # purge failed: the old i2 (success) is still there, the new sandbox just ran i1
    old_i2 = exited(pod, "i2", sandbox_id="sb0", created=150)
    new_i1 = exited(pod, "i1", attempt=1, sandbox_id="sb1", created=300)
    a = compute(pod, [sandbox(0, ready=False), sandbox(1, created=250, sid="sb1")], [old_i2, new_i1])
    assert starts(a) == [("i2", "init", 1)]
    assert a.sandbox_id == "sb1" and not a.kill_pod


def test_finished_never_pod_gets_no_new_sandbox():
    pod = make_pod([spec("a")], policy="Never")
    a = compute(pod, [sandbox(0, ready=False)], [exited(pod, "a", 0)])
    assert a.kill_pod and not a.create_sandbox and a.to_start == []


def test_never_pod_whose_sandbox_died_while_running_is_killed_not_recreated():
    pod = make_pod([spec("a")], policy="Never")
    a = compute(pod, [sandbox(0, ready=False)], [ctr(pod, "a")])
    assert a.kill_pod and not a.create_sandbox and a.to_start == []


def test_onfailure_pod_with_all_succeeded_gets_no_new_sandbox():
    pod = make_pod([spec("a"), spec("b")], policy="OnFailure")
    a = compute(pod, [sandbox(0, ready=False)], [exited(pod, "a", 0), exited(pod, "b", 0)])
    assert a.kill_pod and not a.create_sandbox and a.to_start == []


def test_onfailure_recreation_restarts_only_failed_containers():
    pod = make_pod([spec("a"), spec("b")], policy="OnFailure")
    conts = [exited(pod, "a", 0), exited(pod, "b", 1, finished=NOW - 100)]
    a = compute(pod, [sandbox(0, ready=False)], conts)
    assert a.create_sandbox and a.sandbox_attempt == 1
    assert starts(a) == [("b", "app", 1)]


def test_never_pod_that_never_ran_gets_its_sandbox():
    pod = make_pod([spec("a")], policy="Never")
    a = compute(pod, [sandbox(0, ready=False)], [])
    assert a.create_sandbox and a.sandbox_attempt == 1 and starts(a) == [("a", "app", 0)]


def test_terminating_kills_the_pod_and_starts_nothing():
    pod = make_pod([spec("a")])
    for sandboxes, conts in (([], []), ([sandbox()], [exited(pod, "a", 1)]), ([sandbox()], [ctr(pod, "a")])):
        a = compute(pod, sandboxes, conts, terminating=True)
        assert a.kill_pod and not a.create_sandbox and a.to_start == [] and a.waiting == {}


# --- init containers and sidecars ------------------------------------------------------


def test_init_containers_run_one_at_a_time_in_order():
    pod = make_pod([spec("a"), spec("b")], init=[spec("i1"), spec("i2")])
    sb = [sandbox()]
    assert starts(compute(pod, sb, [])) == [("i1", "init", 0)]
    i1_running = ctr(pod, "i1")
    assert starts(compute(pod, sb, [i1_running])) == []
    i1_done = exited(pod, "i1", 0)
    assert starts(compute(pod, sb, [i1_done])) == [("i2", "init", 0)]
    assert starts(compute(pod, sb, [i1_done, ctr(pod, "i2")])) == []
    i2_done = exited(pod, "i2", 0)
    a = compute(pod, sb, [i1_done, i2_done])
    assert starts(a) == [("a", "app", 0), ("b", "app", 0)]


def test_removed_init_containers_are_not_rerun_once_apps_run():
    pod = make_pod([spec("a")], init=[spec("i1")])
    a = compute(pod, [sandbox()], [ctr(pod, "a")])
    assert a == PodActions(sandbox_id="sb0")


def test_failed_init_with_restart_never_fails_the_pod():
    pod = make_pod([spec("a")], init=[spec("i1"), sidecar("s"), spec("i2")], policy="Never")
    conts = [exited(pod, "i1", 0), ctr(pod, "s"), exited(pod, "i2", 7)]
    a = compute(pod, [sandbox()], conts)
    assert a.kill_pod and not a.create_sandbox and a.to_start == [] and a.waiting == {}
    # once the sandbox is down nothing is recreated
    a = compute(pod, [sandbox(ready=False)], conts)
    assert a.kill_pod and not a.create_sandbox and a.to_start == []


@pytest.mark.parametrize("policy", ["OnFailure", "Always"])
def test_failed_init_restarts_with_back_off(policy):
    pod = make_pod([spec("a")], init=[spec("i1")], policy=policy)
    failed = exited(pod, "i1", 3, started=NOW - 2, finished=NOW - 1)
    b = Backoff()
    a = compute(pod, [sandbox()], [failed], backoff=b)
    assert a.to_start == [] and not a.kill_pod
    assert a.waiting["i1"][0] == "CrashLoopBackOff"
    assert a.requeue_after == pytest.approx(9.0)
    a = compute(pod, [sandbox()], [failed], now=NOW + 9.5, backoff=b)
    assert starts(a) == [("i1", "init", 1)] and a.waiting == {}


def test_sidecar_must_run_before_the_next_init_container():
    pod = make_pod([spec("app")], init=[spec("first"), sidecar("side"), spec("second")])
    sb = [sandbox()]
    first = exited(pod, "first", 0)
    assert starts(compute(pod, sb, [first])) == [("side", "sidecar", 0)]
    side = ctr(pod, "side")
    assert starts(compute(pod, sb, [first, side])) == [("second", "init", 0)]
    second = exited(pod, "second", 0)
    assert starts(compute(pod, sb, [first, side, second])) == [("app", "app", 0)]
    # all up: nothing to do
    assert compute(pod, sb, [first, side, second, ctr(pod, "app")]) == PodActions(sandbox_id="sb0")


def test_sidecar_not_yet_started_blocks_the_next_init_container():
    pod = make_pod([spec("app")], init=[sidecar("side"), spec("second")])
    created_only = ctr(pod, "side", state=ContainerState.CREATED, started=None)
    a = compute(pod, [sandbox()], [created_only])
    assert starts(a) == [("side", "sidecar", 0)]  # replaced under the same attempt
    assert a.to_remove == [created_only.id]


def test_last_init_being_a_running_sidecar_initializes_the_pod():
    pod = make_pod([spec("a"), spec("b")], init=[sidecar("side")])
    a = compute(pod, [sandbox()], [ctr(pod, "side")])
    assert starts(a) == [("a", "app", 0), ("b", "app", 0)]


def test_exited_sidecar_restarts_with_back_off_while_apps_run_even_under_never():
    pod = make_pod([spec("app")], init=[sidecar("side")], policy="Never")
    dead_side = exited(pod, "side", 1, started=NOW - 3, finished=NOW - 2)
    b = Backoff()
    a = compute(pod, [sandbox()], [dead_side, ctr(pod, "app")], backoff=b)
    assert a.to_start == [] and a.waiting["side"][0] == "CrashLoopBackOff"
    assert a.requeue_after == pytest.approx(8.0) and not a.kill_pod
    a = compute(pod, [sandbox()], [dead_side, ctr(pod, "app")], now=NOW + 8.01, backoff=b)
    assert starts(a) == [("side", "sidecar", 1)]


def test_missing_sidecar_of_an_initialized_pod_is_started_again():
    pod = make_pod([spec("app")], init=[spec("i1"), sidecar("side")])
    a = compute(pod, [sandbox()], [ctr(pod, "app")])
    assert starts(a) == [("side", "sidecar", 0)]


@pytest.mark.parametrize("policy,code", [("Never", 0), ("Never", 1), ("OnFailure", 0)])
def test_sidecars_are_stopped_once_all_app_containers_are_terminal(policy, code):
    pod = make_pod([spec("a"), spec("b")], init=[sidecar("s1"), sidecar("s2")], policy=policy)
    conts = [ctr(pod, "s1"), exited(pod, "s2", 1, finished=NOW - 1), exited(pod, "a", code), exited(pod, "b", 0)]
    a = compute(pod, [sandbox()], conts)
    assert a.kill_pod and not a.create_sandbox
    assert a.to_start == [] and a.waiting == {} and a.requeue_after is None
    # the stopped pod stays down
    a = compute(pod, [sandbox(ready=False)], conts)
    assert a.kill_pod and not a.create_sandbox and a.to_start == []


def test_sidecar_spec_change_restarts_it():
    pod = make_pod([spec("app")], init=[sidecar("side")])
    old_side = ctr(pod, "side", spec_hash="stale")
    a = compute(pod, [sandbox()], [old_side, ctr(pod, "app")])
    assert [k.container_id for k in a.to_kill] == [old_side.id]
    assert a.to_kill[0].reason == "SpecChanged" and "changed" in a.to_kill[0].message
    assert starts(a) == [("side", "sidecar", 1)]


def test_regular_init_container_in_unknown_state_is_killed_and_rerun():
    pod = make_pod([spec("app")], init=[spec("i1")], policy="OnFailure")
    odd = ctr(pod, "i1", state=ContainerState.UNKNOWN)
    a = compute(pod, [sandbox()], [odd])
    assert [k.container_id for k in a.to_kill] == [odd.id] and a.to_kill[0].reason == "Unknown"
    assert starts(a) == [("i1", "init", 1)]
    pod_never = make_pod([spec("app")], init=[spec("i1")], policy="Never")
    a = compute(pod_never, [sandbox()], [ctr(pod_never, "i1", state=ContainerState.UNKNOWN)])
    assert a.kill_pod and a.to_start == []


# --- app containers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "policy,code,restarted",
    [("Always", 0, True), ("Always", 1, True), ("OnFailure", 0, False), ("OnFailure", 2, True),
     ("Never", 0, False), ("Never", 1, False)],
)
def test_restart_policy_for_app_containers(policy, code, restarted):
    pod = make_pod([spec("a"), spec("keep")], policy=policy)
    dead = exited(pod, "a", code, finished=NOW - 100)
    a = compute(pod, [sandbox()], [dead, ctr(pod, "keep")])
    assert starts(a) == ([("a", "app", 1)] if restarted else [])
    assert not a.kill_pod  # "keep" still runs


def test_changed_spec_restarts_running_container_regardless_of_policy():
    pod = make_pod([spec("a", command=["sleep", "2"])], policy="Never")
    running = ctr(pod, "a", spec_hash=container_hash(spec("a", command=["sleep", "1"])))
    a = compute(pod, [sandbox()], [running])
    assert a.to_kill == [KillAction(running.id, "a", "SpecChanged", "spec of container a changed; restarting it")]
    assert starts(a) == [("a", "app", 1)]
    assert not a.kill_pod


def test_container_without_recorded_hash_is_left_alone():
    pod = make_pod([spec("a")])
    a = compute(pod, [sandbox()], [ctr(pod, "a", spec_hash="")])
    assert a == PodActions(sandbox_id="sb0")


def test_containers_not_in_spec_are_killed_and_removed():
    pod = make_pod([spec("a")])
    stray_running = ctr(pod, "gone", spec_hash="x")
    stray_dead = exited(pod, "old", 0, spec_hash="x")
    a = compute(pod, [sandbox()], [ctr(pod, "a"), stray_running, stray_dead])
    assert [(k.container_id, k.name, k.reason) for k in a.to_kill] == [(stray_running.id, "gone", "NotInSpec")]
    assert set(a.to_remove) == {stray_running.id, stray_dead.id}
    assert a.to_start == []


def test_created_but_never_started_container_is_replaced_not_counted_as_running():
    pod = make_pod([spec("a")], policy="Never")
    leftover = ctr(pod, "a", state=ContainerState.CREATED, started=None)
    a = compute(pod, [sandbox()], [leftover])
    assert a.to_remove == [leftover.id]
    assert starts(a) == [("a", "app", 0)]  # it never ran: same attempt, not a restart
    assert not a.kill_pod


def test_created_leftover_after_a_crash_keeps_counting_restarts():
    pod = make_pod([spec("a")])
    dead = exited(pod, "a", 1, attempt=2, created=100, finished=NOW - 500)
    leftover = ctr(pod, "a", attempt=3, state=ContainerState.CREATED, started=None, created=300)
    a = compute(pod, [sandbox()], [dead, leftover])
    assert a.to_remove == [leftover.id]
    assert starts(a) == [("a", "app", 3)]


def test_container_that_could_not_run_is_dead_and_backs_off():
    pod = make_pod([spec("a")])
    failed = ctr(pod, "a", state=ContainerState.CREATED, started=None, exit_code=127,
                 error='exec: "nope": executable file not found', created=NOW - 1)
    a = compute(pod, [sandbox()], [failed])
    assert a.to_remove == [] and a.to_start == []
    assert a.waiting["a"][0] == "CrashLoopBackOff"
    assert a.requeue_after == pytest.approx(9.0)


def test_unknown_app_container_is_killed_and_restarted():
    pod = make_pod([spec("a")])
    odd = ctr(pod, "a", state=ContainerState.UNKNOWN)
    a = compute(pod, [sandbox()], [odd])
    assert [(k.container_id, k.reason) for k in a.to_kill] == [(odd.id, "Unknown")]
    assert starts(a) == [("a", "app", 1)]


def test_all_apps_terminal_without_sidecars_kills_pod_only_when_nothing_restarts():
    pod = make_pod([spec("a")], policy="Never")
    a = compute(pod, [sandbox()], [exited(pod, "a", 0)])
    assert a.kill_pod and a.to_start == []
    pod = make_pod([spec("a")], policy="Always")
    a = compute(pod, [sandbox()], [exited(pod, "a", 0, finished=NOW - 5)])
    assert not a.kill_pod and a.waiting["a"][0] == "CrashLoopBackOff"  # backing off still counts


def test_gc_keeps_newest_and_newest_dead_instance_per_container():
    pod = make_pod([spec("a"), spec("b")])
    a_dead = [exited(pod, "a", 1, attempt=n, created=100 + n, finished=NOW - 1000 + n) for n in range(3)]
    a_run = ctr(pod, "a", attempt=3, created=200)
    b_dead = [exited(pod, "b", 1, attempt=n, created=100 + n, finished=NOW - 1000 + n) for n in range(3)]
    act = compute(pod, [sandbox()], a_dead + [a_run] + b_dead)
    # a: keep running #3 and dead #2; b: newest (dead #2) only, it doubles as lastState
    assert set(act.to_remove) == {a_dead[0].id, a_dead[1].id, b_dead[0].id, b_dead[1].id}


def test_older_running_duplicate_is_killed():
    pod = make_pod([spec("a")])
    older = ctr(pod, "a", attempt=0, created=100)
    newer = ctr(pod, "a", attempt=1, created=200)
    act = compute(pod, [sandbox()], [older, newer])
    assert [k.container_id for k in act.to_kill] == [older.id] and act.to_start == []


# --- back-off ------------------------------------------------------------------------------


def test_crash_loop_message_and_requeue():
    pod = make_pod([spec("app")])
    dead = exited(pod, "app", 2, attempt=1, started=NOW - 6, finished=NOW - 5)
    b = Backoff()
    b.record_exit(f"{UID}/app/{container_hash(spec('app'))}", NOW - 30, 1.0)  # an earlier crash
    a = compute(pod, [sandbox()], [dead], backoff=b)
    reason, message = a.waiting["app"]
    assert reason == "CrashLoopBackOff"
    assert message == f"back-off 20s restarting failed container=app pod=web_default({UID})"
    assert a.requeue_after == pytest.approx(15.0)
    assert a.to_start == [] and not a.kill_pod


def test_back_off_is_derived_from_runtime_state_after_an_agent_restart():
    pod = make_pod([spec("app")])
    # 4th crash (attempt 3) 5 s ago; the agent has just restarted with empty memory
    dead = exited(pod, "app", 1, attempt=3, started=NOW - 6, finished=NOW - 5)
    a = compute(pod, [sandbox()], [dead], backoff=Backoff())
    assert a.waiting["app"][1].startswith("back-off 1m20s restarting failed container=app")
    assert a.requeue_after == pytest.approx(75.0)


def test_spec_change_while_crash_looping_restarts_at_once():
    pod = make_pod([spec("app", command=["new"])])
    dead = exited(pod, "app", 1, attempt=5, finished=NOW - 1, spec_hash="old-hash")
    a = compute(pod, [sandbox()], [dead])
    assert starts(a) == [("app", "app", 6)] and a.waiting == {}


class FakeRuntime:
    """Applies PodActions the way the kubelet does, with a fake clock."""

    def __init__(self, pod: dict):
        self.pod = pod
        self.sandboxes: list[SandboxStatus] = []
        self.containers: list[ContainerStatus] = []
        self.specs = {c["name"]: c for c in pod["spec"]["containers"] + pod["spec"].get("initContainers", [])}
        self.start_log: list[tuple[str, float]] = []

    def apply(self, a: PodActions, now: float) -> None:
        if a.kill_pod:
            for c in self.containers:
                if c.state == ContainerState.RUNNING:
                    c.state, c.finished_at, c.exit_code = ContainerState.EXITED, now, 137
            for s in self.sandboxes:
                s.state = SandboxState.NOTREADY
        sandbox_id = a.sandbox_id
        if a.create_sandbox:
            sb = sandbox(a.sandbox_attempt, created=now, sid=f"sb{a.sandbox_attempt}")
            self.sandboxes.append(sb)
            sandbox_id = sb.id
        for k in a.to_kill:
            c = next(c for c in self.containers if c.id == k.container_id)
            c.state, c.finished_at, c.exit_code = ContainerState.EXITED, now, 137
        self.containers = [c for c in self.containers if c.id not in a.to_remove]
        for s in a.to_start:
            self.containers.append(ContainerStatus(
                id=f"c{next(_ids)}", pod=REF, name=s.name, attempt=s.attempt, state=ContainerState.RUNNING,
                image="busybox:1.35", image_id="", created_at=now, started_at=now,
                spec_hash=container_hash(self.specs[s.name]), sandbox_id=sandbox_id or "", kind=s.kind))
            self.start_log.append((s.name, now))

    def crash_running(self, now: float, code: int = 2) -> None:
        for c in self.containers:
            if c.state == ContainerState.RUNNING:
                c.state, c.finished_at, c.exit_code = ContainerState.EXITED, now, code


def run_crash_loop(backoff: Backoff, pod: dict, runtime: FakeRuntime, t: float, crashes: int, run_for: float):
    for _ in range(crashes):
        # sync until the container is started again (following requeue_after)
        for _sync in range(5):
            a = compute_pod_actions(pod, runtime.sandboxes, runtime.containers, backoff, t)
            runtime.apply(a, t)
            if a.to_start:
                break
            assert a.requeue_after is not None and a.waiting["app"][0] == "CrashLoopBackOff"
            t += a.requeue_after
        t += run_for
        runtime.crash_running(t)
    return t


def test_crash_loop_gaps_double_up_to_the_cap():
    pod = make_pod([spec("app")])
    rt = FakeRuntime(pod)
    b = Backoff(base=10, cap=300)
    run_crash_loop(b, pod, rt, 0.0, crashes=9, run_for=1.0)
    times = [t for _n, t in rt.start_log]
    gaps = [round(b2 - a2 - 1.0, 6) for a2, b2 in zip(times, times[1:])]  # minus the 1 s run
    assert gaps == [10, 20, 40, 80, 160, 300, 300, 300]
    assert [c.attempt for c in rt.containers] == [7, 8]  # newest + newest dead kept
    assert len(rt.containers) <= 2


def test_crash_loop_gaps_with_test_settings_are_1_2_4_seconds():
    pod = make_pod([spec("app")])
    rt = FakeRuntime(pod)
    run_crash_loop(Backoff(base=1, cap=8), pod, rt, 0.0, crashes=6, run_for=0.05)
    times = [t for _n, t in rt.start_log]
    gaps = [round(b2 - a2 - 0.05, 6) for a2, b2 in zip(times, times[1:])]
    assert gaps == [1, 2, 4, 8, 8]


def test_crash_loop_survives_agent_restart_and_resets_after_long_run():
    pod = make_pod([spec("app")])
    rt = FakeRuntime(pod)
    t = run_crash_loop(Backoff(), pod, rt, 0.0, crashes=4, run_for=1.0)
    # kill -9: a fresh Backoff must not restart the crash-looper at once
    fresh = Backoff()
    a = compute_pod_actions(pod, rt.sandboxes, rt.containers, fresh, t + 1)
    assert a.to_start == [] and a.requeue_after == pytest.approx(79.0)
    # after the delay it restarts, then runs 10 minutes: next delay is back to base
    t = t + 80
    rt.apply(compute_pod_actions(pod, rt.sandboxes, rt.containers, fresh, t), t)
    t += 600
    rt.crash_running(t)
    a = compute_pod_actions(pod, rt.sandboxes, rt.containers, fresh, t)
    assert a.requeue_after == pytest.approx(10.0)
    assert a.waiting["app"][1].startswith("back-off 10s ")


def test_full_lifecycle_with_init_sidecar_and_never_policy():
    pod = make_pod([spec("app")], init=[spec("first"), sidecar("side")], policy="Never")
    rt = FakeRuntime(pod)
    b = Backoff()
    t = 0.0
    for _ in range(4):
        rt.apply(compute_pod_actions(pod, rt.sandboxes, rt.containers, b, t), t)
        t += 1
        for c in rt.containers:
            if c.name == "first" and c.state == ContainerState.RUNNING:
                c.state, c.finished_at, c.exit_code = ContainerState.EXITED, t, 0
    assert [n for n, _t in rt.start_log] == ["first", "side", "app"]
    # the app finishes: sidecar stopped, pod done, nothing recreated afterwards
    app = next(c for c in rt.containers if c.name == "app")
    app.state, app.finished_at, app.exit_code = ContainerState.EXITED, t, 0
    a = compute_pod_actions(pod, rt.sandboxes, rt.containers, b, t)
    assert a.kill_pod and a.to_start == []
    rt.apply(a, t)
    assert all(c.state == ContainerState.EXITED for c in rt.containers)
    for _ in range(3):
        a = compute_pod_actions(pod, rt.sandboxes, rt.containers, b, t)
        assert not a.create_sandbox and a.to_start == []
    assert len(rt.sandboxes) == 1


def test_go_duration_formatting():
    assert [go_duration(s) for s in (0, 0.5, 1, 10, 20, 80, 160, 300, 3600, 1.5)] == [
        "0s", "500ms", "1s", "10s", "20s", "1m20s", "2m40s", "5m0s", "1h0m0s", "1.5s"]


# --- termination order -------------------------------------------------------------------


def test_termination_order_apps_then_sidecars_reversed_then_strays():
    pod = make_pod([spec("a"), spec("b")], init=[sidecar("s1"), spec("i"), sidecar("s2")])
    cs = {n: ctr(pod, n, spec_hash="x") for n in ("s1", "s2", "a", "b", "i", "stray")}
    groups = termination_order(pod, list(cs.values()))
    names = [sorted(c.name for c in g) for g in groups]
    assert names == [["a", "b", "i"], ["s2"], ["s1"], ["stray"]]


def test_termination_order_skips_empty_groups():
    pod = make_pod([spec("a")], init=[sidecar("s1"), sidecar("s2")])
    groups = termination_order(pod, [ctr(pod, "s1")])
    assert [[c.name for c in g] for g in groups] == [["s1"]]
    assert termination_order(pod, []) == []


def test_start_action_fields():
    a = compute(make_pod([spec("x")]), [], [])
    assert a.to_start == [StartAction(name="x", kind="app", attempt=0)]
