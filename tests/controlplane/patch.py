"""Patch application: JSON merge patch (RFC 7386), JSON patch (RFC 6902) and strategic
merge patch, whose list strategies and merge keys come from the official schema
(`x-kubernetes-patch-strategy` / `x-kubernetes-patch-merge-key`)."""

from __future__ import annotations

from typing import Any

from . import schema as k8s_schema


def _clone(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value


class PatchError(ValueError):
    """The patch cannot be applied (the API answers 422 or 400)."""


MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
PATCH_TYPES = (MERGE_PATCH, STRATEGIC_MERGE_PATCH, JSON_PATCH, APPLY_PATCH)


# --- RFC 7386 -----------------------------------------------------------------------

def merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return _clone(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# --- RFC 6902 -----------------------------------------------------------------------

def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, parts: list[str], path: str) -> Any:
    for part in parts:
        if isinstance(doc, dict):
            if part not in doc:
                raise PatchError(f"path {path!r} not found (missing {part!r})")
            doc = doc[part]
        elif isinstance(doc, list):
            try:
                doc = doc[int(part)]
            except (ValueError, IndexError) as exc:
                raise PatchError(f"path {path!r}: bad index {part!r}") from exc
        else:
            raise PatchError(f"path {path!r} traverses a scalar")
    return doc


def _add(doc: Any, parts: list[str], value: Any, path: str) -> Any:
    if not parts:
        return value
    parent = _walk(doc, parts[:-1], path)
    last = parts[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        if last == "-":
            parent.append(value)
        else:
            try:
                index = int(last)
            except ValueError as exc:
                raise PatchError(f"path {path!r}: bad index {last!r}") from exc
            if index < 0 or index > len(parent):
                raise PatchError(f"path {path!r}: index {index} out of range")
            parent.insert(index, value)
    else:
        raise PatchError(f"path {path!r}: parent is not a container")
    return doc


def _remove(doc: Any, parts: list[str], path: str) -> Any:
    if not parts:
        raise PatchError("cannot remove the whole document")
    parent = _walk(doc, parts[:-1], path)
    last = parts[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise PatchError(f"path {path!r} not found for remove")
        return parent.pop(last)
    if isinstance(parent, list):
        try:
            return parent.pop(int(last))
        except (ValueError, IndexError) as exc:
            raise PatchError(f"path {path!r}: bad index for remove") from exc
    raise PatchError(f"path {path!r}: parent is not a container")


def json_patch(target: Any, operations: Any) -> Any:
    if not isinstance(operations, list):
        raise PatchError("a JSON patch must be a list of operations")
    doc = _clone(target)
    for op in operations:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise PatchError(f"invalid JSON patch operation {op!r}")
        kind, path = op["op"], op["path"]
        parts = _pointer(path)
        if kind == "add":
            doc = _add(doc, parts, _clone(op.get("value")), path)
        elif kind == "remove":
            _remove(doc, parts, path)
        elif kind == "replace":
            _walk(doc, parts, path)  # must exist
            if not parts:
                doc = _clone(op.get("value"))
            else:
                _remove(doc, parts, path)
                doc = _add(doc, parts, _clone(op.get("value")), path)
        elif kind in ("move", "copy"):
            source = op.get("from", "")
            value = _clone(_walk(doc, _pointer(source), source))
            if kind == "move":
                _remove(doc, _pointer(source), source)
            doc = _add(doc, parts, value, path)
        elif kind == "test":
            if _walk(doc, parts, path) != op.get("value"):
                raise PatchError(f"test operation failed at {path!r}")
        else:
            raise PatchError(f"unknown JSON patch operation {kind!r}")
    return doc


# --- strategic merge patch ------------------------------------------------------------

_DIRECTIVE = "$patch"
_RETAIN_KEYS = "$retainKeys"
_SET_ORDER = "$setElementOrder/"
_DELETE_PRIMITIVE = "$deleteFromPrimitiveList/"


def _strip_directives(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_directives(v) for k, v in value.items()
                if not k.startswith("$") and v is not None}
    if isinstance(value, list):
        return [_strip_directives(v) for v in value
                if not (isinstance(v, dict) and v.get(_DIRECTIVE) == "delete")]
    return value


def _merge_map(original: dict, patch: dict, schema: dict) -> dict | None:
    directive = patch.get(_DIRECTIVE)
    if directive == "delete":
        return None
    if directive == "replace":
        return _strip_directives({k: v for k, v in patch.items() if k != _DIRECTIVE})
    if directive is not None:
        raise PatchError(f"unknown patch directive {directive!r}")
    result = dict(original)
    deferred: list[tuple[str, Any]] = []
    for key, value in patch.items():
        if key in (_DIRECTIVE, _RETAIN_KEYS):
            continue
        if key.startswith(_SET_ORDER) or key.startswith(_DELETE_PRIMITIVE):
            deferred.append((key, value))
            continue
        if value is None:
            result.pop(key, None)
            continue
        info = k8s_schema.field_info(schema, key)
        current = result.get(key)
        if isinstance(value, dict):
            if info.atomic_map or not isinstance(current, dict):
                merged = _merge_map({}, value, info.schema)
            else:
                merged = _merge_map(current, value, info.schema)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
        elif isinstance(value, list):
            if "merge" in info.strategy:
                result[key] = _merge_list(current if isinstance(current, list) else [],
                                          value, info)
            else:
                result[key] = _strip_directives(value)
        else:
            result[key] = value
    for key, value in deferred:
        if key.startswith(_DELETE_PRIMITIVE):
            field = key[len(_DELETE_PRIMITIVE):]
            if isinstance(result.get(field), list):
                result[field] = [v for v in result[field] if v not in (value or [])]
        else:
            field = key[len(_SET_ORDER):]
            info = k8s_schema.field_info(schema, field)
            if isinstance(result.get(field), list) and isinstance(value, list):
                result[field] = _apply_order(result[field], value, info.merge_key)
    retain = patch.get(_RETAIN_KEYS)
    if isinstance(retain, list):
        result = {k: v for k, v in result.items() if k in retain}
    return result


def _merge_list(original: list, patch: list, info: k8s_schema.FieldPatchInfo) -> list:
    if any(isinstance(p, dict) and p.get(_DIRECTIVE) == "replace" for p in patch):
        return _strip_directives([p for p in patch
                                  if not (isinstance(p, dict) and p.get(_DIRECTIVE) == "replace")])
    key = info.merge_key
    if key is None:
        # A merged primitive list (finalizers): union, keeping the original order.
        result = list(original)
        for item in patch:
            if item not in result:
                result.append(item)
        return result
    item_schema = k8s_schema.items_schema(info.schema)
    result = [_clone(i) for i in original]
    for item in patch:
        if not isinstance(item, dict):
            raise PatchError(f"list merged by key {key!r} got a non-object item {item!r}")
        if key not in item:
            raise PatchError(f"map: {item!r} does not contain declared merge key: {key}")
        index = next((i for i, cur in enumerate(result)
                      if isinstance(cur, dict) and cur.get(key) == item[key]), None)
        if item.get(_DIRECTIVE) == "delete":
            result = [cur for cur in result
                      if not (isinstance(cur, dict) and cur.get(key) == item[key])]
            continue
        if index is None:
            merged = _merge_map({}, item, item_schema)
            if merged is not None:
                result.append(merged)
        else:
            merged = _merge_map(result[index], item, item_schema)
            if merged is None:
                result.pop(index)
            else:
                result[index] = merged
    return result


def _apply_order(items: list, order: list, merge_key: str | None) -> list:
    def identity(item: Any) -> Any:
        if isinstance(item, dict):
            return item.get(merge_key) if merge_key else None
        return item

    positions: dict[Any, int] = {}
    for i, wanted in enumerate(order):
        ident = identity(wanted)
        if ident is not None:
            positions.setdefault(ident, i)
    ordered = sorted((i for i in items if identity(i) in positions),
                     key=lambda i: positions[identity(i)])
    rest = [i for i in items if identity(i) not in positions]
    return ordered + rest


def strategic_merge_patch(target: dict, patch: Any, api_version: str, kind: str) -> dict:
    if not isinstance(patch, dict):
        raise PatchError("a strategic merge patch must be a JSON object")
    schema = k8s_schema.kind_schema(api_version, kind)
    merged = _merge_map(target, patch, schema)
    if merged is None:
        raise PatchError("a strategic merge patch cannot delete the whole object")
    return merged
