"""The core/v1 PodStatus of a pod, built from what the runtime holds for it.

A pure function mirroring kubelet's generateAPIPodStatus, convertToAPIContainerStatuses,
getPhase and pkg/kubelet/status/generate.go, plus the status manager's bookkeeping
(lastTransitionTime kept while a condition's status is unchanged, startTime kept,
terminal phases never left). The output is a JSON-ready dict with exactly the keys the
Kubernetes API serialises: optional fields are left out rather than set to None, except
``lastProbeTime``, which the API itself writes as null.

Project choices (see also the module docstring of podactions):
* ``containerStatuses`` follow the spec order (upstream sorts them by name; clients
  look statuses up by name, so nothing depends on the order);
* a terminated container that never started shows ``startedAt`` 1970-01-01T00:00:00Z,
  as the CRI conversion of a zero start time does upstream;
* ``ready`` needs a readiness result only for containers with a readiness probe; with
  no prober wired in (``readiness`` None) such containers stay unready.
"""

from __future__ import annotations

import time
from typing import Iterable, Mapping

from nodeagent.kubelet.podactions import (
    cannot_run,
    exit_code,
    group_by_name,
    is_dead,
    is_sidecar,
    sandbox_needs_recreation,
)
from runtime.types import ContainerState, ContainerStatus, SandboxStatus

try:  # the pod spec module owns QoS; fall back while it does not exist yet
    from nodeagent.api.podspec import qos_class as _qos_class
except ImportError:  # pragma: no cover - depends on the other module being present
    _qos_class = None

KUBELET_CONDITIONS = (
    "PodReadyToStartContainers",
    "Initialized",
    "Ready",
    "ContainersReady",
    "PodScheduled",
)
TERMINAL_PHASES = ("Succeeded", "Failed")


