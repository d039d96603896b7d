"""The OpenFlow session against a real switch: echo, stats, packet-in and packet-out."""

from __future__ import annotations

import asyncio

from sanderling.openflow import encoder as E
from sanderling.openflow import ir
from sanderling.openflow.connection import Connection

# an ICMP echo request, Ethernet + IPv4 (checksums need not be right for the dummy datapath)
FRAME = bytes.fromhex(
    "0a0000000002" "0a0000000001" "0800"
    "45000054000040004001" "0000" "0a000001" "0a000002"
    "0800f7ff00000000") + b"\0" * 56


def test_echo_and_features(bridge):
    async def go():
        conn = await Connection.open(bridge.target)
        assert conn.datapath_id != 0
        await conn.echo()
        await conn.barrier()
        conn.close()
    asyncio.run(go())


def test_packet_in_carries_cookie_and_match(bridge):
    flow = ir.Flow(0, 10, ir.match(proto="icmp", in_port=1), (ir.Controller(max_len=128, controller_id=0),),
                   cookie=0xABC)

    async def go():
        conn = await Connection.open(bridge.target)
        got: asyncio.Queue = asyncio.Queue()
        conn.packet_in_handlers.append(got.put_nowait)
        xid = conn.next_xid()
        await conn.bundle([(xid, E.flow_mod(flow, xid, flow.cookie))], lambda x: flow.text())
        await asyncio.to_thread(bridge.runtime.appctl, "netdev-dummy/receive", f"{bridge.name}p1", FRAME.hex())
        pin = await asyncio.wait_for(got.get(), 5)
        conn.close()
        return pin
    pin = asyncio.run(go())
    assert pin.cookie == 0xABC
    assert pin.match.get("in_port") == (1, None)
    assert pin.data[:12] == FRAME[:12]


def test_packet_out_is_sent_and_counted_in_port_stats(bridge):
    async def go():
        conn = await Connection.open(bridge.target)
        before = {s.port_no: s.tx_packets for s in await conn.port_stats()}
        for _ in range(3):
            await conn.packet_out(FRAME, (ir.Output(2),))
        await conn.barrier()
        await asyncio.sleep(0.2)
        after = {s.port_no: s.tx_packets for s in await conn.port_stats()}
        conn.close()
        return before, after
    before, after = asyncio.run(go())
    assert after[2] - before.get(2, 0) == 3


def test_flow_and_group_stats(bridge):
    group = ir.Group(3, "select", (ir.Bucket((ir.Output(1),), 1), ir.Bucket((ir.Output(2),), 1)))
    flow = ir.Flow(0, 5, ir.match(proto="ip"), (ir.GroupAction(3),), cookie=0x77)

    async def go():
        conn = await Connection.open(bridge.target)
        x1, x2 = conn.next_xid(), conn.next_xid()
        await conn.bundle([(x1, E.group_mod(group, x1)), (x2, E.flow_mod(flow, x2, flow.cookie))], str)
        flows = await conn.flow_stats()
        groups = await conn.group_stats()
        conn.close()
        return flows, groups
    flows, groups = asyncio.run(go())
    assert [(s.table_id, s.priority, s.cookie) for s in flows] == [(0, 5, 0x77)]
    assert flows[0].match == flow.match
    assert [g.group_id for g in groups] == [3] and len(groups[0].bucket_packets) == 2


def test_metered_controller_action_is_accepted_as_written(bridge):
    """controller(...,meter_id=N) (NXAST_CONTROLLER2) with its meter, read back from OVS."""

    async def go():
        conn = await Connection.open(bridge.target)
        conn.send(E.meter_mod(ir.Meter(7, 100, 20), conn.next_xid()))
        flow = ir.Flow(0, 10, ir.match(proto="tcp"), (ir.Controller(max_len=128, meter_id=7), ir.Goto(1)))
        conn.send(E.flow_mod(flow, conn.next_xid(), 0, E.OFPFC_ADD, E.InstructionCache()))
        await conn.barrier()
        conn.close()
    asyncio.run(go())
    assert any("controller(max_len=128,meter_id=7),goto_table:1" in line for line in bridge.dump_flows())
