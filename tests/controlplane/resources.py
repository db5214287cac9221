"""The resource types the test control plane serves, with their discovery data."""

from __future__ import annotations

from dataclasses import dataclass, field

VERBS_ALL = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")


@dataclass(frozen=True)
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    singular: str = ""
    subresources: tuple[str, ...] = ()
    # Storage shared across API versions/groups (core and events.k8s.io events).
    storage: str = ""
    # Writes to the main resource keep the stored status (status has its own subresource).
    status_via_subresource: bool = False
    categories: tuple[str, ...] = ()
    verbs: tuple[str, ...] = VERBS_ALL
    field_labels: frozenset[str] = field(default_factory=frozenset)
    # Pods and nodes carry no metadata.generation in v1.32; most spec'd objects do.
    tracks_generation: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def storage_key(self) -> str:
        return self.storage or f"{self.group}/{self.plural}"

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"

    @property
    def singular_name(self) -> str:
        return self.singular or self.kind.lower()

    @property
    def supported_field_labels(self) -> frozenset[str]:
        base = {"metadata.name"}
        if self.namespaced:
            base.add("metadata.namespace")
        return frozenset(base) | self.field_labels


POD_FIELDS = frozenset({
    "spec.nodeName", "spec.restartPolicy", "spec.schedulerName", "spec.serviceAccountName",
    "spec.hostNetwork", "status.phase", "status.podIP", "status.podIPs",
    "status.nominatedNodeName",
})
EVENT_FIELDS = frozenset({
    "involvedObject.kind", "involvedObject.namespace", "involvedObject.name",
    "involvedObject.uid", "involvedObject.apiVersion", "involvedObject.resourceVersion",
    "involvedObject.fieldPath", "reason", "reportingComponent", "source", "type",
})
EVENTS_V1_FIELDS = frozenset({
    "regarding.kind", "regarding.namespace", "regarding.name", "regarding.uid",
    "regarding.apiVersion", "regarding.resourceVersion", "regarding.fieldPath", "reason",
    "reportingController", "type", "deprecatedSource",
})

RESOURCES: tuple[ResourceType, ...] = (
    ResourceType("", "v1", "namespaces", "Namespace", False, ("ns",),
                 subresources=("status", "finalize"), status_via_subresource=True,
                 field_labels=frozenset({"status.phase"})),
    ResourceType("", "v1", "pods", "Pod", True, ("po",),
                 subresources=("status", "binding", "eviction", "log", "exec", "attach", "portforward"),
                 status_via_subresource=True, categories=("all",), field_labels=POD_FIELDS),
    ResourceType("", "v1", "nodes", "Node", False, ("no",), subresources=("status", "proxy"),
                 status_via_subresource=True, field_labels=frozenset({"spec.unschedulable"})),
    ResourceType("", "v1", "events", "Event", True, ("ev",), storage="core/events",
                 field_labels=EVENT_FIELDS),
    ResourceType("", "v1", "configmaps", "ConfigMap", True, ("cm",)),
    ResourceType("", "v1", "secrets", "Secret", True, field_labels=frozenset({"type"})),
    ResourceType("", "v1", "serviceaccounts", "ServiceAccount", True, ("sa",),
                 subresources=("token",)),
    ResourceType("", "v1", "services", "Service", True, ("svc",), subresources=("status",),
                 status_via_subresource=True, categories=("all",)),
    ResourceType("", "v1", "endpoints", "Endpoints", True, ("ep",)),
    ResourceType("coordination.k8s.io", "v1", "leases", "Lease", True),
    ResourceType("events.k8s.io", "v1", "events", "Event", True, ("ev",), storage="core/events",
                 field_labels=EVENTS_V1_FIELDS),
    ResourceType("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True,
                 field_labels=frozenset({"addressType"})),
    ResourceType("certificates.k8s.io", "v1", "certificatesigningrequests",
                 "CertificateSigningRequest", False, ("csr",), subresources=("approval", "status"),
                 status_via_subresource=True, field_labels=frozenset({"spec.signerName"})),
    ResourceType("authentication.k8s.io", "v1", "tokenreviews", "TokenReview", False,
                 verbs=("create",)),
    ResourceType("authorization.k8s.io", "v1", "subjectaccessreviews", "SubjectAccessReview",
                 False, verbs=("create",)),
    ResourceType("authorization.k8s.io", "v1", "selfsubjectaccessreviews", "SelfSubjectAccessReview",
                 False, verbs=("create",)),
    ResourceType("authentication.k8s.io", "v1", "selfsubjectreviews", "SelfSubjectReview",
                 False, verbs=("create",)),
)

# Discovery lists these groups in this order (core first, like the real server).
GROUP_ORDER = ("", "events.k8s.io", "authentication.k8s.io", "authorization.k8s.io",
               "certificates.k8s.io", "coordination.k8s.io", "discovery.k8s.io")

SUBRESOURCE_KINDS = {
    ("pods", "binding"): ("Binding", ("create",)),
    ("pods", "eviction"): ("Eviction", ("create",)),
    ("pods", "log"): ("Pod", ("get",)),
    ("pods", "exec"): ("PodExecOptions", ("create", "get")),
    ("pods", "attach"): ("PodAttachOptions", ("create", "get")),
    ("pods", "portforward"): ("PodPortForwardOptions", ("create", "get")),
    ("nodes", "proxy"): ("NodeProxyOptions", ("create", "delete", "get", "patch", "update")),
    ("serviceaccounts", "token"): ("TokenRequest", ("create",)),
    ("namespaces", "finalize"): ("Namespace", ("update",)),
}


def find(group: str, version: str, plural: str) -> ResourceType | None:
    for rt in RESOURCES:
        if rt.group == group and rt.version == version and rt.plural == plural:
            return rt
    return None


def by_storage(storage: str) -> list[ResourceType]:
    return [rt for rt in RESOURCES if rt.storage_key == storage]


def groups() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for rt in RESOURCES:
        versions = out.setdefault(rt.group, [])
        if rt.version not in versions:
            versions.append(rt.version)
    return out
