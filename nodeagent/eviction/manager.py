"""The eviction loop (kubelet's ``managerImpl.synchronize``), once per ``period``:

1. observe the signals; note which thresholds are met;
2. conditions: a pressure condition is True while its threshold is met and for
   ``transition_period`` after (kubelet's ``evictionPressureTransitionPeriod``), so a
   node near the line does not flap;
3. for a disk signal, reclaim node-level resources first (dead containers, unused
   images) and observe again; done if that was enough;
4. otherwise evict one pod, the first in the resource's ranking (``ranking``), with
   kubelet's message; the next round looks again.
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, Protocol

import structlog

from nodeagent.eviction.ranking import EPHEMERAL_STORAGE, MEMORY, PIDS, PodUsageStats, eviction_message, rank
from nodeagent.eviction.signals import Observation
from nodeagent.eviction.thresholds import Threshold, format_available

log = structlog.get_logger(__name__)

# signal -> the resource reclaimed by evicting pods
RESOURCE = {
    "memory.available": MEMORY,
    "nodefs.available": EPHEMERAL_STORAGE,
    "nodefs.inodesFree": EPHEMERAL_STORAGE,
    "imagefs.available": EPHEMERAL_STORAGE,
    "imagefs.inodesFree": EPHEMERAL_STORAGE,
    "pid.available": PIDS,
}
DISK_SIGNALS = ("nodefs.available", "nodefs.inodesFree", "imagefs.available", "imagefs.inodesFree")

_CONDITIONS = {
    "MemoryPressure": ("KubeletHasInsufficientMemory", "kubelet has insufficient memory available",
                       "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
    "DiskPressure": ("KubeletHasDiskPressure", "kubelet has disk pressure",
                     "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
    "PIDPressure": ("KubeletHasInsufficientPID", "kubelet has insufficient PID available",
                    "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
}


class PodUsage(Protocol):
    async def usage(self, pods: list[dict], resource: str) -> dict[str, PodUsageStats]:
        """Per pod uid, what its containers use of ``resource``."""


class EvictionManager:
    def __init__(
        self,
        thresholds: list[Threshold],
        *,
        observe: Callable[[], dict[str, Observation]],
        pods: Callable[[], list[dict]],
        usage: PodUsage,
        evict: Callable[[dict, str], None],
        reclaim: Callable[[], Awaitable[None]] | None = None,
        node_event: Callable[[str, str, str], None] | None = None,
        period: float = 10.0,
        transition_period: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.thresholds = thresholds
        self._observe = observe
        self._pods = pods
        self._usage = usage
        self._evict = evict
        self._reclaim = reclaim
        self._node_event = node_event or (lambda type_, reason, message: None)
        self.period = period
        self.transition_period = transition_period
        self._clock = clock
        self.observations: dict[str, Observation] = {}
        self.met: list[Threshold] = []
        self._last_met: dict[str, float] = {}  # condition -> when a threshold last was met
        self.evictions = 0

    # --- views -----------------------------------------------------------------------

    def under_pressure(self) -> set[str]:
        now = self._clock()
        return {cond for cond, when in self._last_met.items() if now - when < self.transition_period}

    def conditions(self) -> list[dict]:
        """MemoryPressure, DiskPressure, PIDPressure as the Node reports them."""
        pressure = self.under_pressure()
        out = []
        for kind, (r_true, m_true, r_false, m_false) in _CONDITIONS.items():
            true = kind in pressure
            out.append({"type": kind, "status": "True" if true else "False",
                        "reason": r_true if true else r_false, "message": m_true if true else m_false})
        return out

    def describe(self) -> list[str]:
        """Lines for /healthz?verbose: each condition and the thresholds met now."""
        lines = [f"{c['type']}={c['status']}" for c in self.conditions()]
        for t in self.met:
            obs = self.observations[t.signal]
            lines.append(f"threshold met: {t.signal} available {format_available(t.signal, obs.available)} "
                         f"< {t.describe()}")
        return lines

    # --- the loop ----------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            try:
                await self.synchronize()
            except Exception as exc:  # one bad round must not end eviction for good
                log.warning("eviction round failed", error=str(exc))
            await asyncio.sleep(self.period)

    def _met_now(self) -> list[Threshold]:
        met = []
        for t in self.thresholds:
            obs = self.observations.get(t.signal)
            if obs is not None and obs.capacity > 0 and t.met(obs.available, obs.capacity):
                met.append(t)
        return met

    async def _refresh(self) -> list[Threshold]:
        self.observations = await asyncio.to_thread(self._observe)
        self.met = self._met_now()
        now = self._clock()
        for t in self.met:
            self._last_met[t.condition] = now
        return self.met

    async def synchronize(self) -> str | None:
        """One round; returns the uid of the pod evicted, if any."""
        met = await self._refresh()
        if not met:
            return None
        for t in met:
            log.warning("eviction threshold met", signal=t.signal, threshold=t.describe(),
                        available=format_available(t.signal, self.observations[t.signal].available))
        if self._reclaim is not None and any(t.signal in DISK_SIGNALS for t in met):
            self._node_event("Warning", "EvictionThresholdMet", "Attempting to reclaim ephemeral-storage")
            await self._reclaim()
            met = await self._refresh()
            if not met:
                log.info("node-level reclaim relieved the pressure")
                return None
        # kubelet takes the thresholds in a fixed order; memory first, as it hurts most.
        order = list(RESOURCE)
        threshold = min(met, key=lambda t: order.index(t.signal))
        resource = RESOURCE[threshold.signal]
        self._node_event("Warning", "EvictionThresholdMet", f"Attempting to reclaim {resource}")
        pods = [p for p in self._pods() if _active(p)]
        usage = await self._usage.usage(pods, resource)
        ranked = rank(pods, usage, resource)
        if not ranked:
            log.warning("no pod can be evicted", resource=resource)
            return None
        victim = ranked[0]
        uid = victim["metadata"]["uid"]
        obs = self.observations[threshold.signal]
        message = eviction_message(victim, usage.get(uid), resource, threshold.describe(),
                                   format_available(threshold.signal, obs.available))
        log.warning("evicting pod", pod=f"{victim['metadata'].get('namespace', 'default')}/"
                    f"{victim['metadata']['name']}", resource=resource, message=message)
        self._evict(victim, message)
        self.evictions += 1
        return uid


def _active(pod: dict) -> bool:
    """Pods that still hold resources: not finished, not being deleted."""
    phase = (pod.get("status") or {}).get("phase")
    return phase not in ("Succeeded", "Failed") and not pod["metadata"].get("deletionTimestamp")
