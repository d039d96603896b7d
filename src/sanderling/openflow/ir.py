"""Immutable flow IR: Match, actions, Flow, Group and Meter, each with a canonical ovs-ofctl text.

The compiler produces these values, the realizer diffs them (they hash and compare by value),
the encoder turns them into OpenFlow 1.3 + Nicira bytes, and `text()` gives exactly what
`ovs-ofctl add-flow(s)` accepts, so every flow can be shown, golden-tested and cross-checked
against ovs-ofctl's own parser.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Protocol, Union

from sanderling.openflow import fields as F

MatchItem = tuple[str, int, Union[int, None]]
_SORT_KEYS = {name: spec.sort_key for name, spec in F.FIELDS.items()}

# Reserved OpenFlow ports.
IN_PORT = 0xFFFFFFF8
NORMAL = 0xFFFFFFFA
FLOOD = 0xFFFFFFFB
CONTROLLER = 0xFFFFFFFD
LOCAL = 0xFFFFFFFE
PORT_NAMES = {IN_PORT: "in_port", NORMAL: "NORMAL", FLOOD: "FLOOD", CONTROLLER: "CONTROLLER",
              LOCAL: "LOCAL"}


class MatchContributor(Protocol):
    """Anything that constrains a match, e.g. a named register mark."""

    def match_items(self) -> tuple[MatchItem, ...]: ...


def _merge(items: dict[str, tuple[int, int | None]], name: str, value: int, mask: int | None) -> None:
    spec = F.field(name)
    full = (1 << spec.nbits) - 1
    if mask is not None and not spec.maskable:
        raise F.FieldError(f"{name} cannot be matched with a mask")
    if mask is not None and mask == full:
        mask = None
    if mask is not None:
        value &= mask
    if name not in items:
        items[name] = (value, mask)
        return
    old_value, old_mask = items[name]
    m_old = full if old_mask is None else old_mask
    m_new = full if mask is None else mask
    overlap = m_old & m_new
    if (old_value & overlap) != (value & overlap):
        raise F.FieldError(f"conflicting constraints on {name}")
    merged_mask = m_old | m_new
    items[name] = (old_value | value, None if merged_mask == full else merged_mask)


class Match:
    """A canonical set of (field, value, mask) constraints, sorted in wire/text order.

    Immutable; the hash is computed once, because the realizer keys every flow by its match.
    """

    __slots__ = ("items", "_hash")
    items: tuple[MatchItem, ...]
    _hash: int

    def __init__(self, items: tuple[MatchItem, ...] = ()) -> None:
        object.__setattr__(self, "items", items)
        object.__setattr__(self, "_hash", hash(items))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Match is immutable")

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, Match):
            return NotImplemented
        return self._hash == other._hash and self.items == other.items

    def __repr__(self) -> str:
        return f"Match({self.text()!r})"

    def __reduce__(self) -> tuple[type[Match], tuple[tuple[MatchItem, ...]]]:
        return (Match, (self.items,))

    @staticmethod
    def build(*contributors: MatchContributor, proto: str | None = None, **kw: object) -> Match:
        """match(proto="tcp", nw_dst="10.96.0.1", tp_dst=80, ct_state="+trk+new", reg0=(1, 0xf))."""
        items: dict[str, tuple[int, int | None]] = {}
        nw_proto: int | None = None
        if proto is not None:
            if proto not in F.PROTOCOLS:
                raise F.FieldError(f"unknown protocol {proto!r}")
            dl_type, nw_proto = F.PROTOCOLS[proto]
            _merge(items, "dl_type", dl_type, None)
            if nw_proto is not None:
                _merge(items, "nw_proto", nw_proto, None)
        if "nw_proto" in kw and isinstance(kw["nw_proto"], int):
            nw_proto = kw["nw_proto"]
        mask: int | None
        for contributor in contributors:
            for name, value, mask in contributor.match_items():
                _merge(items, name, value, mask)
        for name, raw in kw.items():
            if name in ("tp_src", "tp_dst"):
                if nw_proto not in F.TRANSPORT_FIELDS:
                    raise F.FieldError(f"{name} needs proto tcp, udp or sctp")
                name = F.TRANSPORT_FIELDS[nw_proto][0 if name == "tp_src" else 1]
            spec = F.field(name)
            mask = None
            if spec.kind in F.FLAG_BITS and isinstance(raw, str):
                value, mask = F.parse_flags(spec.kind, raw)
            elif isinstance(raw, tuple):
                value, mask = F.parse_value(spec, raw[0]), F.parse_value(spec, raw[1])
            elif isinstance(raw, str) and "/" in raw and spec.kind in (F.Kind.IPV4, F.Kind.IPV6):
                addr, plen = raw.split("/")
                value = F.parse_value(spec, addr)
                mask = F.prefix_mask(spec, int(plen))
            else:
                value = F.parse_value(spec, raw)
            _merge(items, name, value, mask)
        ordered = sorted(items.items(), key=lambda kv: F.FIELDS[kv[0]].sort_key)
        return Match(tuple((name, v, m) for name, (v, m) in ordered))

    @staticmethod
    def from_items(items: Iterable[MatchItem]) -> Match:
        """A match from already-parsed (field, value, mask) items: the compilers' fast path for flows
        built by the hundred thousand (no value parsing; fields are checked, order made canonical)."""
        return Match(tuple(sorted(items, key=lambda item: _SORT_KEYS[item[0]])))

    def get(self, name: str) -> tuple[int, int | None] | None:
        for n, v, m in self.items:
            if n == name:
                return v, m
        return None

    def text(self) -> str:
        parts: list[str] = []
        values = {n: (v, m) for n, v, m in self.items}
        dl = values.get("dl_type")
        proto_key: tuple[int, int | None] | None = None
        if dl is not None:
            nwp = values.get("nw_proto")
            candidate = (dl[0], nwp[0] if nwp else None)
            if candidate in F.PROTOCOL_NAMES:
                proto_key = candidate
                parts.append(F.PROTOCOL_NAMES[candidate])
        for name, value, mask in self.items:
            if proto_key is not None and (name == "dl_type" or (name == "nw_proto" and proto_key[1] is not None)):
                continue
            parts.append(f"{name}={F.format_match_value(F.FIELDS[name], value, mask)}")
        return ",".join(parts)


def match(*contributors: MatchContributor, proto: str | None = None, **kw: object) -> Match:
    return Match.build(*contributors, proto=proto, **kw)


@dataclass(frozen=True, slots=True)
class FieldRef:
    """Bits [start..end] of a field, as load/move/learn address them (NXM_NX_REG0[0..3])."""

    field: str
    start: int = 0
    end: int | None = None

    @property
    def spec(self) -> F.FieldSpec:
        return F.field(self.field)

    @property
    def last(self) -> int:
        return self.spec.nbits - 1 if self.end is None else self.end

    @property
    def nbits(self) -> int:
        return self.last - self.start + 1

    def text(self) -> str:
        spec = self.spec
        if self.start == 0 and self.last == spec.nbits - 1:
            return f"{spec.nxm_name}[]"
        if self.start == self.last:
            return f"{spec.nxm_name}[{self.start}]"
        return f"{spec.nxm_name}[{self.start}..{self.last}]"


# ---- actions -------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Output:
    port: int
    max_len: int = 0

    def text(self) -> str:
        if self.port == CONTROLLER:
            return f"CONTROLLER:{self.max_len or 65535}"
        return f"output:{PORT_NAMES.get(self.port, self.port)}" if self.port not in (IN_PORT,) else "IN_PORT"


@dataclass(frozen=True, slots=True)
class OutputReg:
    src: FieldRef
    max_len: int = 0

    def text(self) -> str:
        return f"output:{self.src.text()}"


@dataclass(frozen=True, slots=True)
class GroupAction:
    group_id: int

    def text(self) -> str:
        return f"group:{self.group_id}"


@dataclass(frozen=True, slots=True)
class SetField:
    field: str
    value: int

    def text(self) -> str:
        spec = F.field(self.field)
        return f"set_field:{F.format_value(spec, self.value)}->{self.field}"


def set_field(name: str, value: object) -> SetField:
    return SetField(name, F.parse_value(F.field(name), value))


@dataclass(frozen=True, slots=True)
class Load:
    """Load an immediate value into some bits of a field (NXAST_REG_LOAD)."""

    dst: FieldRef
    value: int

    def text(self) -> str:
        return f"load:{hex(self.value)}->{self.dst.text()}"


@dataclass(frozen=True, slots=True)
class Move:
    src: FieldRef
    dst: FieldRef

    def text(self) -> str:
        return f"move:{self.src.text()}->{self.dst.text()}"


@dataclass(frozen=True, slots=True)
class DecTTL:
    def text(self) -> str:
        return "dec_ttl"


@dataclass(frozen=True, slots=True)
class Resubmit:
    table: int
    in_port: int = IN_PORT

    def text(self) -> str:
        port = "" if self.in_port == IN_PORT else str(self.in_port)
        return f"resubmit({port},{self.table})"


@dataclass(frozen=True, slots=True)
class Goto:
    """goto_table instruction; must be the last element of a flow's actions."""

    table: int

    def text(self) -> str:
        return f"goto_table:{self.table}"


