"""The node's one back-off mechanism: exponential delays, doubling up to a cap.

``exponential`` is the formula; two shapes use it:

* ``Delay``: one sequence of retries (API requests, watches, the pod network start, a
  failing pod worker, the PLEG's event stream), with optional multiplicative jitter
  so many clients do not retry in step. ``retry`` runs an operation until it succeeds
  on such a sequence.
* ``Backoff``: delays kept per key for container restarts (CrashLoopBackOff) and
  image pulls, below.

Two ways to feed it, matching the two uses kubelet has for its back-off:

* ``record_exit`` for container restarts. The delay is counted from the moment the
  container *finished*, which the runtime reports, so the decision survives an agent
  restart: the caller re-records the newest dead instance on every sync (the call is
  idempotent on ``finished_at``) and, when the agent has no memory of the container at
  all, the streak of short-lived runs is derived from the instance's attempt number
  instead of starting again from zero (``kill -9`` of the agent must not reset it).
* ``record_failure`` for operations that fail at a point in time (image pulls).

Restart delays with ``immediate_first_restart=True``, which is how the agent wires
its container back-off (``nodeagent/agent.py``) and what kubelet does (``doBackOff``
with ``flowcontrol.Backoff``: a crash with no back-off entry is restarted at once and
only creates the entry): the first exit of a streak is restarted at once, then the
next start waits ``base``, 2*base, 4*base ... capped at ``cap`` (0, 10 s, 20 s, 40 s
... 300 s with kubelet's defaults). With ``immediate_first_restart=False`` (the
constructor's default, for other callers) the first restart waits ``base`` too. A
container that ran at least ``reset_after`` seconds ends the streak, so its next exit
counts as a first one again.

Image pulls wait ``base`` after the first failure, doubling up to ``cap``; a failure
more than ``reset_after`` after the previous one starts a new streak.

Keys are ``"<pod uid>/..."`` (restarts: ``"<uid>/<container>/<spec hash>"``), which is
what ``gc`` relies on.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable, TypeVar

# 2**_MAX_DOUBLINGS * base is far beyond any sane cap; keeps the power finite.
_MAX_DOUBLINGS = 62

T = TypeVar("T")


def exponential(base: float, cap: float, doublings: int, factor: float = 2.0) -> float:
    """``base * factor**doublings``, capped at ``cap``."""
    return min(base * factor ** min(max(doublings, 0), _MAX_DOUBLINGS), cap)


class Delay:
    """One sequence of retry delays: ``initial``, ``initial*factor`` ... up to
    ``maximum``, each stretched by a random factor in [1, 1 + jitter)."""

    def __init__(self, initial: float = 0.5, maximum: float = 30.0, factor: float = 2.0,
                 jitter: float = 0.0, rng: Callable[[], float] = random.random) -> None:
        if initial <= 0 or maximum < initial or factor < 1:
            raise ValueError(f"bad back-off: initial={initial} maximum={maximum} factor={factor}")
        self.initial, self.maximum, self.factor, self.jitter = initial, maximum, factor, jitter
        self._rng = rng
        self._tries = 0

    def next(self) -> float:
        """The delay before the next try (and count this one)."""
        base = exponential(self.initial, self.maximum, self._tries, self.factor)
        self._tries += 1
        return base * (1.0 + self.jitter * self._rng()) if self.jitter else base

    def reset(self) -> None:
        self._tries = 0

    def copy(self) -> "Delay":
        """A fresh sequence with the same parameters."""
        return Delay(self.initial, self.maximum, self.factor, self.jitter, self._rng)


async def retry(operation: Callable[[], Awaitable[T]], delay: Delay, *,
                on_error: Callable[[Exception, float], None] | None = None) -> T:
    """Run ``operation`` until it returns, sleeping ``delay.next()`` after each failure
    (``on_error(exc, retry_in)`` reports it). Cancellation ends it."""
    while True:
        try:
            return await operation()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            wait = delay.next()
            if on_error is not None:
                on_error(exc, wait)
            await asyncio.sleep(wait)


@dataclass
class _Entry:
    streak: int  # consecutive short-lived exits (or failures), this one included
    delay: float  # seconds after ``last`` before the next attempt is allowed
    last: float  # unix time of the exit/failure the delay counts from


class Backoff:
    def __init__(
        self,
        base: float = 10.0,
        cap: float = 300.0,
        reset_after: float = 600.0,
        *,
        immediate_first_restart: bool = False,
    ) -> None:
        if base <= 0:
            raise ValueError(f"back-off base must be > 0, got {base}")
        if cap < base:
            raise ValueError(f"back-off cap ({cap}) must be >= base ({base})")
        if reset_after <= 0:
            raise ValueError(f"back-off reset_after must be > 0, got {reset_after}")
        self.base = float(base)
        self.cap = float(cap)
        self.reset_after = float(reset_after)
        self.immediate_first_restart = immediate_first_restart
        self._entries: dict[str, _Entry] = {}

    # --- container restarts ------------------------------------------------------

    def restart_delay(self, streak: int) -> float:
        """Delay before restarting a container whose streak of short runs is ``streak``
        (1 = the first exit of a streak)."""
        if streak < 1:
            return 0.0
        doublings = streak - 1
        if self.immediate_first_restart:
            if streak == 1:
                return 0.0
            doublings = streak - 2
        return exponential(self.base, self.cap, doublings)

    def record_exit(
        self, key: str, finished_at: float, ran_for: float, *, attempt: int | None = None
    ) -> float:
        """Record that the instance under ``key`` finished at ``finished_at`` after
        running ``ran_for`` seconds; return the delay (seconds after ``finished_at``)
        before the next start is allowed.

        Idempotent: recording the same (or an older) exit again changes nothing, so the
        caller may pass the newest dead instance on every sync. ``attempt`` is that
        instance's attempt number (0 = first run); it is used only when nothing is known
        about the container, e.g. right after an agent restart: every run so far is then
        assumed short-lived, which may overstate the delay (never beyond ``cap``) but
        never forgets it.
        """
        entry = self._entries.get(key)
        if entry is not None and finished_at <= entry.last:
            return entry.delay
        if ran_for >= self.reset_after:
            streak = 1
        elif entry is not None:
            streak = entry.streak + 1
        elif attempt is not None and not self._knows_container(key):
            streak = max(0, attempt) + 1
        else:
            streak = 1
        delay = self.restart_delay(streak)
        self._entries[key] = _Entry(streak=streak, delay=delay, last=finished_at)
        return delay

    # --- point-in-time failures (image pulls) --------------------------------------

    def record_failure(self, key: str, now: float) -> float:
        """Record a failure at ``now``; return the delay before the next try."""
        entry = self._entries.get(key)
        if entry is None or now - entry.last > self.reset_after:
            streak = 1
        elif now <= entry.last:
            return entry.delay
        else:
            streak = entry.streak + 1
        delay = exponential(self.base, self.cap, streak - 1)
        self._entries[key] = _Entry(streak=streak, delay=delay, last=now)
        return delay

    # --- queries ---------------------------------------------------------------------

    def in_backoff(self, key: str, now: float) -> float | None:
        """Seconds left before the next attempt is allowed, or None when it may go now."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        remaining = entry.last + entry.delay - now
        return remaining if remaining > 0 else None

    def delay(self, key: str) -> float | None:
        """The delay currently applying to ``key`` (for "back-off 20s ..." messages)."""
        entry = self._entries.get(key)
        return entry.delay if entry is not None else None

    def streak(self, key: str) -> int:
        entry = self._entries.get(key)
        return entry.streak if entry is not None else 0

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    # --- housekeeping --------------------------------------------------------------

    def reset(self, key: str) -> None:
        self._entries.pop(key, None)

    def gc(self, live_pod_uids: Iterable[str]) -> int:
        """Forget every key that is not ``"<uid>/..."`` for one of ``live_pod_uids``;
        return how many entries went."""
        live = set(live_pod_uids)

        def alive(key: str) -> bool:
            head, sep, _rest = key.partition("/")
            return bool(sep) and head in live

        dead = [key for key in self._entries if not alive(key)]
        for key in dead:
            del self._entries[key]
        return len(dead)

    def _knows_container(self, key: str) -> bool:
        """Whether some spec hash of the same pod/container is remembered: then memory
        is intact and a key without an entry really is a fresh spec."""
        if "/" not in key:
            return False
        parent = key.rsplit("/", 1)[0] + "/"
        return any(k.startswith(parent) for k in self._entries)
