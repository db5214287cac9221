"""OpenAPI documents for kubectl, built from the official v1.32 definitions shipped by
kubernetes-validate (converted back from JSON Schema to OpenAPI form).

kubectl reads /openapi/v3 to decide whether the server validates fields itself
(`fieldValidation` on PATCH operations) and to compute strategic merge patches for
`kubectl apply` (patch strategies and merge keys of the component schemas)."""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any

from . import schema as k8s_schema
from .resources import RESOURCES, ResourceType

_DEFS_PREFIX = "#/$defs/"


def _convert(node: Any, ref_prefix: str) -> Any:
    if isinstance(node, list):
        return [_convert(n, ref_prefix) for n in node]
    if not isinstance(node, dict):
        return node
    if "oneOf" in node and all(isinstance(o, dict) and set(o) == {"type"} for o in node["oneOf"]):
        kinds = {t for o in node["oneOf"] for t in (o["type"] if isinstance(o["type"], list) else [o["type"]])}
        out = {k: _convert(v, ref_prefix) for k, v in node.items() if k != "oneOf"}
        out["type"] = "string"
        if "integer" in kinds:
            out["format"] = "int-or-string"
        return out
    out = {}
    for key, value in node.items():
        if key == "$ref" and isinstance(value, str) and value.startswith(_DEFS_PREFIX):
            out[key] = ref_prefix + value[len(_DEFS_PREFIX):]
        elif key == "type" and isinstance(value, list):
            kinds = [t for t in value if t != "null"]
            out[key] = kinds[0] if len(kinds) == 1 else kinds
        else:
            out[key] = _convert(value, ref_prefix)
    return out


def _refs(node: Any, found: set[str]) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(_DEFS_PREFIX):
            found.add(ref[len(_DEFS_PREFIX):])
        for value in node.values():
            _refs(value, found)
    elif isinstance(node, list):
        for value in node:
            _refs(value, found)


def _closure(names: set[str]) -> set[str]:
    defs = k8s_schema.definitions()["$defs"]
    todo, seen = list(names), set()
    while todo:
        name = todo.pop()
        if name in seen or name not in defs:
            continue
        seen.add(name)
        found: set[str] = set()
        _refs(defs[name], found)
        todo.extend(found - seen)
    return seen


def _param(name: str, where: str = "query", required: bool = False, kind: str = "string") -> dict:
    return {"name": name, "in": where, "required": required, "description": name,
            "schema": {"type": kind, "uniqueItems": True}}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _operation(rt: ResourceType, action: str, verb_id: str, kind_def: str | None,
               gvk_kind: str, params: list[dict], body: str | None = None,
               patch: bool = False) -> dict:
    group_name = rt.group.split(".")[0].capitalize() if rt.group else "Core"
    op: dict[str, Any] = {
        "operationId": f"{verb_id}{group_name}{rt.version.capitalize()}{rt.kind}",
        "parameters": params,
        "responses": {"200": {"description": "OK", "content": {
            "application/json": {"schema": _ref(kind_def)} if kind_def else {"schema": {}}}}},
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": {"group": rt.group, "version": rt.version, "kind": gvk_kind},
    }
    if patch:
        patch_schema = {"schema": _ref("io.k8s.apimachinery.pkg.apis.meta.v1.Patch")}
        op["requestBody"] = {"required": True, "content": {
            "application/apply-patch+yaml": patch_schema,
            "application/json-patch+json": patch_schema,
            "application/merge-patch+json": patch_schema,
            "application/strategic-merge-patch+json": patch_schema,
        }}
    elif body:
        op["requestBody"] = {"required": True, "content": {"*/*": {"schema": _ref(body)}}}
    return op


def _write_params(patch: bool = False) -> list[dict]:
    params = [_param("dryRun"), _param("fieldManager"), _param("fieldValidation")]
    if patch:
        params.append(_param("force", kind="boolean"))
    return params


def _list_params() -> list[dict]:
    return [_param(n) for n in ("allowWatchBookmarks", "continue", "fieldSelector", "labelSelector",
                                "limit", "resourceVersion", "resourceVersionMatch",
                                "sendInitialEvents", "timeoutSeconds", "watch")]


