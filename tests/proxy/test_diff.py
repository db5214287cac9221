"""Transitions between desired states, and their encoding (pure; no root needed)."""

from __future__ import annotations

import struct

import pytest

from netplugin.proxy import nfnl
from netplugin.proxy.diff import AppliedState, NeedsRecreate, full_plan, preview, transition
from netplugin.proxy.encode import encode_key, encode_plan, key_layout
from netplugin.proxy.model import Endpoint, parse_service
from netplugin.proxy.ruleset import (
    CLUSTER_IPS,
    ENDPOINTS,
    HAIRPIN,
    NO_ENDPOINT_SERVICES,
    SERVICE_IPS,
    Fragment,
    ProxyConfig,
    SetSpec,
    global_fragment,
    service_fragment,
)
from netplugin.proxy.stmts import Verdict

from .helpers import service

CONFIG = ProxyConfig(table="t", node_name="node-a", cluster_cidr="10.244.0.0/16")
GLOBAL = ("", "")


def frag(name: str, cluster_ip: str, ips: list[str]) -> Fragment:
    ports = parse_service(service(name, cluster_ip)).ports
    return service_fragment(CONFIG, ports, {("http", "tcp"): [Endpoint(ip, 8080) for ip in ips]})


def applied(updates: dict) -> AppliedState:
    state = AppliedState()
    state.adopt(transition(state, updates))
    return state


def test_first_transition_creates_everything() -> None:
    trans = transition(AppliedState(), {GLOBAL: global_fragment(CONFIG), ("default", "a"): frag("a", "10.96.0.1", ["10.244.1.1"])})
    plan = trans.plan
    assert {"services", "pick-1"} <= {c.name for c in plan.new_chains}
    assert not plan.flush_chains and not plan.del_chains and not plan.del_elements
    assert plan.add_elements[SERVICE_IPS] == [(("10.96.0.1", "tcp", 80), Verdict("goto", "pick-1"))]
    assert plan.add_elements[ENDPOINTS] == [(("10.96.0.1", "tcp", 80, 0), ("10.244.1.1", 8080))]
    assert trans.conflicts == []


def test_replacing_an_endpoint_only_swaps_elements() -> None:
    state = applied({GLOBAL: global_fragment(CONFIG), ("default", "a"): frag("a", "10.96.0.1", ["10.244.1.1"]),
                     ("default", "b"): frag("b", "10.96.0.2", ["10.244.2.1"])})
    plan = transition(state, {("default", "a"): frag("a", "10.96.0.1", ["10.244.1.9"])}).plan
    assert not plan.new_chains and not plan.flush_chains and not plan.rules and not plan.del_chains
    assert plan.del_elements == {ENDPOINTS: [("10.96.0.1", "tcp", 80, 0)], HAIRPIN: [("10.244.1.1", "10.244.1.1")]}
    assert plan.add_elements == {ENDPOINTS: [(("10.96.0.1", "tcp", 80, 0), ("10.244.1.9", 8080))],
                                 HAIRPIN: [(("10.244.1.9", "10.244.1.9"), None)]}
    assert transition(state, {("default", "b"): frag("b", "10.96.0.2", ["10.244.2.1"])}).plan.is_empty()


def test_growing_a_service_moves_it_to_another_pick_chain() -> None:
    state = applied({GLOBAL: global_fragment(CONFIG), ("default", "a"): frag("a", "10.96.0.1", ["10.244.1.1"]),
                     ("default", "b"): frag("b", "10.96.0.2", ["10.244.2.1"])})
    plan = transition(state, {("default", "a"): frag("a", "10.96.0.1", ["10.244.1.1", "10.244.1.2"])}).plan
    assert [c.name for c in plan.new_chains] == ["pick-2"] and [c.name for c in plan.rules] == ["pick-2"]
    assert not plan.del_chains  # b still uses pick-1
    assert plan.del_elements[SERVICE_IPS] == [("10.96.0.1", "tcp", 80)]
    assert plan.add_elements[SERVICE_IPS] == [(("10.96.0.1", "tcp", 80), Verdict("goto", "pick-2"))]
    assert plan.add_elements[ENDPOINTS] == [(("10.96.0.1", "tcp", 80, 1), ("10.244.1.2", 8080))]