@dataclass(frozen=True, slots=True)
class MeterAction:
    """meter instruction; must be the first element of a flow's actions."""

    meter_id: int

    def text(self) -> str:
        return f"meter:{self.meter_id}"


@dataclass(frozen=True, slots=True)
class Nat:
    """nat(...) inside ct(): kind is "src", "dst" or "" (apply the connection's NAT)."""

    kind: str = ""
    ip_min: int | None = None
    ip_max: int | None = None
    port_min: int | None = None
    port_max: int | None = None
    persistent: bool = False
    random: bool = False
    v6: bool = False  # the addresses are IPv6 (written [addr] in text)

    def text(self) -> str:
        if not self.kind:
            return "nat"
        inner = self.kind
        if self.ip_min is not None:
            field = F.FIELDS["ipv6_src" if self.v6 else "nw_src"]

            def addr(value: int) -> str:
                text = F.format_value(field, value)
                return f"[{text}]" if self.v6 else text

            inner += "=" + addr(self.ip_min)
            if self.ip_max is not None and self.ip_max != self.ip_min:
                inner += "-" + addr(self.ip_max)
            if self.port_min is not None:
                inner += f":{self.port_min}"
                if self.port_max is not None and self.port_max != self.port_min:
                    inner += f"-{self.port_max}"
        flags = [f for f, on in (("persistent", self.persistent), ("random", self.random)) if on]
        return "nat(" + ",".join([inner, *flags]) + ")"


