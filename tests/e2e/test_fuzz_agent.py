"""The real agent process against hostile manifests (issue 7: 23 of 300 malformed files
crashed the agent, 4 hung it).

Three good pods run; crafted killers (alias bombs, a file at the size limit, /dev/zero,
a FIFO, a dangling symlink, a directory, a non-UTF-8 name, deep nesting, NaN/10^30 grace
periods removed while their pod runs) and Hypothesis-generated mutants are dropped one
by one. After each: the process is alive, /healthz answers 200 within a bound, the file
is reported by name (log line, or its pod shown); at the end the good pods still run
the same containers and the agent's peak RSS (VmHWM) stayed under 150 MB.
"""

from __future__ import annotations

import os
import time
import urllib.request

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings

from tests.e2e.conftest import busybox, pod_manifest
from tests.unit.test_fuzz_manifests import RICH_POD, RICH_SERVICE, dump, mutated
from tests.unit.test_manifest_hardening import BILLION_LAUGHS

pytestmark = [pytest.mark.docker, pytest.mark.root]

RSS_LIMIT = 150 * 1024 * 1024
HEALTH_BOUND = 5.0  # seconds /healthz may take to answer 200 after a file lands
GENERATED = int(os.environ.get("NODEAGENT_E2E_FUZZ_EXAMPLES", "12"))
SLEEP_FOREVER = "trap 'exit 0' TERM; while true; do sleep 1; done"


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def healthz_ok(agent) -> float:
    started = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(agent.url + "/healthz", timeout=HEALTH_BOUND) as resp:
                if resp.status == 200:
                    return time.monotonic() - started
        except OSError:
            pass
        assert time.monotonic() - started < HEALTH_BOUND, "/healthz not 200 within the bound"
        time.sleep(0.1)


class Dropper:
    def __init__(self, agent) -> None:
        self.agent = agent
        self.count = 0
        self.slowest_health = 0.0

    def reported(self, name: str) -> bool:
        # Reported: an error naming the file, or (a mutant that is still valid) loaded.
        for record in self.agent.log_records():
            if name in str(record.get("file") or ""):
                return True
        return any(name in str((p["metadata"].get("annotations") or {}).get("nodeagent.io/manifest-file"))
                   for p in self.agent.pods())

    def settle(self, name: str, *, expect_reported: bool = True) -> None:
        assert self.agent.proc.poll() is None, self.agent.log_path.read_text()[-3000:]
        if expect_reported:
            self.agent.wait_for(f"{name} reported", lambda: self.reported(name), timeout=15)
        self.slowest_health = max(self.slowest_health, healthz_ok(self.agent))
        assert self.agent.proc.poll() is None

    def drop_text(self, name: str, data: bytes) -> None:
        self.count += 1
        path = self.agent.manifest_dir / name
        tmp = self.agent.manifest_dir / f".{self.count}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, path)
        self.settle(name)
        path.unlink()
        self.settle(name, expect_reported=False)


