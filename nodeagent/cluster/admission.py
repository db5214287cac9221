"""Pod admission as kubelet's predicate admit handler does it (pure functions).

Before a pod from the API first runs, the node checks, in kubelet's order, that it fits
(pod count, then cpu, memory and ephemeral-storage requests against allocatable, counting
the pods already admitted), then that its nodeSelector and required node affinity match
the node. The first failure decides: reason ``OutOf<resource>`` or ``NodeAffinity`` and
kubelet's message, prefixed ``Pod was rejected: `` as kubelet's rejectPod writes it.

Not checked (kubelet does): host port conflicts, NoExecute taints, extended resources,
and the critical-pod preemption path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Iterable, Mapping

from nodeagent.api.podspec import effective_requests
from nodeagent.api.quantity import QuantityError, parse_quantity

# Resources kubelet checks, in its order, with the unit it reports amounts in.
CHECKED_RESOURCES = ("cpu", "memory", "ephemeral-storage")
ADMISSION_REASONS = ("OutOfcpu", "OutOfmemory", "OutOfephemeral-storage", "OutOfpods", "NodeAffinity")
REJECTED_PREFIX = "Pod was rejected: "
NODE_AFFINITY_MESSAGE = "Predicate NodeAffinity failed: node(s) didn't match Pod's node affinity/selector"


@dataclass(frozen=True)
class NodeView:
    """What admission needs to know about the node."""

    name: str
    labels: Mapping[str, str]
    allocatable: Mapping[str, int]  # cpu in millicores, memory/storage in bytes
    max_pods: int
    extra_fields: Mapping[str, str] = field(default_factory=dict)

    @staticmethod
    def from_node(node: Mapping, max_pods: int | None = None) -> "NodeView":
        status = node.get("status") or {}
        meta = node.get("metadata") or {}
        allocatable = to_amounts(status.get("allocatable") or {})
        pods = allocatable.pop("pods", None)
        return NodeView(
            name=meta.get("name", ""),
            labels=dict(meta.get("labels") or {}),
            allocatable=allocatable,
            max_pods=int(pods) if pods is not None else int(max_pods or 110),
        )


def to_amounts(quantities: Mapping[str, object]) -> dict[str, int]:
    """API quantities -> integers: cpu in millicores (rounded up), others in units."""
    out: dict[str, int] = {}
    for name, raw in quantities.items():
        try:
            value = parse_quantity(raw)
        except QuantityError:
            continue
        out[name] = _ceil(value * 1000) if name == "cpu" else _ceil(value)
    return out


def _ceil(value: Decimal) -> int:
    return int(value.to_integral_value(rounding="ROUND_CEILING"))


def _container_amounts(container: dict) -> dict[str, Decimal]:
    return {k: v for k, v in effective_requests(container).items()}


def _add(into: dict[str, Decimal], amounts: Mapping[str, Decimal]) -> None:
    for name, amount in amounts.items():
        into[name] = into.get(name, Decimal(0)) + amount


def _max(into: dict[str, Decimal], amounts: Mapping[str, Decimal]) -> None:
    for name, amount in amounts.items():
        if amount > into.get(name, Decimal(0)):
            into[name] = amount


def pod_requests(pod: Mapping) -> dict[str, int]:
    """The pod's effective requests as the scheduler and kubelet count them: the sum of
    app containers and sidecars, or the peak of an init container (with the sidecars
    started before it) when that is larger, plus the pod overhead."""
    spec = pod.get("spec") or {}
    total: dict[str, Decimal] = {}
    for c in spec.get("containers") or []:
        _add(total, _container_amounts(c))
    sidecars: dict[str, Decimal] = {}
    init_peak: dict[str, Decimal] = {}
    for c in spec.get("initContainers") or []:
        amounts = _container_amounts(c)
        if c.get("restartPolicy") == "Always":
            _add(total, amounts)
            _add(sidecars, amounts)
            _max(init_peak, sidecars)
        else:
            step = dict(amounts)
            _add(step, sidecars)
            _max(init_peak, step)
    _max(total, init_peak)
    overhead = {}
    for name, raw in (spec.get("overhead") or {}).items():
        try:
            overhead[name] = parse_quantity(raw)
        except QuantityError:
            pass
    _add(total, overhead)
    return {name: (_ceil(v * 1000) if name == "cpu" else _ceil(v)) for name, v in total.items()}


# --- node affinity ---------------------------------------------------------------------


def _match_expression(expr: Mapping, value: str | None) -> bool:
    op = expr.get("operator")
    values = list(expr.get("values") or [])
    if op == "In":
        return value is not None and value in values
    if op == "NotIn":
        return value is None or value not in values
    if op == "Exists":
        return value is not None
    if op == "DoesNotExist":
        return value is None
    if op in ("Gt", "Lt"):
        if value is None or len(values) != 1:
            return False
        try:
            have, want = int(value), int(values[0])
        except ValueError:
            return False
        return have > want if op == "Gt" else have < want
    return False  # an unknown operator matches nothing


def _match_term(term: Mapping, node: NodeView) -> bool:
    expressions = list(term.get("matchExpressions") or [])
    fields = list(term.get("matchFields") or [])
    if not expressions and not fields:
        return False  # an empty term matches no node (as upstream)
    for expr in expressions:
        if not _match_expression(expr, node.labels.get(expr.get("key", ""))):
            return False
    node_fields = {"metadata.name": node.name, **node.extra_fields}
    for expr in fields:
        key = expr.get("key", "")
        if key != "metadata.name" or expr.get("operator") not in ("In", "NotIn"):
            return False
        if not _match_expression(expr, node_fields.get(key)):
            return False
    return True


def matches_node_selector_terms(terms: Iterable[Mapping], node: NodeView) -> bool:
    """nodeSelectorTerms are ORed; the requirements inside one term are ANDed."""
    return any(_match_term(term, node) for term in terms)


def matches_node(pod: Mapping, node: NodeView) -> bool:
    spec = pod.get("spec") or {}
    for key, value in (spec.get("nodeSelector") or {}).items():
        if node.labels.get(key) != value:
            return False
    required = (((spec.get("affinity") or {}).get("nodeAffinity") or {})
                .get("requiredDuringSchedulingIgnoredDuringExecution"))
    if required is not None:
        return matches_node_selector_terms(required.get("nodeSelectorTerms") or [], node)
    return True


# --- the decision ----------------------------------------------------------------------


def admit(pod: Mapping, node: NodeView, admitted: Iterable[Mapping]) -> tuple[str, str] | None:
    """None when the pod may run, else (reason, message) for its Failed status.

    ``admitted`` are the node's active pods (admitted earlier, not terminal), not
    including ``pod``."""
    others = list(admitted)
    if len(others) + 1 > node.max_pods:
        return _insufficient("pods", 1, len(others), node.max_pods)
    wanted = pod_requests(pod)
    if any(wanted.get(name, 0) for name in CHECKED_RESOURCES):
        used: dict[str, int] = {}
        for other in others:
            for name, amount in pod_requests(other).items():
                used[name] = used.get(name, 0) + amount
        for name in CHECKED_RESOURCES:
            want = wanted.get(name, 0)
            if want == 0:
                continue
            capacity = node.allocatable.get(name)
            if capacity is None:
                continue
            if want + used.get(name, 0) > capacity:
                return _insufficient(name, want, used.get(name, 0), capacity)
    if not matches_node(pod, node):
        return "NodeAffinity", REJECTED_PREFIX + NODE_AFFINITY_MESSAGE
    return None


def _insufficient(resource: str, requested: int, used: int, capacity: int) -> tuple[str, str]:
    message = (f"Node didn't have enough resource: {resource}, requested: {requested}, "
               f"used: {used}, capacity: {capacity}")
    return f"OutOf{resource}", REJECTED_PREFIX + message