def rfc3339(ts: float) -> str:
    """Unix seconds as the API's RFC 3339 timestamp (UTC, whole seconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(ts)))


# --- QoS fallback -----------------------------------------------------------------


def _fallback_qos_class(pod: dict) -> str:
    """v1qos.GetPodQOS: sums cpu/memory requests and limits over all containers."""
    try:
        from nodeagent.api.quantity import parse_quantity as parse
    except ImportError:  # pragma: no cover - quantity module always ships with the agent
        def parse(value):  # type: ignore[misc]
            return float(str(value).rstrip("m") or 0)

    spec = pod.get("spec") or {}
    requests: dict[str, object] = {}
    limits: dict[str, object] = {}
    guaranteed = True
    for container in list(spec.get("containers") or []) + list(spec.get("initContainers") or []):
        resources = container.get("resources") or {}
        for name, value in (resources.get("requests") or {}).items():
            if name in ("cpu", "memory") and parse(value) > 0:
                requests[name] = requests.get(name, 0) + parse(value)
        found = set()
        for name, value in (resources.get("limits") or {}).items():
            if name in ("cpu", "memory") and parse(value) > 0:
                found.add(name)
                limits[name] = limits.get(name, 0) + parse(value)
        if not {"cpu", "memory"} <= found:
            guaranteed = False
    if not requests and not limits:
        return "BestEffort"
    if guaranteed:
        for name, amount in requests.items():
            if limits.get(name) != amount:
                guaranteed = False
                break
    if guaranteed and len(requests) == len(limits):
        return "Guaranteed"
    return "Burstable"


def qos_class(pod: dict) -> str:
    """The pod's QoS class; a pod whose resources do not parse (a rejected manifest
    still gets a status) is reported BestEffort rather than failing the status."""
    try:
        if _qos_class is not None:
            return _qos_class(pod)
        return _fallback_qos_class(pod)
    except (ValueError, TypeError, AttributeError):
        return "BestEffort"


# --- container statuses ------------------------------------------------------------


def _terminated(c: ContainerStatus) -> dict:
    if c.oom_killed:
        reason = "OOMKilled"
    elif cannot_run(c):
        reason = "ContainerCannotRun"
    elif exit_code(c) == 0:
        reason = "Completed"
    else:
        reason = "Error"
    state: dict = {"exitCode": exit_code(c), "reason": reason}
    if c.error:
        state["message"] = c.error
    elif c.message:
        state["message"] = c.message
    state["startedAt"] = rfc3339(c.started_at or 0)
    state["finishedAt"] = rfc3339(c.finished_at or c.created_at)
    state["containerID"] = c.container_id
    return state


def _waiting(reason: str, message: str = "") -> dict:
    waiting = {"reason": reason}
    if message:
        waiting["message"] = message
    return {"waiting": waiting}


def _volume_mounts(spec: dict) -> list[dict]:
    mounts = []
    for m in spec.get("volumeMounts") or []:
        if not isinstance(m, dict) or not m.get("name") or not m.get("mountPath"):
            continue
        status = {"name": m["name"], "mountPath": m["mountPath"]}
        if m.get("readOnly"):
            status["readOnly"] = True
            # Docker has no recursive read-only mounts: IfPossible falls back to Disabled.
            status["recursiveReadOnly"] = "Disabled"
        mounts.append(status)
    return mounts


def _spec(pod: dict) -> dict:
    spec = pod.get("spec")
    return spec if isinstance(spec, dict) else {}


def _named(containers: object) -> list[dict]:
    if not isinstance(containers, list):
        return []
    return [c for c in containers if isinstance(c, dict) and isinstance(c.get("name"), str)]


class _StatusBuilder:
    def __init__(
        self,
        pod: dict,
        containers: list[ContainerStatus],
        waiting: Mapping[str, tuple[str, str]],
        previous: dict | None,
        readiness: Mapping[str, bool] | None,
        startup: Mapping[str, bool] | None = None,
    ) -> None:
        self.pod = pod
        spec = pod.get("spec") or {}
        # A rejected manifest still gets a status: skip entries that are not containers.
        self.inits: list[dict] = _named(spec.get("initContainers"))
        self.apps: list[dict] = _named(spec.get("containers"))
        self.instances = group_by_name(containers)
        self.waiting = waiting
        self.readiness = readiness
        self.startup = startup
        self.default_reason = "PodInitializing" if self.inits else "ContainerCreating"
        self.deleting = (pod.get("metadata") or {}).get("deletionTimestamp") is not None
        self.previous: dict[str, dict] = {}
        for key in ("initContainerStatuses", "containerStatuses"):
            for cs in (previous or {}).get(key) or []:
                self.previous[cs["name"]] = cs

    def container_status(self, spec: dict, kind: str) -> dict:
        name = spec["name"]
        instances = self.instances.get(name, [])
        newest = instances[0] if instances else None
        old = self.previous.get(name)

        status: dict = {"name": name}
        state: dict
        last_state: dict = {}
        restart_count = 0
        if newest is None:
            if old is not None and "terminated" in (old.get("state") or {}):
                # The instances are gone (removed); the last known end stays true.
                state = old["state"]
                last_state = old.get("lastState") or {}
                restart_count = int(old.get("restartCount") or 0)
            else:
                state = _waiting(self.default_reason)
                if old is not None:
                    restart_count = int(old.get("restartCount") or 0)
                    last_state = old.get("lastState") or {}
                    if "running" in (old.get("state") or {}) and "terminated" not in last_state:
                        # It ran and vanished without a trace: say so instead of
                        # pretending it never started (kubelet does the same).
                        last_state = {"terminated": {
                            "exitCode": 137,
                            "reason": "ContainerStatusUnknown",
                            "message": "The container was running before and can no longer be found",
                        }}
                        if not self.deleting:
                            restart_count += 1
        else:
            restart_count = newest.attempt
            state = self._instance_state(newest, old)
            if state.get("terminated", {}).get("reason") == "ContainerStatusUnknown" and old:
                restart_count = int(old.get("restartCount") or 0) + 1
            previous_dead = next((c for c in instances[1:] if is_dead(c)), None)
            if previous_dead is not None:
                last_state = {"terminated": _terminated(previous_dead)}
        # A container that will be (re)started shows why it is not running yet.
        regular_init_done = (
            kind == "init" and newest is not None and is_dead(newest) and exit_code(newest) == 0
        )
        reason = self.waiting.get(name)
        if reason is not None and not regular_init_done and (
            newest is None or newest.state != ContainerState.RUNNING
        ):
            if "terminated" in state:
                last_state = state
            state = _waiting(reason[0], reason[1])

        running = "running" in state
        # With a startup probe a container counts as started once the probe passed.
        started = running and (
            bool(self.startup and self.startup.get(name)) if spec.get("startupProbe") else True
        )
        if kind == "init":
            ready = "terminated" in state and state["terminated"].get("exitCode") == 0
        elif not started:
            ready = False
        elif spec.get("readinessProbe"):
            ready = bool(self.readiness and self.readiness.get(name))
        else:
            ready = True

        status["state"] = state
        status["lastState"] = last_state
        status["ready"] = ready
        status["restartCount"] = restart_count
        status["image"] = spec.get("image", "")
        status["imageID"] = newest.image_id if newest is not None else (old or {}).get("imageID", "")
        if newest is not None:
            status["containerID"] = newest.container_id
        elif old is not None and old.get("containerID") and "terminated" in state:
            status["containerID"] = old["containerID"]
        status["started"] = started
        mounts = _volume_mounts(spec)
        if mounts:
            status["volumeMounts"] = mounts
        return status

    def _instance_state(self, c: ContainerStatus, old: dict | None) -> dict:
        if c.state == ContainerState.RUNNING:
            return {"running": {"startedAt": rfc3339(c.started_at or c.created_at)}}
        if is_dead(c):
            return {"terminated": _terminated(c)}
        if c.state == ContainerState.UNKNOWN and old is not None and "running" in (old.get("state") or {}):
            return {"terminated": {
                "exitCode": 137,
                "reason": "ContainerStatusUnknown",
                "message": "The container was running before; the runtime no longer knows its state",
            }}
        # Created but not started, or unknown: waiting to run.
        return _waiting(self.default_reason)


# --- phase and conditions -----------------------------------------------------------


def _any_app_started(pod: dict, statuses: Mapping[str, dict]) -> bool:
    for spec in _named(_spec(pod).get("containers")):
        state = (statuses.get(spec["name"]) or {}).get("state") or {}
        if "running" in state or "terminated" in state:
            return True
    return False


def get_phase(pod: dict, statuses: Mapping[str, dict], *, pod_is_terminal: bool = False) -> str:
    """kubelet's getPhase over the generated container statuses (by name)."""
    spec = _spec(pod)
    policy = spec.get("restartPolicy", "Always")
    inits = _named(spec.get("initContainers"))
    apps = _named(spec.get("containers"))
    pending_init = failed_init = 0
    for c in inits:
        if is_sidecar(c):
            continue
        cs = statuses.get(c["name"])
        state = (cs or {}).get("state") or {}
        if cs is None or "running" in state:
            pending_init += 1
        elif "terminated" in state:
            if state["terminated"].get("exitCode", 0) != 0:
                failed_init += 1
        elif "waiting" in state:
            last = (cs.get("lastState") or {}).get("terminated")
            if last is not None:
                if last.get("exitCode", 0) != 0:
                    failed_init += 1
            else:
                pending_init += 1
        else:
            pending_init += 1

    unknown = running = waiting = stopped = succeeded = 0
    for c in inits:
        if not is_sidecar(c):
            continue
        cs = statuses.get(c["name"])
        if cs is None:
            unknown += 1
            continue
        state = cs.get("state") or {}
        if "running" in state:
            if not cs.get("started"):
                pending_init += 1
            running += 1
        elif "terminated" in state:
            pass  # an exited sidecar does not decide the phase
        elif "waiting" in state:
            if not (cs.get("lastState") or {}).get("terminated"):
                pending_init += 1
                waiting += 1
        else:
            pending_init += 1
            unknown += 1

    for c in apps:
        cs = statuses.get(c["name"])
        if cs is None:
            unknown += 1
            continue
        state = cs.get("state") or {}
        if "running" in state:
            running += 1
        elif "terminated" in state:
            stopped += 1
            if state["terminated"].get("exitCode", 0) == 0:
                succeeded += 1
        elif "waiting" in state:
            if (cs.get("lastState") or {}).get("terminated"):
                stopped += 1
            else:
                waiting += 1
        else:
            unknown += 1

    if failed_init > 0 and policy == "Never":
        return "Failed"
    if (pending_init > 0 and not _any_app_started(pod, statuses)) or waiting > 0:
        return "Pending"
    if running > 0 and unknown == 0:
        return "Running"
    if running == 0 and stopped > 0 and unknown == 0:
        if pod_is_terminal:
            return "Succeeded" if stopped == succeeded else "Failed"
        if policy == "Always":
            return "Running"
        if stopped == succeeded:
            return "Succeeded"
        if policy == "Never":
            return "Failed"
        return "Running"
    return "Pending"


