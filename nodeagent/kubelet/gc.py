"""Garbage collection of dead pod sandboxes, as kubelet's container GC does for them.

A sandbox that is not running and has no containers is debris when its pod is gone
(no pod worker knows its uid) or when a newer sandbox of the same pod exists: an agent
killed between creating and starting a sandbox leaves one behind, and the next sync
makes a new one. Nothing else ever removes those.

What is never touched: running sandboxes, the newest sandbox of a pod the workers
know, and any sandbox that still has containers (dead or alive) — the last dead
containers of a pod are kept until the pod is deleted, and removing a pod's
containers is the pod worker's business (``Kubelet.terminate_pod``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import structlog

from runtime.types import ContainerStatus, NotFound, RuntimeService, SandboxState, SandboxStatus

log = structlog.get_logger(__name__)


def dead_sandboxes(
    sandboxes: Iterable[SandboxStatus],
    containers: Iterable[ContainerStatus],
    known_pod_uids: set[str],
) -> list[SandboxStatus]:
    """The sandboxes to remove (pure): not ready, no containers, and the pod is unknown
    or has a newer sandbox."""
    by_pod: dict[str, list[SandboxStatus]] = {}
    for sandbox in sandboxes:
        by_pod.setdefault(sandbox.pod.uid, []).append(sandbox)
    used = {c.sandbox_id for c in containers if c.sandbox_id}
    # A container without a sandbox label could belong to any sandbox of its pod.
    unlabelled = {c.pod.uid for c in containers if not c.sandbox_id}
    victims: list[SandboxStatus] = []
    for uid, group in by_pod.items():
        if uid in unlabelled:
            continue
        newest_first = sorted(group, key=lambda s: (s.created_at, s.attempt), reverse=True)
        for index, sandbox in enumerate(newest_first):
            if sandbox.state == SandboxState.READY or sandbox.id in used:
                continue
            if uid in known_pod_uids and index == 0:
                continue  # the pod's current sandbox: its worker decides
            victims.append(sandbox)
    return victims


async def collect_dead_sandboxes(
    runtime: RuntimeService,
    known_pod_uids: Callable[[], set[str]],
    listing: tuple[list[SandboxStatus], list[ContainerStatus]] | None = None,
) -> list[str]:
    """Remove dead sandboxes (see ``dead_sandboxes``); returns the removed ids.

    ``listing`` is a recent (sandboxes, containers) listing to decide on (the PLEG's
    last relist) instead of listing the runtime again. Either way the known uids are
    read after the runtime was listed: a pod whose worker started meanwhile is then
    known, so its brand-new sandbox is never mistaken for debris, and a sandbox created
    after the listing is not in it.
    """
    if listing is None:
        listing = (await runtime.list_pod_sandboxes(), await runtime.list_containers())
    sandboxes, containers = listing
    victims = dead_sandboxes(sandboxes, containers, known_pod_uids())
    removed: list[str] = []
    for sandbox in victims:
        try:
            await runtime.remove_pod_sandbox(sandbox.id)
        except NotFound:
            continue
        removed.append(sandbox.id)
    if removed:
        log.info("removed dead pod sandboxes", sandboxes=[
            f"{s.pod.namespace}/{s.pod.name} attempt {s.attempt} ({s.id[:12]})"
            for s in victims if s.id in removed])
    return removed
