"""Parsing of the OpenFlow 1.3 messages a switch sends to the controller.

Only what the controller consumes: errors, packet-ins, features, bundle replies and the
multipart replies for flow, port and group statistics.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from sanderling.openflow import encoder as E
from sanderling.openflow import fields as F
from sanderling.openflow import ir

ERROR_TYPES = {
    0: "HELLO_FAILED", 1: "BAD_REQUEST", 2: "BAD_ACTION", 3: "BAD_INSTRUCTION", 4: "BAD_MATCH",
    5: "FLOW_MOD_FAILED", 6: "GROUP_MOD_FAILED", 7: "PORT_MOD_FAILED", 8: "TABLE_MOD_FAILED",
    9: "QUEUE_OP_FAILED", 10: "SWITCH_CONFIG_FAILED", 11: "ROLE_REQUEST_FAILED",
    12: "METER_MOD_FAILED", 13: "TABLE_FEATURES_FAILED", 0xFFFF: "EXPERIMENTER",
}


class DecodeError(ValueError):
    """A message from the switch that does not parse (truncated, a length field that lies, a
    zero-length entry). Raised for that message alone: the session logs it and goes on."""


_T = TypeVar("_T")


def _decoder(what: str) -> Callable[[Callable[..., _T]], Callable[..., _T]]:
    """Turn any parsing failure of `what` into a DecodeError naming it."""
    def wrap(parse: Callable[..., _T]) -> Callable[..., _T]:
        @functools.wraps(parse)
        def run(data: bytes, *args: object) -> _T:
            try:
                return parse(data, *args)
            except DecodeError:
                raise
            except (struct.error, IndexError, ValueError, KeyError) as exc:
                raise DecodeError(f"malformed {what} ({len(data)} bytes): {exc}") from None
        return run
    return wrap


def _entry_length(data: bytes, pos: int, end: int, minimum: int, what: str) -> int:
    """The length of the stats entry at pos, checked: never zero (a loop that would not advance),
    never past the message."""
    entry_len = struct.unpack_from("!H", data, pos)[0]
    if entry_len < minimum or pos + entry_len > end:
        raise DecodeError(f"{what} entry at offset {pos} claims {entry_len} bytes "
                          f"(at least {minimum}, at most {end - pos})")
    return entry_len


def _message_end(data: bytes) -> int:
    length = parse_header(data)[2]
    if length > len(data):
        raise DecodeError(f"message claims {length} bytes, has {len(data)}")
    return length


@dataclass(frozen=True, slots=True)
class ErrorMsg:
    xid: int
    type: int
    code: int
    data: bytes

    def describe(self) -> str:
        if self.type == 0xFFFF and len(self.data) >= 6:
            exp_code = self.code
            experimenter = struct.unpack_from("!I", self.data, 0)[0]
            return f"EXPERIMENTER error 0x{experimenter:08x} code {exp_code}"
        return f"{ERROR_TYPES.get(self.type, self.type)} code {self.code}"


@dataclass(frozen=True, slots=True)
class PacketIn:
    buffer_id: int
    total_len: int
    reason: int
    table_id: int
    cookie: int
    match: ir.Match
    data: bytes


@dataclass(frozen=True, slots=True)
class FlowStats:
    table_id: int
    priority: int
    cookie: int
    packet_count: int
    byte_count: int
    duration_sec: int
    match: ir.Match


@dataclass(frozen=True, slots=True)
class PortStats:
    port_no: int
    rx_packets: int
    tx_packets: int
    rx_bytes: int
    tx_bytes: int
    rx_dropped: int
    tx_dropped: int


@dataclass(frozen=True, slots=True)
class GroupStats:
    group_id: int
    packet_count: int
    byte_count: int
    bucket_packets: tuple[int, ...]


@_decoder("OpenFlow header")
def parse_header(data: bytes) -> tuple[int, int, int, int]:
    """(version, type, length, xid)."""
    return struct.unpack_from("!BBHI", data, 0)


@_decoder("ERROR")
def parse_error(data: bytes) -> ErrorMsg:
    _, _, length, xid = parse_header(data)
    etype, code = struct.unpack_from("!HH", data, 8)
    return ErrorMsg(xid, etype, code, data[12:length])


def parse_oxm(data: bytes, offset: int) -> tuple[ir.Match, int]:
    """Parse an ofp_match at offset; return the match and the offset after its padding."""
    mtype, length = struct.unpack_from("!HH", data, offset)
    end = offset + length
    if length < 4 or end > len(data):
        raise DecodeError(f"match at offset {offset} claims {length} bytes, {len(data) - offset} left")
    pos = offset + 4
    items: list[ir.MatchItem] = []
    while pos + 4 <= end:
        hdr = struct.unpack_from("!I", data, pos)[0]
        cls, fld, hasmask, ln = hdr >> 16, (hdr >> 9) & 0x7F, (hdr >> 8) & 1, hdr & 0xFF
        pos += 4
        if pos + ln > end:
            raise DecodeError(f"match field at offset {pos - 4} runs past its match")
        spec = F.FIELDS_BY_HEADER.get((cls, fld))
        if cls == F.OXM_CLASS_EXPERIMENTER and ln >= 4:
            name = F.EXPERIMENTER_FIELDS.get((struct.unpack_from("!I", data, pos)[0], fld))
            spec = F.FIELDS[name] if name else None
            pos, ln = pos + 4, ln - 4
        if spec is None:
            pos += ln
            continue
        if hasmask:
            half = ln // 2
            value = int.from_bytes(data[pos:pos + half], "big")
            mask: int | None = int.from_bytes(data[pos + half:pos + ln], "big")
        else:
            value, mask = int.from_bytes(data[pos:pos + ln], "big"), None
        items.append((spec.name, value, mask))
        pos += ln
    items.sort(key=lambda it: F.FIELDS[it[0]].sort_key)
    return ir.Match(tuple(items)), offset + ((length + 7) // 8) * 8


@_decoder("PACKET_IN")
def parse_packet_in(data: bytes) -> PacketIn:
    end = _message_end(data)
    data = data[:end]
    buffer_id, total_len, reason, table_id, cookie = struct.unpack_from("!IHBBQ", data, 8)
    match, pos = parse_oxm(data, 24)
    if pos + 2 > end:
        raise DecodeError("PACKET_IN ends inside its match padding")
    return PacketIn(buffer_id, total_len, reason, table_id, cookie, match, data[pos + 2:])


OFPPR_ADD, OFPPR_DELETE, OFPPR_MODIFY = 0, 1, 2


@dataclass(frozen=True, slots=True)
class PortStatus:
    """A port added, deleted or changed on the switch (sent as ovs-vswitchd opens each port)."""
    reason: int
    port_no: int
    name: str


@_decoder("PORT_STATUS")
def parse_port_status(data: bytes) -> PortStatus:
    # header (8), reason (1), pad (7), then ofp_port: port_no (4), pad (4), hw_addr (6), pad (2), name (16)
    if _message_end(data) < 48:
        raise DecodeError("PORT_STATUS shorter than its port description")
    reason = data[8]
    port_no = struct.unpack_from("!I", data, 16)[0]
    name = data[32:48].split(b"\0", 1)[0].decode("utf-8", "replace")
    return PortStatus(reason, port_no, name)


@_decoder("FEATURES_REPLY")
def parse_features(data: bytes) -> int:
    """datapath id."""
    return struct.unpack_from("!Q", data, 8)[0]


@_decoder("bundle reply")
def parse_bundle_reply(data: bytes) -> tuple[int, int]:
    """(bundle_id, ctrl_type) of an ONF bundle-control reply."""
    experimenter, exp_type, bundle_id, ctrl_type = struct.unpack_from("!IIIH", data, 8)
    if experimenter != E.ONF or exp_type != E.ONFT_BUNDLE_CONTROL:
        raise DecodeError("not a bundle control message")
    return bundle_id, ctrl_type


@_decoder("MULTIPART_REPLY")
def multipart_header(data: bytes) -> tuple[int, bool]:
    """(multipart type, more-follows flag)."""
    mp_type, flags = struct.unpack_from("!HH", data, 8)
    return mp_type, bool(flags & 1)


@_decoder("flow stats reply")
def parse_flow_stats(data: bytes) -> list[FlowStats]:
    length = _message_end(data)
    pos = 16
    out = []
    while pos < length:
        entry_len = _entry_length(data, pos, length, 56, "flow stats")
        (_, table_id, dsec, _dnsec, priority, _idle, _hard, _flags, cookie, packets,
         nbytes) = struct.unpack_from("!HBxIIHHHH4xQQQ", data, pos)
        match, _ = parse_oxm(data, pos + 48)
        out.append(FlowStats(table_id, priority, cookie, packets, nbytes, dsec, match))
        pos += entry_len
    return out


@_decoder("port stats reply")
def parse_port_stats(data: bytes) -> list[PortStats]:
    length = _message_end(data)
    pos = 16
    out = []
    while pos + 112 <= length:
        (port_no, rx_p, tx_p, rx_b, tx_b, rx_d, tx_d) = struct.unpack_from("!I4xQQQQQQ", data, pos)
        out.append(PortStats(port_no, rx_p, tx_p, rx_b, tx_b, rx_d, tx_d))
        pos += 112
    return out


@dataclass(frozen=True)
class TableStats:
    table_id: int
    active_count: int
    lookup_count: int
    matched_count: int


@dataclass(frozen=True)
class MeterStats:
    meter_id: int
    packet_in_count: int
    byte_in_count: int
    band_packets: tuple[int, ...]  # per band: packets the band acted on (for a drop band: dropped)


def _packet_counters(data: bytes, start: int, end: int) -> tuple[int, ...]:
    """The packet counts of the 16-byte (packets, bytes) records from start to end: a group's
    buckets, a meter's bands."""
    return tuple(struct.unpack_from("!Q", data, pos)[0] for pos in range(start, end - 15, 16))


