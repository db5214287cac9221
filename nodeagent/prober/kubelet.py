"""The kubelet's calls into this package, kept here so ``Kubelet`` needs one line
per hook point: what ``compute_pod_actions`` and ``generate_pod_status`` get from the
prober, and the postStart/preStop steps of starting and stopping a container."""

from __future__ import annotations

import json
import math
import time
from typing import TYPE_CHECKING, Any, Iterable

import structlog

from nodeagent.api.podspec import iter_containers
from nodeagent.kubelet.events import NORMAL, WARNING, container_field_path
from nodeagent.prober.handlers import Target
from runtime.types import ContainerState, ContainerStatus

if TYPE_CHECKING:
    from nodeagent.kubelet.kubelet import Kubelet
    from nodeagent.prober.manager import ProbeManager

log = structlog.get_logger(__name__)

PRE_STOP_LABEL = "io.kubernetes.container.preStopHandler"
# kubelet never stops a container with less than this after its preStop hook ran.
MIN_GRACE_AFTER_PRESTOP = 2
# kubelet runs postStart without a deadline, blocking the pod's worker; this agent
# bounds it (the pod's grace period when longer) so a hung hook cannot wedge a pod.
POST_START_TIMEOUT = 120.0


def probe_inputs(prober: "ProbeManager | None", uid: str, containers: Iterable[ContainerStatus]) -> dict[str, Any]:
    """Keyword arguments for ``compute_pod_actions``: kills and startup verdicts."""
    if prober is None:
        return {}
    started, _ready = prober.container_results(uid, containers)
    kills = {cid: (req.probe_type.value.lower(), req.grace) for cid, req in prober.kills(uid).items()}
    return {"probe_kills": kills, "started": started}


def probe_results(prober: "ProbeManager | None", uid: str, containers: Iterable[ContainerStatus]) -> dict[str, Any]:
    """Keyword arguments for ``generate_pod_status``: readiness and startup results."""
    if prober is None:
        return {}
    started, ready = prober.container_results(uid, containers)
    return {"readiness": ready, "startup": started}


def _spec(pod: dict, name: str) -> dict | None:
    return next((c for _kind, c in iter_containers(pod) if c.get("name") == name), None)


def _grace(pod: dict) -> int:
    return int(pod["spec"].get("terminationGracePeriodSeconds", 30))


async def post_start(
    kubelet: "Kubelet", pod: dict, container: dict, container_id: str, pod_ip: str | None, field_path: str
) -> bool:
    """Run the container's postStart hook; on failure kill the container and return
    True (kubelet: event FailedPostStartHook, then the restart policy decides)."""
    handler = (container.get("lifecycle") or {}).get("postStart")
    if not handler or kubelet.hooks is None:
        return False
    timeout = max(POST_START_TIMEOUT, float(_grace(pod)))
    error = await kubelet.hooks.run(pod, container, handler, Target(container_id, pod_ip, container), timeout)
    if error is None:
        return False
    log.warning("postStart hook failed", pod=pod["metadata"]["name"], container=container["name"], error=error)
    kubelet.events.event(pod, WARNING, "FailedPostStartHook", error, field_path=field_path)
    kubelet.events.event(pod, NORMAL, "Killing", "FailedPostStartHook", field_path=field_path)
    await kubelet._stop_container(container_id, _grace(pod), pod, container["name"])
    return True


def hook_labels(container: dict) -> dict[str, str]:
    """Labels for the runtime: the preStop handler, so a pod whose spec is gone (its
    manifest removed while the agent was down) still gets it when stopped, as kubelet
    keeps it in its container labels too."""
    handler = (container.get("lifecycle") or {}).get("preStop")
    return {PRE_STOP_LABEL: json.dumps(handler, sort_keys=True)} if handler else {}


async def pre_stop(
    kubelet: "Kubelet", pod: dict | None, name: str, container_id: str, grace: int,
    status: ContainerStatus | None = None,
) -> int:
    """Run the container's preStop hook within ``grace``; return the grace left for
    the stop signal (at least 2 s, as kubelet). Without the pod's spec the handler
    comes from the container's labels."""
    if kubelet.hooks is None or grace <= 0:
        return grace
    if status is not None and status.state != ContainerState.RUNNING:
        return grace  # nothing runs to run a hook in
    if pod is not None:
        container = _spec(pod, name) or {"name": name}
        handler = (container.get("lifecycle") or {}).get("preStop")
    elif status is not None and status.labels.get(PRE_STOP_LABEL):
        container = {"name": name}
        try:
            handler = json.loads(status.labels[PRE_STOP_LABEL])
        except ValueError:
            handler = None
        pod = {"metadata": {"name": status.pod.name, "namespace": status.pod.namespace,
                            "uid": status.pod.uid}, "spec": {}}
    else:
        handler = None
    if not isinstance(handler, dict) or pod is None:
        return grace
    started = time.monotonic()
    if pod.get("spec"):
        pod_ip = await kubelet._pod_ip(pod)
    else:
        net = await kubelet.network.pod_status(pod["metadata"]["uid"])
        pod_ip = net.ip if net else None
    error = await kubelet.hooks.run(pod, container, handler, Target(container_id, pod_ip, container), float(grace))
    if error is not None:
        log.warning("preStop hook failed", pod=pod["metadata"]["name"], container=name, error=error)
        if pod.get("spec"):  # an event needs the pod object; a pod known only from labels is logged
            kind = "sidecar" if any(c.get("name") == name for c in pod["spec"].get("initContainers") or ()) else "app"
            kubelet.events.event(pod, WARNING, "FailedPreStopHook", error,
                                 field_path=container_field_path(kind, name, pod))
    left = grace - math.ceil(time.monotonic() - started)
    return max(MIN_GRACE_AFTER_PRESTOP, left)
