"""From desired fragments to the operations of one transaction (pure, no kernel).

``AppliedState`` remembers what the last successful transaction installed: every
fragment by owner, for every map/set element the owners that claim it (first claim
wins; later ones wait, reported as conflicts), and for every shared chain (pick-N) how
many fragments want it (created with the first, deleted with the last). ``transition`` compares new fragments of
some owners with the applied ones and returns a ``Plan`` that changes only what changed
plus the state to adopt once the kernel accepted it. ``full_plan`` rewrites everything
(start, periodic resync, after a failure) and removes leftovers it is told about.

Operation order inside one batch (the kernel checks references as it goes):
sets and chains are created first, chains are flushed before their rules are re-added,
elements are removed before they are re-added, and chains/sets are deleted last, once
nothing refers to them any more.
"""

from __future__ import annotations

from collections import ChainMap
from dataclasses import dataclass, field
from typing import Hashable, Mapping, Sequence

from .ruleset import Chain, ElementKey, ElementValue, Fragment, SetSpec

Owner = Hashable
_ABSENT = object()


class NeedsRecreate(Exception):
    """An object changed in a way the kernel cannot update in place (a set's type, a
    base chain's hook): only a full resync that recreates the table can apply it."""


@dataclass
class Plan:
    delete_table: bool = False
    ensure_table: bool = False
    new_sets: list[SetSpec] = field(default_factory=list)
    new_chains: list[Chain] = field(default_factory=list)
    flush_chains: list[str] = field(default_factory=list)
    flush_sets: list[str] = field(default_factory=list)
    del_elements: dict[str, list[ElementKey]] = field(default_factory=dict)
    rules: list[Chain] = field(default_factory=list)  # chains whose rules are (re)added
    add_elements: dict[str, list[tuple[ElementKey, ElementValue]]] = field(default_factory=dict)
    del_chains: list[str] = field(default_factory=list)
    del_sets: list[str] = field(default_factory=list)
    set_specs: Mapping[str, SetSpec] = field(default_factory=dict)  # for encoding element keys

    def is_empty(self) -> bool:
        return not (self.delete_table or self.ensure_table or self.new_sets or self.new_chains
                    or self.flush_chains or self.flush_sets or self.del_elements or self.rules
                    or self.add_elements or self.del_chains or self.del_sets)

    def summary(self) -> dict[str, int]:
        return {
            "chains_added": len(self.new_chains),
            "chains_rewritten": len(self.flush_chains) - len(self.del_chains),
            "chains_deleted": len(self.del_chains),
            "rules": sum(len(chain.rules) for chain in self.rules),
            "elements_added": sum(len(v) for v in self.add_elements.values()),
            "elements_deleted": sum(len(v) for v in self.del_elements.values()),
            "sets_added": len(self.new_sets),
            "sets_deleted": len(self.del_sets),
        }


@dataclass(frozen=True)
class Conflict:
    owner: Owner
    set_name: str
    key: ElementKey
    holder: Owner


@dataclass
class Transition:
    plan: Plan
    fragments: dict[Owner, Fragment | None]  # owner -> new fragment (None: removed)
    # touched keys: their holders afterwards (a list or tuple; empty: nobody holds it)
    claims: dict[tuple[str, ElementKey], Sequence[tuple[Owner, ElementValue]]]
    conflicts: list[Conflict]
    shared: dict[str, tuple[Chain, int]] = field(default_factory=dict)  # touched shared chains


@dataclass
class AppliedState:
    fragments: dict[Owner, Fragment] = field(default_factory=dict)
    # holders are tuples (not lists): plain tuples of atomic values, which most of these
    # are, get untracked by the cyclic GC, and there is one per element (200,000+ in a
    # large cluster)
    claims: dict[tuple[str, ElementKey], tuple[tuple[Owner, ElementValue], ...]] = field(default_factory=dict)
    # every set of every fragment by name (to encode element keys without a full scan)
    set_index: dict[str, SetSpec] = field(default_factory=dict)
    # shared chains (pick-N) and how many fragments want each
    shared: dict[str, tuple[Chain, int]] = field(default_factory=dict)

    def adopt(self, transition: Transition) -> None:
        for owner, frag in transition.fragments.items():
            old = self.fragments.get(owner)
            if old is not None:
                for name in old.sets:
                    self.set_index.pop(name, None)
            if frag is None:
                self.fragments.pop(owner, None)
            else:
                self.fragments[owner] = frag
                self.set_index.update(frag.sets)
        claims = self.claims
        for key, holders in transition.claims.items():
            if holders:
                claims[key] = holders if type(holders) is tuple else tuple(holders)
            else:
                claims.pop(key, None)
        for name, entry in transition.shared.items():
            if entry[1] > 0:
                self.shared[name] = entry
            else:
                self.shared.pop(name, None)

    def chains(self) -> dict[str, Chain]:
        out: dict[str, Chain] = {}
        for frag in self.fragments.values():
            out.update(frag.chains)
        out.update((name, chain) for name, (chain, _) in self.shared.items())
        return out

    def sets(self) -> dict[str, SetSpec]:
        return dict(self.set_index)


