"""The REST semantics of the test control plane, independent of HTTP: create, get, list,
update, patch, delete and watch setup, with the rules the real API server applies
(defaulting, status subresources, optimistic concurrency, graceful deletion,
finalizers, selectors). Tests may call it directly as the admin user."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import yaml

from . import defaults, errors, patch as patching, resources, schema as k8s_schema, selectors
from .errors import ApiStatusError
from .resources import ResourceType
from .store import Store, StoredEvent, Watcher


@dataclass(frozen=True)
class UserInfo:
    name: str
    groups: tuple[str, ...] = ()
    uid: str = ""
    extra: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def is_admin(self) -> bool:
        return "system:masters" in self.groups

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"username": self.name, "groups": list(self.groups)}
        if self.uid:
            out["uid"] = self.uid
        if self.extra:
            out["extra"] = {k: list(v) for k, v in self.extra}
        return out


ADMIN = UserInfo("kubernetes-admin", ("system:masters", "system:authenticated"))


@dataclass
class Options:
    """Behaviour switches of the control plane (see ControlPlane)."""
    service_account_admission: bool = True
    auto_approve_csrs: bool = False
    # kube-controller-manager's --cluster-signing-duration (seconds; None: one year):
    # the most a signed certificate may live. Tests shorten it to exercise rotation.
    signing_duration: float | None = None
    # With auto_approve_csrs: also approve kubelet-serving CSRs. kube-controller-manager's
    # csrapproving approves only node client CSRs; False gives that behaviour.
    auto_approve_serving_csrs: bool = True
    pod_cidr: str | None = None
    service_cidr: str = "10.96.0.0/12"
    node_port_range: tuple[int, int] = (30000, 32767)
    validate_writes: bool = True
    record_writes: bool = False
    # pods/log and nodes/proxy connect only to node addresses inside these networks.
    kubelet_proxy_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")


@dataclass
class RecordedWrite:
    user: str
    verb: str
    resource: str  # plural or plural/subresource, with group prefix for non-core
    namespace: str
    name: str
    object: dict
    request: Any = None


@dataclass
class WriteResult:
    obj: dict
    code: int = 200
    warnings: list[str] = field(default_factory=list)


@dataclass
class WatchSetup:
    watcher: Watcher
    initial: list[tuple[str, dict]]
    send_initial_end_bookmark: bool = False


def now_time() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def time_after(seconds: int) -> str:
    when = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=seconds)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_time() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

# events.k8s.io/v1 field -> core/v1 field (the two versions share storage).
_EVENT_V1_TO_CORE = {
    "regarding": "involvedObject", "note": "message", "deprecatedSource": "source",
    "deprecatedFirstTimestamp": "firstTimestamp", "deprecatedLastTimestamp": "lastTimestamp",
    "deprecatedCount": "count", "reportingController": "reportingComponent",
}
_EVENT_CORE_TO_V1 = {v: k for k, v in _EVENT_V1_TO_CORE.items()}

_POD_UPDATE_FORBIDDEN = (
    "pod updates may not change fields other than `spec.containers[*].image`,"
    "`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` "
    "(only additions to existing tolerations),`spec.terminationGracePeriodSeconds` "
    "(allow it to be set to 1 if it was previously negative)"
)

_READ_ONLY_META = ("uid", "resourceVersion", "creationTimestamp", "deletionTimestamp",
                   "deletionGracePeriodSeconds", "generation", "selfLink")


def clone(value: Any) -> Any:
    """Deep copy of JSON data (several times faster than copy.deepcopy)."""
    if isinstance(value, dict):
        return {k: clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clone(v) for v in value]
    return value


def strip_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [strip_nulls(v) for v in value]
    return value


def _fold_string_data(secret: dict) -> None:
    """Secret.stringData is write-only: merged into data (base64) on create and update."""
    if "stringData" in secret:
        data = secret.setdefault("data", {})
        for k, v in (secret.pop("stringData") or {}).items():
            data[k] = base64.b64encode(str(v).encode()).decode()


def _meta(obj: dict) -> dict:
    return obj.setdefault("metadata", {})


class Api:
    def __init__(self, store: Store, options: Options, *, ca_pem: bytes,
                 sign_csr: Callable[[dict], str], token_signer) -> None:
        self.store = store
        self.options = options
        self.ca_pem = ca_pem
        self._sign_csr = sign_csr
        self.token_signer = token_signer
        self.recorded: list[RecordedWrite] = []
        self._service_net = ipaddress.ip_network(options.service_cidr)
        self._next_service_ip = 10  # .1 is kept for the `kubernetes` service
        self._next_node_port = options.node_port_range[0]
        self._pod_cidrs = (ipaddress.ip_network(options.pod_cidr).subnets(new_prefix=24)
                           if options.pod_cidr else None)
        self.server_url = ""

    # --- conversion between external versions and storage ------------------------------

    @staticmethod
    def to_external(rt: ResourceType, stored: dict) -> dict:
        if rt.group == "events.k8s.io":
            out = {_EVENT_CORE_TO_V1.get(k, k): v for k, v in stored.items()}
            out["apiVersion"], out["kind"] = rt.api_version, rt.kind
            return out
        if stored.get("apiVersion") != rt.api_version or stored.get("kind") != rt.kind:
            return dict(stored, apiVersion=rt.api_version, kind=rt.kind)
        return stored

    @staticmethod
    def to_storage(rt: ResourceType, obj: dict) -> dict:
        if rt.group == "events.k8s.io":
            out = {_EVENT_V1_TO_CORE.get(k, k): v for k, v in obj.items()}
            out["apiVersion"], out["kind"] = "v1", "Event"
            return out
        return obj

    # --- helpers ------------------------------------------------------------------------

    def _record(self, user: UserInfo, verb: str, rt: ResourceType, sub: str | None,
                obj: dict, request: Any = None) -> None:
        if not self.options.record_writes or user.is_admin:
            return
        resource = rt.plural + (f"/{sub}" if sub else "")
        if rt.group:
            resource = f"{rt.group}/{resource}"
        meta = obj.get("metadata") or {}
        self.recorded.append(RecordedWrite(user.name, verb, resource, meta.get("namespace", ""),
                                           meta.get("name", ""), clone(obj),
                                           clone(request)))

    def _require_namespace(self, rt: ResourceType, namespace: str | None, creating: bool) -> None:
        if not rt.namespaced:
            return
        ns = self.store.get("/namespaces", None, namespace or "")
        if ns is None:
            raise errors.not_found("", "namespaces", namespace or "")
        if creating and (ns.get("metadata") or {}).get("deletionTimestamp"):
            raise ApiStatusError(
                "Forbidden",
                f'{rt.plural} "" is forbidden: unable to create new content in namespace '
                f'{namespace} because it is being terminated')

    def _check_type(self, rt: ResourceType, body: Any) -> dict:
        if not isinstance(body, dict):
            raise errors.bad_request(f"the body of the request must be a {rt.kind} object")
        api_version, kind = body.get("apiVersion"), body.get("kind")
        if api_version and api_version != rt.api_version:
            raise errors.bad_request(
                f"the API version in the data ({api_version}) does not match the expected "
                f"API version ({rt.api_version})")
        if kind and kind != rt.kind:
            raise errors.bad_request(
                f"the kind in the data ({kind}) does not match the expected kind ({rt.kind})")
        body = dict(body)
        body["apiVersion"], body["kind"] = rt.api_version, rt.kind
        if not isinstance(body.get("metadata", {}), dict):
            raise errors.bad_request(f"{rt.kind}.metadata must be an object")
        return body

    def _schema_check(self, rt: ResourceType, obj: dict, field_validation: str) -> list[str]:
        """Check a written object against the official schema, as decoding and validation
        would: type errors -> 400, missing required fields -> 422, unknown fields -> 400
        with fieldValidation=Strict, else dropped with a warning. Prunes `obj` in place."""
        if not self.options.validate_writes:
            return []
        problems = k8s_schema.check_object(obj, strict=True)
        hard = [p for p in problems if not p.unknown_field and not p.missing_required]
        missing = [p for p in problems if p.missing_required]
        unknown = [p for p in problems if p.unknown_field]
        if hard:
            raise errors.bad_request(
                f'{rt.kind} in version "{rt.version}" cannot be handled as a {rt.kind}: '
                + "; ".join(str(p) for p in hard))
        if unknown and field_validation == "Strict":
            raise errors.bad_request(
                "strict decoding error: " + ", ".join(p.message for p in unknown))
        for p in unknown:
            k8s_schema.prune(obj, p.parts)
        if missing:
            name = (obj.get("metadata") or {}).get("name") or ""
            raise errors.invalid(rt.group, rt.kind, name,
                                 [(p.path, "FieldValueRequired", "Required value") for p in missing])
        if unknown and field_validation != "Ignore":
            return [p.message for p in unknown]
        return []

    def _validate_name(self, rt: ResourceType, name: str) -> list[tuple[str, str, str]]:
        if not name:
            return [("metadata.name", "FieldValueRequired",
                     "Required value: name or generateName is required")]
        if rt.kind == "Namespace":
            ok, rule = bool(_DNS_LABEL.match(name)) and len(name) <= 63, "RFC 1123 label"
        elif rt.kind == "Service":
            ok, rule = bool(_DNS_1035.match(name)) and len(name) <= 63, "RFC 1035 label"
        elif rt.kind in ("Event",):
            ok, rule = "/" not in name and name not in (".", ".."), "path segment name"
        else:
            ok, rule = bool(_DNS_SUBDOMAIN.match(name)) and len(name) <= 253, "RFC 1123 subdomain"
        if not ok:
            return [("metadata.name", "FieldValueInvalid",
                     f'Invalid value: "{name}": a lowercase {rule} must consist of lower case '
                     "alphanumeric characters, '-' or '.'")]
        return []

    # --- kind-specific validation ---------------------------------------------------------

    def _validate(self, rt: ResourceType, obj: dict, old: dict | None) -> None:
        meta = obj.get("metadata") or {}
        causes = [] if old is not None else self._validate_name(rt, meta.get("name", ""))
        kind = rt.kind
        if kind == "Pod":
            causes += self._validate_pod(obj)
            if old is not None:
                causes += self._validate_pod_update(obj, old)
        elif kind == "Event":
            causes += self._validate_event(rt, obj)
        elif kind == "CertificateSigningRequest" and old is None:
            spec = obj.get("spec") or {}
            if not spec.get("request"):
                causes.append(("spec.request", "FieldValueRequired", "Required value"))
            else:
                try:
                    pem = base64.b64decode(spec["request"])
                    from cryptography import x509  # noqa: PLC0415
                    x509.load_pem_x509_csr(pem)
                except (ValueError, TypeError):
                    causes.append(("spec.request", "FieldValueInvalid",
                                   "Invalid value: []byte{...}: PEM block type must be CERTIFICATE REQUEST"))
            if not spec.get("signerName"):
                causes.append(("spec.signerName", "FieldValueRequired", "Required value"))
            if not spec.get("usages"):
                causes.append(("spec.usages", "FieldValueRequired", "Required value"))
        elif kind == "Lease":
            duration = (obj.get("spec") or {}).get("leaseDurationSeconds")
            if duration is not None and duration <= 0:
                causes.append(("spec.leaseDurationSeconds", "FieldValueInvalid",
                               f"Invalid value: {duration}: must be greater than 0"))
        if causes:
            raise errors.invalid(rt.group, rt.kind, meta.get("name", ""), causes)

    @staticmethod
    def _validate_pod(pod: dict) -> list[tuple[str, str, str]]:
        causes = []
        spec = pod.get("spec") or {}
        containers = spec.get("containers") or []
        if not containers:
            causes.append(("spec.containers", "FieldValueRequired", "Required value"))
        seen: set[str] = set()
        for label, group in (("containers", containers), ("initContainers", spec.get("initContainers") or [])):
            for i, c in enumerate(group):
                name = c.get("name", "")
                if not name:
                    causes.append((f"spec.{label}[{i}].name", "FieldValueRequired", "Required value"))
                elif not _DNS_LABEL.match(name):
                    causes.append((f"spec.{label}[{i}].name", "FieldValueInvalid",
                                   f'Invalid value: "{name}": a lowercase RFC 1123 label must '
                                   "consist of lower case alphanumeric characters or '-'"))
                elif name in seen:
                    causes.append((f"spec.{label}[{i}].name", "FieldValueDuplicate",
                                   f'Duplicate value: "{name}"'))
                seen.add(name)
                if not c.get("image"):
                    causes.append((f"spec.{label}[{i}].image", "FieldValueRequired", "Required value"))
        policy = spec.get("restartPolicy")
        if policy not in (None, "Always", "OnFailure", "Never"):
            causes.append(("spec.restartPolicy", "FieldValueNotSupported",
                           f'Unsupported value: "{policy}": supported values: "Always", '
                           '"OnFailure", "Never"'))
        status = pod.get("status") or {}
        for key in ("podIP", "hostIP"):
            if status.get(key):
                try:
                    ipaddress.ip_address(status[key])
                except ValueError:
                    causes.append((f"status.{key}", "FieldValueInvalid",
                                   f'Invalid value: "{status[key]}": must be a valid IP address'))
        return causes

    @staticmethod
    def _validate_pod_update(new: dict, old: dict) -> list[tuple[str, str, str]]:
        causes = []
        new_spec = clone(new.get("spec") or {})
        old_spec = old.get("spec") or {}
        for key in ("containers", "initContainers"):
            for i, c in enumerate(new_spec.get(key) or []):
                old_list = old_spec.get(key) or []
                if i < len(old_list) and "image" in old_list[i]:
                    c["image"] = old_list[i]["image"]
        for key in ("activeDeadlineSeconds", "tolerations", "schedulingGates",
                    "terminationGracePeriodSeconds"):
            if key in old_spec:
                new_spec[key] = old_spec[key]
            else:
                new_spec.pop(key, None)
        if new_spec != old_spec:
            causes.append(("spec", "FieldValueForbidden", "Forbidden: " + _POD_UPDATE_FORBIDDEN))
        old_phase = (old.get("status") or {}).get("phase")
        new_phase = (new.get("status") or {}).get("phase")
        if old_phase in ("Succeeded", "Failed") and new_phase != old_phase:
            causes.append(("status.phase", "FieldValueForbidden",
                           "Forbidden: may not be transitioned to non-terminal state"))
        return causes

    @staticmethod
    def _validate_event(rt: ResourceType, ev: dict) -> list[tuple[str, str, str]]:
        causes = []
        meta = ev.get("metadata") or {}
        involved = ev.get("involvedObject") or {}
        ns = meta.get("namespace", "")
        if involved.get("namespace"):
            if involved["namespace"] != ns:
                causes.append(("involvedObject.namespace", "FieldValueInvalid",
                               f'Invalid value: "{involved["namespace"]}": does not match event.namespace'))
        elif ns not in ("", "default"):
            causes.append(("involvedObject.namespace", "FieldValueInvalid",
                           'Invalid value: "": does not match event.namespace'))
        if rt.group == "events.k8s.io":
            for fld, label in (("eventTime", "eventTime"), ("reportingComponent", "reportingController"),
                               ("reportingInstance", "reportingInstance"), ("action", "action"),
                               ("reason", "reason")):
                if not ev.get(fld):
                    causes.append((label, "FieldValueRequired", "Required value"))
        series = ev.get("series")
        if series is not None and int(series.get("count") or 0) < 2:
            causes.append(("series.count", "FieldValueInvalid",
                           f"Invalid value: {series.get('count')}: should be at least 2"))
        if ev.get("type") and ev["type"] not in ("Normal", "Warning"):
            causes.append(("type", "FieldValueNotSupported",
                           f'Unsupported value: "{ev["type"]}": supported values: "Normal", "Warning"'))
        return causes

    # --- kind-specific preparation ---------------------------------------------------------

    def _allocate_service_ip(self) -> str:
        ip = self._service_net.network_address + self._next_service_ip
        self._next_service_ip += 1
        return str(ip)

    def _allocate_node_port(self) -> int:
        port = self._next_node_port
        self._next_node_port += 1
        return port

    def _prepare_create(self, rt: ResourceType, obj: dict, user: UserInfo) -> None:
        kind = rt.kind
        if kind == "Pod":
            defaults.default_pod(obj, service_account_admission=self.options.service_account_admission)
            obj["status"] = {"phase": "Pending", "qosClass": defaults.qos_class(obj)}
        elif kind == "Namespace":
            obj["spec"] = {"finalizers": ["kubernetes"]}
            obj["status"] = {"phase": "Active"}
            _meta(obj).setdefault("labels", {})["kubernetes.io/metadata.name"] = obj["metadata"]["name"]
        elif kind == "Service":
            defaults.default_service(obj, self._allocate_service_ip, self._allocate_node_port)
        elif kind == "Secret":
            obj.setdefault("type", "Opaque")
            _fold_string_data(obj)
        elif kind == "CertificateSigningRequest":
            spec = obj.setdefault("spec", {})
            spec["username"] = user.name
            spec["groups"] = list(user.groups)
            if user.uid:
                spec["uid"] = user.uid
            obj["status"] = {}
        elif kind == "Event":
            if not obj.get("firstTimestamp") and not obj.get("eventTime"):
                obj["firstTimestamp"] = now_time()
        elif kind == "EndpointSlice":
            for ep in obj.get("endpoints") or []:
                ep.setdefault("conditions", {})

    def _merge_status(self, rt: ResourceType, old: dict, new: dict, subresource: str | None) -> dict:
        """Which parts of an update take effect, per endpoint (main resource vs /status)."""
        if subresource in ("status", "approval"):
            result = clone(old)
            if subresource == "status":
                result["status"] = new.get("status", {})
            else:  # CSR approval changes only Approved/Denied/Failed conditions
                status = dict(result.get("status") or {})
                status["conditions"] = (new.get("status") or {}).get("conditions") or []
                result["status"] = status
            new_meta, res_meta = new.get("metadata") or {}, result["metadata"]
            for key in ("labels", "annotations"):
                if key in new_meta:
                    res_meta[key] = new_meta[key]
                else:
                    res_meta.pop(key, None)
            res_meta["resourceVersion"] = new_meta.get("resourceVersion", "")
            return result
        result = new
        if rt.status_via_subresource:
            if "status" in old:
                result["status"] = clone(old["status"])
            else:
                result.pop("status", None)
        if rt.kind == "Namespace":
            result["spec"] = clone(old.get("spec") or {})
        if rt.kind == "CertificateSigningRequest":
            result["spec"] = clone(old.get("spec") or {})
        return result

    # --- reads --------------------------------------------------------------------------

    def get(self, rt: ResourceType, namespace: str | None, name: str) -> dict:
        obj = self.store.get(rt.storage_key, namespace if rt.namespaced else None, name)
        if obj is None:
            raise errors.not_found(rt.group, rt.plural, name)
        return self.to_external(rt, obj)

    def _predicate(self, rt: ResourceType, label_selector: str | None,
                   field_selector: str | None) -> Callable[[dict], bool]:
        try:
            label_reqs = selectors.parse_label_selector(label_selector)
            field_reqs = selectors.parse_field_selector(field_selector)
            field_match = selectors.make_field_matcher(field_reqs, rt.supported_field_labels, rt.kind)
        except selectors.SelectorError as exc:
            raise errors.bad_request(str(exc)) from exc
        converted = rt.group == "events.k8s.io"

        def predicate(obj: dict) -> bool:
            if label_reqs and not selectors.labels_match(label_reqs, obj):
                return False
            if field_reqs:
                return field_match(self.to_external(rt, obj) if converted else obj)
            return True

        return predicate

    def list(self, rt: ResourceType, namespace: str | None, *, label_selector: str | None = None,
             field_selector: str | None = None, limit: int | None = None,
             continue_token: str | None = None) -> tuple[list[dict], str, str]:
        """(items, resourceVersion, continue token)."""
        predicate = self._predicate(rt, label_selector, field_selector)
        list_rv = self.store.rv
        start_after: tuple[str, str] | None = None
        if continue_token:
            try:
                state = json.loads(base64.b64decode(continue_token))
                list_rv, start_after = int(state["rv"]), (state["ns"], state["name"])
            except (ValueError, KeyError, TypeError) as exc:
                raise errors.bad_request("invalid continue token") from exc
            if list_rv < self.store.floor_rv:
                raise errors.expired(
                    "The provided continue parameter is too old to display a consistent list "
                    "result. You can start a new list without the continue parameter.")
        items = []
        next_token = ""
        for obj in self.store.list(rt.storage_key, namespace if rt.namespaced else None):
            meta = obj["metadata"]
            key = (meta.get("namespace", ""), meta["name"])
            if start_after is not None and key <= start_after:
                continue
            if not predicate(obj):
                continue
            if limit and len(items) >= limit:
                last = items[-1]["metadata"]
                next_token = base64.b64encode(json.dumps(
                    {"rv": list_rv, "ns": last.get("namespace", ""), "name": last["name"]}).encode()).decode()
                break
            items.append(self.to_external(rt, obj))
        return items, str(list_rv), next_token

    def open_watch(self, rt: ResourceType, namespace: str | None, *, resource_version: str | None,
                   label_selector: str | None = None, field_selector: str | None = None,
                   send_initial_events: bool = False) -> WatchSetup:
        """Register a watcher and compute its replay in one step (no await in between,
        so no event can fall in a gap). Raises TooOldResourceVersion."""
        predicate = self._predicate(rt, label_selector, field_selector)
        ns = namespace if rt.namespaced else None
        watcher = Watcher(rt.storage_key, ns, predicate, self.store.watcher_buffer)
        initial: list[tuple[str, dict]] = []
        if resource_version in (None, "", "0") or send_initial_events:
            for obj in self.store.list(rt.storage_key, ns):
                if predicate(obj):
                    initial.append(("ADDED", obj))
        else:
            try:
                since = int(resource_version)
            except ValueError as exc:
                raise errors.bad_request(f"invalid resource version {resource_version!r}") from exc
            for event in self.store.events_since(rt.storage_key, since):
                translated = watcher.translate(event)
                if translated is not None:
                    initial.append(translated)
        self.store.add_watcher(watcher)
        return WatchSetup(watcher, initial, send_initial_end_bookmark=send_initial_events)

    # --- writes -------------------------------------------------------------------------

    def create(self, rt: ResourceType, namespace: str | None, body: Any, user: UserInfo = ADMIN, *,
               field_validation: str = "Warn", dry_run: bool = False) -> WriteResult:
        obj = self._check_type(rt, body)
        meta = _meta(obj)
        if rt.namespaced:
            if meta.get("namespace") and namespace and meta["namespace"] != namespace:
                raise errors.bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request")
            namespace = namespace or meta.get("namespace") or "default"
            self._require_namespace(rt, namespace, creating=True)
        else:
            namespace = None
        if meta.get("resourceVersion"):
            raise errors.bad_request("resourceVersion should not be set on objects to be created")
        obj = clone(obj)
        warnings = self._schema_check(rt, obj, field_validation)
        obj = strip_nulls(obj)
        meta = _meta(obj)
        for key in _READ_ONLY_META:
            meta.pop(key, None)
        if rt.namespaced:
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        if not meta.get("name") and meta.get("generateName"):
            for _ in range(8):
                candidate = meta["generateName"] + defaults.random_suffix()
                if self.store.get(rt.storage_key, namespace, candidate) is None:
                    meta["name"] = candidate
                    break
        obj = self.to_storage(rt, obj)
        self._prepare_create(rt, obj, user)
        self._validate(rt, obj, None)
        name = obj["metadata"]["name"]
        if self.store.get(rt.storage_key, namespace, name) is not None:
            raise errors.already_exists(rt.group, rt.plural, name)
        meta = obj["metadata"]
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_time()
        if dry_run:
            meta["resourceVersion"] = ""
            return WriteResult(self.to_external(rt, obj), 201, warnings)
        stored = self.store.put(rt.storage_key, obj)
        external = self.to_external(rt, stored)
        self._record(user, "create", rt, None, external, body)
        return WriteResult(external, 201, warnings)

    def update(self, rt: ResourceType, namespace: str | None, name: str, body: Any,
               user: UserInfo = ADMIN, *, subresource: str | None = None,
               field_validation: str = "Warn", dry_run: bool = False, verb: str = "update",
               request: Any = None) -> WriteResult:
        obj = self._check_type(rt, body)
        meta = _meta(obj)
        if meta.get("name") and meta["name"] != name:
            raise errors.bad_request(
                f"the name of the object ({meta['name']}) does not match the name on the URL ({name})")
        ns = namespace if rt.namespaced else None
        if rt.namespaced and meta.get("namespace") and meta["namespace"] != namespace:
            raise errors.bad_request(
                "the namespace of the provided object does not match the namespace sent on the request")
        stored_old = self.store.get(rt.storage_key, ns, name)
        if stored_old is None:
            raise errors.not_found(rt.group, rt.plural, name)
        old_meta = stored_old["metadata"]
        if meta.get("resourceVersion") and meta["resourceVersion"] != old_meta["resourceVersion"]:
            raise errors.conflict(rt.group, rt.plural, name, errors.STALE_OBJECT)
        if meta.get("uid") and meta["uid"] != old_meta["uid"]:
            raise errors.conflict(rt.group, rt.plural, name,
                                  f"Precondition failed: UID in precondition: {meta['uid']}, "
                                  f"UID in object meta: {old_meta['uid']}")
        obj = clone(obj)
        warnings = self._schema_check(rt, obj, field_validation)
        new = self.to_storage(rt, strip_nulls(obj))
        new = self._merge_status(rt, stored_old, new, subresource)
        if rt.kind == "Secret":
            _fold_string_data(new)
        new_meta = _meta(new)
        for key in ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds",
                    "generation"):
            if key in old_meta:
                new_meta[key] = old_meta[key]
            else:
                new_meta.pop(key, None)
        new_meta["name"] = name
        if rt.namespaced:
            new_meta["namespace"] = namespace
        new_meta["resourceVersion"] = old_meta["resourceVersion"]
        self._validate(rt, new, stored_old)
        if new == stored_old:
            return WriteResult(self.to_external(rt, stored_old), 200, warnings)
        if dry_run:
            return WriteResult(self.to_external(rt, new), 200, warnings)
        if (new_meta.get("deletionTimestamp") and not new_meta.get("finalizers")
                and int(new_meta.get("deletionGracePeriodSeconds") or 0) == 0):
            final = self.store.remove(rt.storage_key, new)
            external = self.to_external(rt, final)
        else:
            external = self.to_external(rt, self.store.put(rt.storage_key, new))
        self._record(user, verb, rt, subresource, external, request if request is not None else body)
        return WriteResult(external, 200, warnings)

    def patch(self, rt: ResourceType, namespace: str | None, name: str, patch_type: str,
              patch_body: bytes | str | Any, user: UserInfo = ADMIN, *,
              subresource: str | None = None, field_validation: str = "Warn",
              dry_run: bool = False, force: bool = False) -> WriteResult:
        if isinstance(patch_body, (bytes, str)):
            try:
                if patch_type == patching.APPLY_PATCH:
                    document = yaml.safe_load(patch_body)
                else:
                    document = json.loads(patch_body)
            except (ValueError, yaml.YAMLError) as exc:
                raise errors.bad_request(f"error decoding patch: {exc}") from exc
        else:
            document = patch_body
        ns = namespace if rt.namespaced else None
        stored = self.store.get(rt.storage_key, ns, name)
        if stored is None:
            if patch_type == patching.APPLY_PATCH and subresource is None:
                if not isinstance(document, dict):
                    raise errors.bad_request("apply patches must be objects")
                return self.create(rt, namespace, document, user,
                                   field_validation=field_validation, dry_run=dry_run)
            raise errors.not_found(rt.group, rt.plural, name)
        current = clone(self.to_external(rt, stored))
        try:
            if patch_type == patching.MERGE_PATCH:
                if not isinstance(document, dict):
                    raise patching.PatchError("a merge patch must be a JSON object")
                patched = patching.merge_patch(current, document)
            elif patch_type == patching.JSON_PATCH:
                patched = patching.json_patch(current, document)
            elif patch_type in (patching.STRATEGIC_MERGE_PATCH, patching.APPLY_PATCH):
                if patch_type == patching.APPLY_PATCH and isinstance(document, dict):
                    # Server-side apply approximated: the applied configuration is merged
                    # into the live object like a strategic merge patch (no field ownership).
                    document = {k: v for k, v in document.items() if k not in ("apiVersion", "kind")}
                patched = patching.strategic_merge_patch(current, document, rt.api_version, rt.kind)
            else:
                raise ApiStatusError("UnsupportedMediaType",
                                     f"the body of the request was in an unknown format - "
                                     f"accepted media types include: {', '.join(patching.PATCH_TYPES)}")
        except patching.PatchError as exc:
            raise ApiStatusError("Invalid" if patch_type != patching.JSON_PATCH else "BadRequest",
                                 str(exc), code=422 if patch_type != patching.JSON_PATCH else 400) from exc
        if not isinstance(patched, dict):
            raise errors.bad_request("the patch result is not an object")
        # The patched object's resourceVersion is the live one unless the patch set it, so a
        # patch carrying a stale metadata.resourceVersion fails with 409 like the real server.
        return self.update(rt, namespace, name, patched, user, subresource=subresource,
                           field_validation=field_validation, dry_run=dry_run, verb="patch",
                           request=document)

    def delete(self, rt: ResourceType, namespace: str | None, name: str,
               options: dict | None = None, user: UserInfo = ADMIN, *,
               dry_run: bool = False) -> WriteResult:
        options = dict(options or {})
        ns = namespace if rt.namespaced else None
        stored = self.store.get(rt.storage_key, ns, name)
        if stored is None:
            raise errors.not_found(rt.group, rt.plural, name)
        meta = stored["metadata"]
        pre = options.get("preconditions") or {}
        if pre.get("uid") and pre["uid"] != meta["uid"]:
            raise errors.conflict(rt.group, rt.plural, name,
                                  f"Precondition failed: UID in precondition: {pre['uid']}, "
                                  f"UID in object meta: {meta['uid']}")
        if pre.get("resourceVersion") and pre["resourceVersion"] != meta["resourceVersion"]:
            raise errors.conflict(rt.group, rt.plural, name,
                                  f"Precondition failed: ResourceVersion in precondition: "
                                  f"{pre['resourceVersion']}, ResourceVersion in object meta: "
                                  f"{meta['resourceVersion']}")
        grace = options.get("gracePeriodSeconds")
        if grace is not None:
            grace = max(int(grace), 0) if int(grace) >= 0 else 1
        new = clone(stored)
        new_meta = new["metadata"]
        finalizers = new_meta.get("finalizers") or []
        immediate: bool
        if rt.kind == "Namespace":
            return self._delete_namespace(rt, stored, user, dry_run)
        if new_meta.get("deletionTimestamp"):
            # Already deleting: a grace period may only be shortened.
            current = new_meta.get("deletionGracePeriodSeconds")
            if current in (None, 0):
                immediate = not finalizers
            elif grace is not None and grace < current:
                when = dt.datetime.fromisoformat(new_meta["deletionTimestamp"].replace("Z", "+00:00"))
                when = when - dt.timedelta(seconds=current) + dt.timedelta(seconds=grace)
                new_meta["deletionTimestamp"] = when.strftime("%Y-%m-%dT%H:%M:%SZ")
                new_meta["deletionGracePeriodSeconds"] = grace
                immediate = grace == 0 and not finalizers
            else:
                return WriteResult(self.to_external(rt, stored), 200)
        else:
            if rt.kind == "Pod":
                spec, status = stored.get("spec") or {}, stored.get("status") or {}
                period = grace if grace is not None else int(spec.get("terminationGracePeriodSeconds", 0) or 0)
                if not spec.get("nodeName") or status.get("phase") in ("Failed", "Succeeded"):
                    period = 0
            else:
                period = 0
            if period > 0:
                new_meta["deletionTimestamp"] = time_after(period)
                new_meta["deletionGracePeriodSeconds"] = period
                immediate = False
            elif finalizers:
                new_meta["deletionTimestamp"] = now_time()
                new_meta["deletionGracePeriodSeconds"] = 0
                immediate = False
            else:
                immediate = True
        if dry_run:
            return WriteResult(self.to_external(rt, new if not immediate else stored), 200)
        if immediate:
            final = self.store.remove(rt.storage_key, stored)
            external = self.to_external(rt, final)
            self._record(user, "delete", rt, None, external, options)
            if rt.kind == "Pod":
                return WriteResult(external, 200)
            return WriteResult(self._success_status(rt, external), 200)
        external = self.to_external(rt, self.store.put(rt.storage_key, new))
        self._record(user, "delete", rt, None, external, options)
        return WriteResult(external, 200)

    @staticmethod
    def _success_status(rt: ResourceType, obj: dict) -> dict:
        meta = obj.get("metadata") or {}
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                "details": {"name": meta.get("name", ""), "group": rt.group, "kind": rt.plural,
                            "uid": meta.get("uid", "")}}

    def _delete_namespace(self, rt: ResourceType, stored: dict, user: UserInfo,
                          dry_run: bool) -> WriteResult:
        if stored["metadata"].get("deletionTimestamp"):
            return WriteResult(self.to_external(rt, stored), 200)
        new = clone(stored)
        new["metadata"]["deletionTimestamp"] = now_time()
        new["metadata"]["deletionGracePeriodSeconds"] = 0
        new["status"] = {"phase": "Terminating"}
        if dry_run:
            return WriteResult(new, 200)
        external = self.to_external(rt, self.store.put(rt.storage_key, new))
        self._record(user, "delete", rt, None, external)
        return WriteResult(external, 200)

    def delete_collection(self, rt: ResourceType, namespace: str | None, options: dict | None,
                          user: UserInfo = ADMIN, *, label_selector: str | None = None,
                          field_selector: str | None = None) -> dict:
        items, rv, _ = self.list(rt, namespace, label_selector=label_selector,
                                 field_selector=field_selector)
        for item in items:
            meta = item["metadata"]
            try:
                self.delete(rt, meta.get("namespace"), meta["name"], options, user)
            except ApiStatusError as exc:
                if exc.code != 404:
                    raise
        return {"kind": rt.list_kind, "apiVersion": rt.api_version,
                "metadata": {"resourceVersion": str(self.store.rv)}, "items": []}

    # --- subresources that create -------------------------------------------------------

    def bind(self, namespace: str, name: str, body: dict, user: UserInfo = ADMIN) -> dict:
        pods = resources.find("", "v1", "pods")
        assert pods is not None
        stored = self.store.get(pods.storage_key, namespace, name)
        if stored is None:
            raise errors.not_found("", "pods", name)
        target = (body.get("target") or {}).get("name")
        if not target:
            raise errors.invalid("", "Binding", name, [("target.name", "FieldValueRequired", "Required value")])
        if (stored.get("spec") or {}).get("nodeName"):
            raise errors.conflict("", "pods", name,
                                  f"pod {name} is already assigned to node "
                                  f"\"{stored['spec']['nodeName']}\"")
        new = clone(stored)
        new["spec"]["nodeName"] = target
        new.setdefault("status", {}).setdefault("conditions", []).append(
            {"type": "PodScheduled", "status": "True", "lastProbeTime": None,
             "lastTransitionTime": now_time()})
        new["status"]["conditions"][-1].pop("lastProbeTime")
        self.store.put(pods.storage_key, new)
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}

    def token_request(self, namespace: str, name: str, body: dict, user: UserInfo = ADMIN) -> dict:
        sa = self.store.get("/serviceaccounts", namespace, name)
        if sa is None:
            raise errors.not_found("", "serviceaccounts", name)
        spec = dict((body or {}).get("spec") or {})
        expiration = int(spec.get("expirationSeconds") or 3600)
        if expiration < 600:
            raise errors.invalid("authentication.k8s.io", "TokenRequest", name, [(
                "spec.expirationSeconds", "FieldValueInvalid",
                f"Invalid value: {expiration}: may not specify a duration less than 10 minutes")])
        audiences = spec.get("audiences") or [SERVICE_ACCOUNT_AUDIENCE]
        now = int(dt.datetime.now(dt.timezone.utc).timestamp())
        private: dict[str, Any] = {
            "namespace": namespace,
            "serviceaccount": {"name": name, "uid": sa["metadata"]["uid"]},
        }
        bound = spec.get("boundObjectRef")
        if bound:
            kind = bound.get("kind")
            storage = {"Pod": "/pods", "Secret": "/secrets", "Node": "/nodes"}.get(kind or "")
            if storage is None:
                raise errors.bad_request(f"cannot bind token to object of kind {kind!r}")
            target = self.store.get(storage, None if kind == "Node" else namespace, bound.get("name", ""))
            if target is None:
                raise errors.not_found("", storage.strip("/"), bound.get("name", ""))
            if bound.get("uid") and bound["uid"] != target["metadata"]["uid"]:
                raise errors.conflict("", storage.strip("/"), bound.get("name", ""),
                                      f"the UID in the bound object reference "
                                      f"({bound['uid']}) does not match the UID in record")
            private[kind.lower()] = {"name": target["metadata"]["name"], "uid": target["metadata"]["uid"]}
            if kind == "Pod" and (target.get("spec") or {}).get("nodeName"):
                node = self.store.get("/nodes", None, target["spec"]["nodeName"])
                if node is not None:
                    private["node"] = {"name": node["metadata"]["name"], "uid": node["metadata"]["uid"]}
        claims = {
            "aud": audiences, "exp": now + expiration, "iat": now, "nbf": now,
            "iss": "https://kubernetes.default.svc.cluster.local",
            "jti": str(uuid.uuid4()),
            "kubernetes.io": private,
            "sub": f"system:serviceaccount:{namespace}:{name}",
        }
        token = self.token_signer.sign(claims)
        expires = dt.datetime.fromtimestamp(now + expiration, dt.timezone.utc)
        result = {
            "kind": "TokenRequest", "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"name": name, "namespace": namespace,
                         "creationTimestamp": now_time()},
            "spec": {"audiences": audiences, "expirationSeconds": expiration,
                     "boundObjectRef": bound},
            "status": {"token": token, "expirationTimestamp": expires.strftime("%Y-%m-%dT%H:%M:%SZ")},
        }
        if not bound:
            result["spec"].pop("boundObjectRef")
        self._record(user, "create", resources.find("", "v1", "serviceaccounts"), "token",  # type: ignore[arg-type]
                     result, body)
        return result

    # --- controllers (invoked asynchronously by the server) ------------------------------

    def on_event(self, event: StoredEvent) -> None:
        """The work of the kube-controller-manager controllers the agent depends on."""
        obj = event.obj
        meta = obj.get("metadata") or {}
        if event.storage == "/namespaces" and event.type == "ADDED":
            self._populate_namespace(meta["name"])
        elif event.storage == "certificates.k8s.io/certificatesigningrequests" and event.type != "DELETED":
            self._csr_controller(obj)
        elif event.storage == "/nodes" and event.type == "ADDED" and self._pod_cidrs is not None:
            if not (obj.get("spec") or {}).get("podCIDR"):
                cidr = str(next(self._pod_cidrs))
                new = clone(obj)
                new.setdefault("spec", {})["podCIDR"] = cidr
                new["spec"]["podCIDRs"] = [cidr]
                current = self.store.get("/nodes", None, meta["name"])
                if current is not None and current["metadata"]["uid"] == meta["uid"]:
                    merged = clone(current)
                    merged.setdefault("spec", {}).update(podCIDR=cidr, podCIDRs=[cidr])
                    self.store.put("/nodes", merged)

    def _populate_namespace(self, namespace: str) -> None:
        now = now_time()
        if self.store.get("/serviceaccounts", namespace, "default") is None:
            self.store.put("/serviceaccounts", {
                "apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": {"name": "default", "namespace": namespace, "uid": str(uuid.uuid4()),
                             "creationTimestamp": now}})
        if self.store.get("/configmaps", namespace, "kube-root-ca.crt") is None:
            self.store.put("/configmaps", {
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "kube-root-ca.crt", "namespace": namespace,
                             "uid": str(uuid.uuid4()), "creationTimestamp": now,
                             "annotations": {"kubernetes.io/description": (
                                 "Contains a CA bundle that can be used to verify the "
                                 "kube-apiserver when using internal endpoints such as the "
                                 "internal service IP or kubernetes.default.svc. No other usage "
                                 "is guaranteed across distributions of Kubernetes clusters.")}},
                "data": {"ca.crt": self.ca_pem.decode()}})

    def _csr_controller(self, csr: dict) -> None:
        status = csr.get("status") or {}
        conditions = status.get("conditions") or []
        types = {c.get("type") for c in conditions}
        spec = csr.get("spec") or {}
        name = csr["metadata"]["name"]
        auto_signers = {"kubernetes.io/kube-apiserver-client-kubelet"}
        if self.options.auto_approve_serving_csrs:
            auto_signers.add("kubernetes.io/kubelet-serving")
        if not types and self.options.auto_approve_csrs and spec.get("signerName") in auto_signers:
            new = clone(csr)
            new.setdefault("status", {})["conditions"] = [{
                "type": "Approved", "status": "True", "reason": "AutoApproved",
                "message": "Auto approving kubelet certificate after SubjectAccessReview.",
                "lastUpdateTime": now_time(), "lastTransitionTime": now_time()}]
            self.store.put("certificates.k8s.io/certificatesigningrequests", new)
            return
        if "Approved" in types and "Denied" not in types and "Failed" not in types \
                and not status.get("certificate"):
            new = clone(csr)
            try:
                new["status"]["certificate"] = self._sign_csr(csr)
            except ValueError as exc:
                new["status"].setdefault("conditions", []).append({
                    "type": "Failed", "status": "True", "reason": "SignerValidationFailure",
                    "message": str(exc), "lastUpdateTime": now_time(),
                    "lastTransitionTime": now_time()})
            current = self.store.get("certificates.k8s.io/certificatesigningrequests", None, name)
            if current is not None and current["metadata"]["resourceVersion"] == csr["metadata"]["resourceVersion"]:
                self.store.put("certificates.k8s.io/certificatesigningrequests", new)

    def namespace_controller_step(self) -> None:
        """Empty terminating namespaces and remove them once empty."""
        for ns in self.store.list("/namespaces"):
            if not ns["metadata"].get("deletionTimestamp"):
                continue
            name = ns["metadata"]["name"]
            remaining = 0
            for rt in resources.RESOURCES:
                if not rt.namespaced or rt.group == "events.k8s.io" or "list" not in rt.verbs:
                    continue
                for obj in self.store.list(rt.storage_key, name):
                    remaining += 1
                    if obj["metadata"].get("deletionTimestamp") and rt.kind == "Pod":
                        continue
                    try:
                        self.delete(rt, name, obj["metadata"]["name"], {})
                    except ApiStatusError:
                        pass
            if remaining == 0 and self.store.get("/namespaces", None, name) is not None:
                self.store.remove("/namespaces", ns)


SERVICE_ACCOUNT_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
