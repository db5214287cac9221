"""The JSON shape every Kubernetes object must have, checked before any field is read.

An object decoded from YAML can hold things JSON (and so the API server) cannot:
mapping keys that are numbers, booleans or null, dates, binary, NaN and infinities,
integers far beyond int64, structures nested hundreds of levels deep or referring to
themselves. Code written against Kubernetes objects assumes none of that (a key is a
string, a number fits a Go int64), so ``check_shape`` runs first, iteratively (no
recursion, so no RecursionError), and reports each problem with the field's path the
way kubectl prints it.
"""

from __future__ import annotations

import math
import re

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
MAX_DEPTH = 32
MAX_ERRORS = 20  # enough to fix a file in one edit; never a flood

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def child_path(parent: str, key: object) -> str:
    if isinstance(key, int) and not isinstance(key, bool):
        return f"{parent}[{key}]"
    text = key if isinstance(key, str) else repr(key)
    if isinstance(key, str) and _IDENT.match(text):
        return f"{parent}.{text}" if parent else text
    shown = text if len(text) <= 60 else text[:57] + "..."
    return f"{parent}[{shown}]"


def _describe(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_shape(obj: object, *, max_depth: int = MAX_DEPTH, root: str = "") -> list[tuple[str, str]]:
    """``(field, message)`` for each place ``obj`` is not plain JSON within the limits."""
    errors: list[tuple[str, str]] = []
    # (path, value, depth); depth counts containers from the root.
    stack: list[tuple[str, object, int]] = [(root, obj, 0)]
    while stack and len(errors) < MAX_ERRORS:
        path, value, depth = stack.pop()
        if isinstance(value, dict):
            if depth >= max_depth:
                errors.append((path, f"nested deeper than {max_depth} levels"))
                continue
            children = []
            for key, item in value.items():
                if not isinstance(key, str):
                    errors.append((child_path(path, key), f"mapping keys must be strings, got {_describe(key)} "
                                   "(quote it in YAML)"))
                    continue
                children.append((child_path(path, key), item, depth + 1))
            stack.extend(reversed(children))
        elif isinstance(value, list):
            if depth >= max_depth:
                errors.append((path, f"nested deeper than {max_depth} levels"))
                continue
            stack.extend(reversed([(f"{path}[{i}]", item, depth + 1) for i, item in enumerate(value)]))
        elif value is None or isinstance(value, (str, bool)):
            continue
        elif isinstance(value, int):
            if not INT64_MIN <= value <= INT64_MAX:
                errors.append((path, f"integer {_describe(value)} out of range: must fit in 64 bits"))
        elif isinstance(value, float):
            if not math.isfinite(value):
                errors.append((path, f"invalid number {value!r}: must be finite"))
        else:
            errors.append((path, f"unsupported value {_describe(value)} of type {type(value).__name__}: only "
                           "strings, numbers, booleans, null, lists and mappings (quote dates in YAML)"))
    return errors