def test_shared_chains_live_while_someone_needs_them() -> None:
    state = applied({GLOBAL: global_fragment(CONFIG), ("default", "a"): frag("a", "10.96.0.1", ["10.244.1.1"]),
                     ("default", "b"): frag("b", "10.96.0.2", ["10.244.2.1"])})
    assert state.shared["pick-1"][1] == 2
    trans = transition(state, {("default", "a"): None})
    assert "pick-1" not in trans.plan.del_chains
    # one leaves and another arrives in the same transaction: no churn
    swap = transition(state, {("default", "a"): None, ("default", "b"): None,
                              ("default", "c"): frag("c", "10.96.0.3", ["10.244.3.1"])}).plan
    assert "pick-1" not in swap.del_chains and "pick-1" not in [c.name for c in swap.new_chains]
    state.adopt(trans)
    last = transition(state, {("default", "b"): None}).plan
    assert last.flush_chains == ["pick-1"] == last.del_chains


def test_removed_service_loses_all_its_elements() -> None:
    state = applied({GLOBAL: global_fragment(CONFIG), ("default", "a"): frag("a", "10.96.0.1", ["10.244.1.1"])})
    plan = transition(state, {("default", "a"): None}).plan
    assert plan.del_elements[SERVICE_IPS] == [("10.96.0.1", "tcp", 80)]
    assert plan.del_elements[CLUSTER_IPS] == [("10.96.0.1",)]
    assert plan.del_elements[HAIRPIN] == [("10.244.1.1", "10.244.1.1")]
    assert plan.del_elements[ENDPOINTS] == [("10.96.0.1", "tcp", 80, 0)]
    assert plan.del_chains == ["pick-1"]


def test_shared_elements_are_reference_counted() -> None:
    state = applied({GLOBAL: global_fragment(CONFIG), ("default", "a"): frag("a", "10.96.0.1", ["10.244.1.1"]),
                     ("default", "b"): frag("b", "10.96.0.2", ["10.244.1.1"])})
    trans = transition(state, {("default", "a"): None})
    assert HAIRPIN not in trans.plan.del_elements  # still used by b
    state.adopt(trans)
    assert HAIRPIN in transition(state, {("default", "b"): None}).plan.del_elements


def test_conflicting_claims_first_wins_and_the_next_takes_over() -> None:
    state = applied({GLOBAL: global_fragment(CONFIG), ("default", "a"): frag("a", "10.96.0.1", ["10.244.1.1"])})
    trans = transition(state, {("default", "b"): frag("b", "10.96.0.1", ["10.244.2.1"])})  # same ClusterIP:port
    # same dispatch (both "goto pick-1") is shared; the endpoint slot is contested
    assert {(c.owner, c.set_name, c.holder) for c in trans.conflicts} == {
        (("default", "b"), ENDPOINTS, ("default", "a"))}
    assert SERVICE_IPS not in trans.plan.add_elements and ENDPOINTS not in trans.plan.add_elements  # a keeps it
    state.adopt(trans)
    handover = transition(state, {("default", "a"): None}).plan
    assert handover.del_elements[ENDPOINTS] == [("10.96.0.1", "tcp", 80, 0)]
    assert handover.add_elements[ENDPOINTS] == [(("10.96.0.1", "tcp", 80, 0), ("10.244.2.1", 8080))]


def test_losing_all_endpoints_swaps_dispatch_for_reject() -> None:
    state = applied({GLOBAL: global_fragment(CONFIG), ("default", "a"): frag("a", "10.96.0.1", ["10.244.1.1"])})
    plan = transition(state, {("default", "a"): frag("a", "10.96.0.1", [])}).plan
    assert plan.del_elements[SERVICE_IPS] == [("10.96.0.1", "tcp", 80)]
    assert plan.add_elements[NO_ENDPOINT_SERVICES] == [(("10.96.0.1", "tcp", 80), Verdict("goto", "reject-chain"))]
    assert plan.del_chains == ["pick-1"]


def test_set_type_change_needs_a_rebuild() -> None:
    state = applied({GLOBAL: Fragment(sets={"s": SetSpec("s", ("ipv4_addr",))})})
    with pytest.raises(NeedsRecreate):
        transition(state, {GLOBAL: Fragment(sets={"s": SetSpec("s", ("inet_proto", "inet_service"))})})


