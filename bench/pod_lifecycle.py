"""Pod lifecycle head to head (issue 11): nodeagent vs the sequential Docker floor vs podman.

    scripts/setup-bench.sh    # once, as root: installs podman (after scripts/setup.sh)
    .venv/bin/python bench/pod_lifecycle.py [--runs 20] [--pods 110] [--rounds 5]
        [--idle-seconds 60] [--settle 1.0] [--warmup 1] [--floor-concurrency 0]
        [--skip-podman] [--out DIR]

Runs as root on one machine, with Docker running and the images ``busybox:1.35`` and
``nodeagent/pause:1`` present (scripts/setup.sh). Three contenders, measured in one run,
interleaved (the order rotates every round), each starting from zero pods of the run:

1. **nodeagent**: the standalone agent as a subprocess, started as bench/pod_startup.py
   does (its ``agent_cmd``: manifest directory, per-run node name ``bench-<tag>`` and
   bridge ``nab<tag>``, pod CIDR 10.244.250.0/24, status on a free loopback port). A pod
   is started by writing its manifest into the directory (atomic rename) and deleted by
   unlinking it.
2. **Docker floor**: the same Docker calls made directly with aiodocker, through the
   agent's own client factory (``runtime.engine.make_docker_client``: the same unbounded
   connection pool). Per pod, sequentially: create the pause container (NetworkMode
   ``none``, IpcMode ``shareable``), start it, create the app container (NetworkMode and
   IpcMode ``container:<pause>``), start it. Delete, per pod, sequentially:
   ``POST /containers/{app}/stop?t=1`` (the grace period), ``DELETE /containers/{app}``,
   ``DELETE /containers/{pause}?force=1``. For N pods the per-pod sequences run
   concurrently, at most ``--floor-concurrency`` pods at a time; the default 0 means all
   N at once, because that is the agent's limit: its connection pool is unbounded
   (``limit=0``) and each pod has its own worker that calls the engine without any
   semaphore on create/start/stop/remove, so nothing in the agent caps how many pods are
   in flight. Outside the measured part (cleanup after an error), the floor's containers
   are removed one at a time: Docker 20.10's libnetwork deadlocks on concurrent network
   exits.
3. **podman** ``kube play`` (Debian's podman 4.3.1, installed by scripts/setup-bench.sh).
   podman gets everything private, in its own short temp dir /tmp/pm-<tag>-* (a runroot
   may not exceed 50 characters): a containers.conf named by ``CONTAINERS_CONF``
   (``[containers] default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]``;
   ``[engine] runtime = "runc"``, ``infra_image = "docker.io/nodeagent/pause:1"`` --
   4.3.1's kube play has no ``--infra-image`` --, ``events_logger = "file"``;
   ``[network] network_config_dir`` in the temp dir, so /etc/cni/net.d is not touched)
   and ``--root``/``--runroot``/``--tmpdir`` in the temp dir; /etc/containers is never
   touched. The images are copied from the local Docker engine (``podman pull
   docker-daemon:busybox:1.35`` and ``docker-daemon:nodeagent/pause:1``); podman as root
   writes its blob-info cache to /var/lib/containers/cache whatever its ``--root``: the
   file (and the directories, if empty) are removed at the end unless they existed. A
   pod is started with ``podman kube play --network none FILE`` and deleted with
   ``podman kube down FILE``; N pods are one multi-document FILE (one command; podman
   plays the documents one after another).

Every pod: the pause container plus one ``busybox:1.35`` container running
``sh -c "trap 'exit 0' TERM; while true; do sleep 3600 & wait $!; done"``,
``imagePullPolicy: IfNotPresent`` (written out: podman 4.3.1 resolves an unset policy
against the registry -- it sent DNS queries for registry-1.docker.io -- whereas
IfNotPresent, the Kubernetes default for a tagged image, stays local),
terminationGracePeriodSeconds 1. busybox ``sh`` as PID 1 ignores SIGTERM, so without the
trap every stop would take the full grace and then SIGKILL; the trap ends it at once in
all three contenders. The loop waits on a background ``sleep`` because ash runs a trap
only once the foreground command has returned: with a foreground ``sleep 1`` a stop
takes up to 1 s more (``docker stop`` measured 120-400 ms against ~40 ms); ``wait`` is
interrupted by the signal at once (the orphaned ``sleep`` dies with the container's PID
namespace).

Scenarios (times in seconds, clock = wall clock of this machine):

* **one pod -> Running**: ``--runs`` rounds (after ``--warmup`` unmeasured start+delete
  per contender). Clock starts just before the manifest rename (agent), the first
  Docker call (floor), or spawning ``podman kube play`` (podman). It stops at the app
  container's start: Docker's ``start`` event (``timeNano``) for agent and floor,
  podman's own ``start`` event of the app container (its event log, nanoseconds) for
  podman -- both are written by the engine right after the OCI runtime's start returned.
  podman events were chosen over polling ``podman ps``/``inspect`` (a poll adds its
  period and a podman process per poll); the ``kube play`` exit time is recorded too
  (``podman_cli``): 4.3.1's kube play returns only after the containers were started
  (the run counts any exit before the start event in ``play_exit_before_start``).
* **one pod deleted -> containers gone**: on the same pod, right after its start (the
  ``--settle`` pause between). Clock from just before the unlink / the first stop call /
  spawning ``podman kube down`` until the last of the pod's two containers is removed:
  Docker's ``destroy`` event, podman's ``remove`` event. Then absence is confirmed by a
  listing. podman's ``kube down`` exit time is recorded too: it can return seconds after
  the containers are gone (it waits for the pod's ``conmon`` cgroup to empty, i.e. for
  conmon's ``podman container cleanup`` processes).
* **N pods (``--pods``) at once -> all Running** and **N pods deleted at once -> all
  gone**: ``--rounds`` rounds, same clocks, until the last pod.
* **idle cost**: after the first agent burst round, with its N pods running and once
  the burst's one-off follow-up work is over (``IDLE_SETTLE`` s: the first stats round
  inspects every new container, the first relist sees them all): the agent process's
  RSS (max over the window, psutil) and CPU (% of one core) over ``--idle-seconds``
  (60 by default: one full cycle of every periodic task, the 10 s relist, stats and
  housekeeping and the 60 s filesystem walk).

Reported per scenario and contender: median and p90 (nearest rank) and the ratios of the
medians nodeagent/floor and nodeagent/podman; a JSON document and a Markdown table for
docs/BENCHMARKS.md are printed at the end (and written to ``--out DIR`` as
pod_lifecycle.json and pod_lifecycle.md). Machine facts: host name, cores, kernel,
Docker and podman versions, load average at start and end.

Caveats:

* The agent does more than the other two: it parses the manifest, keeps pod state, and
  wires a real pod network (bridge, veth, IPAM address, routes) for every pod; the
  floor and podman run with no network (``none``). Agent pods also carry the agent's
  labels and cgroup parent, and its stop/remove path is its own.
* podman 4.3.1's ``kube down`` does not honour the grace period: it stops the pod's
  containers with timeout 0 (SIGKILL at once; exit code 137). With the trap above that
  saves podman the few ms of a SIGTERM exit only.
* podman's clocks include starting its CLI process (a Go binary, tens of ms), the
  agent's include noticing the manifest (inotify) and parsing it: each is the
  contender's own way in. For N pods podman plays the documents one by one, while the
  agent and the floor work on all pods at once.
* The floor and podman are single pass: the floor has no reconcile loop and podman no
  daemon; the agent also runs its periodic work (PLEG relist, status, probes, GC)
  during the measurement.
* ``--settle`` seconds pass between measurements so one contender's background
  teardown (the agent's network cleanup, podman's conmon cleanup) does not land in the
  next one's measurement; it is not counted.
* Everything created carries the run's tag: the agent's node label
  ``io.nodeagent.node=bench-<tag>``, the floor's ``nodeagent.bench=<tag>`` label and
  container names, podman pods ``<name>-<tag>`` labelled ``nodeagent.bench=<tag>`` in a
  private storage. All of it is removed at the end, also on Ctrl-C, SIGTERM or an error
  (try/finally), together with the leftovers podman 4.3.1 leaves outside its storage
  (its pods' cgroups in the cgroup v1 ``systemd``/``unified`` hierarchies, and
  ``libpod_parent``/``/dev/shm/libpod_lock`` if they did not exist before the run). No
  traffic is sent anywhere: only local container starts; the agent's status endpoint is
  on loopback.
* Every wait has a timeout. If the agent fails to come up (a transient breakage of the
  tree it runs from), it is retried a few times, 30 s apart.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import secrets
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import aiodocker
import aiohttp
import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from pod_startup import agent_cmd, cleanup_network, free_port, remove_labelled, wait_gone  # noqa: E402

from runtime.engine import close_docker_client, make_docker_client  # noqa: E402

IMAGE = "busybox:1.35"
PAUSE = "nodeagent/pause:1"
PODMAN_PAUSE = "docker.io/nodeagent/pause:1"
APP_COMMAND = ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 3600 & wait $!; done"]
GRACE = 1
BENCH_LABEL = "nodeagent.bench"
NODE_LABEL = "io.nodeagent.node"
POD_NAME_LABEL = "io.kubernetes.pod.name"
CONTAINER_NAME_LABEL = "io.kubernetes.container.name"
CONTAINERS_PER_POD = 2  # pause/infra + app
CGROUP_ROOT = Path("/sys/fs/cgroup")
PODMAN_LOCK = Path("/dev/shm/libpod_lock")
BLOB_CACHE = Path("/var/lib/containers/cache/blob-info-cache-v1.boltdb")

AGENT, FLOOR, PODMAN = "nodeagent", "floor", "podman"
SCENARIOS = {
    "one_start": "one pod → Running",
    "one_delete": "one pod deleted → containers gone",
    "burst_start": "{n} pods at once → all Running",
    "burst_delete": "{n} pods deleted at once → all gone",
}
LABELS = {AGENT: "nodeagent", FLOOR: "Docker floor", PODMAN: "podman kube play"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def pod_manifest(name: str, tag: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {BENCH_LABEL: tag}},
            "spec": {"terminationGracePeriodSeconds": GRACE,
                     "containers": [{"name": "app", "image": IMAGE, "imagePullPolicy": "IfNotPresent",
                                     "command": APP_COMMAND}]}}


class Contender(Protocol):
    name: str

    async def start(self, pods: list[str], timeout: float) -> float:
        """Start ``pods`` at once; seconds until the last app container is running."""
        ...

    async def delete(self, pods: list[str], timeout: float) -> float:
        """Delete ``pods`` at once; seconds until the last of their containers is gone."""
        ...


# --- Docker events (agent and floor) ------------------------------------------------------


class DockerEvents:
    """``start`` and ``destroy`` events of this run's containers, by owner and pod name.

    One subscription without a label filter (Docker ANDs label filters, and the agent's
    and the floor's containers carry different labels); the owner is told by the labels.
    """

    def __init__(self, docker: aiodocker.Docker, node: str, tag: str) -> None:
        self.docker = docker
        self.node = node
        self.tag = tag
        # (owner, pod) -> {container id: start time}
        self.started: dict[tuple[str, str], dict[str, float]] = {}
        self.app_started: dict[tuple[str, str], float] = {}
        self.destroyed: dict[str, float] = {}
        self.changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def _owner(self, labels: dict[str, str]) -> str | None:
        if labels.get(NODE_LABEL) == self.node:
            return AGENT
        if labels.get(BENCH_LABEL) == self.tag:
            return FLOOR
        return None

    async def start(self) -> None:
        sub = self.docker.events.subscribe(filters=json.dumps(
            {"type": ["container"], "event": ["start", "destroy"]}))
        ready = asyncio.Event()

        async def loop() -> None:
            ready.set()
            while True:
                ev = await sub.get()
                if ev is None:
                    return
                labels: dict[str, str] = ev.get("Actor", {}).get("Attributes", {})
                owner = self._owner(labels)
                pod = labels.get(POD_NAME_LABEL)
                if owner is None or pod is None:
                    continue
                cid, when = ev["Actor"]["ID"], ev["timeNano"] / 1e9
                if ev["Action"] == "start":
                    self.started.setdefault((owner, pod), {})[cid] = when
                    if labels.get(CONTAINER_NAME_LABEL) == "app":
                        self.app_started[(owner, pod)] = when
                else:
                    self.destroyed[cid] = when
                self.changed.set()

        self._task = asyncio.create_task(loop())
        await ready.wait()
        await asyncio.sleep(0.2)  # the subscription request is on its way

    async def _until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not done():
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            raise TimeoutError(f"{what}: not seen within {timeout:g}s") from None

    async def wait_started(self, owner: str, pods: Sequence[str], timeout: float) -> float:
        """Time of the last app start among ``pods``."""
        keys = [(owner, p) for p in pods]
        await self._until(lambda: all(k in self.app_started for k in keys), timeout,
                          f"{owner}: app start of {len(keys)} pod(s)")
        return max(self.app_started[k] for k in keys)

    async def wait_destroyed(self, owner: str, pods: Sequence[str], timeout: float) -> float:
        """Time of the last destroy among the containers of ``pods``."""
        keys = [(owner, p) for p in pods]

        def done() -> bool:
            return all(len(self.started.get(k, {})) >= CONTAINERS_PER_POD
                       and all(c in self.destroyed for c in self.started[k]) for k in keys)

        await self._until(done, timeout, f"{owner}: removal of {len(keys)} pod(s)")
        return max(self.destroyed[c] for k in keys for c in self.started[k])

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self.docker.events.stop()


# --- nodeagent ----------------------------------------------------------------------------


class Agent:
    name = AGENT

    def __init__(self, docker: aiodocker.Docker, events: DockerEvents, workdir: Path,
                 node: str, bridge: str, tag: str) -> None:
        self.docker = docker
        self.events = events
        self.workdir = workdir
        self.manifests = workdir / "m"
        self.node = node
        self.bridge = bridge
        self.tag = tag
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "agent.log"

    async def launch(self, attempts: int = 4, retry_after: float = 30.0) -> None:
        self.manifests.mkdir(exist_ok=True)
        for attempt in range(1, attempts + 1):
            port = free_port()
            with open(self.log_path, "ab") as logf:
                self.proc = subprocess.Popen(agent_cmd(self.workdir, self.node, port, self.bridge),
                                             cwd=REPO, stdout=logf, stderr=logf)
            if await self._ready(port, timeout=60):
                log(f"agent up (pid {self.proc.pid}, node {self.node})")
                return
            tail = self.log_path.read_text(errors="replace")[-2000:]
            await self.terminate()
            log(f"agent did not come up (attempt {attempt}/{attempts}); log tail:\n{tail}")
            if attempt < attempts:
                await asyncio.sleep(retry_after)
        raise RuntimeError(f"the agent did not start; see {self.log_path}")

    async def _ready(self, port: int, timeout: float) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    return False
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                        if resp.status == 200:
                            return True
                await asyncio.sleep(0.2)
        return False

    def key(self, pod: str) -> str:
        return f"{pod}-{self.node}"  # static pod name: <name>-<node>

    def _write(self, pod: str) -> None:
        tmp = self.manifests / f".{pod}.tmp"
        tmp.write_text(yaml.safe_dump(pod_manifest(pod, self.tag)))
        os.replace(tmp, self.manifests / f"{pod}.yaml")

    async def start(self, pods: list[str], timeout: float) -> float:
        self._check_alive()
        t0 = time.time()
        for p in pods:
            self._write(p)
        last = await self.events.wait_started(AGENT, [self.key(p) for p in pods], timeout)
        return last - t0

    async def delete(self, pods: list[str], timeout: float) -> float:
        self._check_alive()
        t0 = time.time()
        for p in pods:
            (self.manifests / f"{p}.yaml").unlink()
        last = await self.events.wait_destroyed(AGENT, [self.key(p) for p in pods], timeout)
        await wait_gone(self.docker, f"{NODE_LABEL}={self.node}", timeout=timeout)
        return last - t0

    def _check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"the agent exited; see {self.log_path}")

    async def terminate(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, 20)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait, 10)

    async def cleanup(self) -> None:
        await self.terminate()
        await remove_labelled(self.docker, f"{NODE_LABEL}={self.node}")
        cleanup_network(self.workdir)
        # Network namespaces and other mounts the agent made under its root dir.
        root = str(self.workdir / "root") + "/"
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                  if line.split()[1].startswith(root)]
        for m in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True, timeout=30)


# --- Docker floor -------------------------------------------------------------------------


class Floor:
    name = FLOOR

    def __init__(self, docker: aiodocker.Docker, events: DockerEvents, tag: str, concurrency: int) -> None:
        self.docker = docker
        self.events = events
        self.tag = tag
        self.concurrency = concurrency
        self.ids: dict[str, tuple[str, str]] = {}  # pod -> (pause id, app id)

    def _labels(self, pod: str, container: str) -> dict[str, str]:
        return {BENCH_LABEL: self.tag, POD_NAME_LABEL: pod, CONTAINER_NAME_LABEL: container}

    async def _start_pod(self, pod: str, slots: asyncio.Semaphore) -> None:
        async with slots:
            pause = await self.docker.containers.create(
                {"Image": PAUSE, "Labels": self._labels(pod, "POD"),
                 "HostConfig": {"NetworkMode": "none", "IpcMode": "shareable"}},
                name=f"bench_{self.tag}_{pod}_pause")
            await pause.start()
            app = await self.docker.containers.create(
                {"Image": IMAGE, "Labels": self._labels(pod, "app"), "Cmd": APP_COMMAND,
                 "HostConfig": {"NetworkMode": f"container:{pause.id}",
                                "IpcMode": f"container:{pause.id}"}},
                name=f"bench_{self.tag}_{pod}_app")
            self.ids[pod] = (pause.id, app.id)
            await app.start()

    async def _delete_pod(self, pod: str, slots: asyncio.Semaphore) -> None:
        async with slots:
            pause_id, app_id = self.ids.pop(pod)
            app = self.docker.containers.container(app_id)
            await app.stop(t=GRACE)
            await app.delete()
            await self.docker.containers.container(pause_id).delete(force=True)

    def _slots(self, pods: list[str]) -> asyncio.Semaphore:
        return asyncio.Semaphore(self.concurrency or len(pods))

    async def start(self, pods: list[str], timeout: float) -> float:
        slots = self._slots(pods)
        t0 = time.time()
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(self._start_pod(p, slots) for p in pods))
        last = await self.events.wait_started(FLOOR, pods, timeout)
        return last - t0

    async def delete(self, pods: list[str], timeout: float) -> float:
        slots = self._slots(pods)
        t0 = time.time()
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(self._delete_pod(p, slots) for p in pods))
        return await self.events.wait_destroyed(FLOOR, pods, timeout) - t0

    async def cleanup(self) -> None:
        self.ids.clear()
        await remove_labelled(self.docker, f"{BENCH_LABEL}={self.tag}")  # one at a time


# --- podman -------------------------------------------------------------------------------


def parse_podman_time(value: str) -> float:
    """``2026-12-02T22:12:52.630472799Z`` (nanoseconds, UTC) -> Unix time."""
    base, _, frac = value.rstrip("Z").partition(".")
    seconds = datetime.strptime(base, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc).timestamp()
    return seconds + (float("0." + frac) if frac else 0.0)


class Podman:
    name = PODMAN

    def __init__(self, tag: str) -> None:
        # Its own short directory: podman refuses a runroot longer than 50 characters.
        self.dir = Path(tempfile.mkdtemp(prefix=f"pm-{tag}-"))
        self.tag = tag
        self.conf = self.dir / "containers.conf"
        self.base = ["podman", "--root", str(self.dir / "root"), "--runroot", str(self.dir / "run"),
                     "--tmpdir", str(self.dir / "tmp")]
        self.env = {**os.environ, "CONTAINERS_CONF": str(self.conf)}
        self.pod_ids: dict[str, str] = {}  # running pod name -> podman pod id
        self.all_pod_ids: set[str] = set()  # every pod this run created (cgroup cleanup)
        self.cli: dict[str, list[float]] = {"kube_play_exit": [], "kube_down_exit": []}
        self.play_exit_before_start = 0
        self.version = ""
        # Host-wide things podman creates that we remove at the end if they were not there.
        self._had_lock = PODMAN_LOCK.exists()
        self._had_blob_cache = BLOB_CACHE.exists()
        self._had_var_lib = BLOB_CACHE.parents[1].exists()
        self._had_parent = {h.name for h in CGROUP_ROOT.iterdir() if (h / "libpod_parent").is_dir()} \
            if CGROUP_ROOT.is_dir() else set()

    def reset_stats(self) -> None:
        self.cli = {key: [] for key in self.cli}
        self.play_exit_before_start = 0

    async def run(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        proc = await asyncio.create_subprocess_exec(
            *self.base, *args, env=self.env, stdin=subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            async with asyncio.timeout(timeout):
                out, err = await proc.communicate()
        except (TimeoutError, asyncio.CancelledError):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        if check and proc.returncode != 0:
            raise RuntimeError(f"podman {shlex.join(args)}: exit {proc.returncode}: "
                               f"{err.decode(errors='replace').strip()[-2000:]}")
        return out.decode()

    async def setup(self) -> None:
        if shutil.which("podman") is None:
            raise RuntimeError("podman is not installed: run scripts/setup-bench.sh (or pass --skip-podman)")
        for d in ("root", "run", "tmp", "net"):
            (self.dir / d).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            "[containers]\n"
            'default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]\n\n'
            "[engine]\n"
            'runtime = "runc"\n'
            f'infra_image = "{PODMAN_PAUSE}"\n'
            'events_logger = "file"\n\n'
            "[network]\n"
            f'network_config_dir = "{self.dir / "net"}"\n')
        self.version = (await self.run("version", "--format", "{{.Client.Version}}")).strip()
        # From the local Docker engine: podman must not reach any registry.
        for image in (IMAGE, PAUSE):
            await self.run("pull", "-q", f"docker-daemon:{image}", timeout=300)

    def _file(self, pods: list[str]) -> Path:
        return self.dir / f"kube-{pods[0]}-{len(pods)}.yaml"

    def key(self, pod: str) -> str:
        return f"{pod}-{self.tag}"

    async def _events(self, since: float, status: str) -> list[dict[str, Any]]:
        out = await self.run("events", "--stream=false", "--since", f"{since:.6f}",
                             "--filter", f"event={status}", "--format", "json", timeout=60)
        found = []
        for line in out.splitlines():
            line = line.strip()
            if line.startswith("{"):
                ev = json.loads(line)
                if ev.get("Type") == "container" and ev.get("Status") == status:
                    found.append(ev)
        return found

    async def start(self, pods: list[str], timeout: float) -> float:
        path = self._file(pods)
        path.write_text(yaml.safe_dump_all([pod_manifest(self.key(p), self.tag) for p in pods]))
        apps = {f"{self.key(p)}-app": p for p in pods}
        t0 = time.time()
        await self.run("kube", "play", "--network", "none", str(path), timeout=timeout)
        t_exit = time.time()
        deadline = time.monotonic() + 30
        while True:
            started = {ev["Name"]: ev for ev in await self._events(t0 - 1, "start") if ev.get("Name") in apps}
            if len(started) == len(apps) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        if len(started) != len(apps):
            raise TimeoutError(f"podman: start events of {len(apps) - len(started)} app container(s) missing")
        for name, ev in started.items():
            self.pod_ids[apps[name]] = ev["PodID"]
            self.all_pod_ids.add(ev["PodID"])
        last = max(parse_podman_time(ev["Time"]) for ev in started.values())
        if t_exit < last:
            self.play_exit_before_start += 1
        self.cli["kube_play_exit"].append(t_exit - t0)
        return last - t0

    async def delete(self, pods: list[str], timeout: float) -> float:
        path = self._file(pods)
        ids = {self.pod_ids.pop(p) for p in pods}
        t0 = time.time()
        await self.run("kube", "down", str(path), timeout=timeout)
        t_exit = time.time()
        deadline = time.monotonic() + 30
        while True:
            removed = [ev for ev in await self._events(t0 - 1, "remove") if ev.get("PodID") in ids]
            if len(removed) >= CONTAINERS_PER_POD * len(ids) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        if len(removed) < CONTAINERS_PER_POD * len(ids):
            raise TimeoutError(f"podman: {CONTAINERS_PER_POD * len(ids) - len(removed)} remove event(s) missing")
        left = (await self.run("ps", "-a", "-q", timeout=60)).split()
        if left:
            raise RuntimeError(f"podman: {len(left)} container(s) left after kube down")
        path.unlink()
        self.cli["kube_down_exit"].append(t_exit - t0)
        return max(parse_podman_time(ev["Time"]) for ev in removed) - t0

    async def cleanup(self) -> None:
        if not self.dir.exists():
            return
        if shutil.which("podman") is not None and self.conf.exists():
            # The private storage holds this run's pods only.
            with contextlib.suppress(Exception):
                pods = (await self.run("pod", "ps", "-q", "--no-trunc", timeout=60, check=False)).split()
                self.all_pod_ids.update(pods)
                await self.run("pod", "rm", "-a", "-f", "-t", "0", timeout=300, check=False)
                await self.run("rm", "-a", "-f", "-t", "0", timeout=300, check=False)
            await self._wait_helpers_gone(timeout=30)
        for line in reversed(Path("/proc/mounts").read_text().splitlines()):
            mountpoint = line.split()[1]
            if mountpoint.startswith(str(self.dir) + "/"):
                subprocess.run(["umount", "-l", mountpoint], capture_output=True, timeout=30)
        self._remove_cgroups()
        shutil.rmtree(self.dir, ignore_errors=True)
        if not self._had_blob_cache:
            # Written by every podman pull/load as root, whatever its --root.
            BLOB_CACHE.unlink(missing_ok=True)
            if not self._had_var_lib:
                for d in (BLOB_CACHE.parent, BLOB_CACHE.parents[1]):
                    with contextlib.suppress(OSError):
                        d.rmdir()  # only if empty
        if not self._had_lock and not self._other_podman_running():
            PODMAN_LOCK.unlink(missing_ok=True)

    async def _wait_helpers_gone(self, timeout: float) -> None:
        """conmon and its ``podman container cleanup`` children of this storage."""
        marker = str(self.dir)
        deadline = time.monotonic() + timeout
        while True:
            helpers = []
            for p in psutil.process_iter(["pid", "cmdline"]):
                cmdline = p.info.get("cmdline") or []
                if p.pid != os.getpid() and any(marker in part for part in cmdline):
                    helpers.append(p)
            if not helpers:
                return
            if time.monotonic() > deadline:
                for p in helpers:  # processes of our own podman runs, by pid
                    with contextlib.suppress(psutil.Error):
                        p.kill()
                return
            await asyncio.sleep(0.2)

    def _remove_cgroups(self) -> None:
        """podman 4.3.1 with cgroupfs leaves each pod's cgroup in the named v1 hierarchies
        (systemd, unified); remove this run's, and libpod_parent if it is new and empty."""
        if not CGROUP_ROOT.is_dir():
            return
        for hierarchy in CGROUP_ROOT.iterdir():
            parent = hierarchy / "libpod_parent"
            if not parent.is_dir():
                continue
            for pod_id in self.all_pod_ids:
                top = parent / pod_id
                if top.is_dir():
                    for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts),
                                    reverse=True):
                        with contextlib.suppress(OSError):
                            d.rmdir()
                    with contextlib.suppress(OSError):
                        top.rmdir()
            if hierarchy.name not in self._had_parent:
                with contextlib.suppress(OSError):
                    parent.rmdir()

    def _other_podman_running(self) -> bool:
        for p in psutil.process_iter(["name", "status"]):
            if p.info.get("name") in ("podman", "conmon") and p.info.get("status") != psutil.STATUS_ZOMBIE:
                return True
        return False