def _paths_for(rt: ResourceType) -> dict[str, dict]:
    kind_def = k8s_schema.definition_name(rt.api_version, rt.kind)
    list_def = k8s_schema.definition_name(rt.api_version, rt.list_kind)
    prefix = f"/apis/{rt.group}/{rt.version}" if rt.group else f"/api/{rt.version}"
    ns_part = "/namespaces/{namespace}" if rt.namespaced else ""
    collection = f"{prefix}{ns_part}/{rt.plural}"
    item = collection + "/{name}"
    common = [_param("pretty")]
    ns_param = [_param("namespace", "path", True)] if rt.namespaced else []
    name_param = [_param("name", "path", True)]
    paths: dict[str, dict] = {}
    if rt.verbs == ("create",):
        paths[collection] = {"parameters": common, "post": _operation(
            rt, "post", "create", kind_def, rt.kind, _write_params(), body=kind_def)}
        return paths
    paths[collection] = {
        "parameters": ns_param + common,
        "get": _operation(rt, "list", "list", list_def, rt.kind, _list_params()),
        "post": _operation(rt, "post", "create", kind_def, rt.kind, _write_params(), body=kind_def),
        "delete": _operation(rt, "deletecollection", "deleteCollection", "io.k8s.apimachinery.pkg.apis.meta.v1.Status",
                             rt.kind, _list_params()),
    }
    if rt.namespaced:
        paths[f"{prefix}/{rt.plural}"] = {"parameters": common, "get": _operation(
            rt, "list", "listForAllNamespaces", list_def, rt.kind, _list_params())}
    paths[item] = {
        "parameters": name_param + ns_param + common,
        "get": _operation(rt, "get", "read", kind_def, rt.kind, []),
        "put": _operation(rt, "put", "replace", kind_def, rt.kind, _write_params(), body=kind_def),
        "patch": _operation(rt, "patch", "patch", kind_def, rt.kind, _write_params(True), patch=True),
        "delete": _operation(rt, "delete", "delete", "io.k8s.apimachinery.pkg.apis.meta.v1.Status",
                             rt.kind, [_param("dryRun"), _param("gracePeriodSeconds", kind="integer"),
                                       _param("propagationPolicy")],
                             body="io.k8s.apimachinery.pkg.apis.meta.v1.DeleteOptions"),
    }
    if "status" in rt.subresources:
        paths[item + "/status"] = {
            "parameters": name_param + ns_param + common,
            "get": _operation(rt, "get", "read", kind_def, rt.kind, []),
            "put": _operation(rt, "put", "replace", kind_def, rt.kind, _write_params(), body=kind_def),
            "patch": _operation(rt, "patch", "patch", kind_def, rt.kind, _write_params(True), patch=True),
        }
    return paths


@functools.lru_cache(maxsize=None)
def group_version_document(group: str, version: str) -> bytes:
    paths: dict[str, dict] = {}
    wanted: set[str] = {"io.k8s.apimachinery.pkg.apis.meta.v1.Patch",
                        "io.k8s.apimachinery.pkg.apis.meta.v1.Status",
                        "io.k8s.apimachinery.pkg.apis.meta.v1.DeleteOptions",
                        "io.k8s.apimachinery.pkg.apis.meta.v1.APIResourceList"}
    for rt in RESOURCES:
        if rt.group != group or rt.version != version:
            continue
        paths.update(_paths_for(rt))
        for kind in (rt.kind, rt.list_kind):
            name = k8s_schema.definition_name(rt.api_version, kind)
            if name:
                wanted.add(name)
    defs = k8s_schema.definitions()["$defs"]
    schemas = {name: _convert(defs[name], "#/components/schemas/")
               for name in sorted(_closure(wanted)) if name in defs}
    doc = {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": f"v{k8s_schema.KUBERNETES_SCHEMA_VERSION}"},
        "paths": paths,
        "components": {"schemas": schemas},
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def gv_path(group: str, version: str) -> str:
    return f"apis/{group}/{version}" if group else f"api/{version}"


@functools.lru_cache(maxsize=1)
def root_document() -> bytes:
    paths = {}
    seen = set()
    for rt in RESOURCES:
        key = (rt.group, rt.version)
        if key in seen:
            continue
        seen.add(key)
        digest = hashlib.sha512(group_version_document(*key)).hexdigest().upper()[:128]
        path = gv_path(*key)
        paths[path] = {"serverRelativeURL": f"/openapi/v3/{path}?hash={digest}"}
    return json.dumps({"paths": paths}, separators=(",", ":")).encode()


def lookup(path: str) -> bytes | None:
    for rt in RESOURCES:
        if gv_path(rt.group, rt.version) == path:
            return group_version_document(rt.group, rt.version)
    return None


@functools.lru_cache(maxsize=1)
def swagger_v2() -> bytes:
    paths: dict[str, dict] = {}
    wanted: set[str] = set()
    for rt in RESOURCES:
        for kind in (rt.kind, rt.list_kind):
            name = k8s_schema.definition_name(rt.api_version, kind)
            if name:
                wanted.add(name)
        for path, item in _paths_for(rt).items():
            paths[path] = {k: {"operationId": v["operationId"],
                               "x-kubernetes-action": v["x-kubernetes-action"],
                               "x-kubernetes-group-version-kind": v["x-kubernetes-group-version-kind"],
                               "responses": {"200": {"description": "OK"}}}
                           for k, v in item.items() if k != "parameters"}
    defs = k8s_schema.definitions()["$defs"]
    doc = {
        "swagger": "2.0",
        "info": {"title": "Kubernetes", "version": f"v{k8s_schema.KUBERNETES_SCHEMA_VERSION}"},
        "paths": paths,
        "definitions": {n: _convert(defs[n], "#/definitions/") for n in sorted(_closure(wanted))},
    }
    return json.dumps(doc, separators=(",", ":")).encode()
