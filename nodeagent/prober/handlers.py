"""One check against one container: exec, httpGet, tcpSocket, grpc.

Each returns an ``Outcome`` and never raises for what the container does (refused
connections, bad status codes, timeouts, a missing command are all outcomes); only
cancellation propagates. Every check is cut off at its timeout, so a hung container
costs its probe worker one timeout and nothing else.

Semantics follow kubelet's prober (pkg/probe/{exec,http,tcp,grpc}):
* httpGet: ``scheme://host:port/path``, host defaulting to the pod IP, a named port
  looked up in the container's ports; no keep-alive (a new connection per check);
  HTTPS without certificate verification; headers ``User-Agent: kube-probe/1.32`` and
  ``Accept: */*`` unless ``httpHeaders`` set them; status 200-399 is success;
  redirects are followed only to the same host (a redirect elsewhere counts as
  success, as kubelet does, with a note in the output); at most 10 KiB of body read;
* tcpSocket: a TCP connect, closed at once;
* grpc: ``grpc.health.v1.Health/Check`` with the optional ``service``; SERVING is
  success, anything else (or an RPC error) failure;
* exec: the command in the container through the runtime, exit code 0 is success.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass
from typing import Protocol

import ssl

from yarl import URL

from nodeagent.prober.results import Result
from runtime import http1
from runtime.types import NotFound, RuntimeError_, RuntimeTimeout

USER_AGENT = "kube-probe/1.32"
MAX_BODY = 10 * 1024
MAX_REDIRECTS = 10


@dataclass
class Outcome:
    result: Result
    output: str = ""


@dataclass
class Target:
    """Where a check goes: the container instance and its pod's address."""

    container_id: str
    pod_ip: str | None
    container: dict  # the container's spec (ports by name, env for $(VAR) in exec)


class ExecRuntime(Protocol):
    async def exec_sync(self, container_id: str, cmd: list[str], timeout: float) -> tuple[int, bytes]: ...


def resolve_port(port: object, container: dict) -> int:
    """A port number, or a container port name looked up in the container's ports."""
    if isinstance(port, int) and not isinstance(port, bool):
        return port
    if isinstance(port, str):
        if port.isdigit():
            return int(port)
        for p in container.get("ports") or ():
            if isinstance(p, dict) and p.get("name") == port:
                return int(p["containerPort"])
    raise ValueError(f"couldn't find port {port!r} in container {container.get('name')!r}")


def static_env(container: dict) -> dict[str, str]:
    return {
        e["name"]: e["value"]
        for e in container.get("env") or ()
        if isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("value"), str)
    }


def _host_port(host: str, port: int) -> str:
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


class HTTPClient:
    """httpGet checks and hooks: one connection per request (kubelet disables
    keep-alive for probes), HTTPS without verification, over ``runtime.http1`` (a
    node with 100 pods probing every second makes 100 of these a second; the small
    client costs a fraction of a full one's CPU)."""

    def __init__(self) -> None:
        self._tls: ssl.SSLContext | None = None

    @property
    def tls(self) -> ssl.SSLContext:
        if self._tls is None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            self._tls = context
        return self._tls

    async def close(self) -> None:
        """Nothing is pooled; kept for symmetry with clients that pool."""

    def build(self, action: dict, target: Target) -> tuple[URL, dict[str, str]]:
        host = action.get("host") or target.pod_ip
        if not host:
            raise ValueError("the pod has no IP address yet")
        port = resolve_port(action.get("port"), target.container)
        scheme = str(action.get("scheme") or "HTTP").lower()
        path = str(action.get("path") or "/")
        if not path.startswith("/"):
            path = "/" + path
        url = URL(f"{scheme}://{_host_port(host, port)}{path}", encoded=False)
        headers = {"Host": _host_port(host, port), "User-Agent": USER_AGENT, "Accept": "*/*"}
        for header in action.get("httpHeaders") or ():
            name, value = header.get("name"), header.get("value", "")
            if not name:
                continue
            # Headers match case-insensitively; the spec's spelling wins.
            for existing in [k for k in headers if k.lower() == name.lower()]:
                del headers[existing]
            headers[name] = value
        return url, headers

    async def _once(self, url: URL, headers: dict[str, str]) -> http1.Response:
        tls = url.scheme == "https"
        reader, writer = await asyncio.open_connection(
            url.host, url.port, ssl=self.tls if tls else None,
            server_hostname=(url.host if tls and not _is_ip(url.host) else ("" if tls else None)),
        )
        try:
            return await http1.request(reader, writer, "GET", url.raw_path_qs, headers, body_limit=MAX_BODY)
        finally:
            writer.close()

    async def get(self, url: URL, headers: dict[str, str]) -> tuple[int, bytes, str]:
        """(status, first bytes of the body, note) after same-host redirects."""
        for _ in range(MAX_REDIRECTS + 1):
            resp = await self._once(url, headers)
            location = resp.headers.get("location")
            if 300 <= resp.status < 400 and location:
                target = url.join(URL(location))
                if target.host != url.host:
                    return resp.status, resp.body, f"probe terminated redirects, response: {resp.status}"
                if target.port != url.port:
                    headers = {**headers, "Host": _host_port(target.host or "", target.port or 80)}
                url = target
                continue
            return resp.status, resp.body, ""
        return 302, b"", "stopped after 10 redirects"


def _is_ip(host: str | None) -> bool:
    try:
        ipaddress.ip_address(host or "")
        return True
    except ValueError:
        return False


