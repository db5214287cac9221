"""The kubelet's calls into this package, kept here so ``Kubelet`` needs one line
per hook point: what ``compute_pod_actions`` and ``generate_pod_status`` get from the
prober, and the postStart/preStop steps of starting and stopping a container."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Iterable

import structlog

from nodeagent.api.podspec import iter_containers
from nodeagent.kubelet.events import NORMAL, WARNING
from nodeagent.prober.handlers import Target
from runtime.types import ContainerStatus

if TYPE_CHECKING:
    from nodeagent.kubelet.kubelet import Kubelet
    from nodeagent.prober.manager import ProbeManager

log = structlog.get_logger(__name__)

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


async def pre_stop(kubelet: "Kubelet", pod: dict, name: str, container_id: str, grace: int) -> int:
    """Run the container's preStop hook within ``grace``; return the grace left for
    the stop signal (at least 2 s, as kubelet)."""
    container = _spec(pod, name)
    handler = ((container or {}).get("lifecycle") or {}).get("preStop")
    if not handler or kubelet.hooks is None or grace <= 0:
        return grace
    assert container is not None
    started = time.monotonic()
    pod_ip = await kubelet._pod_ip(pod)
    error = await kubelet.hooks.run(pod, container, handler, Target(container_id, pod_ip, container), float(grace))
    if error is not None:
        log.warning("preStop hook failed", pod=pod["metadata"]["name"], container=name, error=error)
        kind = "sidecar" if any(c.get("name") == name for c in pod["spec"].get("initContainers") or ()) else "app"
        from nodeagent.kubelet.events import container_field_path

        kubelet.events.event(pod, WARNING, "FailedPreStopHook", error,
                             field_path=container_field_path(kind, name, pod))
    left = grace - math.ceil(time.monotonic() - started)
    return max(MIN_GRACE_AFTER_PRESTOP, left)
