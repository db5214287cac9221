"""The official Kubernetes object schemas, as shipped by the `kubernetes-validate` package.

kubernetes-validate carries the upstream OpenAPI definitions converted to JSON Schema
(draft 2020-12), with the `x-kubernetes-*` extensions kept. This module uses them to:
  * validate objects (`validate_object`) — in tests, every object the agent writes;
  * find a field's patch strategy / merge key for strategic merge patch;
  * tell unknown fields (strict field validation) from type errors on writes;
  * build the OpenAPI v3 documents that kubectl reads (see openapi.py).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

KUBERNETES_SCHEMA_VERSION = "1.32.0"


class SchemaUnavailable(RuntimeError):
    pass


def _schema_root() -> Path:
    try:
        import kubernetes_validate  # noqa: PLC0415 - optional test dependency
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SchemaUnavailable(
            "the official Kubernetes schemas come from the 'kubernetes-validate' package; "
            "install it into the venv (pip install kubernetes-validate)"
        ) from exc
    return Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"


def _version_folder(root: Path) -> str:
    """v1.32.0-local if shipped, else the nearest version kubernetes-validate has (newer
    preferred): schema releases drop old versions over time."""
    wanted = f"v{KUBERNETES_SCHEMA_VERSION}-local"
    if (root / wanted).is_dir():
        return wanted

    def minor(name: str) -> int:
        return int(name[1:].split(".")[1])

    available = sorted((p.name for p in root.iterdir()
                        if p.name.startswith("v1.") and p.name.endswith("-local")), key=minor)
    if not available:
        raise SchemaUnavailable(f"{root} holds no schema versions")
    target = minor(wanted)
    newer = [n for n in available if minor(n) >= target]
    return newer[0] if newer else available[-1]


@functools.lru_cache(maxsize=2)
def definitions(strict: bool = False) -> dict[str, Any]:
    """The `$defs` document (name -> schema) for Kubernetes v1.32 (or the nearest shipped)."""
    root = _schema_root()
    folder = _version_folder(root) + ("-strict" if strict else "")
    path = root / folder / "_definitions.json"
    if not path.exists():
        raise SchemaUnavailable(f"{path} is missing from kubernetes-validate")
    with path.open() as fh:
        return json.load(fh)


@functools.lru_cache(maxsize=1)
def gvk_index() -> dict[tuple[str, str, str], str]:
    """(group, version, kind) -> definition name."""
    index: dict[tuple[str, str, str], str] = {}
    for name, schema in definitions()["$defs"].items():
        for gvk in schema.get("x-kubernetes-group-version-kind", []):
            key = (gvk["group"], gvk["version"], gvk["kind"])
            # DeleteOptions and friends are listed under every group; the first wins.
            index.setdefault(key, name)
    return index


def split_api_version(api_version: str) -> tuple[str, str]:
    if "/" in api_version:
        group, version = api_version.split("/", 1)
        return group, version
    return "", api_version


def definition_name(api_version: str, kind: str) -> str | None:
    group, version = split_api_version(api_version)
    return gvk_index().get((group, version, kind))


def resolve(schema: dict | None) -> dict:
    """Follow `$ref` (and single-element allOf) to the referenced definition."""
    defs = definitions()["$defs"]
    seen = 0
    while schema:
        ref = schema.get("$ref")
        if ref is None and len(schema.get("allOf", [])) == 1:
            ref = schema["allOf"][0].get("$ref")
        if not ref:
            return schema
        schema = defs.get(ref.rsplit("/", 1)[-1], {})
        seen += 1
        if seen > 50:  # pragma: no cover - malformed schema
            break
    return schema or {}


@dataclass(frozen=True)
class FieldPatchInfo:
    schema: dict
    strategy: tuple[str, ...]
    merge_key: str | None
    atomic_map: bool


def field_info(parent_schema: dict, field: str) -> FieldPatchInfo:
    parent = resolve(parent_schema)
    prop = (parent.get("properties") or {}).get(field)
    if prop is None:
        extra = parent.get("additionalProperties")
        prop = extra if isinstance(extra, dict) else {}
    strategy = tuple(s for s in (prop.get("x-kubernetes-patch-strategy") or "").split(",") if s)
    merged = resolve(prop)
    return FieldPatchInfo(
        schema=prop,
        strategy=strategy,
        merge_key=prop.get("x-kubernetes-patch-merge-key"),
        atomic_map=prop.get("x-kubernetes-map-type") == "atomic"
        or merged.get("x-kubernetes-map-type") == "atomic",
    )


def items_schema(list_schema: dict) -> dict:
    return resolve(list_schema).get("items") or list_schema.get("items") or {}


def kind_schema(api_version: str, kind: str) -> dict:
    name = definition_name(api_version, kind)
    return definitions()["$defs"].get(name, {}) if name else {}


# --- validation ----------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _validator(def_name: str, strict: bool):
    import jsonschema  # noqa: PLC0415
    from referencing import Registry, Resource  # noqa: PLC0415

    doc = definitions(strict)
    base = doc.get("$id", "https://kubernetes.io/api/_definitions.json")
    registry = Registry().with_resource(base, Resource.from_contents(doc))
    schema = {"$ref": f"{base}#/$defs/{def_name}"}
    return jsonschema.Draft202012Validator(schema, registry=registry)


def _path_text(path: Iterator[Any]) -> str:
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + str(part)
    return text


@dataclass(frozen=True)
class SchemaProblem:
    path: str
    message: str
    unknown_field: bool
    parts: tuple = ()
    missing_required: bool = False

    def __str__(self) -> str:
        return f"{self.path or '<root>'}: {self.message}"


def _leaf_errors(error) -> Iterator[Any]:
    # oneOf/anyOf failures carry the real reasons in their context.
    if error.context:
        for sub in error.context:
            yield from _leaf_errors(sub)
    else:
        yield error


def check_object(obj: dict, strict: bool = True) -> list[SchemaProblem]:
    """Schema problems of one object; unknown fields flagged separately (strict schemas)."""
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    if not api_version or not kind:
        return [SchemaProblem("", "apiVersion and kind are required", False)]
    name = definition_name(api_version, kind)
    if name is None:
        return [SchemaProblem("", f"no schema for {api_version} {kind} in Kubernetes "
                                  f"v{KUBERNETES_SCHEMA_VERSION}", False)]
    problems: list[SchemaProblem] = []
    for err in _validator(name, strict).iter_errors(obj):
        if err.validator == "additionalProperties":
            allowed = set((err.schema.get("properties") or {}).keys())
            extras = sorted(k for k in (err.instance or {}) if k not in allowed)
            for extra in extras:
                parts = tuple(err.absolute_path) + (extra,)
                path = _path_text(parts)
                problems.append(SchemaProblem(path, f'unknown field "{path}"', True, parts))
            continue
        if err.validator == "required":
            missing = [r for r in err.validator_value if r not in (err.instance or {})]
            for field in missing:
                parts = tuple(err.absolute_path) + (field,)
                problems.append(SchemaProblem(_path_text(parts), "Required value", False, parts, True))
            continue
        if err.validator in ("oneOf", "anyOf"):
            # Quantity / IntOrString: report once with the offending value.
            problems.append(SchemaProblem(_path_text(err.absolute_path),
                                          f"invalid value {err.instance!r}", False))
            continue
        problems.append(SchemaProblem(_path_text(err.absolute_path), err.message, False))
    return problems


def prune(obj: Any, parts: tuple) -> None:
    """Remove the field at `parts` (what decoding does with unknown fields)."""
    for part in parts[:-1]:
        try:
            obj = obj[part]
        except (KeyError, IndexError, TypeError):
            return
    if isinstance(obj, dict):
        obj.pop(parts[-1], None)


def validate_object(obj: dict) -> list[str]:
    """Validate an object against the official Kubernetes v1.32 schema (strict: unknown
    fields are errors). Returns human-readable problems; an empty list means valid."""
    return [str(p) for p in check_object(obj, strict=True)]
