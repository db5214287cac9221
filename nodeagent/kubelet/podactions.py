"""What one pod sync must do: kubelet's ``computePodActions``, as a pure function.

Input is the desired pod (a defaulted manifest dict) and what the runtime holds for it
(sandboxes and every container instance, dead or alive); output is a ``PodActions``
the kubelet carries out in order: kill the pod, create a sandbox, kill containers,
remove containers, start containers. Nothing here does I/O, and nothing is decided
from memory that the runtime could not give back after an agent restart: the only
state kept across syncs is the restart back-off, and that is re-derived from the dead
instances when it is missing.

Semantics follow kubelet (kuberuntime_manager.go, computeInitContainerActions with
native sidecars), with these project choices:
* back-off is decided here (kubelet checks it when starting): a container waiting out
  its back-off is not in ``to_start`` but in ``waiting`` as ``CrashLoopBackOff``, and
  ``requeue_after`` says when to look again;
* instances created but never started (agent killed between create and start) are
  removed and replaced, with the same attempt number since they never ran;
* garbage collection is per sync: per container name the newest instance and the
  newest dead instance (for ``lastState``) are kept, older dead ones removed;
* init instances that belong to an older sandbox (``sandbox_id`` differs from the
  current one) never count as progress, so a re-created sandbox reruns init
  containers even if removing the old ones failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

from nodeagent.backoff import Backoff
from nodeagent.kubelet.hashing import container_hash
from runtime.types import ContainerState, ContainerStatus, SandboxState, SandboxStatus

KIND_INIT = "init"
KIND_SIDECAR = "sidecar"
KIND_APP = "app"

REASON_CRASH_LOOP = "CrashLoopBackOff"


@dataclass
class StartAction:
    name: str
    kind: str  # "init" | "sidecar" | "app"
    attempt: int


@dataclass
class KillAction:
    container_id: str  # the runtime's id (no "docker://" prefix)
    name: str
    reason: str
    message: str
    # Seconds to stop within instead of the pod's grace period (a liveness/startup
    # probe's terminationGracePeriodSeconds).
    grace: int | None = None


@dataclass
class PodActions:
    # Stop every container of the pod (termination order) and every ready sandbox.
    kill_pod: bool = False
    create_sandbox: bool = False
    sandbox_attempt: int = 0
    # The ready sandbox to start containers in when no new one is created.
    sandbox_id: str | None = None
    to_start: list[StartAction] = field(default_factory=list)
    to_kill: list[KillAction] = field(default_factory=list)
    to_remove: list[str] = field(default_factory=list)
    # container name -> (reason, message) for containers that stay waiting this sync.
    waiting: dict[str, tuple[str, str]] = field(default_factory=dict)
    # Sync again after this many seconds even without a runtime event (back-off end).
    requeue_after: float | None = None


# --- container instance classification (shared with podstatus) -------------------


def cannot_run(c: ContainerStatus) -> bool:
    """The runtime created the container but its process never ran (Docker's
    ``ContainerCannotRun``): an error, a non-zero exit code, no real start. The Docker
    shim reports such a container exited with start = finish = creation time; a
    runtime may also leave the start time out."""
    if c.state not in (ContainerState.CREATED, ContainerState.EXITED):
        return False
    if not c.error or (c.exit_code or 0) == 0:
        return False
    return (
        not c.started_at
        or c.started_at <= c.created_at
        or (c.finished_at is not None and c.started_at >= c.finished_at)
    )


def never_started(c: ContainerStatus) -> bool:
    """Created, not started, and not a failed start either."""
    return c.state == ContainerState.CREATED and not cannot_run(c)


def is_dead(c: ContainerStatus) -> bool:
    return c.state == ContainerState.EXITED or cannot_run(c)


def exit_code(c: ContainerStatus) -> int:
    return c.exit_code if c.exit_code is not None else 0


def is_sidecar(init_container: dict) -> bool:
    return init_container.get("restartPolicy") == "Always"


def newest_first(instances: Iterable[ContainerStatus]) -> list[ContainerStatus]:
    return sorted(instances, key=lambda c: (c.created_at, c.attempt), reverse=True)


def group_by_name(containers: Iterable[ContainerStatus]) -> dict[str, list[ContainerStatus]]:
    """Container name -> its instances, newest first."""
    groups: dict[str, list[ContainerStatus]] = {}
    for c in containers:
        groups.setdefault(c.name, []).append(c)
    return {name: newest_first(items) for name, items in groups.items()}


def sandbox_needs_recreation(
    sandboxes: Iterable[SandboxStatus],
) -> tuple[bool, int, SandboxStatus | None]:
    """kubelet's PodSandboxChanged: (new sandbox needed, attempt for it, newest sandbox).

    A new sandbox is needed when there is none, when the newest is not ready, or when
    more than one is ready (an earlier sync died half-way).
    """
    ordered = sorted(sandboxes, key=lambda s: (s.created_at, s.attempt), reverse=True)
    if not ordered:
        return True, 0, None
    newest = ordered[0]
    ready = sum(1 for s in ordered if s.state == SandboxState.READY)
    if ready > 1 or newest.state != SandboxState.READY:
        return True, newest.attempt + 1, newest
    return False, newest.attempt, newest


def next_attempt(instances: list[ContainerStatus]) -> int:
    """Attempt number of the next instance: one more than the newest that ran (an
    instance that never started is replaced under its own number)."""
    best = 0
    for c in instances:
        best = max(best, c.attempt if never_started(c) else c.attempt + 1)
    return best


def go_duration(seconds: float) -> str:
    """Seconds as Go's ``time.Duration.String`` prints them (10s, 1m20s, 5m0s)."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{round(seconds * 1000, 6):g}ms"
    whole_minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(int(whole_minutes), 60)
    secs_text = f"{round(secs, 9):g}s"
    if hours:
        return f"{hours}h{minutes}m{secs_text}"
    if minutes:
        return f"{minutes}m{secs_text}"
    return secs_text


