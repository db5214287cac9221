"""Regenerate tests/controlplane/proto_fields.json from a kubectl binary.

Go binaries built with gogo-protobuf embed each generated.proto's FileDescriptorProto,
gzip-compressed. This finds those blobs for the API packages the control plane serves and
writes the message layouts (field number -> [json name, type, label, message type]).

    python -m tests.controlplane.tools.extract_proto_fields [/usr/bin/kubectl]
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import zlib
from pathlib import Path

from tests.controlplane.protobuf import iter_fields

PACKAGES = {
    "k8s.io/api/core/v1/generated.proto": ("", "v1"),
    "k8s.io/api/authentication/v1/generated.proto": ("authentication.k8s.io", "v1"),
    "k8s.io/api/authorization/v1/generated.proto": ("authorization.k8s.io", "v1"),
    "k8s.io/api/coordination/v1/generated.proto": ("coordination.k8s.io", "v1"),
    "k8s.io/api/discovery/v1/generated.proto": ("discovery.k8s.io", "v1"),
    "k8s.io/api/events/v1/generated.proto": ("events.k8s.io", "v1"),
    "k8s.io/api/certificates/v1/generated.proto": ("certificates.k8s.io", "v1"),
    "k8s.io/api/policy/v1/generated.proto": ("policy", "v1"),
    "k8s.io/apimachinery/pkg/apis/meta/v1/generated.proto": ("meta.k8s.io", "v1"),
    "k8s.io/apimachinery/pkg/api/resource/generated.proto": None,
    "k8s.io/apimachinery/pkg/util/intstr/generated.proto": None,
    "k8s.io/apimachinery/pkg/runtime/generated.proto": None,
}


def _messages(blob: bytes, prefix: str, out: dict) -> None:
    fields: dict[str, list] = {}
    name = ""
    map_entry = False
    nested = []
    for number, _, value in iter_fields(blob):
        if number == 1:
            name = value.decode()
        elif number == 2:
            f = {n: v for n, _, v in iter_fields(value)}
            fields[str(f[3])] = [f[1].decode(), f[5], f[4], f.get(6, b"").decode().lstrip(".")]
        elif number == 3:
            nested.append(value)
        elif number == 7:
            opts = {n: v for n, _, v in iter_fields(value)}
            map_entry = bool(opts.get(7))
    full = f"{prefix}.{name}"
    out[full] = {"fields": fields, **({"map_entry": True} if map_entry else {})}
    for n in nested:
        _messages(n, full, out)


def extract(binary: Path) -> dict:
    data = binary.read_bytes()
    table: dict = {"__groups__": {}}
    for m in re.finditer(rb"\x1f\x8b\x08\x00\x00\x00\x00\x00", data):
        try:
            blob = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[m.start():m.start() + 4_000_000])
        except zlib.error:
            continue
        try:
            top = list(iter_fields(blob))
        except ValueError:
            continue
        names = [v for n, _, v in top if n == 1]
        if not names or names[0].decode(errors="replace") not in PACKAGES:
            continue
        package = next(v.decode() for n, _, v in top if n == 2)
        group = PACKAGES[names[0].decode()]
        if group is not None:
            table["__groups__"][package] = list(group)
        for n, _, v in top:
            if n == 4:
                _messages(v, package, table)
    return table


def main() -> int:
    binary = Path(sys.argv[1] if len(sys.argv) > 1 else (shutil.which("kubectl") or "kubectl"))
    table = extract(binary.resolve())
    out = Path(__file__).resolve().parent.parent / "proto_fields.json"
    out.write_text(json.dumps(table, sort_keys=True, separators=(",", ":")) + "\n")
    print(f"{out}: {len(table) - 1} messages from {binary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
