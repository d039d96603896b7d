"""Clause flows that many rules share, merged one match at a time.

A compiled policy says, per address set (table, priority, clause tuple), what its rules add there:
conjunction actions, or an allow of their own. Equal peer lists compile to the same clause tuple,
so a set named by a thousand rules is held once, with a thousand shares. A flow is one match of
one or more sets; its actions are the union of the shares of the sets that hold the match, and
matches in the same sets get their actions computed once.

After policies change, `take_dirty()` names only the flows whose merged actions may differ, so an
edit of one policy among a thousand rewrites the few flows it touches (each flow is its own
realizer object, named by a number that is never reused while its key exists).
"""

from __future__ import annotations

from sanderling.compiler.policy import FlowKey, SetKey, Share, merged
from sanderling.openflow import ir


class SharedFlows:
    def __init__(self) -> None:
        self._by_policy: dict[str, dict[SetKey, tuple[Share, ...]]] = {}
        self._set_ids: dict[SetKey, int] = {}
        self._set_keys: dict[int, SetKey] = {}
        self._set_shares: dict[int, dict[str, tuple[Share, ...]]] = {}  # set -> policy -> its shares
        self._match_sets: dict[FlowKey, set[int]] = {}  # flow -> the sets holding its match
        self._next_set = 0
        self._names: dict[FlowKey, str] = {}
        self._next_name = 0
        self._dirty_sets: set[int] = set()
        self._dirty: set[FlowKey] = set()

    def __len__(self) -> int:
        return len(self._match_sets)

    def set_count(self) -> int:
        """Distinct address/port sets the rules share."""
        return len(self._set_ids)

    def update(self, policy: str, shares: dict[SetKey, tuple[Share, ...]]) -> None:
        """Replace what `policy` contributes."""
        old = self._by_policy.pop(policy, {})
        for key, had in old.items():
            if shares.get(key) != had:
                sid = self._set_ids[key]
                owners = self._set_shares[sid]
                del owners[policy]
                if owners:
                    self._dirty_sets.add(sid)
                else:
                    self._drop_set(sid)
        for key, now in shares.items():
            if old.get(key) != now:
                known = self._set_ids.get(key)
                sid = self._add_set(key) if known is None else known
                self._set_shares[sid][policy] = now
                self._dirty_sets.add(sid)
        if shares:
            self._by_policy[policy] = shares

    def remove(self, policy: str) -> None:
        self.update(policy, {})

    def _add_set(self, key: SetKey) -> int:
        self._next_set += 1
        sid = self._next_set
        self._set_ids[key] = sid
        self._set_keys[sid] = key
        self._set_shares[sid] = {}
        table, prio, clause = key
        for m in clause:
            self._match_sets.setdefault((table, prio, m), set()).add(sid)
        return sid

    def _drop_set(self, sid: int) -> None:
        key = self._set_keys.pop(sid)
        del self._set_ids[key]
        del self._set_shares[sid]
        self._dirty_sets.discard(sid)
        table, prio, clause = key
        for m in clause:
            fk = (table, prio, m)
            sets = self._match_sets[fk]
            sets.discard(sid)
            if not sets:
                del self._match_sets[fk]
            self._dirty.add(fk)

    def take_dirty(self) -> dict[FlowKey, ir.Flow | None]:
        """Every flow that may have changed since the last call: key -> its flow now (None: gone)."""
        dirty = self._dirty
        for sid in self._dirty_sets:
            table, prio, clause = self._set_keys[sid]
            dirty.update((table, prio, m) for m in clause)
        self._dirty, self._dirty_sets = set(), set()
        by_signature: dict[tuple[int, frozenset[int]], tuple[tuple[ir.Action, ...], int]] = {}
        out: dict[FlowKey, ir.Flow | None] = {}
        for fk in dirty:
            sets = self._match_sets.get(fk)
            if not sets:
                out[fk] = None
                continue
            table, prio, match = fk
            signature = (prio, frozenset(sets))
            actions_cookie = by_signature.get(signature)
            if actions_cookie is None:
                actions_cookie = by_signature[signature] = merged(prio, (
                    s for sid in sets for shares in self._set_shares[sid].values() for s in shares))
            out[fk] = ir.Flow(table, prio, match, actions_cookie[0], actions_cookie[1])
        return out

    def object_name(self, key: FlowKey) -> str:
        name = self._names.get(key)
        if name is None:
            self._next_name += 1
            name = self._names[key] = f"policy-flow/{self._next_name}"
        return name

    def release(self, key: FlowKey) -> None:
        """Forget a key's object name once its flow is gone."""
        self._names.pop(key, None)
