"""Resource usage end to end: one agent (stats sampled every second) runs a pod that
fills 48 MiB of memory and one that burns a core; the numbers it serves are checked
against the workloads and, in the same run, against Docker's own stats API; the text
endpoints pass promtool; a real Prometheus scrapes the agent; the status page renders
in headless Chromium; `nodeagent status` prints the same."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import REPO, AgentProcess, busybox, docker_time, free_port, pod_manifest

pytestmark = [pytest.mark.docker, pytest.mark.root]

MiB = 1 << 20
N_MIB = 48
DOCKER_SOCK = "/var/run/docker.sock"


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("stats")
    agent = AgentProcess(workdir, extra_config={"stats-interval": 1.0, "stats-fs-interval": 1.0,
                                                "proxy": False})
    agent.start()
    mem = pod_manifest("mem", [busybox(
        "hog",
        f"dd if=/dev/zero of=/dev/shm/fill bs=1M count={N_MIB} 2>/dev/null; "
        "dd if=/dev/zero of=/tmp/blob bs=1k count=400 2>/dev/null; "
        "dd if=/dev/zero of=/scratch/data bs=1k count=1024 2>/dev/null; "
        "i=0; while true; do i=$((i+1)); echo line $i; sleep 1; done",
        volumeMounts=[{"name": "scratch", "mountPath": "/scratch"}])],
        volumes=[{"name": "scratch", "emptyDir": {}}])
    cpu = pod_manifest("cpu", [busybox("burn", "while :; do :; done")])
    agent.write("mem.yaml", mem)
    agent.write("cpu.yaml", cpu)
    try:
        # generous: the shared engine can be slow while other suites run
        agent.wait_running_ready("mem", timeout=120)
        agent.wait_running_ready("cpu", timeout=120)
        yield agent
    finally:
        agent.stop()
        agent.cleanup()


def _get(agent: AgentProcess, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(agent.url + path, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def summary(agent: AgentProcess) -> dict:
    status, body = _get(agent, "/stats/summary")
    assert status == 200
    return json.loads(body)


def pod_of(s: dict, name: str, agent: AgentProcess) -> dict:
    full = f"{name}-{agent.node_name}"
    return next(p for p in s["pods"] if p["podRef"]["name"] == full)


def docker_stats(container_id: str) -> dict:
    """One reading from Docker's stats API (the engine reads the same cgroup)."""
    out = subprocess.run(["curl", "-s", "--unix-socket", DOCKER_SOCK,
                          f"http://docker/containers/{container_id}/stats?stream=false&one-shot=true"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return json.loads(out)


def _docker_ws(st: dict) -> int:
    mem = st["memory_stats"]
    return mem["usage"] - mem["stats"].get("total_inactive_file", mem["stats"].get("inactive_file", 0))


def test_working_set_and_cpu_rate_match_workloads_and_docker(node):
    hog = node.container_of("mem", "hog")["Id"]
    burn = node.container_of("cpu", "burn")["Id"]

    def ws_settled():
        # the pod may be absent from a round or two while the listing catches up
        p = next((p for p in summary(node)["pods"] if p["podRef"]["name"] == f"mem-{node.node_name}"), None)
        if not p or not p.get("containers") or "memory" not in p["containers"][0]:
            return None
        ws = p["containers"][0]["memory"]["workingSetBytes"]
        return ws if ws >= N_MIB * MiB * 0.95 else None

    ws = node.wait_for("working set of the 48 MiB writer", ws_settled, timeout=30)
    assert abs(ws - N_MIB * MiB) <= 0.05 * N_MIB * MiB, ws
    docker_ws = _docker_ws(docker_stats(hog))
    assert abs(ws - docker_ws) <= 0.05 * N_MIB * MiB, (ws, docker_ws)

    # CPU over the same ~6 s window, three ways: the agent's counter (cAdvisor's
    # container_cpu_usage_seconds_total at its sample time container_last_seen),
    # Docker's stats API (total_usage at its `read` time), and the kernel's account of
    # the loop process itself (utime+stime).
    pid = int(node.container_of("cpu", "burn")["State"]["Pid"])
    proc = psutil.Process(pid)
    o1, d1, p1, t1 = _ours(node, "burn"), docker_stats(burn), sum(proc.cpu_times()[:2]), time.time()
    time.sleep(6.0)
    o2, d2, p2, t2 = _ours(node, "burn"), docker_stats(burn), sum(proc.cpu_times()[:2]), time.time()
    ours = (o2[0] - o1[0]) / (o2[1] - o1[1])
    docker_rate = ((d2["cpu_stats"]["cpu_usage"]["total_usage"] - d1["cpu_stats"]["cpu_usage"]["total_usage"])
                   / 1e9 / (docker_time(d2["read"]) - docker_time(d1["read"])))
    proc_rate = (p2 - p1) / (t2 - t1)
    assert abs(ours - docker_rate) <= 0.1, (ours, docker_rate, proc_rate)
    assert abs(ours - proc_rate) <= 0.1, (ours, proc_rate)
    # the same counter: Docker's reading and ours differ by at most what the loop
    # burned between the two reading times
    gap = abs(docker_time(d2["read"]) - o2[1])
    assert abs(d2["cpu_stats"]["cpu_usage"]["total_usage"] / 1e9 - o2[0]) <= gap * 1.1 + 0.2
    # One core of two is the loop's only when others leave it free; on the shared
    # machine the kernel's own view (proc_rate) says whether it was.
    if proc_rate >= 0.9:
        assert 0.9 <= ours <= 1.1, ours
    else:
        print(f"host busy: the loop got {proc_rate:.2f} cores; the agent says {ours:.2f}")


def _ours(agent: AgentProcess, container: str) -> tuple[float, float]:
    """(cpu seconds, sample time) of a container from /metrics/cadvisor."""
    fams = {f.name: f for f in text_string_to_metric_families(_get(agent, "/metrics/cadvisor")[1].decode())}
    cpu = next(s.value for s in fams["container_cpu_usage_seconds"].samples if s.labels["container"] == container)
    seen = next(s.value for s in fams["container_last_seen"].samples if s.labels["container"] == container)
    return cpu, seen


def test_summary_fields(node):
    # a few pings from the host give the pod's eth0 something to count
    ip = node.pod("mem")["status"]["podIP"]
    subprocess.run(["ping", "-c", "3", "-i", "0.2", "-W", "1", ip], capture_output=True, timeout=10)

    def fs_seen():
        p = next((p for p in summary(node)["pods"] if p["podRef"]["name"] == f"mem-{node.node_name}"), None)
        return p if p and p.get("volume") and p.get("containers") and p["network"]["rxBytes"] >= 3 * 84 else None

    pod = node.wait_for("volume and network figures", fs_seen, timeout=20)
    s = summary(node)
    n = s["node"]
    assert n["nodeName"] == node.node_name
    for key in ("startTime", "cpu", "memory", "network", "fs", "runtime", "rlimit"):
        assert key in n, key
    assert n["cpu"]["usageCoreNanoSeconds"] > 0 and n["cpu"]["usageNanoCores"] >= 0
    total = psutil.virtual_memory().total
    assert n["memory"]["availableBytes"] + n["memory"]["workingSetBytes"] == total
    assert 0 < n["memory"]["workingSetBytes"] <= n["memory"]["usageBytes"] <= total
    assert n["fs"]["capacityBytes"] >= n["fs"]["usedBytes"] > 0
    assert n["runtime"]["imageFs"]["capacityBytes"] > 0
    assert n["rlimit"]["maxpid"] > 0 and n["rlimit"]["curproc"] > 0
    assert pod["podRef"]["namespace"] == "default" and len(pod["podRef"]["uid"]) > 0
    assert pod["podRef"]["uid"] == node.pod("mem")["metadata"]["uid"]
    [c] = pod["containers"]
    assert c["name"] == "hog"  # the pause is not listed as a container...
    assert pod["memory"]["workingSetBytes"] > c["memory"]["workingSetBytes"]  # ...but counted
    for section in ("cpu", "memory", "rootfs", "logs"):
        assert section in c, section
    assert c["memory"]["rssBytes"] > 0 and c["memory"]["pageFaults"] > 0
    assert c["rootfs"]["usedBytes"] >= 400 * 1024
    assert c["logs"]["usedBytes"] > 0
    [vol] = pod["volume"]
    assert vol["name"] == "scratch" and vol["usedBytes"] >= 1024 * 1024
    eph = pod["ephemeral-storage"]["usedBytes"]
    assert eph >= c["rootfs"]["usedBytes"] + c["logs"]["usedBytes"] + vol["usedBytes"]
    assert pod["network"]["name"] == "eth0" and pod["network"]["interfaces"][0]["name"] == "eth0"
    assert pod["process_stats"]["process_count"] >= 2
    for stamp in (n["startTime"], pod["startTime"], c["startTime"], c["cpu"]["time"]):
        time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")


def test_promtool_accepts_live_metrics(node):
    if shutil.which("promtool") is None:
        pytest.fail("promtool missing (Debian prometheus: run scripts/setup.sh)")
    for path in ("/metrics", "/metrics/cadvisor", "/metrics/resource", "/metrics/probes"):
        status, body = _get(node, path)
        assert status == 200, path
        check = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, timeout=30)
        assert check.returncode == 0, (path, check.stdout, check.stderr)
    def families_now() -> dict:
        return {f.name: f for f in text_string_to_metric_families(_get(node, "/metrics")[1].decode())}

    # The running counts are as of the PLEG's last relist (every relist period).
    node.wait_for("a relist that saw both pods",
                  lambda: families_now()["kubelet_running_pods"].samples[0].value == 2, 10)
    families = families_now()
    assert families["kubelet_running_pods"].samples[0].value == 2
    running = {s.labels["container_state"]: s.value for s in families["kubelet_running_containers"].samples}
    assert running["running"] == 2
    ops = {s.labels["operation_type"] for s in families["kubelet_runtime_operations"].samples}
    assert {"run_podsandbox", "create_container", "start_container", "list_containers"} <= ops
    assert families["kubelet_pod_start_duration_seconds"].samples  # histogram present
    start_count = next(s.value for s in families["kubelet_pod_start_duration_seconds"].samples
                       if s.name.endswith("_count"))
    assert start_count == 2
    assert next(s.value for s in families["kubelet_pleg_relist_duration_seconds"].samples
                if s.name.endswith("_count")) > 0
    cad = _get(node, "/metrics/cadvisor")[1].decode()
    burn = [line for line in cad.splitlines()
            if line.startswith("container_cpu_usage_seconds_total") and 'container="burn"' in line]
    assert len(burn) == 1 and f'pod="cpu-{node.node_name}"' in burn[0] and 'namespace="default"' in burn[0]
    assert 'image="busybox:1.35"' in burn[0] and 'name="k8s_burn_cpu-' in burn[0]
    rx = [line for line in cad.splitlines() if line.startswith("container_network_receive_bytes_total")
          and f'pod="mem-{node.node_name}"' in line]
    assert rx and 'interface="eth0"' in rx[0] and 'container="POD"' in rx[0]


def test_prometheus_scrapes_a_pods_cpu_rate(node, tmp_path):
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus missing (Debian prometheus: run scripts/setup.sh)")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "- job_name: cadvisor\n"
        "  metrics_path: /metrics/cadvisor\n"
        f"  static_configs: [{{targets: ['127.0.0.1:{node.port}']}}]\n")
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))
    query = ('sum by (pod) (rate(container_cpu_usage_seconds_total'
             f'{{pod="cpu-{node.node_name}",container="burn"}}[5s]))')
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    try:
        value = None
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and value is None:
            time.sleep(1)
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    data = json.loads(r.read())
            except OSError:
                continue
            result = data.get("data", {}).get("result", [])
            if data.get("status") == "success" and result:
                value = float(result[0]["value"][1])
        assert value is not None, (tmp_path / "prometheus.log").read_text()[-2000:]
        # The loop's share of the (shared, loaded) machine varies, so the rate is checked
        # for being there and positive, and the counter behind it against ours.
        assert value > 0.01, value
        raw = f'container_cpu_usage_seconds_total{{pod="cpu-{node.node_name}",container="burn"}}'
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query?"
                                    + urllib.parse.urlencode({"query": raw}), timeout=5) as r:
            theirs = float(json.loads(r.read())["data"]["result"][0]["value"][1])
        ours = pod_of(summary(node), "cpu", node)["containers"][0]["cpu"]["usageCoreNanoSeconds"] / 1e9
        assert 0 <= ours - theirs <= 5.0, (ours, theirs)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(60)


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return name
    pytest.fail("chromium missing (run scripts/setup.sh)")