def format_pod(pod: dict) -> str:
    """kubelet's ``format.Pod``: ``name_namespace(uid)``."""
    meta = pod["metadata"]
    return f"{meta['name']}_{meta.get('namespace', 'default')}({meta['uid']})"


# --- the decision -------------------------------------------------------------------


class _Planner:
    """One computation; holds the pieces every step needs."""

    def __init__(
        self,
        pod: dict,
        sandboxes: list[SandboxStatus],
        containers: list[ContainerStatus],
        backoff: Backoff,
        now: float,
        probe_kills: Mapping[str, tuple[str, int | None]] | None = None,
        started: Mapping[str, bool] | None = None,
    ) -> None:
        self.pod = pod
        # Running instances (runtime id) that failed a liveness or startup probe:
        # id -> (probe kind "liveness"/"startup", grace override); from the prober.
        self.probe_kills = probe_kills or {}
        # Startup-probe verdicts by container name (absent: no startup probe).
        self.started = started or {}
        self.uid = pod["metadata"]["uid"]
        spec = pod["spec"]
        self.policy = spec.get("restartPolicy", "Always")
        self.inits: list[dict] = list(spec.get("initContainers") or [])
        self.apps: list[dict] = list(spec.get("containers") or [])
        self.sandboxes = sandboxes
        self.instances = group_by_name(containers)
        self.backoff = backoff
        self.now = now
        self.actions = PodActions()
        self._starts: list[tuple[int, StartAction]] = []  # (order, action)
        self._started_names: set[str] = set()
        self._killed_ids: set[str] = set()
        self._removed_ids: set[str] = set()

    # -- helpers --

    def newest(self, name: str, sandbox_id: str | None = None) -> ContainerStatus | None:
        """Newest instance of ``name``; with ``sandbox_id``, only instances known to
        belong to that sandbox (or whose sandbox is unknown) count."""
        for c in self.instances.get(name, ()):
            if sandbox_id and c.sandbox_id and c.sandbox_id != sandbox_id:
                continue
            return c
        return None

    def kill(self, c: ContainerStatus, reason: str, message: str, grace: int | None = None) -> None:
        if c.id in self._killed_ids:
            return
        self._killed_ids.add(c.id)
        self.actions.to_kill.append(KillAction(c.id, c.name, reason, message, grace))

    def kill_if_probe_failed(self, c: ContainerStatus) -> bool:
        """kubelet: a running instance that failed its liveness or startup probe is
        killed; its exit then takes the normal restart-policy and back-off path."""
        failed = self.probe_kills.get(c.id)
        if failed is None:
            return False
        kind, grace = failed
        message = f"Container {c.name} failed {kind} probe"
        if self.policy != "Never":
            message += ", will be restarted"
        self.kill(c, f"{kind.capitalize()}Probe", message, grace)
        return True

    def remove(self, container_id: str) -> None:
        if container_id in self._removed_ids:
            return
        self._removed_ids.add(container_id)
        self.actions.to_remove.append(container_id)

    def requeue(self, seconds: float) -> None:
        current = self.actions.requeue_after
        self.actions.requeue_after = seconds if current is None else min(current, seconds)

    def start(
        self, order: int, spec: dict, kind: str, current: ContainerStatus | None = None
    ) -> None:
        """Queue a start unless the container waits out its back-off (then it is
        reported waiting in CrashLoopBackOff). ``current`` is the instance the decision
        was made on; its exit is what the back-off counts from."""
        name = spec["name"]
        if name in self._started_names:
            return
        remaining, delay = self.backoff_remaining(spec, current)
        if remaining is not None:
            message = (
                f"back-off {go_duration(delay)} restarting failed "
                f"container={name} pod={format_pod(self.pod)}"
            )
            self.actions.waiting[name] = (REASON_CRASH_LOOP, message)
            self.requeue(remaining)
            return
        self._started_names.add(name)
        # Counted over every instance, old sandboxes included, so names never collide.
        attempt = next_attempt(self.instances.get(name, []))
        self._starts.append((order, StartAction(name=name, kind=kind, attempt=attempt)))

    def backoff_remaining(
        self, spec: dict, newest: ContainerStatus | None
    ) -> tuple[float | None, float]:
        """(seconds left, current delay) when the restart must wait, else (None, 0)."""
        if newest is None or not is_dead(newest):
            return None, 0.0
        want_hash = container_hash(spec)
        if newest.spec_hash and newest.spec_hash != want_hash:
            # A new spec is a new container for back-off purposes (kubelet keys the
            # back-off by the spec hash too).
            return None, 0.0
        key = f"{self.uid}/{spec['name']}/{want_hash}"
        finished = newest.finished_at or newest.created_at
        ran_for = 0.0
        if newest.started_at and newest.finished_at:
            ran_for = max(0.0, newest.finished_at - newest.started_at)
        delay = self.backoff.record_exit(key, finished, ran_for, attempt=newest.attempt)
        remaining = self.backoff.in_backoff(key, self.now)
        return remaining, delay

    def finalize(self) -> PodActions:
        self._starts.sort(key=lambda item: item[0])
        self.actions.to_start = [action for _order, action in self._starts]
        return self.actions

    # -- steps --

    def collect_garbage(self) -> None:
        """Per container name keep the newest instance and the newest dead one; drop
        never-started leftovers; kill and remove containers the spec no longer has."""
        spec_names = {c["name"] for c in self.inits} | {c["name"] for c in self.apps}
        for name, instances in self.instances.items():
            if name not in spec_names:
                for c in instances:
                    if c.state in (ContainerState.RUNNING, ContainerState.UNKNOWN):
                        self.kill(c, "NotInSpec", f"container {name} is not in the pod spec")
                    self.remove(c.id)
                continue
            current_seen = False
            dead_kept = False
            for c in instances:
                if never_started(c):
                    self.remove(c.id)
                    continue
                if not current_seen:
                    current_seen = True
                    dead_kept = is_dead(c)
                    continue
                if is_dead(c):
                    if dead_kept:
                        self.remove(c.id)
                    dead_kept = True
                elif c.state in (ContainerState.RUNNING, ContainerState.UNKNOWN):
                    # An older instance still running next to a newer one: only one
                    # instance of a container may run.
                    self.kill(c, "Duplicate", f"container {name} has a newer instance")

    def purge_init_containers(self) -> None:
        """A new sandbox reruns init containers from the start: drop their instances."""
        for spec in self.inits:
            for c in self.instances.get(spec["name"], ()):
                self.remove(c.id)

    def should_restart(self, c: ContainerStatus | None) -> bool:
        """kubelet's ShouldContainerBeRestarted for an app container's newest instance."""
        if c is None:
            return True
        if c.state == ContainerState.RUNNING:
            return False
        if c.state == ContainerState.UNKNOWN or never_started(c):
            return True
        if self.policy == "Never":
            return False
        if self.policy == "OnFailure":
            return exit_code(c) != 0
        return True

    def app_succeeded(self, spec: dict) -> bool:
        c = self.newest(spec["name"])
        return c is not None and is_dead(c) and exit_code(c) == 0

    def pod_is_finished(self) -> bool:
        """No sandbox must be created again: the pod ran and must not restart."""
        ran = any(
            not never_started(c) for instances in self.instances.values() for c in instances
        )
        if self.policy == "Never" and ran:
            return True
        initialized = any(
            c is not None and c.state in (ContainerState.CREATED, ContainerState.RUNNING, ContainerState.EXITED)
            for c in (self.newest(a["name"]) for a in self.apps)
        )
        to_start = [
            a for a in self.apps if not (self.policy == "OnFailure" and self.app_succeeded(a))
        ]
        return initialized and not to_start

    def plan_new_sandbox(self, attempt: int) -> None:
        self.actions.kill_pod = True
        if self.pod_is_finished():
            return
        self.actions.create_sandbox = True
        self.actions.sandbox_attempt = attempt
        self.purge_init_containers()
        if self.inits:
            first = self.inits[0]
            # The old instances are gone with the purge: start fresh, no back-off.
            self._started_names.add(first["name"])
            kind = KIND_SIDECAR if is_sidecar(first) else KIND_INIT
            attempt_no = next_attempt(self.instances.get(first["name"], []))
            self._starts.append((0, StartAction(first["name"], kind, attempt_no)))
            return
        for index, spec in enumerate(self.apps):
            if self.policy == "OnFailure" and self.app_succeeded(spec):
                continue
            self.start(1000 + index, spec, KIND_APP, self.newest(spec["name"]))

    def plan_init_containers(self, sandbox_id: str) -> bool:
        """computeInitContainerActions: returns whether the pod is initialized. Sets
        kill_pod when a regular init container failed under restartPolicy Never."""
        if not self.inits:
            return True
        initialized = False
        for spec in self.apps:
            c = self.newest(spec["name"], sandbox_id)
            if c is None:
                continue
            # Apps were created, so initialization finished before (its instances may
            # have been removed since); only sidecars need keeping alive. An exited app
            # proves it only when it provably ran in this sandbox: after a node reboot
            # every container of the old sandbox is exited too (kubelet's caveat).
            if c.state in (ContainerState.CREATED, ContainerState.RUNNING) or (
                c.state == ContainerState.EXITED and c.sandbox_id == sandbox_id
            ):
                initialized = True
                break
        previously_initialized = initialized
        restart_on_failure = self.policy != "Never"
        last = len(self.inits) - 1
        # Walk backwards: the last init container with an instance is the frontier;
        # everything before it has completed, except sidecars, which must keep running.
        for i in range(last, -1, -1):
            spec = self.inits[i]
            sidecar = is_sidecar(spec)
            kind = KIND_SIDECAR if sidecar else KIND_INIT
            c = self.newest(spec["name"], sandbox_id)
            if c is None:
                if previously_initialized and sidecar:
                    self.start(i, spec, kind, c)
                continue
            if previously_initialized and not sidecar:
                continue
            if never_started(c):
                self.start(i, spec, kind, c)  # the leftover itself is removed by the GC
            elif c.state == ContainerState.RUNNING:
                if sidecar:
                    self.kill_if_probe_failed(c)
                    # Started (its startup probe passed, if it has one): the next init
                    # container may run.
                    if not self.started.get(spec["name"], True):
                        pass
                    elif i == last:
                        initialized = True
                    elif not previously_initialized:
                        self.start_next_init(i + 1, sandbox_id)
                    if c.spec_hash and c.spec_hash != container_hash(spec):
                        self.kill(c, "SpecChanged", f"spec of init container {spec['name']} changed; restarting it")
                        self.start(i, spec, kind, c)
                # A regular init container is running: wait for it.
            elif is_dead(c):
                if sidecar:
                    self.start(i, spec, kind, c)
                elif exit_code(c) != 0:
                    if not restart_on_failure:
                        self.fail_pod()
                        return False
                    self.start(i, spec, kind, c)
                elif i == last:
                    initialized = True
                else:
                    self.start_next_init(i + 1, sandbox_id)
            else:  # unknown state: make sure it is gone before another instance runs
                self.kill(c, "Unknown", f"init container {spec['name']} is in state {c.state.value}; stopping it before a restart")
                if not sidecar and not restart_on_failure:
                    self.fail_pod()
                    return False
                self.start(i, spec, kind, c)
            previously_initialized = True
        if not previously_initialized:
            self.start_next_init(0, sandbox_id)
        return initialized

    def start_next_init(self, index: int, sandbox_id: str) -> None:
        spec = self.inits[index]
        kind = KIND_SIDECAR if is_sidecar(spec) else KIND_INIT
        self.start(index, spec, kind, self.newest(spec["name"], sandbox_id))

    def fail_pod(self) -> None:
        """A regular init container failed and must not restart: the pod is done."""
        self.actions.kill_pod = True
        self._starts.clear()
        self._started_names.clear()
        self.actions.waiting.clear()
        self.actions.requeue_after = None

    def plan_app_containers(self) -> None:
        keep = 0
        will_start = 0
        for index, spec in enumerate(self.apps):
            name = spec["name"]
            c = self.newest(name)
            if c is None or c.state != ContainerState.RUNNING:
                if self.should_restart(c):
                    if c is not None and c.state == ContainerState.UNKNOWN:
                        self.kill(c, "Unknown", f"container {name} is in state {c.state.value}; stopping it before a restart")
                    self.start(1000 + index, spec, KIND_APP, c)
                    will_start += 1
                continue
            if c.spec_hash and c.spec_hash != container_hash(spec):
                # Restart regardless of the restart policy: the spec changed.
                self.kill(c, "SpecChanged", f"spec of container {name} changed; restarting it")
                self.start(1000 + index, spec, KIND_APP, c)
                will_start += 1
                continue
            # Killed for a failed probe it still counts as running: its exit is
            # handled by the next sync like any other.
            self.kill_if_probe_failed(c)
            keep += 1
        if keep == 0 and will_start == 0:
            # Every app container is terminal and stays so: stop the sidecars too and
            # let the pod finish; restarting sidecars would keep it alive.
            self.actions.kill_pod = True
            self._starts.clear()
            self._started_names.clear()
            sidecars = {s["name"] for s in self.inits if is_sidecar(s)}
            for name in sidecars:
                self.actions.waiting.pop(name, None)
            self.actions.requeue_after = None