def _names(names: list[str]) -> str:
    """Go's %s of a []string: [a b c]."""
    return "[" + " ".join(names) + "]"


def _containers_ready(pod: dict, statuses: Mapping[str, dict], phase: str) -> tuple[str, str, str]:
    spec = _spec(pod)
    unknown: list[str] = []
    unready: list[str] = []
    relevant = [c["name"] for c in _named(spec.get("initContainers")) if is_sidecar(c)]
    relevant += [c["name"] for c in _named(spec.get("containers"))]
    for name in relevant:
        cs = statuses.get(name)
        if cs is None:
            unknown.append(name)
        elif not cs.get("ready"):
            unready.append(name)
    if phase == "Succeeded" and not unknown:
        return "False", "PodCompleted", ""
    if phase == "Failed":
        return "False", "PodFailed", ""
    messages = []
    if unknown:
        messages.append(f"containers with unknown status: {_names(unknown)}")
    if unready:
        messages.append(f"containers with unready status: {_names(unready)}")
    if messages:
        return "False", "ContainersNotReady", ", ".join(messages)
    return "True", "", ""


def _pod_ready(
    pod: dict, containers_ready: tuple[str, str, str], other_conditions: list[dict]
) -> tuple[str, str, str]:
    if containers_ready[0] != "True":
        return containers_ready
    by_type = {c.get("type"): c for c in other_conditions}
    messages = []
    for gate in _spec(pod).get("readinessGates") or []:
        kind = gate.get("conditionType") if isinstance(gate, dict) else None
        cond = by_type.get(kind)
        if cond is None:
            messages.append(f'readiness gate "{kind}" has no condition yet')
        elif cond.get("status") != "True":
            messages.append(f'readiness gate "{kind}" is {cond.get("status")}, not True')
    if messages:
        return "False", "ReadinessGatesNotReady", ", ".join(messages)
    return "True", "", ""