# --- the run ------------------------------------------------------------------------------


def summary(samples: list[float]) -> dict[str, Any]:
    return {"median_s": round(statistics.median(samples), 4), "p90_s": round(pct(samples, 90), 4), "n": len(samples),
            "all_s": [round(s, 4) for s in samples]}


def rotate(items: list[Any], k: int) -> list[Any]:
    k %= len(items)
    return items[k:] + items[:k]


IDLE_SETTLE = 20.0


async def measure_idle(proc: psutil.Process, seconds: float) -> dict[str, Any]:
    await asyncio.sleep(IDLE_SETTLE)  # the burst's follow-up work is not idle cost
    proc.cpu_percent(None)
    rss: list[int] = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        await asyncio.sleep(min(1.0, seconds))
        rss.append(proc.memory_info().rss)
    return {"rss_mb_max": round(max(rss) / 2**20, 1), "rss_mb_last": round(rss[-1] / 2**20, 1),
            "cpu_percent_of_one_core": round(proc.cpu_percent(None), 2), "seconds": seconds}


async def run_scenarios(args: argparse.Namespace, contenders: list[Contender], agent: Agent,
                        results: dict[str, Any]) -> None:
    samples: dict[str, dict[str, list[float]]] = {s: {c.name: [] for c in contenders} for s in SCENARIOS}

    for w in range(args.warmup):
        for c in contenders:
            pod = f"warm{w}"
            log(f"warm-up {c.name}")
            await c.start([pod], 60)
            await asyncio.sleep(args.settle)
            await c.delete([pod], 60)
            await asyncio.sleep(args.settle)
    for c in contenders:
        if isinstance(c, Podman):
            c.reset_stats()  # warm-up runs are not reported

    for i in range(args.runs):
        pod = f"one{i}"
        line = []
        for c in rotate(contenders, i):
            up = await c.start([pod], 60)
            await asyncio.sleep(args.settle)
            down = await c.delete([pod], 60)
            await asyncio.sleep(args.settle)
            samples["one_start"][c.name].append(up)
            samples["one_delete"][c.name].append(down)
            line.append(f"{c.name} {up * 1000:.0f}/{down * 1000:.0f} ms")
        log(f"one pod, run {i + 1}/{args.runs} (start/delete): " + ", ".join(line))

    burst_timeout = max(600.0, 5.0 * args.pods)
    for r in range(args.rounds):
        pods = [f"b{r}-{i}" for i in range(args.pods)]
        for c in rotate(contenders, r):
            up = await c.start(pods, burst_timeout)
            log(f"{args.pods} pods, round {r + 1}/{args.rounds}: {c.name} all Running in {up:.2f} s")
            if c is agent and "idle" not in results:
                assert agent.proc is not None
                log(f"idle cost of the agent with {args.pods} pods over {args.idle_seconds:g} s")
                results["idle"] = {"pods": args.pods,
                                   **await measure_idle(psutil.Process(agent.proc.pid), args.idle_seconds)}
                log(json.dumps(results["idle"]))
            await asyncio.sleep(args.settle)
            down = await c.delete(pods, burst_timeout)
            log(f"{args.pods} pods, round {r + 1}/{args.rounds}: {c.name} all gone in {down:.2f} s")
            await asyncio.sleep(args.settle * 3)
            samples["burst_start"][c.name].append(up)
            samples["burst_delete"][c.name].append(down)

    scen: dict[str, Any] = {}
    for s, by_contender in samples.items():
        entry: dict[str, Any] = {"title": SCENARIOS[s].format(n=args.pods)}
        for name, values in by_contender.items():
            if values:
                entry[name] = summary(values)
        for other in (FLOOR, PODMAN):
            if AGENT in entry and other in entry:
                entry[f"ratio_{AGENT}_{other}"] = round(entry[AGENT]["median_s"] / entry[other]["median_s"], 3)
        scen[s] = entry
    results["scenarios"] = scen
    for c in contenders:
        if isinstance(c, Podman):
            n_one = args.runs
            results["podman_cli"] = {
                "note": "seconds from spawning the podman command to its exit (one pod runs, then bursts)",
                "kube_play_exit_one": summary(c.cli["kube_play_exit"][:n_one]) if n_one else None,
                "kube_down_exit_one": summary(c.cli["kube_down_exit"][:n_one]) if n_one else None,
                "kube_play_exit_burst": summary(c.cli["kube_play_exit"][n_one:]) if args.rounds else None,
                "kube_down_exit_burst": summary(c.cli["kube_down_exit"][n_one:]) if args.rounds else None,
                "play_exit_before_start": c.play_exit_before_start,
            }


