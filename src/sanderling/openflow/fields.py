"""Match fields the pipeline uses: their ovs-ofctl names, OXM/NXM headers and value formats.

One table of facts, shared by the IR (parsing user values, canonical text) and the encoder
(header bytes). Values are kept as plain ints everywhere, so encoding is int.to_bytes.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import Enum

OXM_CLASS_BASIC = 0x8000
NXM_CLASS_0 = 0x0000
NXM_CLASS_1 = 0x0001
ERICSSON_CLASS = 0x1000


class Kind(Enum):
    """How a field's value is written in ovs-ofctl text."""

    INT = "int"
    HEX = "hex"
    MAC = "mac"
    IPV4 = "ipv4"
    IPV6 = "ipv6"
    CT_STATE = "ct_state"
    TCP_FLAGS = "tcp_flags"


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One matchable/loadable field.

    `name` is the ovs-ofctl name used in matches and `set_field`; `nxm_name` the name ovs-ofctl
    uses inside `load:`/`move:` (e.g. NXM_NX_REG0); `order` is the canonical position in text and
    on the wire (prerequisites first, as ovs-ofctl prints them).
    """

    name: str
    nxm_name: str
    oxm_class: int
    field: int
    nbytes: int
    kind: Kind
    maskable: bool = True
    needs_l4: bool = False  # an NXM field whose prerequisite (nw_proto) is an OXM basic field

    @property
    def nbits(self) -> int:
        return self.nbytes * 8

    def header(self, masked: bool = False) -> int:
        length = self.nbytes * 2 if masked else self.nbytes
        return (self.oxm_class << 16) | (self.field << 9) | (int(masked) << 8) | length

    @property
    def sort_key(self) -> tuple[int, int]:
        # OVS checks a field's prerequisites against the fields before it on the wire
        return (OXM_CLASS_BASIC + 1 if self.needs_l4 else self.oxm_class, self.field)


def _basic(name: str, nxm: str, field: int, nbytes: int, kind: Kind, maskable: bool = True) -> FieldSpec:
    return FieldSpec(name, nxm, OXM_CLASS_BASIC, field, nbytes, kind, maskable)


def _nx(name: str, nxm: str, field: int, nbytes: int, kind: Kind, maskable: bool = True) -> FieldSpec:
    return FieldSpec(name, nxm, NXM_CLASS_1, field, nbytes, kind, maskable)


_SPECS: list[FieldSpec] = [
    _basic("in_port", "OXM_OF_IN_PORT", 0, 4, Kind.INT, maskable=False),
    _basic("metadata", "OXM_OF_METADATA", 2, 8, Kind.HEX),
    _basic("dl_dst", "NXM_OF_ETH_DST", 3, 6, Kind.MAC),
    _basic("dl_src", "NXM_OF_ETH_SRC", 4, 6, Kind.MAC),
    _basic("dl_type", "NXM_OF_ETH_TYPE", 5, 2, Kind.HEX, maskable=False),
    _basic("vlan_vid", "OXM_OF_VLAN_VID", 6, 2, Kind.HEX),
    _basic("ip_dscp", "OXM_OF_IP_DSCP", 8, 1, Kind.INT, maskable=False),
    _basic("nw_proto", "NXM_OF_IP_PROTO", 10, 1, Kind.INT, maskable=False),
    _basic("nw_src", "NXM_OF_IP_SRC", 11, 4, Kind.IPV4),
    _basic("nw_dst", "NXM_OF_IP_DST", 12, 4, Kind.IPV4),
    _basic("tcp_src", "NXM_OF_TCP_SRC", 13, 2, Kind.INT),
    _basic("tcp_dst", "NXM_OF_TCP_DST", 14, 2, Kind.INT),
    _basic("udp_src", "NXM_OF_UDP_SRC", 15, 2, Kind.INT),
    _basic("udp_dst", "NXM_OF_UDP_DST", 16, 2, Kind.INT),
    _basic("sctp_src", "OXM_OF_SCTP_SRC", 17, 2, Kind.INT),
    _basic("sctp_dst", "OXM_OF_SCTP_DST", 18, 2, Kind.INT),
    FieldSpec("tcp_flags", "NXM_NX_TCP_FLAGS", NXM_CLASS_1, 34, 2, Kind.TCP_FLAGS, needs_l4=True),
    _basic("icmp_type", "NXM_OF_ICMP_TYPE", 19, 1, Kind.INT, maskable=False),
    _basic("icmp_code", "NXM_OF_ICMP_CODE", 20, 1, Kind.INT, maskable=False),
    _basic("arp_op", "NXM_OF_ARP_OP", 21, 2, Kind.INT, maskable=False),
    _basic("arp_spa", "NXM_OF_ARP_SPA", 22, 4, Kind.IPV4),
    _basic("arp_tpa", "NXM_OF_ARP_TPA", 23, 4, Kind.IPV4),
    _basic("arp_sha", "NXM_NX_ARP_SHA", 24, 6, Kind.MAC),
    _basic("arp_tha", "NXM_NX_ARP_THA", 25, 6, Kind.MAC),
    _basic("ipv6_src", "NXM_NX_IPV6_SRC", 26, 16, Kind.IPV6),
    _basic("ipv6_dst", "NXM_NX_IPV6_DST", 27, 16, Kind.IPV6),
    _basic("icmpv6_type", "NXM_NX_ICMPV6_TYPE", 29, 1, Kind.INT, maskable=False),
    _basic("icmpv6_code", "NXM_NX_ICMPV6_CODE", 30, 1, Kind.INT, maskable=False),
    _basic("nd_target", "NXM_NX_ND_TARGET", 31, 16, Kind.IPV6),
    _basic("nd_sll", "NXM_NX_ND_SLL", 32, 6, Kind.MAC),
    _basic("nd_tll", "NXM_NX_ND_TLL", 33, 6, Kind.MAC),
    _basic("tun_id", "NXM_NX_TUN_ID", 38, 8, Kind.HEX),
    *[_nx(f"reg{i}", f"NXM_NX_REG{i}", i, 4, Kind.HEX) for i in range(16)],
    _nx("tun_src", "NXM_NX_TUN_IPV4_SRC", 31, 4, Kind.IPV4),
    _nx("tun_dst", "NXM_NX_TUN_IPV4_DST", 32, 4, Kind.IPV4),
    _nx("conj_id", "NXM_NX_CONJ_ID", 37, 4, Kind.INT, maskable=False),
    _nx("ct_state", "NXM_NX_CT_STATE", 105, 4, Kind.CT_STATE),
    _nx("ct_zone", "NXM_NX_CT_ZONE", 106, 2, Kind.INT, maskable=False),
    _nx("ct_mark", "NXM_NX_CT_MARK", 107, 4, Kind.HEX),
    _nx("ct_label", "NXM_NX_CT_LABEL", 108, 16, Kind.HEX),
    # Ericsson's OXM class: the NS -> NA rewrite of the neighbour responder (OVS >= 2.12)
    FieldSpec("nd_reserved", "ERICOXM_OF_ICMPV6_ND_RESERVED", ERICSSON_CLASS, 1, 4, Kind.HEX, maskable=False,
              needs_l4=True),
    FieldSpec("nd_options_type", "ERICOXM_OF_ICMPV6_ND_OPTIONS_TYPE", ERICSSON_CLASS, 2, 1, Kind.INT,
              maskable=False, needs_l4=True),
]

FIELDS: dict[str, FieldSpec] = {spec.name: spec for spec in _SPECS}
FIELDS_BY_HEADER: dict[tuple[int, int], FieldSpec] = {(s.oxm_class, s.field): s for s in _SPECS}
OXM_CLASS_EXPERIMENTER = 0xFFFF
ONF_EXPERIMENTER = 0x4F4E4600
# Fields OVS writes as experimenter OXMs in OpenFlow 1.3 replies though we send their NXM form:
# (experimenter id, field) -> field name (tcp_flags is ONFOXM_ET_TCP_FLAGS before OpenFlow 1.5)
EXPERIMENTER_FIELDS: dict[tuple[int, int], str] = {(ONF_EXPERIMENTER, 42): "tcp_flags"}

CT_STATE_BITS: dict[str, int] = {
    "new": 0x01, "est": 0x02, "rel": 0x04, "rpl": 0x08,
    "inv": 0x10, "trk": 0x20, "snat": 0x40, "dnat": 0x80,
}

# TCP header flags as ovs-ofctl names them in `tcp_flags=+syn-ack`
TCP_FLAG_BITS: dict[str, int] = {
    "fin": 0x001, "syn": 0x002, "rst": 0x004, "psh": 0x008,
    "ack": 0x010, "urg": 0x020, "ece": 0x040, "cwr": 0x080, "ns": 0x100,
}
FLAG_BITS: dict[Kind, dict[str, int]] = {Kind.CT_STATE: CT_STATE_BITS, Kind.TCP_FLAGS: TCP_FLAG_BITS}

ETH_TYPE_IP = 0x0800
ETH_TYPE_ARP = 0x0806
ETH_TYPE_IPV6 = 0x86DD
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_SCTP = 132
IPPROTO_ICMPV6 = 58

# Protocol shorthands as ovs-ofctl spells them: name -> (dl_type, nw_proto or None).
PROTOCOLS: dict[str, tuple[int, int | None]] = {
    "ip": (ETH_TYPE_IP, None),
    "arp": (ETH_TYPE_ARP, None),
    "ipv6": (ETH_TYPE_IPV6, None),
    "icmp": (ETH_TYPE_IP, IPPROTO_ICMP),
    "tcp": (ETH_TYPE_IP, IPPROTO_TCP),
    "udp": (ETH_TYPE_IP, IPPROTO_UDP),
    "sctp": (ETH_TYPE_IP, IPPROTO_SCTP),
    "icmp6": (ETH_TYPE_IPV6, IPPROTO_ICMPV6),
    "tcp6": (ETH_TYPE_IPV6, IPPROTO_TCP),
    "udp6": (ETH_TYPE_IPV6, IPPROTO_UDP),
    "sctp6": (ETH_TYPE_IPV6, IPPROTO_SCTP),
}
PROTOCOL_NAMES: dict[tuple[int, int | None], str] = {v: k for k, v in PROTOCOLS.items()}

# tp_src/tp_dst resolve to the protocol-specific OXM field.
TRANSPORT_FIELDS: dict[int, tuple[str, str]] = {
    IPPROTO_TCP: ("tcp_src", "tcp_dst"),
    IPPROTO_UDP: ("udp_src", "udp_dst"),
    IPPROTO_SCTP: ("sctp_src", "sctp_dst"),
}


class FieldError(ValueError):
    """A field name or value that the pipeline cannot express."""


def field(name: str) -> FieldSpec:
    try:
        return FIELDS[name]
    except KeyError:
        raise FieldError(f"unknown match field {name!r}") from None


def parse_value(spec: FieldSpec, value: object) -> int:
    """Turn a user value (int, dotted IP, colon MAC) into the field's int value."""
    if isinstance(value, bool):
        raise FieldError(f"{spec.name}: boolean is not a value")
    if isinstance(value, int):
        result = value
    elif isinstance(value, str):
        if spec.kind is Kind.MAC:
            parts = value.split(":")
            if len(parts) != 6:
                raise FieldError(f"{spec.name}: {value!r} is not a MAC address")
            result = int("".join(p.zfill(2) for p in parts), 16)
        elif spec.kind is Kind.IPV4:
            result = int(ipaddress.IPv4Address(value))
        elif spec.kind is Kind.IPV6:
            result = int(ipaddress.IPv6Address(value))
        else:
            result = int(value, 0)
    else:
        raise FieldError(f"{spec.name}: cannot use {value!r} as a value")
    if result < 0 or result >= 1 << spec.nbits:
        raise FieldError(f"{spec.name}: {value!r} does not fit in {spec.nbits} bits")
    return result