def test_status_page_in_headless_chromium(node, tmp_path):
    node.wait_for("CPU history", lambda: summary(node)["pods"] and time.sleep(2) is None, timeout=10)
    browser = _chromium()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}"]
    def run(*args: str) -> subprocess.CompletedProcess:
        # One retry: on the loaded shared machine a headless start occasionally stalls.
        for attempt in (1, 2):
            try:
                return subprocess.run([browser, *flags, *args],
                                      capture_output=True, text=True, timeout=90)
            except subprocess.TimeoutExpired:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    dom = run("--dump-dom", node.url + "/")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    from html.parser import HTMLParser

    class Rows(HTMLParser):
        def __init__(self):
            super().__init__()
            self.rows: list[dict] = []
            self.cls = None
            self.in_pods = False
            self.polylines = 0

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "table":
                self.in_pods = a.get("id") == "pods"
            if self.in_pods and tag == "tr" and "data-uid" in a:
                self.rows.append({"uid": a["data-uid"]})
            if self.in_pods and tag == "td":
                self.cls = a.get("class", "")
            if self.in_pods and tag == "polyline":
                self.polylines += 1

        def handle_data(self, data):
            if self.in_pods and self.rows and self.cls:
                key = self.cls.split()[-1] if "phase" not in self.cls else "phase"
                self.rows[-1][key] = self.rows[-1].get(key, "") + data

    parser = Rows()
    parser.feed(html)
    names = {r.get("pod-name"): r for r in parser.rows}
    assert f"mem-{node.node_name}" in names, html[-3000:]
    mem = names[f"mem-{node.node_name}"]
    assert mem["phase"] == "Running" and mem["ip"] == node.pod("mem")["status"]["podIP"]
    assert mem["memory"].endswith("MiB") and float(mem["memory"].split()[0]) >= N_MIB * 0.95
    assert float(names[f"cpu-{node.node_name}"]["cpu"]) > 0.0  # a share of a loaded machine
    assert parser.polylines >= 4  # CPU and memory sparklines of both pods
    assert "<script" not in html and 'id="node-name"' in html and node.node_name in html
    shot = tmp_path / "page.png"
    done = run("--window-size=1280,720", f"--screenshot={shot}", node.url + "/")
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    keep = os.environ.get("NODEAGENT_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)


def test_status_command(node):
    cmd = [sys.executable, "-m", "nodeagent.cli", "status", "--status-address", f"127.0.0.1:{node.port}"]
    # Run alone, the module's pods may not have been sampled yet: usage shows once they are.
    out = node.wait_for("a status table with the pods' usage", lambda: (
        o := subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=REPO)) and "MiB" in o.stdout and o, 30)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert text.startswith(f"NODE {node.node_name}   health ok")
    rows = {line.split()[1]: line.split() for line in text.splitlines()
            if line.startswith("default ")}
    mem = rows[f"mem-{node.node_name}"]
    assert mem[2:5] == ["Running", "1/1", "0"] and mem[5] == node.pod("mem")["status"]["podIP"]
    assert "MiB" in text and "[#" in text
    # --watch redraws until interrupted
    frames = Path(tempfile.mkdtemp()) / "watch.out"
    with open(frames, "w") as sink:
        # Ctrl-C as a terminal sends it: SIGINT at its default, whatever the test runner
        # inherited (a shell's background job starts with SIGINT ignored).
        watch = subprocess.Popen(cmd + ["--watch", "0.5"], stdout=sink, text=True, cwd=REPO,
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and frames.read_text().count(f"NODE {node.node_name}") < 2:
                time.sleep(0.2)
            watch.send_signal(signal.SIGINT)
            watch.wait(10)
        finally:
            if watch.poll() is None:  # a failed test leaves no watcher behind
                watch.kill()
                watch.wait(5)
    assert watch.returncode == 0 and frames.read_text().count(f"NODE {node.node_name}") >= 2
    bad = subprocess.run(cmd[:-2] + ["--status-address", f"127.0.0.1:{free_port()}"],
                         capture_output=True, text=True, timeout=30, cwd=REPO)
    assert bad.returncode == 1 and "cannot read the agent" in bad.stderr


def test_http_errors(node):
    assert _get(node, "/nope")[0] == 404
    assert _get(node, "/stats/summary?only_cpu_and_memory=sometimes")[0] == 400
    assert _get(node, "/?refresh=x")[0] == 400
    status, body = _get(node, "/readyz?verbose")
    assert status == 200 and b"readyz check passed" in body
