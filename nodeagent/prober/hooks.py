"""postStart and preStop lifecycle hooks (kubelet's lifecycle handler runner).

Handlers: ``exec`` (in the container, through the runtime), ``httpGet`` (from the
node to the pod IP by default) and ``sleep`` (the agent waits; nothing runs in the
container). As in kubelet, an httpGet hook fails only when the request fails (no
connection, timeout), not on the status code. ``tcpSocket`` hooks are refused at
validation: kubelet does not run them either.

``run`` returns None on success or kubelet's failure message; the kubelet decides
what follows (kill the container after a failed postStart, go on stopping after a
failed preStop) and records ``FailedPostStartHook``/``FailedPreStopHook``.
"""

from __future__ import annotations

import asyncio

from runtime import http1
from nodeagent.kubelet.containerconfig import expand
from nodeagent.prober.handlers import ExecRuntime, HTTPClient, Target, static_env
from runtime.types import RuntimeError_, RuntimeTimeout


def _format_pod(pod: dict) -> str:
    meta = pod["metadata"]
    return f"{meta['name']}_{meta.get('namespace', 'default')}({meta['uid']})"


class HookRunner:
    def __init__(self, runtime: ExecRuntime, http: HTTPClient | None = None) -> None:
        self.runtime = runtime
        self.http = http or HTTPClient()

    async def run(self, pod: dict, container: dict, handler: dict, target: Target, timeout: float) -> str | None:
        where = f'for Container "{container["name"]}" in Pod "{_format_pod(pod)}"'
        try:
            async with asyncio.timeout(max(timeout, 0.001)):
                if handler.get("exec") is not None:
                    return await self._exec(handler["exec"], target, timeout, where)
                if handler.get("httpGet") is not None:
                    return await self._http(handler["httpGet"], target, where)
                if handler.get("sleep") is not None:
                    await asyncio.sleep(float(handler["sleep"].get("seconds") or 0))
                    return None
        except TimeoutError:
            return f"lifecycle hook {where} did not finish within {timeout:g}s"
        return f"invalid lifecycle handler {where}: {sorted(handler)}"

    async def _exec(self, action: dict, target: Target, timeout: float, where: str) -> str | None:
        command = [expand(str(p), static_env(target.container)) for p in action.get("command") or ()]
        shown = f"Exec lifecycle hook ({command}) {where}"
        try:
            code, output = await self.runtime.exec_sync(target.container_id, command, timeout)
        except RuntimeTimeout:
            return f"{shown} failed - error: command '{' '.join(command)}' timed out after {timeout:g}s"
        except RuntimeError_ as exc:
            return f"{shown} failed - error: {exc}"
        if code != 0:
            text = output.decode("utf-8", "replace").strip()
            return (f"{shown} failed - error: command '{' '.join(command)}' exited with {code}: {text}, "
                    f'message: "{text}"')
        return None

    async def _http(self, action: dict, target: Target, where: str) -> str | None:
        try:
            url, headers = self.http.build(action, target)
        except ValueError as exc:
            return f"HTTP lifecycle hook ({action.get('path', '/')}) {where} failed - error: {exc}"
        try:
            await self.http.get(url, headers)
        except (http1.ProtocolError, OSError, ValueError) as exc:
            return f'HTTP lifecycle hook ({action.get("path", "/")}) {where} failed - error: Get "{url}": {exc}'
        return None