def parse_flags(kind: Kind, text: str) -> tuple[int, int]:
    """'+trk+new-est' (ct_state) or '+syn-ack' (tcp_flags) -> (value, mask)."""
    bits = FLAG_BITS[kind]
    value = mask = 0
    token = ""
    sign = ""
    for ch in text + "+":
        if ch in "+-":
            if token:
                if token not in bits or not sign:
                    raise FieldError(f"{kind.value}: bad flag {sign}{token!r} in {text!r}")
                bit = bits[token]
                mask |= bit
                if sign == "+":
                    value |= bit
            sign, token = ch, ""
        else:
            token += ch
    return value, mask


def parse_ct_state(text: str) -> tuple[int, int]:
    """'+trk+new-est' -> (value, mask)."""
    return parse_flags(Kind.CT_STATE, text)


def format_value(spec: FieldSpec, value: int) -> str:
    if spec.kind is Kind.MAC:
        raw = f"{value:012x}"
        return ":".join(raw[i:i + 2] for i in range(0, 12, 2))
    if spec.kind is Kind.IPV4:
        return str(ipaddress.IPv4Address(value))
    if spec.kind is Kind.IPV6:
        return str(ipaddress.IPv6Address(value))
    if spec.kind is Kind.INT:
        return str(value)
    return hex(value)


