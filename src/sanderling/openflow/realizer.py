"""Keeps a bridge's flows and groups equal to the desired state, one atomic bundle at a time.

Desired state is held per object key (a pod, a service, the static pipeline). `sync()` diffs the
keys that changed against what is installed and sends the difference as one OpenFlow bundle;
the installed cache moves only when the bundle committed. If a change set is refused, each
object is retried on its own so one bad object is reported and everything else still lands.
`resync()` replays everything after a (re)connect: the current generation is installed first
and older generations are swept in the same atomic bundle, so an agent restart has no gap.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from sanderling.openflow import cookies, ir
from sanderling.openflow import decoder as D
from sanderling.openflow import encoder as E
from sanderling.openflow.connection import OpenFlowError

log = logging.getLogger(__name__)

FlowKey = tuple[int, int, ir.Match]


class Switch(Protocol):
    """What the realizer needs from an OpenFlow connection."""

    def next_xid(self) -> int: ...

    async def bundle(self, messages: Iterable[tuple[int, bytes]], describe: Callable[[int], str],
                     timeout: float = ...) -> int: ...

    async def flow_stats(self, table: int = ..., cookie: int = ..., cookie_mask: int = ...) -> list[D.FlowStats]: ...

    async def group_stats(self) -> list[D.GroupStats]: ...


@dataclass(frozen=True)
class ObjectState:
    flows: dict[FlowKey, ir.Flow]
    groups: dict[int, ir.Group] = field(default_factory=dict)

    @staticmethod
    def of(flows: Iterable[ir.Flow], groups: Iterable[ir.Group] = ()) -> ObjectState:
        return ObjectState({f.key: f for f in flows}, {g.group_id: g for g in groups})


EMPTY = ObjectState({}, {})


class _Unencodable(Exception):
    """An object has a flow no OpenFlow message can carry (see resync)."""


class ConflictError(ValueError):
    """Two objects want the same flow (table, priority, match) or group id."""


@dataclass
class InstalledChanges:
    """Keys (of one prefix) whose installed state changed since the reader last took them, for
    readers that follow what is installed without rescanning every object (the metrics' bucket
    labels); `everything` after a resync, when any object may have changed."""

    prefix: str
    keys: set[str] = field(default_factory=set)
    everything: bool = True

    def take(self) -> tuple[bool, set[str]]:
        everything, keys = self.everything, self.keys
        self.everything, self.keys = False, set()
        return everything, keys


@dataclass
class SyncResult:
    applied: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    flow_mods: int = 0


class Realizer:
    def __init__(self, generation: int) -> None:
        if not 1 <= generation <= 0xFFFF:
            raise ValueError("generation must be 1..65535")
        self.generation = generation
        self._desired: dict[str, ObjectState] = {}
        self._installed: dict[str, ObjectState] = {}
        self._dirty: set[str] = set()
        self._flow_owner: dict[FlowKey, str] = {}
        self._group_owner: dict[int, str] = {}
        self.errors: dict[str, str] = {}
        self._cache = E.InstructionCache()
        self._watchers: list[InstalledChanges] = []
        self._xid_owner: dict[int, str] = {}

    # ---- desired state --------------------------------------------------------------------

    def set_object(self, key: str, flows: Iterable[ir.Flow], groups: Iterable[ir.Group] = ()) -> bool:
        """Whether the desired state changed (an equal state is a no-op)."""
        state = ObjectState.of(flows, groups)
        if self._desired.get(key, EMPTY) == state:
            return False
        if state.flows or state.groups:
            self._desired[key] = state
        else:
            self._desired.pop(key, None)
        self._dirty.add(key)
        return True

    def remove_object(self, key: str) -> bool:
        return self.set_object(key, ())

    def retry(self, key: str) -> None:
        """Send a refused object again at the next sync, unchanged (its refusal may have depended
        on another object since changed)."""
        if key in self.errors:
            self._dirty.add(key)

    def is_installed(self, key: str) -> bool:
        return key in self._installed

    def installed(self, key: str) -> ObjectState | None:
        return self._installed.get(key)

    def watch_installed(self, prefix: str) -> InstalledChanges:
        """A log of the keys starting with `prefix` whose installed state changes from now on."""
        watcher = InstalledChanges(prefix)
        self._watchers.append(watcher)
        return watcher

    def keys(self) -> set[str]:
        return set(self._desired)

    @property
    def pending(self) -> set[str]:
        return set(self._dirty)

    def installed_flows(self) -> list[ir.Flow]:
        return [f for s in self._installed.values() for f in s.flows.values()]

    def desired_state(self) -> dict[str, ObjectState]:
        return dict(self._desired)

    def installed_state(self) -> dict[str, ObjectState]:
        return dict(self._installed)

    def cookie(self, flow: ir.Flow) -> int:
        return cookies.with_generation(flow.cookie, self.generation)

    # ---- incremental sync -----------------------------------------------------------------

    async def sync(self, switch: Switch, only: Callable[[str], bool] | None = None) -> SyncResult:
        """Send the pending changes as one bundle; on refusal isolate the objects at fault.
        With `only`, just the pending objects it accepts (the others stay pending)."""
        keys = sorted(k for k in self._dirty if only is None or only(k))
        result = SyncResult()
        if not keys:
            return result
        try:
            result.flow_mods = await self._apply(switch, keys)
            result.applied = len(keys)
            return result
        except (OpenFlowError, ConflictError, E.EncodeError) as exc:
            if len(keys) == 1:
                self._record_failure(keys[0], str(exc), result)
                return result
            log.warning("change set of %d objects refused, retrying each on its own", len(keys))
        for key in keys:
            try:
                result.flow_mods += await self._apply(switch, [key])
                result.applied += 1
            except (OpenFlowError, ConflictError, E.EncodeError) as exc:
                self._record_failure(key, str(exc), result)
        return result

    def _record_failure(self, key: str, message: str, result: SyncResult) -> None:
        # once per refusal, not once per retry of the same refusal
        log.log(logging.DEBUG if self.errors.get(key) == message else logging.ERROR,
                "object %s: flows not installed (refused or not encodable), keeping its previous flows:\n%s",
                key, message)
        self.errors[key] = message
        result.failed[key] = message
        self._dirty.discard(key)  # sent again when it changes, on resync, or by retry()

    def _claim(self, keys: list[str], states: dict[str, ObjectState | None]) -> tuple[dict[FlowKey, str],
                                                                                    dict[int, str]]:
        """Ownership after this change set; raises ConflictError on a double claim."""
        flow_claims: dict[FlowKey, str] = {}
        group_claims: dict[int, str] = {}
        changing = set(keys)
        owners = self._flow_owner
        for key in keys:
            state = states.get(key) or EMPTY
            for fk in state.flows:
                owner = owners.get(fk)
                if (owner is not None and owner not in changing) or fk in flow_claims:
                    other = owner if owner not in (None, key) else flow_claims.get(fk)
                    raise ConflictError(f"object {key} and {other} both want flow {state.flows[fk].text()}")
                flow_claims[fk] = key
            for gid in state.groups:
                owner = self._group_owner.get(gid)
                if (owner is not None and owner not in changing) or gid in group_claims:
                    raise ConflictError(f"object {key} and {owner or group_claims.get(gid)} both want group {gid}")
                group_claims[gid] = key
        return flow_claims, group_claims

    async def _apply(self, switch: Switch, keys: list[str]) -> int:
        # what is sent is a snapshot: an object changed while the bundle is in flight stays dirty
        # and goes out with the next sync instead of being taken for installed
        states = {key: self._desired.get(key) for key in keys}
        flow_claims, group_claims = self._claim(keys, states)
        described: dict[int, tuple[str, ir.Flow | ir.Group | None, str]] = {}
        count = await switch.bundle(self._diff_messages(switch, keys, states, flow_claims, group_claims, described),
                                    lambda xid: _describe(described, xid))
        # committed: move the cache
        for key in keys:
            old = self._installed.get(key, EMPTY)
            for fk in old.flows:
                if self._flow_owner.get(fk) == key:
                    del self._flow_owner[fk]
            for gid in old.groups:
                if self._group_owner.get(gid) == key:
                    del self._group_owner[gid]
            new = states[key]
            if new is None:
                self._installed.pop(key, None)
            else:
                self._installed[key] = new
            for watcher in self._watchers:
                if key.startswith(watcher.prefix):
                    watcher.keys.add(key)
            if self._desired.get(key) is new:
                self._dirty.discard(key)
            self.errors.pop(key, None)
        self._flow_owner.update(flow_claims)
        self._group_owner.update(group_claims)
        return count

    def _diff_messages(self, switch: Switch, keys: list[str], states: dict[str, ObjectState | None],
                       flow_claims: dict[FlowKey, str],
                       group_claims: dict[int, str],
                       described: dict[int, tuple[str, ir.Flow | ir.Group | None, str]]
                       ) -> Iterator[tuple[int, bytes]]:
        """Messages turning installed into desired for `keys`, in a safe order: groups, flow
        adds, flow deletes, group deletes. A generator, so sending overlaps encoding."""
        gen = self.generation
        next_xid = switch.next_xid
        cache = self._cache
        for key in keys:
            old = self._installed.get(key, EMPTY)
            for gid, group in (states[key] or EMPTY).groups.items():
                if old.groups.get(gid) != group:
                    xid = next_xid()
                    cmd = E.OFPGC_MODIFY if gid in old.groups or self._group_owner.get(gid) else E.OFPGC_ADD
                    described[xid] = ("group", group, key)
                    yield xid, E.group_mod(group, xid, cmd)
        for key in keys:
            old_flows = self._installed.get(key, EMPTY).flows
            for fk, flow in (states[key] or EMPTY).flows.items():
                if old_flows.get(fk) != flow:
                    xid = next_xid()
                    described[xid] = ("", flow, key)
                    yield xid, E.flow_mod(flow, xid, cookies.with_generation(flow.cookie, gen), E.OFPFC_ADD, cache)
        for key in keys:
            new_flows = (states[key] or EMPTY).flows
            for fk, flow in self._installed.get(key, EMPTY).flows.items():
                if fk not in new_flows and fk not in flow_claims:
                    xid = next_xid()
                    described[xid] = ("delete", flow, key)
                    yield xid, E.flow_mod(flow, xid, 0, E.OFPFC_DELETE_STRICT)
        for key in keys:
            new_groups = (states[key] or EMPTY).groups
            for gid, group in self._installed.get(key, EMPTY).groups.items():
                if gid not in new_groups and gid not in group_claims:
                    xid = next_xid()
                    described[xid] = ("delete group", group, key)
                    yield xid, E.group_mod(group, xid, E.OFPGC_DELETE)

    # ---- full resync ----------------------------------------------------------------------

    async def resync(self, switch: Switch, sweep: bool = True, only: Callable[[str], bool] | None = None) -> int:
        """Make the switch equal to the whole desired state, atomically, with no traffic gap.

        Reads what the switch has, then in one bundle: (re)adds every group and flow of this
        generation, deletes flows of older generations by cookie/mask, and strict-deletes any
        flow of this generation that is not desired. Objects whose flows conflict or are
        refused are left out and reported in `errors`; everything else is installed.

        `sweep=False` (and `only`, the objects to install): install without deleting anything,
        while the agent does not yet know the whole desired state (its informers have not listed):
        the previous generation keeps serving what this one cannot yet describe.
        """
        excluded: dict[str, str] = {}
        refusals = 0
        while True:
            try:
                return await self._resync_once(switch, excluded, sweep, only)
            except _Unencodable:
                continue  # that object is in `excluded` now: build the bundle again without it
            except OpenFlowError as exc:
                at_fault = {self._xid_owner[e.xid] for e, _ in exc.errors if e.xid in self._xid_owner}
                refusals += 1
                if not at_fault or refusals > 3:
                    raise
                for key in at_fault:
                    excluded[key] = str(exc)
                    log.error("object %s: flows refused by the switch during resync:\n%s", key, exc)

    async def _resync_once(self, switch: Switch, excluded: dict[str, str], sweep: bool = True,
                           only: Callable[[str], bool] | None = None) -> int:
        existing = await switch.flow_stats() if sweep else []
        existing_groups = {g.group_id for g in await switch.group_stats()}
        keys = [k for k in sorted(self._desired) if k not in excluded and (only is None or only(k))]
        flow_claims, group_claims, conflicts = self._claim_all(keys)
        keys = [k for k in keys if k not in conflicts]
        snapshot = {k: self._desired[k] for k in keys}  # changes during the bundle stay dirty
        messages: list[tuple[int, bytes]] = []
        described: dict[int, tuple[str, ir.Flow | ir.Group | None, str]] = {}
        self._xid_owner = {}
        gen = self.generation
        for key in keys:
            state = snapshot[key]
            for gid, group in state.groups.items():
                xid = switch.next_xid()
                cmd = E.OFPGC_MODIFY if gid in existing_groups else E.OFPGC_ADD
                messages.append((xid, self._encode_or_exclude(key, excluded, E.group_mod, group, xid, cmd)))
                described[xid] = ("group", group, key)
                self._xid_owner[xid] = key
        for key in keys:
            for flow in snapshot[key].flows.values():
                xid = switch.next_xid()
                data = self._encode_or_exclude(key, excluded, E.flow_mod, flow, xid,
                                               cookies.with_generation(flow.cookie, gen), E.OFPFC_ADD, self._cache)
                messages.append((xid, data))
                described[xid] = ("", flow, key)
                self._xid_owner[xid] = key
        stale_generations = set()
        for stat in existing:
            stat_gen = cookies.generation_of(stat.cookie)
            if stat_gen != gen:
                stale_generations.add(stat_gen)
            elif (stat.table_id, stat.priority, stat.match) not in flow_claims:
                xid = switch.next_xid()
                flow = ir.Flow(stat.table_id, stat.priority, stat.match)
                messages.append((xid, E.flow_mod(flow, xid, 0, E.OFPFC_DELETE_STRICT)))
                described[xid] = ("delete stray", flow, "")
        for stale in sorted(stale_generations):
            xid = switch.next_xid()
            messages.append((xid, E.flow_delete(xid, cookie=stale << cookies.GENERATION_SHIFT,
                                                cookie_mask=cookies.GENERATION_MASK)))
            described[xid] = (f"sweep generation {stale}", None, "")
        for gid in sorted(existing_groups - set(group_claims) if sweep else ()):
            xid = switch.next_xid()
            messages.append((xid, E.group_mod(ir.Group(gid), xid, E.OFPGC_DELETE)))
            described[xid] = (f"delete stray group {gid}", None, "")
        await switch.bundle(messages, lambda xid: _describe(described, xid))
        self._installed = dict(snapshot)
        for watcher in self._watchers:
            watcher.everything = True
        self._flow_owner = flow_claims
        self._group_owner = group_claims
        self._dirty = {k for k in set(self._desired) | set(snapshot)
                       if k not in excluded and k not in conflicts and self._desired.get(k) is not snapshot.get(k)}
        self.errors = {**excluded, **conflicts}
        log.info("resync: %d flows and %d groups of generation %d installed, %s", len(flow_claims), len(group_claims),
                 gen, f"{len(stale_generations)} older generation(s) swept" if sweep
                 else "nothing swept (the desired state is not complete yet)")
        return len(messages)

    @staticmethod
    def _encode_or_exclude(key: str, excluded: dict[str, str], encode: Callable[..., bytes], *args: object) -> bytes:
        """Encode one message of object `key`; if it cannot be encoded, leave the object out."""
        try:
            return encode(*args)
        except E.EncodeError as exc:
            excluded[key] = str(exc)
            log.error("object %s: left out of the resync: %s", key, exc)
            raise _Unencodable(key) from None

    def _claim_all(self, keys: list[str]) -> tuple[dict[FlowKey, str], dict[int, str], dict[str, str]]:
        """Owners of every flow and group; an object that collides with an earlier one is left out."""
        flow_claims: dict[FlowKey, str] = {}
        group_claims: dict[int, str] = {}
        conflicts: dict[str, str] = {}
        for key in keys:
            state = self._desired[key]
            clash = next((fk for fk in state.flows if fk in flow_claims), None)
            gclash = next((gid for gid in state.groups if gid in group_claims), None)
            if clash is not None:
                conflicts[key] = (f"object {key} and {flow_claims[clash]} both want flow "
                                  f"{state.flows[clash].text()}")
            elif gclash is not None:
                conflicts[key] = f"object {key} and {group_claims[gclash]} both want group {gclash}"
            else:
                flow_claims.update(dict.fromkeys(state.flows, key))
                group_claims.update(dict.fromkeys(state.groups, key))
                continue
            log.error("%s", conflicts[key])
        return flow_claims, group_claims, conflicts


def _describe(described: dict[int, tuple[str, ir.Flow | ir.Group | None, str]], xid: int) -> str:
    """ovs-ofctl text of the message with this xid; formatted only when an error needs it."""
    entry = described.get(xid)
    if entry is None:
        return f"message xid {xid}"
    verb, obj, key = entry
    text = obj.text() if obj is not None else ""
    owner = f" (object {key})" if key else ""
    return " ".join(p for p in (verb, text) if p) + owner