def compute_pod_actions(
    pod: dict,
    sandboxes: list[SandboxStatus],
    containers: list[ContainerStatus],
    backoff: Backoff,
    now: float,
    *,
    terminating: bool = False,
    probe_kills: Mapping[str, tuple[str, int | None]] | None = None,
    started: Mapping[str, bool] | None = None,
) -> PodActions:
    """Decide what one sync of ``pod`` must do, given what the runtime holds for it.

    ``probe_kills`` and ``started`` come from the prober (see ``_Planner``)."""
    plan = _Planner(pod, list(sandboxes), list(containers), backoff, now, probe_kills, started)
    if terminating:
        plan.actions.kill_pod = True
        return plan.finalize()

    plan.collect_garbage()
    needs_new, attempt, newest_sandbox = sandbox_needs_recreation(plan.sandboxes)
    if needs_new:
        plan.plan_new_sandbox(attempt)
        return plan.finalize()

    assert newest_sandbox is not None
    plan.actions.sandbox_id = newest_sandbox.id
    initialized = plan.plan_init_containers(newest_sandbox.id)
    if plan.actions.kill_pod or not initialized:
        return plan.finalize()
    plan.plan_app_containers()
    return plan.finalize()


def termination_order(pod: dict, containers: list[ContainerStatus]) -> list[list[ContainerStatus]]:
    """Groups to stop one after the other: app containers (and regular init containers,
    which kubelet stops without waiting too) first, then each sidecar in reverse spec
    order, then containers the spec does not know. Empty groups are left out."""
    spec = pod["spec"]
    inits = list(spec.get("initContainers") or [])
    app_names = {c["name"] for c in spec.get("containers") or []}
    regular_init_names = {c["name"] for c in inits if not is_sidecar(c)}
    sidecar_names = [c["name"] for c in inits if is_sidecar(c)]

    first = [c for c in containers if c.name in app_names or c.name in regular_init_names]
    groups: list[list[ContainerStatus]] = [first] if first else []
    for name in reversed(sidecar_names):
        group = [c for c in containers if c.name == name]
        if group:
            groups.append(group)
    known = app_names | regular_init_names | set(sidecar_names)
    rest = [c for c in containers if c.name not in known]
    if rest:
        groups.append(rest)
    return groups
