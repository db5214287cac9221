"""Plan -> one nfnetlink batch (pure: bytes out, nothing sent)."""

from __future__ import annotations

import socket
import struct
from functools import lru_cache

from . import nfnl
from .diff import Plan
from .ruleset import ElementKey, ElementValue, SetSpec
from .stmts import PROTO_NUMBERS, NumgenVmap, Rule, Verdict, encode_rule, rule_text

_FIELDS = {
    "ipv4_addr": (nfnl.TYPE_IPADDR, 4),
    "inet_proto": (nfnl.TYPE_INET_PROTOCOL, 1),
    "inet_service": (nfnl.TYPE_INET_SERVICE, 2),
    "mark": (nfnl.TYPE_MARK, 4),  # endpoint slots: numgen's output, host byte order
}
_VERDICT_CODES = {"goto": nfnl.NFT_GOTO, "jump": nfnl.NFT_JUMP, "drop": nfnl.NF_DROP,
                  "accept": nfnl.NF_ACCEPT, "return": nfnl.NFT_RETURN}


def key_layout(key: tuple[str, ...]) -> tuple[int, int]:
    """(nft datatype id, key length) of a set key; concatenations pad fields to 32 bits."""
    if len(key) == 1:
        return _FIELDS[key[0]]
    kind = nfnl.concat_type(*(_FIELDS[f][0] for f in key))
    return kind, sum((_FIELDS[f][1] + 3) & ~3 for f in key)


def encode_key(fields: tuple[str, ...], key: ElementKey) -> bytes:
    concat = len(fields) > 1
    out = []
    for kind, value in zip(fields, key):
        if kind == "ipv4_addr":
            out.append(_inet(value))
        elif kind == "inet_proto":
            out.append(bytes((PROTO_NUMBERS[value], 0, 0, 0)) if concat else bytes((PROTO_NUMBERS[value],)))
        elif kind == "inet_service":
            out.append(struct.pack(">H", value) + (b"\0\0" if concat else b""))
        elif kind == "mark":
            out.append(struct.pack("=I", value))
        else:  # pragma: no cover - SetSpec keys are fixed in ruleset.py
            raise ValueError(f"unknown key field {kind}")
    return b"".join(out)


@lru_cache(maxsize=1 << 18)
def _verdict_data(kind: str, chain: str | None) -> bytes:
    return nfnl.verdict_data(2, _VERDICT_CODES[kind], chain)


@lru_cache(maxsize=1024)
def _proto_port(proto: str, port: int) -> bytes:
    return bytes((PROTO_NUMBERS[proto], 0, 0, 0)) + struct.pack(">H", port) + b"\0\0"


def _inet(ip: str) -> bytes:
    return socket.inet_pton(socket.AF_INET, ip)


_SLOT = struct.Struct("=I").pack
# the keys the ruleset uses, encoded without the generic per-field loop
_FAST_KEYS = {
    ("ipv4_addr", "inet_proto", "inet_service"): lambda k: _inet(k[0]) + _proto_port(k[1], k[2]),
    ("inet_proto", "inet_service"): lambda k: _proto_port(k[0], k[1]),
    ("ipv4_addr", "ipv4_addr"): lambda k: _inet(k[0]) + _inet(k[1]),
    ("ipv4_addr",): lambda k: _inet(k[0]),
    ("ipv4_addr", "inet_proto", "inet_service", "mark"): lambda k: _inet(k[0]) + _proto_port(k[1], k[2]) + _SLOT(k[3]),
    ("inet_proto", "inet_service", "mark"): lambda k: _proto_port(k[0], k[1]) + _SLOT(k[2]),
}
# NFTA_SET_ELEM_DATA holding an 8-byte "address . port" value: fixed framing
_ADDR_PORT_DATA = nfnl.nest(2, nfnl.attr(1, b"\0" * 8))[:-8]


def _value(value: ElementValue) -> bytes:
    if value is None:
        return b""
    if isinstance(value, Verdict):
        return _verdict_data(value.kind, value.chain)
    ip, port = value  # data maps: address . port
    return _ADDR_PORT_DATA + _inet(ip) + struct.pack(">H", port) + b"\0\0"


def encode_element(spec: SetSpec, key: ElementKey, value: ElementValue) -> bytes:
    fast = _FAST_KEYS.get(spec.key)
    raw_key = fast(key) if fast is not None else encode_key(spec.key, key)
    return nfnl.element_raw(raw_key, _value(value))