def format_flags(kind: Kind, value: int, mask: int) -> str:
    return "".join(("+" if value & bit else "-") + name for name, bit in FLAG_BITS[kind].items() if mask & bit)


def prefix_mask(spec: FieldSpec, prefixlen: int) -> int:
    """The mask of a /prefixlen on an address field (IPv4 or IPv6)."""
    full = (1 << spec.nbits) - 1
    if not 0 <= prefixlen <= spec.nbits:
        raise FieldError(f"{spec.name}: /{prefixlen} is not a prefix length of a {spec.nbits}-bit address")
    return (full << (spec.nbits - prefixlen)) & full


def format_match_value(spec: FieldSpec, value: int, mask: int | None) -> str:
    if spec.kind in FLAG_BITS:
        return format_flags(spec.kind, value, mask if mask is not None else (1 << spec.nbits) - 1)
    if mask is None:
        return format_value(spec, value)
    if spec.kind in (Kind.IPV4, Kind.IPV6):
        net = ipaddress.ip_network((value if spec.kind is Kind.IPV4 else ipaddress.IPv6Address(value),
                                    bin(mask).count("1")), strict=False)
        if int(net.netmask) == mask:
            return str(net) if net.prefixlen != spec.nbits else str(net.network_address)
    return f"{format_value(spec, value)}/{format_value(spec, mask) if spec.kind is not Kind.INT else hex(mask)}"