async def http_get(http: HTTPClient, action: dict, target: Target, timeout: float) -> Outcome:
    try:
        url, headers = http.build(action, target)
    except ValueError as exc:
        return Outcome(Result.FAILURE, str(exc))
    try:
        async with asyncio.timeout(timeout):
            status, body, note = await http.get(url, headers)
    except TimeoutError:
        return Outcome(Result.FAILURE, f'Get "{url}": context deadline exceeded (Client.Timeout exceeded '
                                       f'while awaiting headers)')
    except (http1.ProtocolError, OSError, ValueError) as exc:
        return Outcome(Result.FAILURE, f'Get "{url}": {_describe(exc)}')
    text = body.decode("utf-8", "replace")
    if 200 <= status < 400:
        return Outcome(Result.SUCCESS, note or text)
    return Outcome(Result.FAILURE, f"HTTP probe failed with statuscode: {status}")


async def tcp_socket(action: dict, target: Target, timeout: float) -> Outcome:
    try:
        port = resolve_port(action.get("port"), target.container)
    except ValueError as exc:
        return Outcome(Result.FAILURE, str(exc))
    host = action.get("host") or target.pod_ip
    if not host:
        return Outcome(Result.FAILURE, "the pod has no IP address yet")
    address = _host_port(host, port)
    try:
        async with asyncio.timeout(timeout):
            _reader, writer = await asyncio.open_connection(host, port)
    except TimeoutError:
        return Outcome(Result.FAILURE, f"dial tcp {address}: i/o timeout")
    except OSError as exc:
        return Outcome(Result.FAILURE, f"dial tcp {address}: connect: {_describe(exc)}")
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return Outcome(Result.SUCCESS)


async def exec_command(runtime: ExecRuntime, action: dict, target: Target, timeout: float) -> Outcome:
    from nodeagent.kubelet.containerconfig import expand

    env = static_env(target.container)
    command = [expand(str(part), env) for part in action.get("command") or ()]
    try:
        code, output = await runtime.exec_sync(target.container_id, command, timeout)
    except RuntimeTimeout:
        return Outcome(Result.FAILURE, f"command {' '.join(command)!r} timed out")
    except NotFound as exc:
        return Outcome(Result.UNKNOWN, f"container not running: {exc}")
    except RuntimeError_ as exc:
        return Outcome(Result.UNKNOWN, str(exc))
    text = output.decode("utf-8", "replace")
    if code == 0:
        return Outcome(Result.SUCCESS, text)
    return Outcome(Result.FAILURE, text or f"command {' '.join(command)!r} exited with {code}")


# --- gRPC ----------------------------------------------------------------------------

_SERVING_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_health_request(service: str) -> bytes:
    """grpc.health.v1.HealthCheckRequest{service} in protobuf wire format."""
    data = service.encode()
    return b"\x0a" + _varint(len(data)) + data if data else b""


def decode_health_response(data: bytes) -> int:
    """The ``status`` enum of a grpc.health.v1.HealthCheckResponse (0 when absent)."""
    i = 0
    status = 0
    while i < len(data):
        key = data[i]
        i += 1
        field, wire = key >> 3, key & 7
        value = 0
        shift = 0
        if wire == 0:
            while True:
                byte = data[i]
                i += 1
                value |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
            if field == 1:
                status = value
        elif wire == 2:
            length = 0
            while True:
                byte = data[i]
                i += 1
                length |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
            i += length
        else:
            raise ValueError(f"unexpected wire type {wire} in HealthCheckResponse")
    return status


async def grpc_check(action: dict, target: Target, timeout: float) -> Outcome:
    try:
        import grpc  # imported on first use: nodes without gRPC probes never load it
    except ImportError:  # pragma: no cover - grpcio is a dependency
        return Outcome(Result.UNKNOWN, "gRPC probes need the grpcio package")
    host = target.pod_ip
    if not host:
        return Outcome(Result.FAILURE, "the pod has no IP address yet")
    port = action.get("port")
    address = _host_port(host, int(port))
    service = str(action.get("service") or "")
    channel = grpc.aio.insecure_channel(address, options=[("grpc.primary_user_agent", USER_AGENT)])
    try:
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        try:
            reply = await check(encode_health_request(service), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return Outcome(Result.FAILURE, f"timeout: health rpc did not complete within {timeout:g}s")
            if code == grpc.StatusCode.UNAVAILABLE:
                return Outcome(Result.FAILURE, f"timeout: failed to connect service {address!r} within "
                                               f"{timeout:g}s: {exc.details()}")
            return Outcome(Result.FAILURE, f"error: health rpc probe failed: {code.name}: {exc.details()}")
        try:
            status = decode_health_response(reply)
        except (ValueError, IndexError) as exc:
            return Outcome(Result.FAILURE, f"error: malformed health response: {exc}")
        if status == 1:
            return Outcome(Result.SUCCESS, "")
        name = _SERVING_STATUS.get(status, str(status))
        return Outcome(Result.FAILURE, f'service unhealthy (responded with "{name}")')
    finally:
        await channel.close()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


async def run_probe(
    probe: dict, target: Target, timeout: float, *, runtime: ExecRuntime, http: HTTPClient
) -> Outcome:
    """Run the probe's one handler (each enforces ``timeout`` itself)."""
    if probe.get("exec") is not None:
        return await exec_command(runtime, probe["exec"], target, timeout)
    if probe.get("httpGet") is not None:
        return await http_get(http, probe["httpGet"], target, timeout)
    if probe.get("tcpSocket") is not None:
        return await tcp_socket(probe["tcpSocket"], target, timeout)
    if probe.get("grpc") is not None:
        try:
            async with asyncio.timeout(timeout + 1.0):  # grpc's deadline covers the call only
                return await grpc_check(probe["grpc"], target, timeout)
        except TimeoutError:
            return Outcome(Result.FAILURE, f"probe did not finish within {timeout:g}s")
    return Outcome(Result.UNKNOWN, "the probe has no handler")