def _initialized(pod: dict, statuses: Mapping[str, dict], phase: str) -> tuple[str, str, str]:
    inits = _named(_spec(pod).get("initContainers"))
    unknown: list[str] = []
    incomplete: list[str] = []
    for c in inits:
        cs = statuses.get(c["name"])
        if cs is None:
            unknown.append(c["name"])
            continue
        done = cs.get("started") if is_sidecar(c) else cs.get("ready")
        if not done:
            incomplete.append(c["name"])
    if phase == "Succeeded" and not unknown:
        return "True", "PodCompleted", ""
    if _any_app_started(pod, statuses):
        return "True", "", ""
    messages = []
    if unknown:
        messages.append(f"containers with unknown status: {_names(unknown)}")
    if incomplete:
        messages.append(f"containers with incomplete status: {_names(incomplete)}")
    if messages:
        return "False", "ContainersNotInitialized", ", ".join(messages)
    return "True", "", ""


def _condition(
    kind: str, value: tuple[str, str, str], previous: Mapping[str, dict], now: float
) -> dict:
    status, reason, message = value
    cond: dict = {"type": kind, "status": status, "lastProbeTime": None}
    old = previous.get(kind)
    if old is not None and old.get("status") == status and old.get("lastTransitionTime"):
        cond["lastTransitionTime"] = old["lastTransitionTime"]
    else:
        cond["lastTransitionTime"] = rfc3339(now)
    if reason:
        cond["reason"] = reason
    if message:
        cond["message"] = message
    return cond


# --- the status -----------------------------------------------------------------------


