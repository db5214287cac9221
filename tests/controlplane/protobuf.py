"""Decoding of Kubernetes protobuf request bodies.

kubectl v1.32 sends protobuf (`application/vnd.kubernetes.protobuf`) for objects built by
its typed clients (`kubectl create configmap|secret|namespace|serviceaccount|token|...`).
The body is the magic `k8s\\0` followed by a runtime.Unknown envelope whose `raw` field
holds the object message. Message layouts (field numbers, names, types) come from
`proto_fields.json`, extracted from the descriptors kubectl registers for the
k8s.io/api and apimachinery generated.proto files (see tools/extract_proto_fields.py).
Field names in those protos are the JSON names, so decoding yields the JSON object.

Responses stay JSON: kubectl's Accept header lists application/json too."""

from __future__ import annotations

import base64
import datetime as dt
import functools
import json
import struct
from pathlib import Path
from typing import Any

MAGIC = b"k8s\x00"

# FieldDescriptorProto.Type values
_DOUBLE, _FLOAT, _INT64, _UINT64, _INT32, _FIXED64, _FIXED32, _BOOL, _STRING = 1, 2, 3, 4, 5, 6, 7, 8, 9
_MESSAGE, _BYTES, _UINT32, _ENUM, _SFIXED32, _SFIXED64, _SINT32, _SINT64 = 11, 12, 13, 14, 15, 16, 17, 18
_REPEATED = 3


class ProtobufError(ValueError):
    pass


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ProtobufError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 70:
            raise ProtobufError("varint too long")


def iter_fields(buf: bytes):
    """Yield (field number, wire type, raw value) of one message."""
    pos = 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = read_varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = read_varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
            if len(value) != length:
                raise ProtobufError("truncated length-delimited field")
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ProtobufError(f"unsupported wire type {wire}")
        yield number, wire, value


@functools.lru_cache(maxsize=1)
def message_table() -> dict[str, dict]:
    with (Path(__file__).parent / "proto_fields.json").open() as fh:
        return json.load(fh)


def _signed(value: int, bits: int) -> int:
    return value - (1 << bits) if value >= 1 << (bits - 1) else value


def _scalar(ftype: int, wire: int, raw: Any) -> Any:
    if ftype in (_INT64, _UINT64, _UINT32, _ENUM):
        return _signed(raw, 64) if ftype == _INT64 else raw
    if ftype == _INT32:
        return _signed(raw & 0xFFFFFFFFFFFFFFFF, 64)
    if ftype == _BOOL:
        return bool(raw)
    if ftype == _SINT32 or ftype == _SINT64:
        return (raw >> 1) ^ -(raw & 1)
    if ftype == _STRING:
        return raw.decode()
    if ftype == _BYTES:
        return base64.b64encode(raw).decode()
    if ftype == _DOUBLE:
        return struct.unpack("<d", raw)[0]
    if ftype == _FLOAT:
        return struct.unpack("<f", raw)[0]
    if ftype in (_FIXED64, _SFIXED64):
        return struct.unpack("<q" if ftype == _SFIXED64 else "<Q", raw)[0]
    if ftype in (_FIXED32, _SFIXED32):
        return struct.unpack("<i" if ftype == _SFIXED32 else "<I", raw)[0]
    raise ProtobufError(f"unsupported field type {ftype}")


