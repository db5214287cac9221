"""Which dead sandboxes the kubelet's GC removes (pure decision)."""

from __future__ import annotations

from nodeagent.kubelet.gc import dead_sandboxes
from runtime.types import ContainerState, ContainerStatus, PodRef, SandboxState, SandboxStatus


def sandbox(uid: str, id_: str, attempt: int, *, ready: bool = False, created: float | None = None) -> SandboxStatus:
    return SandboxStatus(id=id_, pod=PodRef(f"pod-{uid}", "default", uid), attempt=attempt,
                         state=SandboxState.READY if ready else SandboxState.NOTREADY,
                         created_at=created if created is not None else 100.0 + attempt)


def container(uid: str, sandbox_id: str, state: ContainerState = ContainerState.EXITED) -> ContainerStatus:
    return ContainerStatus(id=f"c-{sandbox_id}", pod=PodRef(f"pod-{uid}", "default", uid), name="c",
                           attempt=0, state=state, image="busybox:1.35", image_id="", created_at=1.0,
                           sandbox_id=sandbox_id)


def ids(victims) -> list[str]:
    return sorted(s.id for s in victims)


def test_superseded_never_started_sandboxes_of_a_live_pod_are_removed() -> None:
    boxes = [sandbox("a", "a0", 0), sandbox("a", "a1", 1), sandbox("a", "a2", 2, ready=True)]
    assert ids(dead_sandboxes(boxes, [], {"a"})) == ["a0", "a1"]


def test_newest_dead_sandbox_of_a_known_pod_is_kept() -> None:
    # E.g. a finished pod, or one whose worker is about to start a new sandbox.
    boxes = [sandbox("a", "a0", 0), sandbox("a", "a1", 1)]
    assert ids(dead_sandboxes(boxes, [], {"a"})) == ["a0"]


def test_sandboxes_with_containers_are_never_removed() -> None:
    boxes = [sandbox("a", "a0", 0), sandbox("a", "a1", 1, ready=True), sandbox("gone", "g0", 0)]
    kept = [container("a", "a0"), container("gone", "g0")]
    assert dead_sandboxes(boxes, kept, {"a"}) == []


def test_unknown_pods_dead_sandboxes_without_containers_all_go() -> None:
    boxes = [sandbox("gone", "g0", 0), sandbox("gone", "g1", 1), sandbox("gone", "g2", 2, ready=True)]
    # The running one is the pod workers' to stop (orphan termination), not GC's.
    assert ids(dead_sandboxes(boxes, [], set())) == ["g0", "g1"]


def test_unlabelled_containers_protect_every_sandbox_of_their_pod() -> None:
    boxes = [sandbox("a", "a0", 0), sandbox("a", "a1", 1)]
    legacy = container("a", "")
    assert dead_sandboxes(boxes, [legacy], set()) == []


def test_newest_is_decided_by_creation_time_then_attempt() -> None:
    boxes = [sandbox("a", "late", 0, created=500.0), sandbox("a", "early", 3, created=200.0)]
    assert ids(dead_sandboxes(boxes, [], {"a"})) == ["early"]


async def test_known_pods_are_read_after_the_runtime_was_listed() -> None:
    # A pod whose worker starts between the listing and the decision must be known by
    # then, so its brand-new (not yet started) sandbox is never removed as debris.
    from nodeagent.kubelet.gc import collect_dead_sandboxes

    calls: list[str] = []
    removed: list[str] = []

    class Runtime:
        async def list_pod_sandboxes(self):
            calls.append("sandboxes")
            return [sandbox("new", "n0", 0), sandbox("gone", "g0", 0)]

        async def list_containers(self):
            calls.append("containers")
            return []

        async def remove_pod_sandbox(self, sandbox_id: str) -> None:
            removed.append(sandbox_id)

    def known() -> set[str]:
        calls.append("known")
        return {"new"}

    assert await collect_dead_sandboxes(Runtime(), known) == ["g0"]
    assert calls == ["sandboxes", "containers", "known"]
    assert removed == ["g0"]


async def test_a_given_listing_is_used_instead_of_listing_again() -> None:
    # Housekeeping hands over the PLEG's last relist: no docker ps of its own, the same
    # decision, and still the known uids read after that listing was taken.
    from nodeagent.kubelet.gc import collect_dead_sandboxes

    removed: list[str] = []

    class Runtime:
        async def list_pod_sandboxes(self):
            raise AssertionError("listed although a listing was given")

        async def list_containers(self):
            raise AssertionError("listed although a listing was given")

        async def remove_pod_sandbox(self, sandbox_id: str) -> None:
            removed.append(sandbox_id)

    listing = ([sandbox("new", "n0", 0), sandbox("gone", "g0", 0), sandbox("busy", "b0", 0)],
               [container("busy", "b0")])
    assert await collect_dead_sandboxes(Runtime(), lambda: {"new"}, listing) == ["g0"]
    assert removed == ["g0"]
