"""Admission under node pressure (kubelet's eviction admit handler): while the node is
under MemoryPressure it takes no new BestEffort pod unless the pod tolerates the
``node.kubernetes.io/memory-pressure`` taint; under DiskPressure or PIDPressure it
takes no new pod at all. Critical pods are always admitted."""

from __future__ import annotations

from nodeagent.api.podspec import qos_class
from nodeagent.eviction.ranking import is_critical

MEMORY_PRESSURE_TAINT = "node.kubernetes.io/memory-pressure"


def _tolerates_memory_pressure(pod: dict) -> bool:
    for t in (pod.get("spec") or {}).get("tolerations") or []:
        if not isinstance(t, dict) or t.get("effect") not in (None, "", "NoSchedule"):
            continue
        key, operator = t.get("key"), t.get("operator") or "Equal"
        if (key in (None, "") and operator == "Exists") or \
                (key == MEMORY_PRESSURE_TAINT and (operator == "Exists" or not t.get("value"))):
            return True
    return False


def admit_under_pressure(pod: dict, pressure: set[str]) -> tuple[str, str] | None:
    """None to admit, else kubelet's (reason, message) for a Failed pod."""
    if not pressure or is_critical(pod):
        return None
    if pressure == {"MemoryPressure"}:
        if qos_class(pod) != "BestEffort" or _tolerates_memory_pressure(pod):
            return None
    return "Evicted", f"The node had condition: [{', '.join(sorted(pressure))}]. "
