"""kubectl logs / exec / cp / port-forward end to end: real kubectl -> test control
plane (WebSocket from kubectl, translated to SPDY/3.1 towards the node like a v1.32 API
server) -> the agent's HTTPS node API -> Docker."""

from __future__ import annotations

import asyncio
import os
import pty
import re
import select
import subprocess
import time
import urllib.request

import pytest

from tests.cluster.test_cluster_support import (SLEEP_FOREVER, api_pod, busybox,  # noqa: F401
                                                cluster_agent_factory)

pytestmark = [pytest.mark.docker, pytest.mark.root]

NODE_API = {"node-ip": "127.0.0.1"}


async def test_kubectl_logs_through_the_node_api(controlplane, kubectl, cluster_agent_factory):
    script = ("if [ -f /data/ran ]; then echo second; " + SLEEP_FOREVER +
              "; else touch /data/ran; for i in 1 2 3; do echo first-$i; done; exit 1; fi")
    pod = api_pod("logs", "", [busybox("app", script, volumeMounts=[{"name": "d", "mountPath": "/data"}])],
                  volumes=[{"name": "d", "emptyDir": {}}])
    agent = await cluster_agent_factory(controlplane, extra_config=NODE_API)
    await agent.wait_node_ready()
    pod["spec"]["nodeName"] = agent.node_name
    from tests.cluster.test_cluster_support import PODS_RT

    controlplane.api.create(PODS_RT, "default", pod)

    async def restarted():
        p = agent.api_pod("logs")
        statuses = (p.get("status") or {}).get("containerStatuses") or []
        return statuses and statuses[0].get("restartCount", 0) >= 1 and statuses[0].get("ready")
    await agent.wait("restarted and ready", restarted, timeout=60)

    res = await kubectl("logs", "logs")
    assert res.stdout == "second\n"
    # nodes/proxy reaches the node API too (the path kubectl top-style readers use).
    res = await kubectl("get", "--raw", f"/api/v1/nodes/{agent.node_name}/proxy/healthz")
    assert res.stdout == "ok"
    res = await kubectl("get", "--raw", f"/api/v1/nodes/{agent.node_name}/proxy/pods")
    assert [p["metadata"]["name"] for p in res.json()["items"]] == ["logs"]
    # metrics-server's read: the Summary API through nodes/proxy, and the metrics.
    async def summary_has_pod():
        out = await kubectl("get", "--raw", f"/api/v1/nodes/{agent.node_name}/proxy/stats/summary")
        body = out.json()
        return body["node"]["nodeName"] == agent.node_name and \
            [p["podRef"]["name"] for p in body.get("pods") or []] == ["logs"]
    await agent.wait("/stats/summary through nodes/proxy", summary_has_pod, timeout=60)
    res = await kubectl("get", "--raw", f"/api/v1/nodes/{agent.node_name}/proxy/metrics/resource")
    assert "node_cpu_usage_seconds_total" in res.stdout
    res = await kubectl("logs", "logs", "--previous")
    assert res.stdout == "first-1\nfirst-2\nfirst-3\n"
    res = await kubectl("logs", "logs", "--previous", "--tail=1")
    assert res.stdout == "first-3\n"
    res = await kubectl("logs", "logs", "--previous", "--limit-bytes=9")
    assert res.stdout == "first-1\nf"
    res = await kubectl("logs", "logs", "--timestamps")
    stamp, line = res.stdout.rstrip("\n").split(" ", 1)
    assert line == "second" and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", stamp)
    res = await kubectl("logs", "logs", "--since=1h")
    assert res.stdout == "second\n"
    res = await kubectl("logs", "logs", "-c", "nope", check=False)
    assert res.returncode != 0 and "container nope is not valid for pod logs" in res.stderr

    # -f streams what the container writes from now on.
    proc = await asyncio.create_subprocess_exec(
        kubectl.binary, "logs", "-f", "logs", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=dict(os.environ, KUBECONFIG=str(kubectl.kubeconfig), HOME=str(kubectl.cache_dir)))
    try:
        first = await asyncio.wait_for(proc.stdout.readline(), 15)
        assert first == b"second\n"
        await kubectl("exec", "logs", "--", "sh", "-c", "echo followed > /proc/1/fd/1")
        nxt = await asyncio.wait_for(proc.stdout.readline(), 15)
        assert nxt == b"followed\n"
    finally:
        proc.kill()
        await proc.wait()


