"""The runtime's view of pod networks that the pod network plugin may ask for.

``netplugin`` knows nothing of Docker; to heal a damaged IPAM store it needs to know
which sandboxes run and where their network namespaces are. The kubelet side answers
from the runtime's sandbox list (the pod uid comes from the sandbox's labels).
"""

from __future__ import annotations

from netplugin.types import RuntimeView, SandboxNetns
from runtime.types import RuntimeService, SandboxState


def sandbox_netns_view(runtime: RuntimeService) -> RuntimeView:
    async def view() -> list[SandboxNetns]:
        return [
            SandboxNetns(pod_uid=s.pod.uid, netns_path=s.netns_path)
            for s in await runtime.list_pod_sandboxes()
            if s.state == SandboxState.READY and not s.host_network and s.netns_path
        ]

    return view
