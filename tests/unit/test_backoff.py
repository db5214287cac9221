"""Back-off arithmetic: restart delays from runtime exits, pull failures, memory GC."""

from __future__ import annotations

import pytest

from nodeagent.backoff import Backoff

KEY = "uid-1/app/hash-a"


def test_restart_delays_double_from_base_up_to_cap():
    b = Backoff()
    assert [b.restart_delay(n) for n in range(1, 9)] == [10, 20, 40, 80, 160, 300, 300, 300]
    assert b.restart_delay(0) == 0
    assert b.restart_delay(10_000) == 300  # no overflow for absurd streaks


def test_kubelet_shape_restarts_first_crash_at_once():
    b = Backoff(immediate_first_restart=True)
    assert [b.restart_delay(n) for n in range(1, 6)] == [0, 10, 20, 40, 80]


def test_successive_short_exits_double_the_delay_counted_from_finish():
    b = Backoff()
    t = 1_000.0
    delays = []
    for _ in range(7):
        delays.append(b.record_exit(KEY, finished_at=t, ran_for=1.0))
        # not allowed before the delay has passed since the exit, allowed right after
        assert b.in_backoff(KEY, t + delays[-1] - 0.5) == pytest.approx(0.5)
        assert b.in_backoff(KEY, t + delays[-1]) is None
        t += delays[-1] + 1.0  # restarted when allowed, ran 1 s, died again
    assert delays == [10, 20, 40, 80, 160, 300, 300]
    assert b.streak(KEY) == 7
    assert b.delay(KEY) == 300


def test_recording_the_same_exit_again_is_idempotent():
    b = Backoff()
    assert b.record_exit(KEY, 100.0, 1.0) == 10
    for _ in range(5):
        assert b.record_exit(KEY, 100.0, 1.0) == 10
        assert b.record_exit(KEY, 99.0, 1.0) == 10  # older exit: ignored
    assert b.streak(KEY) == 1
    assert b.record_exit(KEY, 120.0, 1.0) == 20


def test_a_long_run_resets_the_streak():
    b = Backoff()
    t = 0.0
    for _ in range(5):
        t += 1000
        b.record_exit(KEY, t, 1.0)
    assert b.delay(KEY) == 160
    assert b.record_exit(KEY, t + 2000, ran_for=600.0) == 10  # ran 10 minutes
    assert b.streak(KEY) == 1
    assert b.record_exit(KEY, t + 3000, ran_for=599.0) == 20  # just short of it


def test_without_memory_the_streak_comes_from_the_attempt_number():
    # The agent was killed: a fresh Backoff sees the 4th crash (attempt 3) of a container.
    b = Backoff()
    assert b.record_exit(KEY, finished_at=500.0, ran_for=2.0, attempt=3) == 80
    assert b.in_backoff(KEY, 505.0) == pytest.approx(75.0)
    # the next crash continues the streak
    assert b.record_exit(KEY, finished_at=600.0, ran_for=2.0, attempt=4) == 160
    # a long-lived newest instance is no evidence of a crash loop
    fresh = Backoff()
    assert fresh.record_exit(KEY, 500.0, ran_for=3600.0, attempt=9) == 10


def test_attempt_is_ignored_when_memory_knows_the_container_under_another_spec():
    b = Backoff()
    b.record_exit("uid-1/app/hash-a", 100.0, 1.0)
    # The spec changed (new hash): a new container for back-off purposes.
    assert b.record_exit("uid-1/app/hash-b", 200.0, 1.0, attempt=7) == 10


def test_pull_failures_double_and_reset_after_a_quiet_period():
    b = Backoff(base=10, cap=300, reset_after=600)
    key = "uid-1/app/registry.example/busybox:1"
    t = 0.0
    delays = []
    for _ in range(7):
        delays.append(b.record_failure(key, t))
        assert b.in_backoff(key, t) == pytest.approx(delays[-1])
        t += delays[-1]
    assert delays == [10, 20, 40, 80, 160, 300, 300]
    assert b.record_failure(key, t) == 300  # same instant again: no extra doubling
    assert b.record_failure(key, t + 601) == 10  # quiet for longer than reset_after


def test_in_backoff_unknown_key_is_none():
    assert Backoff().in_backoff("nope/x/y", 0.0) is None
    assert Backoff().delay("nope/x/y") is None


def test_gc_keeps_only_keys_of_live_pods():
    b = Backoff()
    for key in ("u1/app/h", "u1/side/h", "u1/app/reg.io/img:1", "u2/app/h", "u10/app/h", "u1"):
        b.record_failure(key, 0.0)
    assert len(b) == 6
    removed = b.gc({"u1"})
    assert removed == 3
    assert "u1/app/h" in b and "u1/side/h" in b and "u1/app/reg.io/img:1" in b
    assert "u2/app/h" not in b and "u10/app/h" not in b
    assert "u1" not in b  # not "<uid>/..." shaped
    assert b.gc(set()) == 3 and len(b) == 0


def test_reset_forgets_a_key():
    b = Backoff()
    b.record_exit(KEY, 0.0, 0.0)
    b.reset(KEY)
    assert KEY not in b and b.in_backoff(KEY, 1.0) is None


@pytest.mark.parametrize(
    "kwargs", [{"base": 0}, {"base": 10, "cap": 5}, {"reset_after": 0}]
)
def test_bad_parameters_are_refused(kwargs):
    with pytest.raises(ValueError):
        Backoff(**kwargs)


# --- the single-sequence shape (API retries, watches, workers, network start) ----------

def test_delay_doubles_to_its_cap_and_resets():
    from nodeagent.backoff import Delay

    d = Delay(0.5, 4.0)
    assert [d.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    d.reset()
    assert d.next() == 0.5
    fresh = d.copy()
    assert fresh.next() == 0.5 and d.next() == 1.0  # independent sequences


def test_delay_jitter_stretches_within_bounds():
    from nodeagent.backoff import Delay

    values = iter([0.0, 0.999, 0.5])
    d = Delay(1.0, 10.0, jitter=0.5, rng=lambda: next(values))
    assert d.next() == 1.0
    assert 2.0 < d.next() < 3.0
    assert d.next() == 4.0 * 1.25


def test_delay_rejects_nonsense():
    from nodeagent.backoff import Delay

    for args in ((0, 1), (2, 1), (1, 2, 0.5)):
        with pytest.raises(ValueError):
            Delay(*args)


async def test_retry_runs_until_success_and_reports_each_failure():
    from nodeagent.backoff import Delay, retry

    attempts = []
    reported = []

    async def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise OSError(f"failure {len(attempts)}")
        return "done"

    result = await retry(flaky, Delay(0.001, 0.002), on_error=lambda exc, wait: reported.append((str(exc), wait)))
    assert result == "done" and len(attempts) == 3
    assert reported == [("failure 1", 0.001), ("failure 2", 0.002)]


def test_keyed_backoff_uses_the_same_formula():
    from nodeagent.backoff import exponential

    b = Backoff(base=10, cap=300)
    assert [b.restart_delay(n) for n in range(1, 8)] == [exponential(10, 300, n - 1) for n in range(1, 8)]
    assert exponential(10, 300, 10_000) == 300  # no overflow far past the cap