def _time(fields: dict[str, Any], micro: bool) -> str | None:
    seconds, nanos = int(fields.get("seconds", 0)), int(fields.get("nanos", 0))
    if seconds == 0 and nanos == 0:
        return None
    when = dt.datetime.fromtimestamp(seconds, dt.timezone.utc) + dt.timedelta(microseconds=nanos // 1000)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ")


def _special(type_name: str, value: dict[str, Any]) -> Any:
    if type_name == "k8s.io.apimachinery.pkg.apis.meta.v1.Time":
        return _time(value, micro=False)
    if type_name == "k8s.io.apimachinery.pkg.apis.meta.v1.MicroTime":
        return _time(value, micro=True)
    if type_name == "k8s.io.apimachinery.pkg.api.resource.Quantity":
        return value.get("string")
    if type_name == "k8s.io.apimachinery.pkg.util.intstr.IntOrString":
        return value.get("strVal", "") if int(value.get("type", 0)) == 1 else int(value.get("intVal", 0))
    if type_name == "k8s.io.apimachinery.pkg.runtime.RawExtension":
        raw = value.get("raw")
        return json.loads(base64.b64decode(raw)) if raw else None
    if type_name == "k8s.io.apimachinery.pkg.apis.meta.v1.Duration":
        return f"{int(value.get('duration', 0)) / 1e9}s"
    return value


_SPECIAL = {
    "k8s.io.apimachinery.pkg.apis.meta.v1.Time", "k8s.io.apimachinery.pkg.apis.meta.v1.MicroTime",
    "k8s.io.apimachinery.pkg.api.resource.Quantity", "k8s.io.apimachinery.pkg.util.intstr.IntOrString",
    "k8s.io.apimachinery.pkg.runtime.RawExtension", "k8s.io.apimachinery.pkg.apis.meta.v1.Duration",
}


def _is_zero(value: Any) -> bool:
    # Go marshals non-pointer zero values; the JSON form omits them (omitempty).
    return value in ("", 0, False, None) or value == {} or value == []


def decode_message(buf: bytes, type_name: str, *, keep_zero: bool = False) -> dict[str, Any]:
    table = message_table()
    desc = table.get(type_name)
    if desc is None:
        raise ProtobufError(f"no layout for protobuf message {type_name}")
    out: dict[str, Any] = {}
    fields = desc["fields"]
    for number, wire, raw in iter_fields(buf):
        spec = fields.get(str(number))
        if spec is None:
            continue  # unknown field: skipped like proto2 decoders do
        name, ftype, label, sub = spec
        if ftype == _MESSAGE:
            sub_desc = table.get(sub, {})
            if sub_desc.get("map_entry"):
                entry = decode_message(raw, sub, keep_zero=True)
                out.setdefault(name, {})[entry.get("key", "")] = entry.get("value")
                continue
            value: Any = decode_message(raw, sub, keep_zero=sub in _SPECIAL)
            if sub in _SPECIAL:
                value = _special(sub, value)
        elif wire == 2 and ftype not in (_STRING, _BYTES):
            # A packed repeated scalar field.
            values, pos = [], 0
            while pos < len(raw):
                item, pos = read_varint(raw, pos)
                values.append(_scalar(ftype, 0, item))
            out.setdefault(name, []).extend(values)
            continue
        else:
            value = _scalar(ftype, wire, raw)
        if label == _REPEATED:
            out.setdefault(name, []).append(value)
        else:
            out[name] = value
    if not keep_zero:
        out = {k: v for k, v in out.items() if not _is_zero(v)}
    return out


def _message_for(api_version: str, kind: str) -> str:
    group, _, version = api_version.rpartition("/")
    table = message_table()
    packages = [p for p, g in table["__groups__"].items() if g == [group, version]]
    for package in packages + ["k8s.io.apimachinery.pkg.apis.meta.v1"]:
        name = f"{package}.{kind}"
        if name in table:
            return name
    raise ProtobufError(f"no protobuf layout for {api_version} {kind}")


def decode_k8s(body: bytes) -> dict[str, Any]:
    """A Kubernetes protobuf body (magic + runtime.Unknown) -> the JSON object."""
    if not body.startswith(MAGIC):
        raise ProtobufError("protobuf body lacks the k8s magic prefix")
    envelope = {n: v for n, _, v in iter_fields(body[len(MAGIC):])}
    type_meta = {n: v.decode() for n, _, v in iter_fields(envelope.get(1, b""))}
    api_version, kind = type_meta.get(1, ""), type_meta.get(2, "")
    obj = decode_message(envelope.get(2, b""), _message_for(api_version, kind))
    obj["apiVersion"], obj["kind"] = api_version, kind
    return obj