def test_agent_survives_hostile_manifests(agent):
    good = {}
    for i in range(3):
        agent.write(f"good{i}.yaml", pod_manifest(f"good{i}", [busybox("c", SLEEP_FOREVER)],
                                                  terminationGracePeriodSeconds=0))
    for i in range(3):
        agent.wait_running_ready(f"good{i}")
        good[i] = agent.container_of(f"good{i}", "c")["Id"]
    drop = Dropper(agent)
    d = agent.manifest_dir

    # Crafted: every shape that took the agent down before.
    crafted = {
        "bomb.yaml": BILLION_LAUGHS.encode(),
        "bomb-svc.yaml": BILLION_LAUGHS.replace("kind: Pod", "kind: Service").encode(),
        "ann-list.yaml": b"kind: Pod\napiVersion: v1\nmetadata: {name: a, annotations: [x]}\n"
                         b"spec: {containers: [{name: c, image: busybox:1.35}]}",
        "spec-list.yaml": b"kind: Pod\napiVersion: v1\nmetadata: {name: b}\nspec: [x]",
        "no-spec.yaml": b"kind: Pod\napiVersion: v1\nmetadata: {name: c}",
        "ns-map.yaml": b"kind: Pod\napiVersion: v1\nmetadata: {name: d, namespace: {x: 1}}\n"
                       b"spec: {containers: [{name: c, image: busybox:1.35, volumeMounts: [{name: [x], "
                       b"mountPath: /x}]}]}",
        "deep.json": b'{"kind": "Pod", "spec": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
        "deep.yaml": b"kind: Pod\nspec: " + b"- " * 100_000 + b"x\n",
        "nan.yaml": b"kind: Pod\napiVersion: v1\nmetadata: {name: n}\nspec: {terminationGracePeriodSeconds: "
                    b".nan, containers: [{name: c, image: busybox:1.35}]}",
        "huge.yaml": b"kind: Pod\napiVersion: v1\nmetadata: {name: h}\nspec: {terminationGracePeriodSeconds: "
                     b"1000000000000000000000000000000, containers: [{name: c, image: busybox:1.35}]}",
        "twelve.yaml": b"kind: Pod\napiVersion: v1\nmetadata: {name: e}\nspec: {terminationGracePeriodSeconds: "
                       b"twelve, containers: [{name: c, image: busybox:1.35}]}",
        # Just under the size limit: the most memory a single file can cost.
        "limit.yaml": yaml.safe_dump({"kind": "Pod", "metadata": {"name": "big"},
                                      "spec": {"x": ["y" * 1000] * 1000}}).encode()[:1024 * 1024 - 1],
        "values.yaml": (b"kind: Pod\nx: [" + b"0," * 524_000 + b"0]")[:1024 * 1024 - 2] + b"0]",
        "anchors-at-limit.yaml": ("kind: Pod\nx: &a [" + ", ".join(["zz"] * 1000) + "]\ny: ["
                                  + ", ".join(["*a"] * 49) + "]\n").encode(),
    }
    for name, data in crafted.items():
        drop.drop_text(name, data)

    # Not regular files: reported, never read, nothing blocks.
    os.symlink("/dev/zero", d / "zero.yaml")
    drop.settle("zero.yaml")
    os.mkfifo(d / "fifo.yaml")
    drop.settle("fifo.yaml")
    os.symlink(d / "nowhere", d / "dangling.yaml")
    drop.settle("dangling.yaml")
    (d / "dir.yaml").mkdir()
    drop.settle("dir.yaml")
    with open(os.fsencode(d) + b"/caf\xe9.yaml", "w") as f:
        f.write(yaml.safe_dump(pod_manifest("cafe", [busybox("c", SLEEP_FOREVER)])))
    drop.settle("caf\\xe9.yaml")
    for name in ("zero.yaml", "fifo.yaml", "dangling.yaml"):
        (d / name).unlink()
    (d / "dir.yaml").rmdir()
    os.unlink(os.fsencode(d) + b"/caf\xe9.yaml")

    # A running pod whose file is then rewritten with a hostile grace period (the
    # previous version keeps running), then removed.
    agent.write("victim.yaml", pod_manifest("victim", [busybox("c", SLEEP_FOREVER)],
                                            terminationGracePeriodSeconds=0))
    victim = agent.wait_running_ready("victim", timeout=30)
    text = (d / "victim.yaml").read_text().replace("terminationGracePeriodSeconds: 0",
                                                   "terminationGracePeriodSeconds: .nan")
    drop.drop_text("victim.yaml", text.encode())
    agent.wait_for("victim gone", lambda: agent.pod("victim") is None, timeout=30)
    assert victim["metadata"]["uid"]

    # Generated: mutants of a rich pod and a Service.
    @settings(max_examples=GENERATED, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(doc=mutated(RICH_POD) | mutated(RICH_SERVICE))
    def generated(doc):
        drop.drop_text(f"mutant-{drop.count}.yaml", dump(doc).encode())

    generated()

    # The good pods never noticed.
    for i in range(3):
        c = agent.container_of(f"good{i}", "c")
        assert c["Id"] == good[i] and c["State"]["Running"]
        assert agent.pod(f"good{i}")["status"]["phase"] == "Running"
    status, body = agent.healthz()
    assert status == 200, body
    rss = peak_rss(agent.proc.pid)
    print(f"files={drop.count} slowest /healthz={drop.slowest_health:.2f}s peak RSS={rss / 2**20:.1f} MiB")
    assert rss < RSS_LIMIT, f"peak RSS {rss / 2**20:.1f} MiB"
    assert drop.slowest_health < HEALTH_BOUND