@_decoder("table stats reply")
def parse_table_stats(data: bytes) -> list[TableStats]:
    length = _message_end(data)
    pos = 16
    out = []
    while pos + 24 <= length:
        table_id, active, lookups, matched = struct.unpack_from("!B3xIQQ", data, pos)
        out.append(TableStats(table_id, active, lookups, matched))
        pos += 24
    return out


@_decoder("meter stats reply")
def parse_meter_stats(data: bytes) -> list[MeterStats]:
    length = _message_end(data)
    pos = 16
    out = []
    while pos < length:
        if pos + 6 > length:
            raise DecodeError(f"meter stats entry at offset {pos} is cut short")
        entry_len = _entry_length(data, pos + 4, length + 4, 40, "meter stats")  # its length follows meter_id
        if pos + entry_len > length:
            raise DecodeError(f"meter stats entry at offset {pos} claims {entry_len} bytes, past the message")
        meter_id, _len, _flows, packets, nbytes = struct.unpack_from("!IH6xIQQ", data, pos)
        out.append(MeterStats(meter_id, packets, nbytes, _packet_counters(data, pos + 40, pos + entry_len)))
        pos += entry_len
    return out


@_decoder("group stats reply")
def parse_group_stats(data: bytes) -> list[GroupStats]:
    length = _message_end(data)
    pos = 16
    out = []
    while pos < length:
        entry_len = _entry_length(data, pos, length, 40, "group stats")
        _, group_id, _ref, packets, nbytes = struct.unpack_from("!H2xII4xQQ", data, pos)
        out.append(GroupStats(group_id, packets, nbytes, _packet_counters(data, pos + 40, pos + entry_len)))
        pos += entry_len
    return out
