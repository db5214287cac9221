"""One probe of one container: kubelet's prober worker as an asyncio task.

The worker ticks every ``periodSeconds`` on a fixed grid (a slow check does not shift
later ticks; missed ticks are skipped, not queued). Each tick it looks at the pod's
latest published status, as kubelet's worker does, and decides:

* no running instance yet, or a new container id: reset to the initial result
  (readiness: failure, liveness: success, startup: unknown);
* the instance was killed for a failed liveness/startup probe: hold until a new
  instance appears;
* the pod is being deleted: liveness and startup report success (no kills during
  termination); readiness keeps probing so endpoints drop the pod when it stops
  answering;
* younger than ``initialDelaySeconds``: wait;
* startup probes run until the container has started; liveness and readiness only
  after it has;
* otherwise run the check, and change the published result only after
  ``successThreshold`` successes or ``failureThreshold`` failures in a row.

A readiness worker probes at once (rather than at its next tick) when its container
has just started, so a pod becomes ready as soon as it can.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from nodeagent.prober.handlers import Outcome, Target
from nodeagent.prober.results import INITIAL, ProbeType, Result

if TYPE_CHECKING:
    from nodeagent.prober.manager import ProbeManager

log = structlog.get_logger(__name__)


def _resolve(future: "asyncio.Future[bool]", value: bool) -> None:
    if not future.done():
        future.set_result(value)


@dataclass
class ProbeSpec:
    """A probe with every timing field defaulted (API defaults, 0 meaning unset)."""

    handler: dict
    initial_delay: float = 0.0
    period: float = 10.0
    timeout: float = 1.0
    success_threshold: int = 1
    failure_threshold: int = 3
    termination_grace: int | None = None

    @classmethod
    def from_probe(cls, probe: dict) -> "ProbeSpec":
        def number(key: str, default: int) -> int:
            value = probe.get(key)
            return value if isinstance(value, int) and value > 0 else default

        grace = probe.get("terminationGracePeriodSeconds")
        return cls(
            handler=probe,
            initial_delay=float(probe.get("initialDelaySeconds") or 0),
            period=float(number("periodSeconds", 10)),
            timeout=float(number("timeoutSeconds", 1)),
            success_threshold=number("successThreshold", 1),
            failure_threshold=number("failureThreshold", 3),
            termination_grace=grace if isinstance(grace, int) and grace > 0 else None,
        )


@dataclass
class Observed:
    """What the worker last learnt about its container from the pod status."""

    container_id: str | None = None
    running: bool = False
    terminated: bool = False
    started: bool = False
    started_at: float | None = None  # unix seconds of state.running.startedAt
    pod_ip: str | None = None
    deleting: bool = False
    terminal_phase: bool = False
    restart_never: bool = False


@dataclass
class ProbeWorker:
    manager: "ProbeManager"
    pod_uid: str
    container_name: str
    probe_type: ProbeType
    spec: ProbeSpec
    container: dict
    pod: dict
    observed: Observed = field(default_factory=Observed)
    container_id: str | None = None
    on_hold: bool = False
    last_result: Result = Result.UNKNOWN
    result_run: int = 0
    _wake: "asyncio.Future[bool] | None" = None
    _triggered: bool = False
    stopped: bool = False
    task: asyncio.Task | None = None
    probes_run: int = 0

    # --- time ------------------------------------------------------------------

    def _scale(self, seconds: float) -> float:
        return seconds * self.manager.time_scale

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        period = self._scale(self.spec.period)
        # kubelet: workers created right after the agent (re)started begin at a random
        # point of their period, so a node full of pods does not probe in lock-step.
        jitter = random.uniform(0, period) if self.manager.recently_started(period) else 0.0
        next_tick = loop.time() + jitter
        try:
            while not self.stopped:
                triggered = False
                if next_tick > loop.time() and not self._triggered:
                    # One future per tick, resolved by the timer or by wake_now(): cheaper
                    # than a timeout context (no cancellation) at 100+ ticks a second.
                    wake = loop.create_future()
                    self._wake = wake
                    timer = loop.call_at(next_tick, _resolve, wake, False)
                    try:
                        triggered = await wake
                    finally:
                        timer.cancel()
                        self._wake = None
                triggered = triggered or self._triggered
                self._triggered = False
                now = loop.time()
                if not triggered:
                    # How late the loop woke us: the scheduling delay the bench reports.
                    self.manager.record_lateness(now - next_tick)
                    next_tick += period
                if not await self.do_probe():
                    return
                now = loop.time()
                if next_tick <= now:  # ticks a slow check overran are skipped, not queued
                    next_tick += period * ((now - next_tick) // period + 1)
        finally:
            self.manager.worker_done(self)

    def stop(self) -> None:
        self.stopped = True
        self.wake_now()

    def wake_now(self) -> None:
        """Probe at once instead of at the next tick."""
        self._triggered = True
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(True)

    # --- one tick ---------------------------------------------------------------

    def observe(self, pod: dict, observed: Observed) -> None:
        """A new pod status was published; wake at once when the container just
        started (readiness) or was replaced."""
        self.pod = pod
        was = self.observed
        self.observed = observed
        if self.probe_type == ProbeType.READINESS and observed.started and observed.running and (
            not was.started or was.container_id != observed.container_id
        ):
            self.wake_now()

    async def do_probe(self) -> bool:
        """One tick; False ends the worker."""
        o = self.observed
        results = self.manager.results
        if o.terminal_phase:
            return False
        if o.container_id is None:
            return True
        if o.container_id != self.container_id:
            if self.container_id is not None:
                results.remove(self.probe_type, self.container_id)
            self.container_id = o.container_id
            self._publish(INITIAL[self.probe_type])
            self.on_hold = False
            self.result_run = 0
            self.last_result = Result.UNKNOWN
        if self.on_hold:
            return True
        if not o.running:
            if self.probe_type != ProbeType.LIVENESS:
                self._publish(Result.FAILURE)
            # A finished container that will never run again needs no more probes.
            return not (o.terminated and o.restart_never)
        if o.deleting and self.probe_type != ProbeType.READINESS:
            self._publish(Result.SUCCESS)
            return True
        if o.started_at is not None:
            age = self.manager.wall() - o.started_at
            if age < self._scale(self.spec.initial_delay):
                return True
        if o.started:
            if self.probe_type == ProbeType.STARTUP:
                return True
        elif self.probe_type != ProbeType.STARTUP:
            return True

        outcome = await self._check(o)
        self.probes_run += 1
        if outcome.result == Result.UNKNOWN:
            # The check itself could not run (container gone, runtime error): no
            # verdict on the container; kubelet does not count these either.
            log.debug("probe errored", pod_uid=self.pod_uid, container=self.container_name,
                      probe=self.probe_type.value, output=outcome.output)
            return True
        if outcome.result == Result.FAILURE:
            self.manager.unhealthy(self, outcome)
        if self.last_result == outcome.result:
            self.result_run += 1
        else:
            self.last_result, self.result_run = outcome.result, 1
        threshold = (self.spec.failure_threshold if outcome.result == Result.FAILURE
                     else self.spec.success_threshold)
        if self.result_run < threshold:
            return True
        if self.container_id != self.observed.container_id:
            return True  # the container changed while the check ran: the verdict is stale
        self._publish(outcome.result)
        if outcome.result == Result.FAILURE and self.probe_type in (ProbeType.LIVENESS, ProbeType.STARTUP):
            # The pod worker kills this instance; nothing more to learn from it.
            self.on_hold = True
            self.result_run = 0
        return True

    async def _check(self, o: Observed) -> Outcome:
        assert self.container_id is not None
        target = Target(container_id=self.container_id.removeprefix("docker://"),
                        pod_ip=o.pod_ip, container=self.container)
        return await self.manager.run_check(self.spec.handler, target, self._scale(self.spec.timeout))

    def _publish(self, result: Result) -> None:
        assert self.container_id is not None
        if self.manager.results.set(self.probe_type, self.container_id, result):
            self.manager.changed(self)