def transition(state: AppliedState, updates: dict[Owner, Fragment | None], *,
               with_plan: bool = True) -> Transition:
    """``with_plan=False``: only the new state (claims, conflicts) is needed because a
    full plan will be written anyway; skips building the incremental operations."""
    plan = Plan()
    touched: dict[tuple[str, ElementKey], Sequence[tuple[Owner, ElementValue]]] = {}
    conflicts: list[Conflict] = []
    new_specs: dict[str, SetSpec] = {}

    claims = state.claims
    shared: dict[str, tuple[Chain, int]] = {}

    for owner, new in updates.items():
        old = state.fragments.get(owner)
        old_chains = old.chains if old else {}
        new_chains = new.chains if new else {}
        for name, chain in (new_chains.items() if with_plan or old_chains else ()):
            prev = old_chains.get(name)
            if prev is None:
                plan.new_chains.append(chain)
                plan.rules.append(chain)
            elif prev != chain:
                if prev.hook != chain.hook:
                    raise NeedsRecreate(f"chain {name} changed its hook")
                plan.flush_chains.append(name)
                plan.rules.append(chain)
        for name in old_chains.keys() - new_chains.keys():
            plan.flush_chains.append(name)
            plan.del_chains.append(name)

        old_sets = old.sets if old else {}
        new_sets = new.sets if new else {}
        for name, spec in new_sets.items():
            prev_spec = old_sets.get(name)
            if prev_spec is None:
                plan.new_sets.append(spec)
            elif prev_spec != spec:
                raise NeedsRecreate(f"set {name} changed its type")
            new_specs[name] = spec
        for name in old_sets.keys() - new_sets.keys():
            plan.del_sets.append(name)

        old_shared = old.shared_chains if old else {}
        new_shared = new.shared_chains if new else {}
        for name in new_shared.keys() ^ old_shared.keys():
            chain = new_shared.get(name) or old_shared[name]
            current = shared.get(name) or state.shared.get(name) or (chain, 0)
            shared[name] = (current[0], current[1] + (1 if name in new_shared else -1))

        old_elements = old.elements if old else {}
        new_elements = new.elements if new else {}
        touched_get, claims_get = touched.get, claims.get
        for key, now in new_elements.items():
            if old_elements and old_elements.get(key, _ABSENT) == now:
                continue
            holders = touched_get(key)
            if holders is None:
                existing = claims_get(key)
                if existing is None:  # the common case: nobody else claims it
                    touched[key] = ((owner, now),)
                    continue
                holders = existing
            holders = touched[key] = list(holders)
            mine = next((i for i, h in enumerate(holders) if h[0] == owner), None)
            others = [h for i, h in enumerate(holders) if i != mine]
            if any(h[1] != now for h in others):
                conflicts.append(Conflict(owner, key[0], key[1], others[0][0]))
            if mine is None:
                holders.append((owner, now))
            else:
                holders[mine] = (owner, now)
        for key in old_elements:
            if key in new_elements:
                continue
            holders = touched_get(key)
            if holders is None:
                holders = claims_get(key, ())
            touched[key] = [h for h in holders if h[0] != owner]

    # shared chains: created when the first fragment wants them, deleted with the last
    for name, (chain, count) in shared.items():
        before = state.shared.get(name, (chain, 0))[1]
        if before == 0 and count > 0:
            plan.new_chains.append(chain)
            plan.rules.append(chain)
        elif before > 0 and count == 0:
            plan.flush_chains.append(name)
            plan.del_chains.append(name)

    for key, holders in (touched.items() if with_plan else ()):
        before = claims.get(key)
        was = before[0][1] if before else _ABSENT
        now = holders[0][1] if holders else _ABSENT
        if was is now or was == now:
            continue
        set_name, element_key = key
        if was is not _ABSENT:
            plan.del_elements.setdefault(set_name, []).append(element_key)
        if now is not _ABSENT:
            plan.add_elements.setdefault(set_name, []).append((element_key, now))
    plan.set_specs = ChainMap(new_specs, state.set_index)
    return Transition(plan, dict(updates), touched, conflicts, shared)


def preview(state: AppliedState, trans: Transition) -> AppliedState:
    """The state as it would be after ``trans`` (shallow copies; for full plans)."""
    after = AppliedState(dict(state.fragments), dict(state.claims), dict(state.set_index), dict(state.shared))
    after.adopt(trans)
    return after


def full_plan(state: AppliedState, existing_chains: set[str] | None,
              existing_sets: set[str] | None, recreate: bool = False) -> Plan:
    """Everything in ``state``, written over whatever the kernel has.

    ``recreate``: the table exists and is to be deleted and rebuilt within the batch.

    ``existing_*``: what the table holds now (None when it does not exist). Chains are
    flushed and refilled, static sets flushed and refilled, dynamic (affinity) sets
    kept with their contents, leftovers flushed and deleted. With ``recreate`` the
    table is deleted and rebuilt inside the same transaction instead.
    """
    plan = Plan()
    chains = state.chains()
    sets = state.sets()
    plan.set_specs = sets
    if recreate:
        plan.delete_table = True
        existing_chains, existing_sets = set(), set()
    plan.ensure_table = True
    existing_chains = existing_chains or set()
    existing_sets = existing_sets or set()
    plan.new_sets = list(sets.values())
    # base chains first: `nft list` shows chains in creation order
    plan.new_chains = sorted(chains.values(), key=lambda chain: chain.hook is None)
    plan.flush_chains = [name for name in chains if name in existing_chains]
    stale_chains = sorted(existing_chains - chains.keys())
    plan.flush_chains += stale_chains
    plan.flush_sets = [name for name, spec in sets.items() if not spec.dynamic and name in existing_sets]
    plan.rules = list(chains.values())
    by_set: dict[str, list[tuple[ElementKey, ElementValue]]] = {}
    for (set_name, key), holders in state.claims.items():
        items = by_set.get(set_name)
        if items is None:
            items = by_set[set_name] = []
        items.append((key, holders[0][1]))
    plan.add_elements = by_set
    plan.del_chains = stale_chains
    plan.del_sets = sorted(name for name in existing_sets - sets.keys() if not name.startswith("__"))
    return plan