async def test_kubectl_exec_cp_and_tty(controlplane, kubectl, cluster_agent_factory, tmp_path):
    agent = await cluster_agent_factory(controlplane, extra_config=NODE_API)
    await agent.wait_node_ready()
    from tests.cluster.test_cluster_support import PODS_RT

    controlplane.api.create(PODS_RT, "default", api_pod("box", agent.node_name, [busybox("app", SLEEP_FOREVER)]))
    controlplane.api.create(PODS_RT, "default", api_pod("echo", agent.node_name, [
        busybox("app", "while read l; do echo got:$l; done; sleep 1000", stdin=True)]))
    await agent.wait_api_running_ready("box")
    await agent.wait_api_running_ready("echo")

    res = await kubectl("exec", "box", "--", "sh", "-c", "echo out; echo err >&2")
    assert res.stdout == "out\n" and res.stderr == "err\n"
    res = await kubectl("exec", "box", "--", "sh", "-c", "echo before; exit 3", check=False)
    assert res.returncode == 3 and res.stdout == "before\n"
    assert "command terminated with exit code 3" in res.stderr
    res = await kubectl("exec", "box", "--", "no-such-program", check=False)
    assert res.returncode == 127 and "executable file not found" in res.stderr
    res = await kubectl("exec", "-i", "box", "--", "sh", "-c", "tr a-z A-Z", input="hello stdin\n")
    assert res.stdout == "HELLO STDIN\n"
    # kubectl's SPDY path (WebSockets off): the control plane pipes SPDY to the node.
    spdy_env = dict(os.environ, KUBECONFIG=str(kubectl.kubeconfig), HOME=str(kubectl.cache_dir),
                    KUBECTL_REMOTE_COMMAND_WEBSOCKETS="false")
    done = await asyncio.to_thread(subprocess.run, [kubectl.binary, "exec", "-i", "box", "--", "sh", "-c",
                                                    "cat; echo spdy >&2; exit 7"],
                                   input=b"over spdy", capture_output=True, env=spdy_env, timeout=30)
    assert (done.returncode, done.stdout) == (7, b"over spdy"), done
    assert b"spdy\n" in done.stderr and b"command terminated with exit code 7" in done.stderr

    # kubectl cp both ways (exec + tar).
    payload = os.urandom(300_000)
    src = tmp_path / "blob.bin"
    src.write_bytes(payload)
    await kubectl("cp", str(src), "box:/tmp/blob.bin")
    res = await kubectl("exec", "box", "--", "md5sum", "/tmp/blob.bin")
    import hashlib

    assert res.stdout.split()[0] == hashlib.md5(payload).hexdigest()
    back = tmp_path / "back.bin"
    await kubectl("cp", "box:/tmp/blob.bin", str(back))
    assert back.read_bytes() == payload

    # kubectl attach: the container's own stdin and stdout, through the control plane.
    attach = await asyncio.create_subprocess_exec(
        kubectl.binary, "attach", "-i", "echo", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(os.environ, KUBECONFIG=str(kubectl.kubeconfig), HOME=str(kubectl.cache_dir)))
    try:
        attach.stdin.write(b"via kubectl attach\n")
        await attach.stdin.drain()
        assert await asyncio.wait_for(attach.stdout.readline(), 15) == b"got:via kubectl attach\n"
    finally:
        attach.kill()
        await attach.wait()

    # WebSocket straight to the node (v5.channel.k8s.io), as v1.36's
    # ExtendWebSocketsToKubelet would: channel bytes, stdin close, status on channel 3.
    import json as _json

    import aiohttp

    base = f"wss://127.0.0.1:{agent.api_port}"
    ctx = controlplane._kubelet_ssl()
    async with aiohttp.ClientSession() as session:
        url = base + "/exec/default/box/app?command=sh&command=-c&command=cat;exit%205&input=1&output=1&error=1"
        async with session.ws_connect(url, protocols=("v5.channel.k8s.io",), ssl=ctx) as ws:
            assert ws.protocol == "v5.channel.k8s.io"
            await ws.send_bytes(b"\x00via websocket")
            await ws.send_bytes(b"\xff\x00")  # v5: stdin closed
            got: dict[int, bytes] = {}
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    got[msg.data[0]] = got.get(msg.data[0], b"") + msg.data[1:]
            assert got[1] == b"via websocket"
            status = _json.loads(got[3])
            assert status["reason"] == "NonZeroExitCode"
            assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "5"}]

        # Attach to a running container's stdin/stdout.
        url = base + "/attach/default/echo/app?input=1&output=1&error=1"
        async with session.ws_connect(url, protocols=("v5.channel.k8s.io",), ssl=ctx) as ws:
            await ws.send_bytes(b"\x00hi\n")
            msg = await asyncio.wait_for(ws.receive(), 10)
            assert msg.data == b"\x01got:hi\n"

        # A client that goes away ends the exec: its process does not linger.
        url = base + "/exec/default/box/app?command=sleep&command=777&output=1"
        async with session.ws_connect(url, protocols=("v5.channel.k8s.io",), ssl=ctx) as ws:
            async def sleeping() -> bool:
                res = await kubectl("exec", "box", "--", "ps", "-o", "args")
                return "sleep 777" in res.stdout
            await agent.wait("exec running", sleeping, timeout=10)
        async def gone() -> bool:
            res = await kubectl("exec", "box", "--", "ps", "-o", "args")
            return "sleep 777" not in res.stdout
        await agent.wait("exec process gone", gone, timeout=10)

    # Interactive with a terminal: kubectl on a pseudo-terminal, like a user's shell.
    def interactive() -> bytes:
        master, slave = pty.openpty()
        env = dict(os.environ, KUBECONFIG=str(kubectl.kubeconfig), HOME=str(kubectl.cache_dir), TERM="xterm")
        proc = subprocess.Popen([kubectl.binary, "exec", "-it", "box", "--", "sh"], stdin=slave, stdout=slave,
                                stderr=slave, env=env, close_fds=True)
        os.close(slave)
        out = bytearray()
        deadline = time.monotonic() + 20
        sent = False
        try:
            while time.monotonic() < deadline:
                ready, _, _ = select.select([master], [], [], 0.2)
                if ready:
                    try:
                        chunk = os.read(master, 4096)
                    except OSError:
                        break
                    if not chunk:
                        break
                    out += chunk
                if not sent and (b"#" in out or time.monotonic() > deadline - 15):
                    os.write(master, b"tty; echo $((6*7)); stty size; exit 4\r")
                    sent = True
                if proc.poll() is not None:
                    break
            proc.wait(timeout=10)
            out += b"\nRC=%d" % proc.returncode
        finally:
            if proc.poll() is None:
                proc.kill()
            os.close(master)
        return bytes(out)

    out = await asyncio.to_thread(interactive)
    assert b"/dev/pts/" in out and b"42" in out, out
    assert out.endswith(b"RC=4"), out