def encode_elements(spec: SetSpec, items: list[tuple[ElementKey, ElementValue]]) -> list[bytes]:
    """Many elements of one set; the common shapes skip the generic per-element path."""
    pton, af = socket.inet_pton, socket.AF_INET
    if spec.key == ("ipv4_addr", "ipv4_addr") and all(value is None for _, value in items):
        # hairpin pairs: 8-byte key, no data; the framing is the same for every element
        head = nfnl.element_raw(b"\0" * 8)[:-8]
        return [head + pton(af, a) + pton(af, b) for (a, b), _ in items]
    if spec.key == ("ipv4_addr", "inet_proto", "inet_service", "mark") and spec.data:
        # endpoint slots: 16-byte key, 8-byte value
        head = nfnl.element_raw(b"\0" * 16, _ADDR_PORT_DATA + b"\0" * 8)
        key_head, data_head = head[:12], _ADDR_PORT_DATA
        pack_port, slot = struct.Struct(">H").pack, _SLOT
        return [key_head + pton(af, ip) + _proto_port(proto, port) + slot(n) + data_head
                + pton(af, value[0]) + pack_port(value[1]) + b"\0\0"
                for (ip, proto, port, n), value in items]
    return [encode_element(spec, key, value) for key, value in items]


class _Context:
    """Lets a statement add an anonymous verdict map ahead of its rule."""

    def __init__(self, batch: nfnl.Batch, table: str) -> None:
        self.batch = batch
        self.table = table

    def anonymous_vmap(self, elements: list[bytes], size: int) -> int:
        set_id = self.batch.new_set(
            self.table, "__map%d",
            flags=nfnl.SET_F_ANONYMOUS | nfnl.SET_F_CONSTANT | nfnl.SET_F_MAP,
            key_type=nfnl.TYPE_INTEGER, key_len=4, verdict_map=True, size=size,
            key_byteorder=nfnl.BYTEORDER_HOST)
        self.batch.set_elements(self.table, "__map%d", elements, set_id=set_id)
        return set_id


def _rule_what(index: int, chain: str, rules: tuple[Rule, ...]) -> str:
    return f"add rule to chain {chain}: {rule_text(rules[index])}"


def new_set(batch: nfnl.Batch, table: str, spec: SetSpec) -> None:
    key_type, key_len = key_layout(spec.key)
    flags = 0
    if spec.verdict_map:
        flags |= nfnl.SET_F_MAP
    if spec.dynamic:
        flags |= nfnl.SET_F_TIMEOUT | nfnl.SET_F_EVAL
    if spec.data:
        flags |= nfnl.SET_F_MAP
    byteorder = nfnl.BYTEORDER_BIG if len(spec.key) == 1 else 0
    batch.new_set(table, spec.name, flags=flags, key_type=key_type, key_len=key_len,
                  verdict_map=spec.verdict_map, data=key_layout(spec.data) if spec.data else None,
                  key_byteorder=byteorder)


def encode_plan(table: str, plan: Plan, first_seq: int = 1) -> nfnl.Batch:
    batch = nfnl.Batch(first_seq=first_seq)
    ctx = _Context(batch, table)
    if plan.delete_table:
        batch.delete_table(table)
    if plan.ensure_table:
        batch.new_table(table)
    for spec in plan.new_sets:
        new_set(batch, table, spec)
    for chain in plan.new_chains:
        batch.new_chain(table, chain.name, chain.hook)
    for name in plan.flush_chains:
        batch.flush_chain(table, name)
    for name in plan.flush_sets:
        batch.flush_set(table, name)
    for set_name, keys in plan.del_elements.items():
        spec = plan.set_specs[set_name]
        batch.set_elements(table, set_name, [encode_element(spec, k, None) for k in keys], delete=True)
    table_attr = nfnl.strz(1, table)
    for chain in plan.rules:
        head = table_attr + nfnl.strz(2, chain.name)
        rules = chain.rules
        if chain.encoded is not None:
            batch.new_rules(head, chain.encoded, (_rule_what, chain.name, rules))
        elif any(isinstance(stmt, NumgenVmap) for rule in rules for stmt in rule):
            # anonymous maps add their own messages between the rules (and get new set
            # ids in every batch, so this chain's encoding cannot be reused)
            for rule in rules:
                exprs = encode_rule(rule, ctx)
                batch.new_rule_raw(head, exprs, f"add rule to chain {chain.name}: {rule_text(rule)}")
        else:
            encoded = tuple([encode_rule(rule, ctx) for rule in rules])
            object.__setattr__(chain, "encoded", encoded)  # a cache, see Chain.encoded
            batch.new_rules(head, encoded, (_rule_what, chain.name, rules))
    for set_name, items in plan.add_elements.items():
        batch.set_elements(table, set_name, encode_elements(plan.set_specs[set_name], items))
    for name in plan.del_chains:
        batch.delete_chain(table, name)
    for name in plan.del_sets:
        batch.delete_set(table, name)
    return batch