@dataclass(frozen=True, slots=True)
class CT:
    """Send through conntrack: ct(commit, zone=..., table=..., nat(...), exec(...))."""

    commit: bool = False
    zone: int | FieldRef = 0
    table: int | None = None
    nat: Nat | None = None
    exec_: tuple[SetField | Load | Move, ...] = ()

    def text(self) -> str:
        parts = []
        if self.commit:
            parts.append("commit")
        if isinstance(self.zone, FieldRef):
            parts.append(f"zone={self.zone.text()}")
        elif self.zone:
            parts.append(f"zone={self.zone}")
        if self.table is not None:
            parts.append(f"table={self.table}")
        if self.nat is not None:
            parts.append(self.nat.text())
        if self.exec_:
            parts.append("exec(" + ",".join(a.text() for a in self.exec_) + ")")
        return "ct(" + ",".join(parts) + ")" if parts else "ct"


@dataclass(frozen=True, slots=True)
class Conjunction:
    conj_id: int
    clause: int  # 1-based, as ovs-ofctl writes it
    n_clauses: int

    def text(self) -> str:
        return f"conjunction({self.conj_id},{self.clause}/{self.n_clauses})"


@dataclass(frozen=True, slots=True)
class Controller:
    """Send to the controller (NXAST_CONTROLLER): reason 1 = action, id distinguishes users."""

    max_len: int = 65535
    controller_id: int = 0
    reason: int = 1
    meter_id: int = 0  # rate-limit these packet-ins with this meter (NXAST_CONTROLLER2)

    def text(self) -> str:
        meter = f",meter_id={self.meter_id}" if self.meter_id else ""
        return f"controller(reason=action,max_len={self.max_len},id={self.controller_id}{meter})"


@dataclass(frozen=True, slots=True)
class LearnMatch:
    """In a learned flow: match dst == (src field of the learning packet | immediate value)."""

    dst: FieldRef
    src: FieldRef | None = None
    value: int | None = None

    def text(self) -> str:
        if self.value is not None:
            return f"{self.dst.text()}={hex(self.value)}"
        if self.src is None or self.src == self.dst:
            return self.dst.text()
        return f"{self.dst.text()}={self.src.text()}"