async def test_kubectl_port_forward_carries_http(controlplane, kubectl, cluster_agent_factory):
    agent = await cluster_agent_factory(controlplane, extra_config=NODE_API)
    await agent.wait_node_ready()
    from tests.cluster.test_cluster_support import PODS_RT

    serve = "mkdir -p /www && echo hello-from-pod > /www/index.html && exec httpd -f -p 127.0.0.1:8080 -h /www"
    controlplane.api.create(PODS_RT, "default", api_pod("web", agent.node_name, [busybox("http", serve)]))
    await agent.wait_api_running_ready("web")
    # kubectl's SPDY path first (WebSockets off), then its WebSocket tunnel.
    spdy_env = dict(os.environ, KUBECONFIG=str(kubectl.kubeconfig), HOME=str(kubectl.cache_dir),
                    KUBECTL_PORT_FORWARD_WEBSOCKETS="false")
    spdy_pf = await asyncio.create_subprocess_exec(
        kubectl.binary, "port-forward", "pod/web", ":8080", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=spdy_env)
    try:
        m = None
        while m is None:
            line = (await asyncio.wait_for(spdy_pf.stdout.readline(), 15)).decode()
            m = re.match(r"Forwarding from 127\.0\.0\.1:(\d+) -> 8080", line)
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{m.group(1)}/index.html", timeout=10).read())
        assert body == b"hello-from-pod\n"
    finally:
        spdy_pf.kill()
        await spdy_pf.wait()

    proc = await asyncio.create_subprocess_exec(
        kubectl.binary, "port-forward", "pod/web", ":8080", ":9999",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=dict(os.environ, KUBECONFIG=str(kubectl.kubeconfig), HOME=str(kubectl.cache_dir)))
    try:
        ports: dict[int, int] = {}
        while len(ports) < 2:
            line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
            m = re.match(r"Forwarding from 127\.0\.0\.1:(\d+) -> (\d+)", line)
            if m:
                ports[int(m.group(2))] = int(m.group(1))

        def get(port: int) -> bytes:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=10).read()

        for _ in range(2):
            assert await asyncio.to_thread(get, ports[8080]) == b"hello-from-pod\n"
        # A closed port in the pod: the node reports it on that connection's error stream
        # (kubectl >= 1.26 then ends the whole session on purpose).
        with pytest.raises(OSError):
            await asyncio.to_thread(get, ports[9999])
    finally:
        proc.kill()
        _, err = await proc.communicate()
    assert b"error forwarding port 9999 to pod web" in err, err

    # WebSocket port-forward straight to the node (kubelet's channel pairs per port).
    import aiohttp

    async with aiohttp.ClientSession() as session:
        url = f"wss://127.0.0.1:{agent.api_port}/portForward/default/web?port=8080&port=9999"
        async with session.ws_connect(url, protocols=("v4.channel.k8s.io",), ssl=controlplane._kubelet_ssl()) as ws:
            assert ws.protocol == "v4.channel.k8s.io"
            firsts = [await asyncio.wait_for(ws.receive_bytes(), 10) for _ in range(4)]
            assert firsts == [b"\x00\x90\x1f", b"\x01\x90\x1f", b"\x02\x0f\x27", b"\x03\x0f\x27"]
            error = await asyncio.wait_for(ws.receive_bytes(), 10)
            assert error[0] == 3 and b"error forwarding port 9999" in error
            await ws.send_bytes(b"\x00GET /index.html HTTP/1.0\r\n\r\n")
            body = b""
            while not body.endswith(b"hello-from-pod\n"):
                msg = await asyncio.wait_for(ws.receive_bytes(), 10)
                assert msg[0] == 0
                body += msg[1:]
            assert body.startswith(b"HTTP/1.")

    # At the node, a failed port leaves the other forwards on the same connection alone.
    from nodeagent.server.spdy import SpdySession
    from tests.controlplane.streaming import dial_upgrade

    status, headers, _, reader, writer = await dial_upgrade(
        "127.0.0.1", agent.api_port, controlplane._kubelet_ssl(), "/portForward/default/web",
        ["portforward.k8s.io"])
    assert status == 101 and headers["x-stream-protocol-version"] == "portforward.k8s.io"
    session = SpdySession(writer.write, writer.drain, server=False)

    async def feed():
        while chunk := await reader.read(65536):
            session.feed(chunk)
        session.feed_eof()
    feeder = asyncio.create_task(feed())
    try:
        async def pair(port: int, request_id: str):
            err = await session.open_stream({"streamtype": "error", "port": str(port), "requestid": request_id})
            data = await session.open_stream({"streamtype": "data", "port": str(port), "requestid": request_id})
            return err, data

        async def read_all(stream) -> bytes:
            out = bytearray()
            while chunk := await asyncio.wait_for(stream.read(), 10):
                out += chunk
            return bytes(out)

        ok_err, ok_data = await pair(8080, "1")
        bad_err, bad_data = await pair(9999, "2")
        assert b"error forwarding port 9999 to pod web" in await read_all(bad_err)
        await ok_data.write(b"GET /index.html HTTP/1.0\r\n\r\n")
        ok_data.close()
        response = await read_all(ok_data)
        assert response.startswith(b"HTTP/1.") and response.endswith(b"hello-from-pod\n")
        assert await read_all(ok_err) == b""
    finally:
        feeder.cancel()
        writer.close()