def test_full_plan_rewrites_and_removes_leftovers() -> None:
    aff = "affinity-default/a/tcp/http__10.244.1.1/8080"
    a = frag("a", "10.96.0.1", ["10.244.1.1"])
    assert "pick-1" in a.shared_chains
    a.sets[aff] = SetSpec(aff, ("ipv4_addr",), dynamic=True)
    state = applied({GLOBAL: global_fragment(CONFIG), ("default", "a"): a})
    existing_chains = {"services", "service-default/old/tcp/http"}
    existing_sets = {SERVICE_IPS, aff, "affinity-default/old/tcp/http__1.2.3.4/80", "__map3"}
    plan = full_plan(state, existing_chains, existing_sets)
    assert plan.ensure_table and not plan.delete_table
    assert "services" in plan.flush_chains and "service-default/old/tcp/http" in plan.flush_chains
    assert plan.del_chains == ["service-default/old/tcp/http"]
    assert plan.del_sets == ["affinity-default/old/tcp/http__1.2.3.4/80"]  # anonymous sets belong to rules
    assert SERVICE_IPS in plan.flush_sets and aff not in plan.flush_sets  # affinity entries survive
    assert len(plan.rules) == len(state.chains()) and "pick-1" in {c.name for c in plan.rules}
    rebuilt = full_plan(state, existing_chains, existing_sets, recreate=True)
    assert rebuilt.delete_table and not rebuilt.del_chains and not rebuilt.flush_chains


def _messages(data: bytes) -> list[tuple[int, int]]:
    out, offset = [], 0
    while offset < len(data):
        length, kind, flags, _seq, _pid = struct.unpack_from("=IHHII", data, offset)
        out.append((kind, flags))
        offset += (length + 3) & ~3
    return out


def test_batch_order_and_framing() -> None:
    state = applied({GLOBAL: global_fragment(CONFIG), ("default", "a"): frag("a", "10.96.0.1", ["10.244.1.1"])})
    trans = transition(state, {("default", "a"): None,
                               ("default", "b"): frag("b", "10.96.0.2", ["10.244.1.2", "10.244.1.3"])})
    batch = encode_plan("t", trans.plan, first_seq=100)
    data, last_seq, end_seq = batch.finish()
    kinds = [kind & 0xFF if kind >> 8 == nfnl.NFNL_SUBSYS_NFTABLES else kind for kind, _ in _messages(data)]
    assert kinds[0] == nfnl.NFNL_MSG_BATCH_BEGIN and kinds[-1] == nfnl.NFNL_MSG_BATCH_END
    body = kinds[1:-1]
    # new chain, flush, element deletes, rules, element adds, chain delete - in this order
    assert body == sorted(body, key=[nfnl.NFT_MSG_NEWCHAIN, nfnl.NFT_MSG_DELRULE, nfnl.NFT_MSG_DELSETELEM,
                                     nfnl.NFT_MSG_NEWRULE, nfnl.NFT_MSG_NEWSETELEM, nfnl.NFT_MSG_DELCHAIN].index)
    assert end_seq == last_seq + 1 == 100 + len(body) + 1
    flags = _messages(data)
    assert flags[-1][1] & nfnl.NLM_F_ACK and flags[-2][1] & nfnl.NLM_F_ACK and not flags[1][1] & nfnl.NLM_F_ACK
    assert "delete chain pick-1" == batch.describe(end_seq - 1)
    described = [batch.describe(seq) for seq in range(101, end_seq)]
    assert "add chain pick-2" in described
    assert "add rule to chain pick-2: dnat ip to ip daddr . meta l4proto . th dport . numgen random mod 2 map @endpoints" in described
    assert "add rule to chain pick-2: dnat ip to meta l4proto . th dport . numgen random mod 2 map @nodeport-endpoints" in described


def test_key_encoding_matches_nft() -> None:
    # layouts as nft sends them: concatenated fields padded to 32 bits
    assert key_layout(("ipv4_addr", "inet_proto", "inet_service")) == (0x730D, 12)
    assert key_layout(("inet_proto", "inet_service")) == (0x30D, 8)
    assert encode_key(("ipv4_addr", "inet_proto", "inet_service"), ("10.203.0.10", "tcp", 80)).hex() == \
        "0acb000a" + "06000000" + "00500000"
    assert encode_key(("inet_proto", "inet_service"), ("udp", 30053)).hex() == "11000000" + "75650000"


def test_preview_does_not_touch_the_applied_state() -> None:
    state = applied({("default", "a"): frag("a", "10.96.0.1", ["10.244.1.1"])})
    trans = transition(state, {("default", "a"): None})
    after = preview(state, trans)
    assert ("default", "a") in state.fragments and ("default", "a") not in after.fragments
