"""What this node does with each pod-spec field: carried out, left to the scheduler,
or refused. The rule: every field the node accepts is honoured, or the pod is refused
with a reason naming the field (as kubelet refuses features a node lacks).

``unsupported(pod)`` returns the refusals; ``validate_pod`` adds them to its errors, so
a manifest is shown Failed/InvalidManifest and an API pod is rejected at admission.
Security-context and DNS fields the node cannot honour (seLinuxOptions, AppArmor,
``hostUsers: false``, unsafe sysctls ...) are refused by the kubelet's admission
(``nodeagent/kubelet/security.py``, ``dns.py``) with kubelet's reasons. The table in
docs/ARCHITECTURE.md is this module in prose.
"""

from __future__ import annotations

from typing import Iterator

# Fields only the scheduler acts on: a kubelet accepts them and so does this node.
# (On a standalone node there is no scheduler: they have no effect, as with kubelet's
# static pods.)
SCHEDULER_FIELDS = ("affinity.podAffinity", "affinity.podAntiAffinity", "tolerations",
                    "topologySpreadConstraints", "schedulerName", "priorityClassName",
                    "preemptionPolicy", "schedulingGates")


def _set(value: object) -> bool:
    return value not in (None, [], {}, "")


def _containers(spec: dict) -> Iterator[tuple[str, dict]]:
    for key in ("initContainers", "containers"):
        items = spec.get(key)
        for i, c in enumerate(items if isinstance(items, list) else []):
            if isinstance(c, dict):
                yield f"spec.{key}[{i}]", c


def unsupported(pod: dict) -> list[tuple[str, str]]:
    """(field, message) for each field this node cannot carry out."""
    spec = pod.get("spec")
    if not isinstance(spec, dict):
        return []
    out: list[tuple[str, str]] = []
    if _set(spec.get("ephemeralContainers")):
        out.append(("spec.ephemeralContainers", "ephemeral containers are not supported by this node"))
    if _set(spec.get("runtimeClassName")):
        out.append(("spec.runtimeClassName", "RuntimeClasses are not supported by this node "
                                             "(it runs every pod with Docker's default runtime)"))
    if _set(spec.get("overhead")):
        out.append(("spec.overhead", "pod overhead (from a RuntimeClass) is not supported by this node"))
    if _set(spec.get("resourceClaims")):
        out.append(("spec.resourceClaims", "dynamic resource allocation is not supported by this node"))
    if _set(spec.get("resources")):
        out.append(("spec.resources", "pod-level resources are not supported by this node; "
                                      "set resources per container"))
    os_name = (spec.get("os") or {}).get("name") if isinstance(spec.get("os"), dict) else None
    if os_name not in (None, "linux"):
        out.append(("spec.os.name", f"this node runs Linux pods, not {os_name!r}"))
    for path, c in _containers(spec):
        if _set(c.get("volumeDevices")):
            out.append((f"{path}.volumeDevices", "raw block volumes are not supported by this node"))
        resources = c.get("resources")
        if isinstance(resources, dict) and _set(resources.get("claims")):
            out.append((f"{path}.resources.claims", "dynamic resource allocation is not supported by this node"))
    return out