@dataclass(frozen=True, slots=True)
class LearnLoad:
    dst: FieldRef
    src: FieldRef | None = None
    value: int | None = None

    def text(self) -> str:
        source = hex(self.value) if self.value is not None else self.src.text() if self.src else "0"
        return f"load:{source}->{self.dst.text()}"


@dataclass(frozen=True, slots=True)
class LearnOutput:
    src: FieldRef

    def text(self) -> str:
        return f"output:{self.src.text()}"


LearnSpec = Union[LearnMatch, LearnLoad, LearnOutput]


@dataclass(frozen=True, slots=True)
class Learn:
    table: int
    specs: tuple[LearnSpec, ...]
    priority: int = 0x8000
    idle_timeout: int = 0
    hard_timeout: int = 0
    fin_idle_timeout: int = 0
    fin_hard_timeout: int = 0
    cookie: int = 0
    delete_learned: bool = False

    def text(self) -> str:
        parts = [f"table={self.table}"]
        if self.idle_timeout:
            parts.append(f"idle_timeout={self.idle_timeout}")
        if self.hard_timeout:
            parts.append(f"hard_timeout={self.hard_timeout}")
        if self.fin_idle_timeout:
            parts.append(f"fin_idle_timeout={self.fin_idle_timeout}")
        if self.fin_hard_timeout:
            parts.append(f"fin_hard_timeout={self.fin_hard_timeout}")
        parts.append(f"priority={self.priority}")
        if self.cookie:
            parts.append(f"cookie={hex(self.cookie)}")
        if self.delete_learned:
            parts.append("delete_learned")
        parts.extend(s.text() for s in self.specs)
        return "learn(" + ",".join(parts) + ")"


Action = Union[Output, OutputReg, GroupAction, SetField, Load, Move, DecTTL, Resubmit, Goto,
               MeterAction, CT, Conjunction, Controller, Learn]


def actions_text(actions: tuple[Action, ...]) -> str:
    return ",".join(a.text() for a in actions) if actions else "drop"


# ---- flows, groups, meters ----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Flow:
    """One flow entry. `cookie` carries category and object id; the realizer adds the generation."""

    table: int
    priority: int
    match: Match
    actions: tuple[Action, ...] = ()
    cookie: int = 0
    idle_timeout: int = 0
    hard_timeout: int = 0

    @property
    def key(self) -> tuple[int, int, Match]:
        """What OpenFlow considers the same flow: an ADD with this key replaces it."""
        return (self.table, self.priority, self.match)

    def text(self, cookie: int | None = None) -> str:
        head = [f"table={self.table}", f"priority={self.priority}"]
        shown = self.cookie if cookie is None else cookie
        if shown:
            head.append(f"cookie={hex(shown)}")
        if self.idle_timeout:
            head.append(f"idle_timeout={self.idle_timeout}")
        if self.hard_timeout:
            head.append(f"hard_timeout={self.hard_timeout}")
        m = self.match.text()
        if m:
            head.append(m)
        return ",".join(head) + " actions=" + actions_text(self.actions)


GROUP_TYPES = {"all": 0, "select": 1, "indirect": 2, "ff": 3}


@dataclass(frozen=True, slots=True)
class Bucket:
    actions: tuple[Action, ...]
    weight: int = 0
    watch_port: int = 0xFFFFFFFF

    def text(self, group_type: str) -> str:
        parts = []
        if group_type == "select":
            parts.append(f"weight:{self.weight}")
        if self.watch_port != 0xFFFFFFFF:
            parts.append(f"watch_port:{self.watch_port}")
        parts.append("actions=" + actions_text(self.actions))
        return "bucket=" + ",".join(parts)


@dataclass(frozen=True, slots=True)
class Group:
    group_id: int
    type: str = "select"
    buckets: tuple[Bucket, ...] = dc_field(default_factory=tuple)

    def text(self) -> str:
        return ",".join([f"group_id={self.group_id}", f"type={self.type}",
                         *(b.text(self.type) for b in self.buckets)])


@dataclass(frozen=True, slots=True)
class Meter:
    """A single drop band: rate in packets/s (pktps) or kbit/s."""

    meter_id: int
    rate: int
    burst: int = 0
    pktps: bool = True

    def text(self) -> str:
        unit = "pktps" if self.pktps else "kbps"
        burst = ",burst" if self.burst else ""
        band = f"band=type=drop,rate={self.rate}" + (f",burst_size={self.burst}" if self.burst else "")
        return f"meter={self.meter_id},{unit}{burst},{band}"