def fmt(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "—"
    med, p90 = entry["median_s"], entry["p90_s"]
    if med < 1:
        return f"{med * 1000:.0f} / {p90 * 1000:.0f} ms"
    return f"{med:.2f} / {p90:.2f} s"


def markdown(results: dict[str, Any], args: argparse.Namespace) -> str:
    m = results["machine"]
    lines = [
        f"Command: `{results['command']}`",
        "",
        f"Machine: {m['node']}, {m['cores']} cores ({m['cpu']}), kernel {m['kernel']}, Docker {m['docker']}, "
        f"podman {m['podman'] or 'not run'}; load average at start "
        f"{' '.join(f'{x:.2f}' for x in m['load_average_at_start'])}, at end "
        f"{' '.join(f'{x:.2f}' for x in m.get('load_average_at_end', []))}.",
        "",
        f"| scenario (median / p90) | {LABELS[AGENT]} | {LABELS[FLOOR]} | {LABELS[PODMAN]} | "
        f"{AGENT} / {FLOOR} | {AGENT} / {PODMAN} |",
        "|---|---|---|---|---|---|",
    ]
    for s, entry in results.get("scenarios", {}).items():
        n = entry[AGENT]["n"] if AGENT in entry else 0
        r_floor = entry.get(f"ratio_{AGENT}_{FLOOR}")
        r_podman = entry.get(f"ratio_{AGENT}_{PODMAN}")
        lines.append(f"| {entry['title']} ({n} {'runs' if s.startswith('one') else 'rounds'}) "
                     f"| {fmt(entry.get(AGENT))} | {fmt(entry.get(FLOOR))} | {fmt(entry.get(PODMAN))} "
                     f"| {f'**{r_floor:.2f}x**' if r_floor else '—'} "
                     f"| {f'**{r_podman:.2f}x**' if r_podman else '—'} |")
    idle = results.get("idle")
    if idle:
        lines += ["", f"Agent idle with {idle['pods']} pods running: RSS {idle['rss_mb_max']} MB (max over "
                      f"{idle['seconds']:g} s), CPU {idle['cpu_percent_of_one_core']} % of one core."]
    cli = results.get("podman_cli")
    if cli:
        parts = []
        for key, what in (("kube_play_exit_one", "`kube play` exits (one pod)"),
                          ("kube_down_exit_one", "`kube down` exits (one pod)"),
                          ("kube_play_exit_burst", f"`kube play` exits ({args.pods} pods)"),
                          ("kube_down_exit_burst", f"`kube down` exits ({args.pods} pods)")):
            if cli.get(key):
                parts.append(f"{what} {fmt(cli[key])}")
        n_play = len(cli["kube_play_exit_one"]["all_s"] if cli.get("kube_play_exit_one") else []) + len(
            cli["kube_play_exit_burst"]["all_s"] if cli.get("kube_play_exit_burst") else [])
        lines += ["", "podman command exit times (median / p90): " + "; ".join(parts) + ". "
                  f"`kube play` exited before its last app container's start event in "
                  f"{cli['play_exit_before_start']} of {n_play} runs."]
    return "\n".join(lines) + "\n"


async def machine_facts(docker: aiodocker.Docker) -> dict[str, Any]:
    version = await docker.version()
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {"node": platform.node(), "cores": os.cpu_count(), "cpu": cpu_model,
            "kernel": platform.release(), "python": platform.python_version(),
            "docker": version.get("Version", "?"), "podman": None,
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20, help="one-pod rounds (default 20)")
    ap.add_argument("--pods", type=int, default=110, help="pods per burst (default 110)")
    ap.add_argument("--rounds", type=int, default=5, help="burst rounds (default 5)")
    ap.add_argument("--idle-seconds", type=float, default=60, help="agent idle window (default 60)")
    ap.add_argument("--settle", type=float, default=1.0,
                    help="pause between measurements, not counted (default 1.0 s; 3x after a burst delete)")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured one-pod start+delete per contender")
    ap.add_argument("--floor-concurrency", type=int, default=0,
                    help="floor pods in flight at once in a burst (default 0: all, as the agent)")
    ap.add_argument("--skip-podman", action="store_true", help="measure nodeagent and the floor only")
    ap.add_argument("--out", type=Path, help="also write pod_lifecycle.json and pod_lifecycle.md here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (the agent manages network namespaces; podman runs rootful)")
    if args.runs < 1 and args.rounds < 1:
        sys.exit("nothing to measure: --runs and --rounds are both 0")

    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)

    tag = secrets.token_hex(3)
    node, bridge = f"bench-{tag}", f"nab{tag}"
    workdir = Path(tempfile.mkdtemp(prefix=f"nodeagent-lifecycle-{tag}-"))
    docker = make_docker_client()  # the agent's own factory: the same unbounded pool
    events = DockerEvents(docker, node, tag)
    agent = Agent(docker, events, workdir, node, bridge, tag)
    floor = Floor(docker, events, tag, args.floor_concurrency)
    podman = None if args.skip_podman else Podman(tag)
    results: dict[str, Any] = {
        "command": shlex.join([".venv/bin/python", "bench/pod_lifecycle.py", *sys.argv[1:]]),
        "tag": tag, "pods": args.pods, "runs": args.runs, "rounds": args.rounds,
        "floor_concurrency": args.floor_concurrency or "all pods at once",
        "app_command": APP_COMMAND, "termination_grace_period_s": GRACE,
    }
    log(f"run {tag}: workdir {workdir}")
    try:
        results["machine"] = await machine_facts(docker)
        await events.start()
        if podman is not None:
            await podman.setup()
            results["machine"]["podman"] = podman.version
        await agent.launch()
        contenders: list[Contender] = [agent, floor]
        if podman is not None:
            contenders.append(podman)
        await run_scenarios(args, contenders, agent, results)
        results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        log("cleaning up")
        with contextlib.suppress(Exception):
            await events.stop()
        with contextlib.suppress(Exception):
            await agent.cleanup()
        with contextlib.suppress(Exception):
            await floor.cleanup()
        if podman is not None:
            with contextlib.suppress(Exception):
                await podman.cleanup()
        await close_docker_client(docker)
        shutil.rmtree(workdir, ignore_errors=True)

    table = markdown(results, args)
    doc = json.dumps(results, indent=2)
    print(doc)
    print()
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "pod_lifecycle.json").write_text(doc + "\n")
        (args.out / "pod_lifecycle.md").write_text(table)


if __name__ == "__main__":
    asyncio.run(main())
