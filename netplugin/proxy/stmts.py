"""Rule statements: a tiny, hashable IR for nft rules.

Statements are named tuples of plain values: immutable, hashable and cheap to create.
Each kind ends with a ``tag`` field so that statements of different kinds never compare
equal as tuples.

A rule is a tuple of statements. Statements compare by value, so the ruleset diff can
tell whether a chain changed by comparing tuples, and each statement knows how to
encode itself as nf_tables expressions and how it reads in ``nft`` syntax (the text
matches what ``nft list table`` prints, which the kernel tests rely on).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from functools import lru_cache
from typing import NamedTuple, Protocol

from . import nfnl

PROTO_NUMBERS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP, "sctp": 132}


class EncodeContext(Protocol):
    """What a statement may need from the batch it is encoded into (anonymous sets)."""

    def anonymous_vmap(self, elements: list[bytes], size: int) -> int: ...


class Stmt(Protocol):
    def encode(self, ctx: EncodeContext) -> bytes: ...

    def text(self) -> str: ...


def _ip_bytes(ip: str) -> bytes:
    return socket.inet_pton(socket.AF_INET, ip)


# "immediate reg 1 <4 bytes>" ends with the address, so it is a constant prefix + address
_IMMEDIATE_ADDR_PREFIX = nfnl.e_immediate_data(b"\0\0\0\0", nfnl.REG_1)[:-4]
_DNAT_TAIL = nfnl.e_dnat(nfnl.REG_1, 2)


@lru_cache(maxsize=65536)
def _immediate_port(port: int) -> bytes:
    return nfnl.e_immediate_data(struct.pack(">H", port), 2)


_FIELD_OFFSET = {"saddr": 12, "daddr": 16}


@lru_cache(maxsize=4096)
def _prefix_match(field: str, cidr: str, negate: bool) -> bytes:
    net = ipaddress.IPv4Network(cidr, strict=False)
    op = nfnl.CMP_NEQ if negate else nfnl.CMP_EQ
    offset = _FIELD_OFFSET[field]
    plen = net.prefixlen
    if plen == 0:
        raise ValueError("a /0 match is not a match")
    if plen % 8 == 0:
        # byte-aligned prefixes: compare only the leading bytes (what nft does too)
        nbytes = plen // 8
        return (nfnl.e_payload(nfnl.PAYLOAD_NETWORK, offset, nbytes)
                + nfnl.e_cmp(op, net.network_address.packed[:nbytes]))
    return (nfnl.e_payload(nfnl.PAYLOAD_NETWORK, offset, 4)
            + nfnl.e_bitwise(4, net.netmask.packed, b"\0" * 4)
            + nfnl.e_cmp(op, net.network_address.packed))


class IPMatch(NamedTuple):
    """``ip saddr 10.0.0.0/8`` / ``ip daddr != 1.2.3.4``"""

    field: str
    cidr: str
    negate: bool = False
    tag: str = "ipmatch"

    def encode(self, ctx: EncodeContext) -> bytes:
        return _prefix_match(self.field, self.cidr, self.negate)

    def text(self) -> str:
        value = self.cidr[:-3] if self.cidr.endswith("/32") else self.cidr
        return f"ip {self.field} {'!= ' if self.negate else ''}{value}"


class IPInSet(NamedTuple):
    """``ip daddr @cluster-ips``"""

    field: str
    set_name: str
    tag: str = "ipinset"

    def encode(self, ctx: EncodeContext) -> bytes:
        return (nfnl.e_payload(nfnl.PAYLOAD_NETWORK, _FIELD_OFFSET[self.field], 4)
                + nfnl.e_lookup(self.set_name))

    def text(self) -> str:
        return f"ip {self.field} @{self.set_name}"


class AddrPairInSet(NamedTuple):
    """``ip saddr . ip daddr @set``: used to spot hairpin traffic (source == DNAT target)."""

    set_name: str
    tag: str = "addrpairinset"

    def encode(self, ctx: EncodeContext) -> bytes:
        return (nfnl.e_payload(nfnl.PAYLOAD_NETWORK, 12, 4, nfnl.REG_1)
                + nfnl.e_payload(nfnl.PAYLOAD_NETWORK, 16, 4, nfnl.REG32_01)
                + nfnl.e_lookup(self.set_name))

    def text(self) -> str:
        return f"ip saddr . ip daddr @{self.set_name}"


class FibLocal(NamedTuple):
    """``fib daddr type local`` (or saddr)."""

    field: str
    tag: str = "fiblocal"

    def encode(self, ctx: EncodeContext) -> bytes:
        flags = nfnl.FIB_F_DADDR if self.field == "daddr" else nfnl.FIB_F_SADDR
        return (nfnl.e_fib_addrtype(flags)
                + nfnl.e_cmp(nfnl.CMP_EQ, struct.pack("=I", nfnl.RTN_LOCAL)))

    def text(self) -> str:
        return f"fib {self.field} type local"


class CtStateNew(NamedTuple):
    tag: str = "ctstatenew"
    def encode(self, ctx: EncodeContext) -> bytes:
        return (nfnl.e_ct_load(nfnl.CT_KEY_STATE)
                + nfnl.e_bitwise(4, struct.pack("=I", nfnl.CT_STATE_NEW), b"\0" * 4)
                + nfnl.e_cmp(nfnl.CMP_NEQ, b"\0" * 4))

    def text(self) -> str:
        return "ct state new"


class MarkUnset(NamedTuple):
    """``meta mark & BITS == 0``"""

    bits: int
    tag: str = "markunset"

    def encode(self, ctx: EncodeContext) -> bytes:
        return (nfnl.e_meta_load(nfnl.META_MARK)
                + nfnl.e_bitwise(4, struct.pack("=I", self.bits), b"\0" * 4)
                + nfnl.e_cmp(nfnl.CMP_EQ, b"\0" * 4))

    def text(self) -> str:
        return f"meta mark & 0x{self.bits:08x} == 0x00000000"


class NumgenPick(NamedTuple):
    """``numgen random mod N 0``: true with probability 1/N (a fresh draw per rule)."""

    modulus: int
    tag: str = "numgenpick"

    def encode(self, ctx: EncodeContext) -> bytes:
        return _numgen_pick(self.modulus)

    def text(self) -> str:
        return f"numgen random mod {self.modulus} 0"


@lru_cache(maxsize=1024)
def numgen_pick(modulus: int) -> NumgenPick:
    """Shared instances: every service with N endpoints uses the same N-1 of them."""
    return NumgenPick(modulus)


@lru_cache(maxsize=1024)
def _numgen_pick(modulus: int) -> bytes:
    return nfnl.e_numgen_random(modulus) + nfnl.e_cmp(nfnl.CMP_EQ, b"\0" * 4)


# Vmap keys: what to load and into which 32-bit register of a concatenation.
_KEY_LOADERS = {
    "daddr": lambda reg: nfnl.e_payload(nfnl.PAYLOAD_NETWORK, 16, 4, reg),
    "l4proto": lambda reg: nfnl.e_meta_load(nfnl.META_L4PROTO, reg),
    "dport": lambda reg: nfnl.e_payload(nfnl.PAYLOAD_TRANSPORT, 2, 2, reg),
}
_KEY_TEXT = {"daddr": "ip daddr", "l4proto": "meta l4proto", "dport": "th dport"}
_CONCAT_REGS = (nfnl.REG_1, nfnl.REG32_01, nfnl.REG32_02)


class Vmap(NamedTuple):
    """``ip daddr . meta l4proto . th dport vmap @service-ips``"""

    keys: tuple[str, ...]
    map_name: str
    tag: str = "vmap"

    def encode(self, ctx: EncodeContext) -> bytes:
        loads = b"".join(_KEY_LOADERS[key](_CONCAT_REGS[i]) for i, key in enumerate(self.keys))
        return loads + nfnl.e_lookup(self.map_name, dreg=nfnl.REG_VERDICT)

    def text(self) -> str:
        return " . ".join(_KEY_TEXT[k] for k in self.keys) + f" vmap @{self.map_name}"




class MapDNAT(NamedTuple):
    """``dnat ip to ip daddr . meta l4proto . th dport . numgen random mod N map @m``

    Picks one of N endpoints at random and DNATs to it: the key (the frontend the
    packet was sent to, plus a slot 0..N-1, shifted by ``offset``) is looked up in a
    data map whose values are ``address . port``."""

    keys: tuple[str, ...]
    modulus: int
    offset: int
    map_name: str
    tag: str = "mapdnat"

    def encode(self, ctx: EncodeContext) -> bytes:
        return _map_dnat(self.keys, self.modulus, self.offset, self.map_name)

    def text(self) -> str:
        offset = f" offset {self.offset}" if self.offset else ""
        keys = " . ".join(_KEY_TEXT[k] for k in self.keys)
        return f"dnat ip to {keys} . numgen random mod {self.modulus}{offset} map @{self.map_name}"


@lru_cache(maxsize=4096)
def _map_dnat(keys: tuple[str, ...], modulus: int, offset: int, map_name: str) -> bytes:
    regs = (nfnl.REG_1, nfnl.REG32_01, nfnl.REG32_02, nfnl.REG32_03)
    loads = b"".join(_KEY_LOADERS[key](regs[i]) for i, key in enumerate(keys))
    # the lookup writes address (4 bytes) and port into registers 1 and 1+1
    return (loads + nfnl.e_numgen_random(modulus, regs[len(keys)], offset)
            + nfnl.e_lookup(map_name, dreg=nfnl.REG_1)
            + nfnl.e_dnat(nfnl.REG_1, nfnl.REG32_01, flags=None))


class NumgenVmap(NamedTuple):
    """``numgen random mod N vmap { 0 : goto a, 1 : goto b }`` with an anonymous map."""

    targets: tuple[str, ...]
    tag: str = "numgenvmap"

    def encode(self, ctx: EncodeContext) -> bytes:
        elements = [nfnl.element(struct.pack("=I", i), (nfnl.NFT_GOTO, chain))
                    for i, chain in enumerate(self.targets)]
        set_id = ctx.anonymous_vmap(elements, len(self.targets))
        return (nfnl.e_numgen_random(len(self.targets))
                + nfnl.e_lookup("__map%d", dreg=nfnl.REG_VERDICT, set_id=set_id))

    def text(self) -> str:
        inner = ", ".join(f"{i} : goto {chain}" for i, chain in enumerate(self.targets))
        return f"numgen random mod {len(self.targets)} vmap {{ {inner} }}"


_VERDICTS = {"accept": nfnl.NF_ACCEPT, "drop": nfnl.NF_DROP, "return": nfnl.NFT_RETURN,
             "jump": nfnl.NFT_JUMP, "goto": nfnl.NFT_GOTO}


class Verdict(NamedTuple):
    kind: str
    chain: str | None = None
    tag: str = "verdict"

    def encode(self, ctx: EncodeContext) -> bytes:
        return _verdict(self.kind, self.chain)

    def text(self) -> str:
        return f"{self.kind} {self.chain}" if self.chain else self.kind


@lru_cache(maxsize=1 << 18)
def _verdict(kind: str, chain: str | None) -> bytes:
    return nfnl.e_verdict(_VERDICTS[kind], chain)


class MarkOr(NamedTuple):
    """``meta mark set meta mark | BITS``"""

    bits: int
    tag: str = "markor"

    def encode(self, ctx: EncodeContext) -> bytes:
        return _mark_update(self.bits, True)

    def text(self) -> str:
        return f"meta mark set meta mark | 0x{self.bits:08x}"


class MarkXor(NamedTuple):
    """``meta mark set meta mark ^ BITS`` (clears the bit once it was tested)."""

    bits: int
    tag: str = "markxor"

    def encode(self, ctx: EncodeContext) -> bytes:
        return _mark_update(self.bits, False)

    def text(self) -> str:
        return f"meta mark set meta mark ^ 0x{self.bits:08x}"


@lru_cache(maxsize=16)
def _mark_update(bits: int, set_bits: bool) -> bytes:
    mask = (0xFFFFFFFF & ~bits) if set_bits else 0xFFFFFFFF
    return (nfnl.e_meta_load(nfnl.META_MARK)
            + nfnl.e_bitwise(4, struct.pack("=I", mask), struct.pack("=I", bits))
            + nfnl.e_meta_set(nfnl.META_MARK))


class Masquerade(NamedTuple):
    tag: str = "masquerade"
    def encode(self, ctx: EncodeContext) -> bytes:
        return nfnl.e_masquerade()

    def text(self) -> str:
        return "masquerade fully-random"


class DNAT(NamedTuple):
    """``dnat to 10.0.0.1:80``. nft's own syntax insists on a ``meta l4proto`` match
    first; the kernel does not, and every chain using this is only reachable through
    maps keyed by TCP/UDP/SCTP, so the match would be evaluated for nothing."""

    proto: str
    ip: str
    port: int
    tag: str = "dnat"

    def encode(self, ctx: EncodeContext) -> bytes:
        return _IMMEDIATE_ADDR_PREFIX + _ip_bytes(self.ip) + _immediate_port(self.port) + _DNAT_TAIL

    def text(self) -> str:
        return f"dnat to {self.ip}:{self.port}"


_REJECT_CODES = {"port-unreachable": nfnl.ICMP_PORT_UNREACH,
                 "admin-prohibited": nfnl.ICMP_ADMIN_PROHIBITED}


class Reject(NamedTuple):
    code: str = "port-unreachable"
    tag: str = "reject"

    def encode(self, ctx: EncodeContext) -> bytes:
        return nfnl.e_reject_icmp(_REJECT_CODES[self.code])

    def text(self) -> str:
        return "reject" if self.code == "port-unreachable" else f"reject with icmp {self.code}"


class UpdateSaddr(NamedTuple):
    """``update @set { ip saddr timeout 3h }``: (re)arm the client's affinity entry."""

    set_name: str
    timeout_s: int
    tag: str = "updatesaddr"

    def encode(self, ctx: EncodeContext) -> bytes:
        return (nfnl.e_payload(nfnl.PAYLOAD_NETWORK, 12, 4)
                + nfnl.e_dynset_update(self.set_name, self.timeout_s * 1000))

    def text(self) -> str:
        return f"update @{self.set_name} {{ ip saddr timeout {format_duration(self.timeout_s)} }}"


def format_duration(seconds: int) -> str:
    """Seconds the way nft prints them (10800 -> 3h, 90 -> 1m30s)."""
    if seconds == 0:
        return "0s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts)


Rule = tuple  # tuple[Stmt, ...]


def rule_text(rule: Rule) -> str:
    return " ".join(stmt.text() for stmt in rule)


def encode_rule(rule: Rule, ctx: EncodeContext) -> bytes:
    return b"".join([stmt.encode(ctx) for stmt in rule])
