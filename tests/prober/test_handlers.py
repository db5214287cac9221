"""Probe handlers and lifecycle hooks against real servers and a real container.

HTTP, TCP and gRPC servers listen on loopback (in this process); exec runs in a
busybox container (network none) through the Docker runtime shim.
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import time
import uuid

import grpc
import pytest
from aiohttp import web

from nodeagent.prober.handlers import (
    HTTPClient,
    Target,
    decode_health_response,
    encode_health_request,
    run_probe,
)
from nodeagent.prober.hooks import HookRunner
from nodeagent.prober.results import Result
from runtime.docker import DockerRuntime


def target(container: dict | None = None, cid: str = "none") -> Target:
    return Target(container_id=cid, pod_ip="127.0.0.1", container=container or {"name": "app"})


@pytest.fixture
async def http_server():
    seen: list[dict] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        seen.append({"path": request.path_qs, "headers": request.headers.copy()})
        if request.path == "/ok":
            return web.Response(text="fine")
        if request.path == "/fail":
            return web.Response(status=503, text="nope")
        if request.path == "/hang":
            await asyncio.sleep(1.5)
        if request.path == "/redirect-local":
            raise web.HTTPFound("/fail")
        if request.path == "/redirect-away":
            raise web.HTTPFound("http://elsewhere.invalid/x")
        return web.Response(status=404)

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield port, seen, runner
    await runner.cleanup()


async def test_http_get_status_headers_named_port_and_redirects(http_server):
    port, seen, _runner = http_server
    http = HTTPClient()
    container = {"name": "app", "ports": [{"name": "web", "containerPort": port}]}
    try:
        ok = await run_probe({"httpGet": {"path": "/ok?x=1", "port": "web", "httpHeaders": [
            {"name": "X-Custom", "value": "v"}, {"name": "user-agent", "value": "mine"}]}},
            target(container), 1.0, runtime=None, http=http)
        assert ok.result == Result.SUCCESS and ok.output == "fine"
        assert seen[-1]["path"] == "/ok?x=1"
        assert seen[-1]["headers"]["X-Custom"] == "v"
        assert seen[-1]["headers"]["user-agent"] == "mine"
        assert seen[-1]["headers"]["Connection"].lower() == "close"

        plain = await run_probe({"httpGet": {"path": "/ok", "port": port}}, target(), 1.0, runtime=None, http=http)
        assert plain.result == Result.SUCCESS
        assert seen[-1]["headers"]["User-Agent"] == "kube-probe/1.32" and seen[-1]["headers"]["Accept"] == "*/*"

        fail = await run_probe({"httpGet": {"path": "/fail", "port": port}}, target(), 1.0, runtime=None, http=http)
        assert fail.result == Result.FAILURE and fail.output == "HTTP probe failed with statuscode: 503"

        local = await run_probe({"httpGet": {"path": "/redirect-local", "port": port}}, target(), 1.0,
                                runtime=None, http=http)
        assert local.result == Result.FAILURE and seen[-1]["path"] == "/fail"

        away = await run_probe({"httpGet": {"path": "/redirect-away", "port": port}}, target(), 1.0,
                               runtime=None, http=http)
        assert away.result == Result.SUCCESS and "redirect" in away.output

        missing = await run_probe({"httpGet": {"path": "/", "port": "nope"}}, target(container), 1.0,
                                  runtime=None, http=http)
        assert missing.result == Result.FAILURE and "couldn't find port" in missing.output
    finally:
        await http.close()


async def test_http_get_hung_server_is_cut_off_at_timeout(http_server):
    port, _seen, _runner = http_server
    http = HTTPClient()
    try:
        started = time.monotonic()
        out = await run_probe({"httpGet": {"path": "/hang", "port": port}}, target(), 0.3, runtime=None, http=http)
        assert out.result == Result.FAILURE and "deadline exceeded" in out.output
        assert time.monotonic() - started < 1.0
    finally:
        await http.close()


async def test_http_get_https_without_verification(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=probe-test",
                    "-days", "1", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    app = web.Application()
    async def secure(request: web.Request) -> web.Response:
        return web.Response(text="secure")

    app.router.add_get("/", secure)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    http = HTTPClient()
    try:
        out = await run_probe({"httpGet": {"path": "/", "port": port, "scheme": "HTTPS"}}, target(), 2.0,
                              runtime=None, http=http)
        assert out.result == Result.SUCCESS and out.output == "secure"
    finally:
        await http.close()
        await runner.cleanup()


async def test_tcp_socket_open_and_closed_port():
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        out = await run_probe({"tcpSocket": {"port": port}}, target(), 1.0, runtime=None, http=None)
        assert out.result == Result.SUCCESS
    finally:
        server.close()
        await server.wait_closed()
    out = await run_probe({"tcpSocket": {"port": port}}, target(), 1.0, runtime=None, http=None)
    assert out.result == Result.FAILURE and out.output == f"dial tcp 127.0.0.1:{port}: connect: connection refused"


def test_health_messages_round_trip():
    assert encode_health_request("") == b""
    assert encode_health_request("svc") == b"\x0a\x03svc"
    assert decode_health_response(b"\x08\x01") == 1
    assert decode_health_response(b"") == 0


async def test_grpc_health_check():
    statuses = {"": 1, "db": 2}
    requests: list[bytes] = []

    async def check(request: bytes, context) -> bytes:
        requests.append(request)
        service = request[2:].decode() if request else ""
        if service not in statuses:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return b"\x08" + bytes([statuses[service]])

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(check)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        ok = await run_probe({"grpc": {"port": port}}, target(), 2.0, runtime=None, http=None)
        assert ok.result == Result.SUCCESS
        bad = await run_probe({"grpc": {"port": port, "service": "db"}}, target(), 2.0, runtime=None, http=None)
        assert bad.result == Result.FAILURE and "NOT_SERVING" in bad.output
        assert requests[-1] == b"\x0a\x02db"
        unknown = await run_probe({"grpc": {"port": port, "service": "x"}}, target(), 2.0, runtime=None, http=None)
        assert unknown.result == Result.FAILURE and "NOT_FOUND" in unknown.output
    finally:
        await server.stop(0)
    gone = await run_probe({"grpc": {"port": port}}, target(), 0.5, runtime=None, http=None)
    assert gone.result == Result.FAILURE


# --- exec and hooks in a real container -------------------------------------------------


def _remove_labelled(node: str) -> None:
    ids = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=io.nodeagent.node={node}"],
                         capture_output=True, text=True, timeout=120).stdout.split()
    if ids:
        subprocess.run(["docker", "rm", "-f", *ids], capture_output=True, timeout=120)


@pytest.fixture
async def container():
    node = f"ptest-{uuid.uuid4().hex[:10]}"
    try:
        # Generous: Docker on a machine shared with other test suites can be slow.
        cid = subprocess.run(
            ["docker", "run", "-d", "--network", "none", "--label", f"io.nodeagent.node={node}", "busybox:1.35",
             "sh", "-c", "while true; do sleep 1; done"],
            capture_output=True, text=True, check=True, timeout=180).stdout.strip()
        rt = DockerRuntime(node, call_timeout=20.0)
        yield rt, cid
        await rt.close()
    finally:
        _remove_labelled(node)


@pytest.mark.docker
async def test_exec_probe_exit_codes_output_timeout_and_missing_command(container):
    rt, cid = container
    spec = {"name": "app", "env": [{"name": "WHO", "value": "probe"}]}
    # Generous timeouts where the command must finish: the machine may be loaded.
    ok = await run_probe({"exec": {"command": ["sh", "-c", "echo hi $(WHO)"]}}, target(spec, cid), 10.0,
                         runtime=rt, http=None)
    assert ok.result == Result.SUCCESS and ok.output == "hi probe\n"  # $(VAR) from the static env
    bad = await run_probe({"exec": {"command": ["sh", "-c", "echo broken >&2; exit 2"]}}, target(spec, cid), 10.0,
                          runtime=rt, http=None)
    assert bad.result == Result.FAILURE and bad.output == "broken\n"
    started = time.monotonic()
    slow = await run_probe({"exec": {"command": ["sleep", "30"]}}, target(spec, cid), 0.5, runtime=rt, http=None)
    assert slow.result == Result.FAILURE and "timed out" in slow.output
    assert time.monotonic() - started < 2.5
    missing = await run_probe({"exec": {"command": ["/no/such/probe"]}}, target(spec, cid), 10.0,
                              runtime=rt, http=None)
    assert missing.result == Result.FAILURE and "no such file" in missing.output


@pytest.mark.docker
async def test_hooks_exec_sleep_and_http(container, http_server):
    rt, cid = container
    port, seen, _runner = http_server
    hooks = HookRunner(rt)
    pod = {"metadata": {"name": "p", "namespace": "default", "uid": "u"}}
    spec = {"name": "app"}
    assert await hooks.run(pod, spec, {"exec": {"command": ["sh", "-c", "echo x > /tmp/hooked"]}},
                           target(spec, cid), 20.0) is None
    assert subprocess.run(["docker", "exec", cid, "cat", "/tmp/hooked"], capture_output=True,
                          text=True).stdout == "x\n"
    error = await hooks.run(pod, spec, {"exec": {"command": ["/no/such/hook"]}}, target(spec, cid), 20.0)
    assert error and error.startswith("Exec lifecycle hook (['/no/such/hook']) for Container \"app\" in Pod "
                                      "\"p_default(u)\" failed - error: command '/no/such/hook' exited with 126")
    started = time.monotonic()
    assert await hooks.run(pod, spec, {"sleep": {"seconds": 1}}, target(spec, cid), 5.0) is None
    assert 0.9 < time.monotonic() - started < 2.0
    assert "did not finish within" in await hooks.run(pod, spec, {"sleep": {"seconds": 5}}, target(spec, cid), 0.3)
    # httpGet hooks fail on transport errors only, like kubelet's.
    assert await hooks.run(pod, spec, {"httpGet": {"path": "/fail", "port": port}}, target(spec, cid), 5.0) is None
    assert seen[-1]["path"] == "/fail"
    await _runner.cleanup()
    error = await hooks.run(pod, spec, {"httpGet": {"path": "/", "port": port}}, target(spec, cid), 5.0)
    assert error and error.startswith("HTTP lifecycle hook (/) for Container \"app\"") and "connect" in error.lower()
    await hooks.http.close()
