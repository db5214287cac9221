"""Probe results per container instance (kubelet's prober/results)."""

from __future__ import annotations

import enum


class ProbeType(str, enum.Enum):
    LIVENESS = "Liveness"
    READINESS = "Readiness"
    STARTUP = "Startup"

    @property
    def field(self) -> str:
        return {"Liveness": "livenessProbe", "Readiness": "readinessProbe",
                "Startup": "startupProbe"}[self.value]


class Result(str, enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    UNKNOWN = "unknown"


# What a container is taken to be before its first probe completes (kubelet's
# initial values): not ready, alive, and not started.
INITIAL = {
    ProbeType.READINESS: Result.FAILURE,
    ProbeType.LIVENESS: Result.SUCCESS,
    ProbeType.STARTUP: Result.UNKNOWN,
}


class ResultsCache:
    """(probe type, container id) -> latest result; ``set`` says whether it changed."""

    def __init__(self) -> None:
        self._results: dict[tuple[ProbeType, str], Result] = {}

    def get(self, probe: ProbeType, container_id: str) -> Result | None:
        return self._results.get((probe, container_id))

    def set(self, probe: ProbeType, container_id: str, result: Result) -> bool:
        key = (probe, container_id)
        if self._results.get(key) == result:
            return False
        self._results[key] = result
        return True

    def remove(self, probe: ProbeType, container_id: str) -> None:
        self._results.pop((probe, container_id), None)

    def __len__(self) -> int:
        return len(self._results)
