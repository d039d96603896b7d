"""The OpenFlow decoder and session against random, truncated and lying messages (issue 20).

Only DecodeError may escape a parser, no parser may loop on a zero-length entry, and a session
that receives such messages logs them and keeps answering. Hypothesis runs a bounded number of
examples here; `SANDERLING_FUZZ_EXAMPLES=100000` runs a longer campaign.
"""

from __future__ import annotations

import asyncio
import os
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sanderling.openflow import decoder as D
from sanderling.openflow import encoder as E
from sanderling.openflow import ir
from sanderling.openflow.connection import Connection

EXAMPLES = int(os.environ.get("SANDERLING_FUZZ_EXAMPLES", "400"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_MATCH = E.encode_match(ir.match(proto="tcp", in_port=3, nw_dst="10.0.0.1", tp_dst=80))


def _msg(mtype: int, body: bytes, xid: int = 7) -> bytes:
    return struct.pack("!BBHI", 4, mtype, 8 + len(body), xid) + body


def flow_stats_reply() -> bytes:
    entry = struct.pack("!HBxIIHHHH4xQQQ", 48 + len(_MATCH), 3, 1, 0, 200, 0, 0, 0, 0xABC, 5, 500) + _MATCH
    return _msg(E.OFPT_MULTIPART_REPLY, struct.pack("!HH4x", E.OFPMP_FLOW, 0) + entry * 2)


def group_stats_reply() -> bytes:
    entry = struct.pack("!H2xII4xQQII", 56, 9, 1, 10, 1000, 1, 0) + struct.pack("!QQ", 10, 1000)
    return _msg(E.OFPT_MULTIPART_REPLY, struct.pack("!HH4x", E.OFPMP_GROUP, 0) + entry)


def port_stats_reply() -> bytes:
    return _msg(E.OFPT_MULTIPART_REPLY, struct.pack("!HH4x", E.OFPMP_PORT_STATS, 0) + b"\1" * 112)


def table_stats_reply() -> bytes:
    return _msg(E.OFPT_MULTIPART_REPLY, struct.pack("!HH4x", E.OFPMP_TABLE, 0)
                + struct.pack("!B3xIQQ", 0, 5, 100, 90) + struct.pack("!B3xIQQ", 1, 2, 90, 80))


def meter_stats_reply() -> bytes:
    entry = struct.pack("!IH6xIQQII", 2, 56, 1, 300, 30000, 1, 0) + struct.pack("!QQ", 120, 12000)
    return _msg(E.OFPT_MULTIPART_REPLY, struct.pack("!HH4x", E.OFPMP_METER, 0) + entry)


def packet_in() -> bytes:
    return _msg(E.OFPT_PACKET_IN, struct.pack("!IHBBQ", 0xFFFFFFFF, 60, 1, 17, 0xABC) + _MATCH + b"\0\0" + b"x" * 60)


def port_status() -> bytes:
    port = struct.pack("!I4x6s2x16sIIIIIIII", 7, b"\x0a\0\0\0\0\x07", b"sl0123456789ab", 0, 4, 0, 0, 0, 0, 0, 0)
    return _msg(E.OFPT_PORT_STATUS, struct.pack("!B7x", D.OFPPR_ADD) + port)


def error() -> bytes:
    return _msg(E.OFPT_ERROR, struct.pack("!HH", 5, 1) + b"\0" * 16)


VALID = {
    D.parse_flow_stats: flow_stats_reply(),
    D.parse_group_stats: group_stats_reply(),
    D.parse_port_stats: port_stats_reply(),
    D.parse_table_stats: table_stats_reply(),
    D.parse_meter_stats: meter_stats_reply(),
    D.parse_packet_in: packet_in(),
    D.parse_error: error(),
    D.parse_port_status: port_status(),
    D.multipart_header: flow_stats_reply(),
    D.parse_features: _msg(E.OFPT_FEATURES_REPLY, struct.pack("!QIBB2xII", 1, 0, 254, 0, 0, 0)),
    D.parse_bundle_reply: _msg(E.OFPT_EXPERIMENTER, struct.pack("!IIIHH", E.ONF, E.ONFT_BUNDLE_CONTROL, 1, 1, 3)),
}
PARSERS = sorted(VALID, key=lambda f: f.__name__)


def test_valid_samples_parse():
    assert len(D.parse_flow_stats(VALID[D.parse_flow_stats])) == 2
    assert D.parse_group_stats(VALID[D.parse_group_stats])[0].bucket_packets == (10,)
    assert [(t.table_id, t.active_count) for t in D.parse_table_stats(VALID[D.parse_table_stats])] == [(0, 5), (1, 2)]
    meter = D.parse_meter_stats(VALID[D.parse_meter_stats])[0]
    assert (meter.meter_id, meter.packet_in_count, meter.band_packets) == (2, 300, (120,))
    pin = D.parse_packet_in(VALID[D.parse_packet_in])
    assert pin.cookie == 0xABC and pin.data == b"x" * 60
    assert D.parse_port_status(VALID[D.parse_port_status]) == D.PortStatus(D.OFPPR_ADD, 7, "sl0123456789ab")


def _only_decode_errors(parse, data: bytes) -> None:
    started = time.monotonic()
    try:
        parse(data)
    except D.DecodeError:
        pass
    assert time.monotonic() - started < 1.0, f"{parse.__name__} took too long on {len(data)} bytes"


@FUZZ
@given(st.sampled_from(PARSERS), st.binary(max_size=300))
def test_random_bytes_raise_only_decode_errors(parse, data):
    _only_decode_errors(parse, data)


@FUZZ
@given(st.sampled_from(PARSERS), st.data())
def test_truncated_and_corrupted_messages_raise_only_decode_errors(parse, data):
    valid = VALID[parse]
    cut = data.draw(st.integers(0, len(valid)))
    frame = bytearray(valid[:cut])
    for _ in range(data.draw(st.integers(0, 4))):  # a few bytes overwritten, lengths included
        if frame:
            frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
    _only_decode_errors(parse, bytes(frame))


@pytest.mark.parametrize("entry_len", [0, 1, 8])
def test_short_stats_entries_are_refused_not_looped_on(entry_len):
    """A flow or group stats entry claiming fewer bytes than its header once made the loop stand still."""
    frame = bytearray(flow_stats_reply())
    frame[16:18] = struct.pack("!H", entry_len)
    with pytest.raises(D.DecodeError, match="flow stats entry"):
        D.parse_flow_stats(bytes(frame))
    frame = bytearray(group_stats_reply())
    frame[16:18] = struct.pack("!H", entry_len)
    with pytest.raises(D.DecodeError, match="group stats entry"):
        D.parse_group_stats(bytes(frame))


def test_session_logs_malformed_messages_and_keeps_answering():
    """A peer that speaks OpenFlow but sends a truncated PACKET_IN, a lying ERROR and a flow stats
    reply with a zero-length entry: the session counts them, stays open and still answers."""
    async def switch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(_msg(E.OFPT_HELLO, struct.pack("!HHI", 1, 8, 1 << 4), 1))
        while True:
            head = await reader.readexactly(8)
            length = struct.unpack_from("!H", head, 2)[0]
            body = await reader.readexactly(length - 8)
            mtype, xid = head[1], struct.unpack_from("!I", head, 4)[0]
            if mtype == E.OFPT_FEATURES_REQUEST:
                writer.write(_msg(E.OFPT_FEATURES_REPLY, struct.pack("!QIBB2xII", 42, 0, 254, 0, 0, 0), xid))
            elif mtype == E.OFPT_BARRIER_REQUEST:
                writer.write(_msg(E.OFPT_BARRIER_REPLY, b"", xid))
            elif mtype == E.OFPT_ECHO_REQUEST:
                writer.write(_msg(E.OFPT_ECHO_REPLY, body, xid))
            elif mtype == E.OFPT_MULTIPART_REQUEST:
                bad = bytearray(flow_stats_reply())
                bad[4:8] = struct.pack("!I", xid)
                bad[16:18] = b"\0\0"  # a zero-length entry
                writer.write(bytes(bad))
                # then messages framed right but truncated inside (a lying header length would break
                # the stream's framing itself: that ends the session, see _read_message)
                writer.write(_msg(E.OFPT_PACKET_IN, packet_in()[8:30], 97))
                writer.write(_msg(E.OFPT_PACKET_IN, b"\xff" * 5, 99))
                writer.write(_msg(E.OFPT_ERROR, b"\1", 98))
            await writer.drain()

    async def go() -> tuple[int, bool]:
        server = await asyncio.start_server(switch, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        conn = await Connection.open(f"tcp:127.0.0.1:{port}", echo_interval=60)
        with pytest.raises(D.DecodeError):
            await conn.flow_stats()
        await conn.echo()
        await conn.barrier()
        errors, open_ = conn.decode_errors, not conn.closed.done()
        conn.close()
        server.close()
        return errors, open_

    errors, still_open = asyncio.run(asyncio.wait_for(go(), 20))
    assert still_open
    assert errors >= 2  # the PACKET_IN and the ERROR; the stats reply fails its own request