def generate_pod_status(
    pod: dict,
    sandboxes: list[SandboxStatus],
    containers: list[ContainerStatus],
    *,
    waiting: Mapping[str, tuple[str, str]],
    pod_ips: list[str],
    host_ips: list[str],
    previous: dict | None,
    now: float,
    start_time: float | None,
    readiness: Mapping[str, bool] | None = None,
    pod_is_terminal: bool = False,
    startup: Mapping[str, bool] | None = None,
) -> dict:
    """The pod's core/v1 PodStatus as a JSON-ready dict.

    ``waiting`` names containers that will be (re)started but are not running yet, with
    the reason and message to show (CrashLoopBackOff, ErrImagePull ...). ``previous``
    is the last status this node generated (keeps lastTransitionTime, startTime and a
    terminal phase). ``readiness`` holds readiness probe results by container name,
    ``startup`` startup probe results (the prober's ``container_results``).
    ``pod_is_terminal`` says the pod will run nothing again (deleted and stopped): its
    phase is then Succeeded or Failed even under restartPolicy Always.
    """
    builder = _StatusBuilder(pod, list(containers), waiting, previous, readiness, startup)
    init_statuses = [
        builder.container_status(c, "sidecar" if is_sidecar(c) else "init") for c in builder.inits
    ]
    app_statuses = [builder.container_status(c, "app") for c in builder.apps]
    by_name = {cs["name"]: cs for cs in init_statuses + app_statuses}

    previous = previous or {}
    phase = get_phase(pod, by_name, pod_is_terminal=pod_is_terminal)
    if phase not in TERMINAL_PHASES and previous.get("phase") in TERMINAL_PHASES:
        phase = previous["phase"]  # a pod never leaves a terminal phase

    old_conditions = {c.get("type"): c for c in previous.get("conditions") or []}
    foreign = [
        c for c in ((pod.get("status") or {}).get("conditions") or [])
        if c.get("type") not in KUBELET_CONDITIONS
    ]
    needs_sandbox, _attempt, _newest = sandbox_needs_recreation(sandboxes)
    containers_ready = _containers_ready(pod, by_name, phase)
    conditions = list(foreign) + [
        _condition("PodReadyToStartContainers",
                   ("False" if needs_sandbox else "True", "", ""), old_conditions, now),
        _condition("Initialized", _initialized(pod, by_name, phase), old_conditions, now),
        _condition("Ready", _pod_ready(pod, containers_ready, foreign), old_conditions, now),
        _condition("ContainersReady", containers_ready, old_conditions, now),
        _condition("PodScheduled", ("True", "", ""), old_conditions, now),
    ]

    status: dict = {"phase": phase, "conditions": conditions}
    if previous.get("phase") == phase:
        # Reason and message belong to the phase (kubelet keeps them while it holds).
        for key in ("message", "reason"):
            if previous.get(key):
                status[key] = previous[key]
    if host_ips:
        status["hostIP"] = host_ips[0]
        status["hostIPs"] = [{"ip": ip} for ip in host_ips]
    ips = list(pod_ips)
    if not ips and _spec(pod).get("hostNetwork") and host_ips:
        ips = list(host_ips)  # host-network pods carry the node's addresses
    if ips:
        status["podIP"] = ips[0]
        status["podIPs"] = [{"ip": ip} for ip in ips]
    started = previous.get("startTime") or _start_time(start_time, sandboxes, containers)
    if started:
        status["startTime"] = started
    if init_statuses:
        status["initContainerStatuses"] = init_statuses
    if app_statuses:
        status["containerStatuses"] = app_statuses
    status["qosClass"] = qos_class(pod)
    return status


def _start_time(
    start_time: float | None,
    sandboxes: Iterable[SandboxStatus],
    containers: Iterable[ContainerStatus],
) -> str | None:
    """When the node took the pod on: the earliest of the caller's record and what the
    runtime holds, so an agent restart does not move it forward."""
    candidates = [t for t in [start_time] if t]
    candidates += [s.created_at for s in sandboxes if s.created_at]
    candidates += [c.created_at for c in containers if c.created_at]
    return rfc3339(min(candidates)) if candidates else None
