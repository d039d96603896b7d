"""Named register fields and marks: the only place register bits are assigned.

Code never writes `reg0[0..3]`; it uses `PORT_CLASS`, `FROM_POD.load()` or `FROM_POD` as a
match contributor. `docs/pipeline.md` is generated from `REG_FIELDS` and `REG_MARKS`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from sanderling.openflow import ir


@dataclass(frozen=True, slots=True)
class RegField:
    """Bits [start..end] of register `reg` with a name and a purpose."""

    name: str
    reg: int
    start: int
    end: int
    doc: str

    @property
    def ref(self) -> ir.FieldRef:
        return ir.FieldRef(f"reg{self.reg}", self.start, self.end)

    @property
    def mask(self) -> int:
        return ((1 << (self.end - self.start + 1)) - 1) << self.start

    def load(self, value: int) -> ir.Load:
        return _load(self, value)

    def equals(self, value: int) -> RegMatch:
        return RegMatch(self, value)

    def text(self) -> str:
        return self.ref.text()


@functools.lru_cache(maxsize=4096)
def _load(field: RegField, value: int) -> ir.Load:
    """Loads are immutable and compilers ask for the same few thousands of times: build each once."""
    return ir.Load(field.ref, value)


@functools.lru_cache(maxsize=4096)
def _match_items(field: RegField, value: int) -> tuple[ir.MatchItem, ...]:
    mask = field.mask
    return ((f"reg{field.reg}", (value << field.start) & mask, None if mask == 0xFFFFFFFF else mask),)


@dataclass(frozen=True, slots=True)
class RegMatch:
    field: RegField
    value: int

    def match_items(self) -> tuple[ir.MatchItem, ...]:
        return _match_items(self.field, self.value)


@dataclass(frozen=True, slots=True)
class RegMark:
    """A named value of a register field, e.g. FROM_POD = PORT_CLASS is 1."""

    name: str
    field: RegField
    value: int
    doc: str

    def load(self) -> ir.Load:
        return self.field.load(self.value)

    def match_items(self) -> tuple[ir.MatchItem, ...]:
        return RegMatch(self.field, self.value).match_items()


PORT_CLASS = RegField("PORT_CLASS", 0, 0, 3, "what kind of port the packet came in on")
TARGET_OFPORT = RegField("TARGET_OFPORT", 1, 0, 31, "OpenFlow port the packet leaves through, set by forwarding")

SERVICE_MASQ = RegField("SERVICE_MASQ", 0, 4, 4, "1: this new service connection must be masqueraded (SNAT)")
AFFINITY_HIT = RegField("AFFINITY_HIT", 0, 5, 5, "1: SessionAffinity found this client's endpoint")
DIRECT_TARGET = RegField("DIRECT_TARGET", 0, 6, 6,
                         "1: a local pod's packet to a service target port, tracked in the DNAT zone")
ENDPOINT_IP = RegField("ENDPOINT_IP", 2, 0, 31, "the endpoint a service's group bucket chose")
ENDPOINT_PORT = RegField("ENDPOINT_PORT", 3, 0, 15, "the chosen endpoint's port")
SERVICE_GROUP = RegField("SERVICE_GROUP", 4, 0, 31, "the service port (its group id) the endpoint was chosen for")

# an IPv6 endpoint chosen under session affinity: its 128 bits in four registers, most significant first
ENDPOINT_IP6 = tuple(RegField(f"ENDPOINT_IP6_{i}", 8 + i, 0, 31,
                              f"bits {127 - 32 * i}..{96 - 32 * i} of the IPv6 endpoint a group bucket chose")
                     for i in range(4))

SECONDARY_NETWORK = RegField("SECONDARY_NETWORK", 5, 0, 15,
                             "secondary-network bridges only: the network of the packet (every policy flow of a "
                             "network matches it; it is also the network's conntrack zone)")

SERVICE_REQUEST = RegField("SERVICE_REQUEST", 0, 7, 7,
                           "1: a request of a service connection this node translated (DNAT zone)")

SECONDARY_FROM_UPLINK = RegField("SECONDARY_FROM_UPLINK", 5, 16, 16,
                                 "secondary-network bridges only: 1: the packet came in from the uplink")
SECONDARY_AFFINITY_HIT = RegField("SECONDARY_AFFINITY_HIT", 5, 17, 17,
                                  "secondary-network bridges only: 1: ServiceAffinity found this client's endpoint")

SECONDARY_REMOTE_ENDPOINT = RegField("SECONDARY_REMOTE_ENDPOINT", 5, 18, 18,
                                     "secondary-network bridges only: 1: the chosen endpoint is on another node")

REG_FIELDS: tuple[RegField, ...] = (PORT_CLASS, TARGET_OFPORT, SERVICE_MASQ, AFFINITY_HIT, DIRECT_TARGET,
                                    SERVICE_REQUEST, ENDPOINT_IP,
                                    ENDPOINT_PORT, SERVICE_GROUP, *ENDPOINT_IP6,
                                    SECONDARY_NETWORK, SECONDARY_FROM_UPLINK,
                                    SECONDARY_AFFINITY_HIT, SECONDARY_REMOTE_ENDPOINT)

FROM_POD = RegMark("FROM_POD", PORT_CLASS, 1, "the packet came from a local pod's port")
FROM_GATEWAY = RegMark("FROM_GATEWAY", PORT_CLASS, 2, "the packet came from the node's gateway (host) port")
FROM_UPLINK = RegMark("FROM_UPLINK", PORT_CLASS, 3, "the packet came from the uplink or a tunnel")

REMEMBERED = RegMark("REMEMBERED", AFFINITY_HIT, 1, "the client's endpoint comes from session affinity")
MASQUERADE = RegMark("MASQUERADE", SERVICE_MASQ, 1, "rewrite the source to the node's masquerade address")
TO_TARGET_PORT = RegMark("TO_TARGET_PORT", DIRECT_TARGET, 1,
                         "a local pod's request to a service target port (one that is not to a service address is "
                         "committed to the origin zone as direct)")

TRANSLATED = RegMark("TRANSLATED", SERVICE_REQUEST, 1,
                     "a service connection's request after DNAT on this node: policy tracks it in the service "
                     "policy zone")

REG_MARKS: tuple[RegMark, ...] = (FROM_POD, FROM_GATEWAY, FROM_UPLINK, MASQUERADE, REMEMBERED, TO_TARGET_PORT,
                                  TRANSLATED)

# conntrack: zones and ct_mark bits, named once
DNAT_ZONE = 0xFFF0  # service DNAT (and, later, policy) connections
SNAT_ZONE = 0xFFF1  # masqueraded service connections
POLICY_ZONE = 0xFFF2  # connections of pods isolated by a NetworkPolicy
CT_MARK_MASQ = 0x1  # ct_mark bit: the connection was masqueraded, re-SNAT its later packets
# requests of service connections translated on this node, for policy: their replies skip policy
# (they are translated back first), so these entries never see a close; in the policy zone they
# made a direct connection reusing the tuple look invalid until they expired (about a minute)
SERVICE_POLICY_ZONE = 0xFFF4
ORIGIN_ZONE = 0xFFF3  # local pods' connections to target ports, by their endpoint tuple: direct or service?
# a conntrack zone per secondary network for its policy, and one for its Services (+ NETWORK_SERVICE_ZONE_OFFSET)
FIRST_NETWORK_ZONE, LAST_NETWORK_ZONE = 0x8000, 0xBFEF
NETWORK_SERVICE_ZONE_OFFSET = 0x4000
CT_MARK_ALLOWED = 0x4  # ct_mark bit in a policy zone: policy allowed the connection when it started
CT_MARK_DIRECT = 0x2  # ct_mark bit in the origin zone: the tuple's latest connection was direct (not a service's)


def check_no_overlap() -> None:
    """Fields sharing a register must not share bits (checked by tests and at import)."""
    taken: dict[int, int] = {}
    for f in REG_FIELDS:
        if taken.get(f.reg, 0) & f.mask:
            raise ValueError(f"register field {f.name} overlaps another field of reg{f.reg}")
        taken[f.reg] = taken.get(f.reg, 0) | f.mask


check_no_overlap()
