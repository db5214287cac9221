"""Label and field selectors with the API server's grammar and matching rules."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable


class SelectorError(ValueError):
    pass


# --- label selectors ---------------------------------------------------------------

_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                        r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


@dataclass(frozen=True)
class LabelRequirement:
    key: str
    op: str  # exists, !, =, !=, in, notin, gt, lt
    values: tuple[str, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op == "exists":
            return present
        if self.op == "!":
            return not present
        if self.op in ("=", "in"):
            return present and value in self.values
        if self.op in ("!=", "notin"):
            return not present or value not in self.values
        if self.op in ("gt", "lt"):
            if not present:
                return False
            try:
                number = int(value or "")
            except ValueError:
                return False
            bound = int(self.values[0])
            return number > bound if self.op == "gt" else number < bound
        raise AssertionError(self.op)


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _check_key(key: str, selector: str) -> str:
    if not _LABEL_KEY.match(key):
        raise SelectorError(f"unable to parse requirement: invalid label key {key!r} in {selector!r}")
    return key


def parse_label_selector(selector: str | None) -> list[LabelRequirement]:
    if not selector:
        return []
    reqs: list[LabelRequirement] = []
    for part in _split_top_level(selector):
        m = re.match(r"^(\S+)\s+(in|notin)\s*\((.*)\)$", part)
        if m:
            values = tuple(v.strip() for v in m.group(3).split(",") if v.strip())
            reqs.append(LabelRequirement(_check_key(m.group(1), selector), m.group(2), values))
            continue
        if part.startswith("!"):
            reqs.append(LabelRequirement(_check_key(part[1:].strip(), selector), "!"))
            continue
        m = re.match(r"^([^=!<>\s]+)\s*(==|=|!=|>|<)\s*(\S*)$", part)
        if m:
            key, op, value = m.groups()
            op = {"==": "=", ">": "gt", "<": "lt"}.get(op, op)
            if op in ("gt", "lt") and not re.fullmatch(r"-?\d+", value):
                raise SelectorError(f"unable to parse requirement: {part!r}: value must be an integer")
            reqs.append(LabelRequirement(_check_key(key, selector), op, (value,)))
            continue
        if re.fullmatch(r"\S+", part):
            reqs.append(LabelRequirement(_check_key(part, selector), "exists"))
            continue
        raise SelectorError(f"unable to parse requirement: {part!r}")
    return reqs


def labels_match(reqs: list[LabelRequirement], obj: dict) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(r.matches(labels) for r in reqs)


# --- field selectors -----------------------------------------------------------------

@dataclass(frozen=True)
class FieldRequirement:
    field: str
    op: str  # = or !=
    value: str


def _split_unescaped(text: str, sep: str) -> list[str]:
    parts, current, i = [], [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            current.append(text[i:i + 2])
            i += 2
            continue
        if ch == sep:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return parts


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", r"\1", value)


def parse_field_selector(selector: str | None) -> list[FieldRequirement]:
    if not selector:
        return []
    reqs = []
    for part in _split_unescaped(selector, ","):
        if not part:
            continue
        m = re.match(r"^([^=!]+)(==|=|!=)(.*)$", part)
        if not m:
            raise SelectorError(f"invalid selector: {selector!r}; can't understand {part!r}")
        field, op, value = m.groups()
        reqs.append(FieldRequirement(field.strip(), "!=" if op == "!=" else "=", _unescape(value)))
    return reqs


def field_value(obj: dict, path: str) -> str:
    """The string value the API server compares for a field label ('' when unset)."""
    current: Any = obj
    for part in path.split("."):
        if not isinstance(current, dict):
            return ""
        current = current.get(part)
    if current is None:
        return ""
    if isinstance(current, bool):
        return "true" if current else "false"
    return str(current)


def make_field_matcher(reqs: list[FieldRequirement], supported: frozenset[str], kind: str,
                       value_of: Callable[[dict, str], str] = field_value) -> Callable[[dict], bool]:
    for r in reqs:
        if r.field not in supported:
            raise SelectorError(f'field label not supported: {r.field}')

    def matches(obj: dict) -> bool:
        for r in reqs:
            actual = value_of(obj, r.field)
            if (actual == r.value) != (r.op == "="):
                return False
        return True

    return matches
