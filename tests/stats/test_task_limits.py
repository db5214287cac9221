"""The node's task figures (Summary API rlimit, eviction's pid.available), read as
kubelet reads them: threads count, and the limit is the lower of the two kernel caps."""

from __future__ import annotations

import threading
from pathlib import Path

from nodeagent.eviction.signals import pid_observation
from nodeagent.stats.host import read_task_limits


def fake_proc(tmp_path: Path, pid_max: str | None, threads_max: str | None, loadavg: str | None) -> Path:
    (tmp_path / "sys" / "kernel").mkdir(parents=True)
    for name, value in (("pid_max", pid_max), ("threads-max", threads_max)):
        if value is not None:
            (tmp_path / "sys" / "kernel" / name).write_text(value)
    if loadavg is not None:
        (tmp_path / "loadavg").write_text(loadavg)
    return tmp_path


def test_the_lower_cap_and_the_tasks_from_loadavg(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, "4194304\n", "192726\n", "0.52 0.58 0.59 3/512 12345\n")
    assert read_task_limits(proc) == (192726, 512)


def test_unreadable_figures_are_none_not_zero(tmp_path: Path) -> None:
    assert read_task_limits(fake_proc(tmp_path, "32768\n", None, "garbage\n")) == (32768, None)
    assert read_task_limits(tmp_path / "nowhere") == (None, None)


def test_threads_count_on_this_machine() -> None:
    # Twenty more threads in this process are twenty more tasks (processes would not
    # change), give or take what the rest of the machine starts meanwhile.
    _limit, before = read_task_limits()
    stop = threading.Event()
    threads = [threading.Thread(target=stop.wait) for _ in range(20)]
    for t in threads:
        t.start()
    try:
        _limit, during = read_task_limits()
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert before is not None and during is not None
    assert 15 <= during - before <= 40
    obs = pid_observation()
    assert obs.capacity == read_task_limits()[0]
    assert 0 < obs.available < obs.capacity
