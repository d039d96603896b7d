"""The focused encoder must produce exactly the bytes os-ken's reference classes produce."""

from __future__ import annotations

import warnings

import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from os_ken.ofproto import ofproto_v1_3 as ofp
    from os_ken.ofproto import ofproto_v1_3_parser as P

from sanderling.openflow import encoder as E
from sanderling.openflow import ir

OSKEN_NAMES = {"dl_src": "eth_src", "dl_dst": "eth_dst", "dl_type": "eth_type", "nw_proto": "ip_proto",
               "nw_src": "ipv4_src", "nw_dst": "ipv4_dst", "tun_id": "tunnel_id", "icmp_type": "icmpv4_type",
               "icmp_code": "icmpv4_code"}


class FakeDatapath:
    ofproto = ofp
    ofproto_parser = P
    id = 1


DP = FakeDatapath()


def osken_bytes(msg, xid):
    msg.set_xid(xid)
    msg.serialize()
    return bytes(msg.buf)


def osken_match(m: ir.Match):
    kwargs = {}
    for name, value, mask in m.items:
        spec_kind = name
        if name in ("dl_src", "dl_dst", "arp_sha", "arp_tha"):
            v = ":".join(f"{value:012x}"[i:i + 2] for i in range(0, 12, 2))
            mv = None if mask is None else ":".join(f"{mask:012x}"[i:i + 2] for i in range(0, 12, 2))
        elif name in ("nw_src", "nw_dst", "arp_spa", "arp_tpa"):
            import ipaddress
            v = str(ipaddress.IPv4Address(value))
            mv = None if mask is None else str(ipaddress.IPv4Address(mask))
        else:
            v, mv = value, mask
        kwargs[OSKEN_NAMES.get(spec_kind, spec_kind)] = v if mv is None else (v, mv)
    return P.OFPMatch(**kwargs)


MATCHES = [
    ir.match(),
    ir.match(in_port=3),
    ir.match(proto="tcp", nw_dst="10.96.0.10", tp_dst=443),
    ir.match(proto="udp", nw_src="10.0.0.0/8", tp_src=53),
    ir.match(proto="arp", arp_op=1, arp_tpa="10.244.1.1", arp_sha="0a:00:00:00:00:01"),
    ir.match(proto="ip", in_port=7, dl_src="0a:58:0a:f4:01:0a", nw_src="10.244.1.10"),
    ir.match(reg0=(1, 0xF), ct_state="+trk+new-est", ct_mark=(2, 3), ct_zone=5),
    ir.match(conj_id=17, proto="ip"),
    ir.match(proto="sctp", tp_dst=9000, dl_dst="0a:00:00:00:00:02"),
]


@pytest.mark.parametrize("m", MATCHES, ids=lambda m: m.text() or "any")
def test_flow_mod_match_bytes(m):
    flow = ir.Flow(3, 100, m, (ir.Output(2),), cookie=0x1234)
    mine = E.flow_mod(flow, 42, 0x0001000000001234)
    theirs = osken_bytes(P.OFPFlowMod(DP, cookie=0x0001000000001234, table_id=3, command=ofp.OFPFC_ADD,
                                      priority=100, buffer_id=ofp.OFP_NO_BUFFER, out_port=ofp.OFPP_ANY,
                                      out_group=ofp.OFPG_ANY, match=osken_match(m),
                                      instructions=[P.OFPInstructionActions(ofp.OFPIT_APPLY_ACTIONS,
                                                                            [P.OFPActionOutput(2, 0xFFFF)])]), 42)
    assert mine == theirs


def _nat_osken(flags, ip_min=None, port_min=None):
    kw = {}
    if ip_min:
        kw["range_ipv4_min"] = ip_min
    if port_min:
        kw["range_proto_min"] = port_min
    return P.NXActionNAT(flags=flags, **kw)


ACTION_CASES = [
    (ir.Output(5), P.OFPActionOutput(5, 0xFFFF)),
    (ir.GroupAction(9), P.OFPActionGroup(9)),
    (ir.set_field("dl_src", "0a:58:0a:f4:00:01"), P.OFPActionSetField(eth_src="0a:58:0a:f4:00:01")),
    (ir.set_field("arp_op", 2), P.OFPActionSetField(arp_op=2)),
    (ir.DecTTL(), P.OFPActionDecNwTtl()),
    (ir.Load(ir.FieldRef("reg0", 0, 3), 1), P.NXActionRegLoad(ofs_nbits=(0 << 6) | 3, dst="reg0", value=1)),
    (ir.Load(ir.FieldRef("reg1"), 7), P.NXActionRegLoad(ofs_nbits=31, dst="reg1", value=7)),
    (ir.Move(ir.FieldRef("dl_src"), ir.FieldRef("dl_dst")),
     P.NXActionRegMove(src_field="eth_src", dst_field="eth_dst", n_bits=48)),
    (ir.Move(ir.FieldRef("arp_spa"), ir.FieldRef("arp_tpa")),
     P.NXActionRegMove(src_field="arp_spa", dst_field="arp_tpa", n_bits=32)),
    (ir.Resubmit(4), P.NXActionResubmitTable(in_port=0xFFF8, table_id=4)),
    (ir.OutputReg(ir.FieldRef("reg1")), P.NXActionOutputReg(ofs_nbits=31, src="reg1", max_len=0xFFFF)),
    (ir.Controller(max_len=128, controller_id=3), P.NXActionController(max_len=128, controller_id=3, reason=1)),
    (ir.Conjunction(11, 2, 3), P.NXActionConjunction(clause=1, n_clauses=3, id_=11)),
    (ir.CT(commit=True, nat=ir.Nat()),
     P.NXActionCT(flags=1, zone_src="", zone_ofs_nbits=0, recirc_table=255, alg=0, actions=[_nat_osken(0)])),
    (ir.CT(table=5, zone=7), P.NXActionCT(flags=0, zone_src="", zone_ofs_nbits=7, recirc_table=5, alg=0, actions=[])),
    (ir.CT(commit=True, zone=ir.FieldRef("reg2", 0, 15), nat=ir.Nat("dst", 0x0A000001, None, 8080)),
     P.NXActionCT(flags=1, zone_src="reg2", zone_ofs_nbits=15, recirc_table=255, alg=0,
                  actions=[_nat_osken(2, "10.0.0.1", 8080)])),
    (ir.CT(commit=True, exec_=(ir.SetField("ct_mark", 1),)),
     P.NXActionCT(flags=1, zone_src="", zone_ofs_nbits=0, recirc_table=255, alg=0,
                  actions=[P.OFPActionSetField(ct_mark=1)])),
    (ir.Learn(table=9, idle_timeout=60, priority=100, specs=(
        ir.LearnMatch(ir.FieldRef("dl_type"), value=0x800),
        ir.LearnMatch(ir.FieldRef("nw_src")),
        ir.LearnMatch(ir.FieldRef("nw_dst"), ir.FieldRef("nw_src")),
        ir.LearnLoad(ir.FieldRef("reg3"), ir.FieldRef("nw_dst")),
        ir.LearnLoad(ir.FieldRef("reg4", 0, 7), value=5),
        ir.LearnOutput(ir.FieldRef("in_port")))),
     P.NXActionLearn(table_id=9, idle_timeout=60, priority=100, specs=[
         P.NXFlowSpecMatch(src=0x800, dst=("eth_type", 0), n_bits=16),
         P.NXFlowSpecMatch(src=("ipv4_src", 0), dst=("ipv4_src", 0), n_bits=32),
         P.NXFlowSpecMatch(src=("ipv4_src", 0), dst=("ipv4_dst", 0), n_bits=32),
         P.NXFlowSpecLoad(src=("ipv4_dst", 0), dst=("reg3", 0), n_bits=32),
         P.NXFlowSpecLoad(src=5, dst=("reg4", 0), n_bits=8),
         P.NXFlowSpecOutput(src=("in_port", 0), dst="", n_bits=32)])),
]


@pytest.mark.parametrize("mine,theirs", ACTION_CASES, ids=lambda a: type(a).__name__)
def test_action_bytes(mine, theirs):
    buf = bytearray()
    theirs.serialize(buf, 0)
    # os-ken declares the padded length but leaves trailing pad bytes to whatever follows
    declared = int.from_bytes(buf[2:4], "big")
    assert E.encode_action(mine) == bytes(buf).ljust(declared, b"\0")


def test_instructions_meter_apply_goto():
    actions = (ir.MeterAction(3), ir.Output(1), ir.Goto(7))
    buf = bytearray()
    for inst in (P.OFPInstructionMeter(3), P.OFPInstructionActions(ofp.OFPIT_APPLY_ACTIONS,
                                                                   [P.OFPActionOutput(1, 0xFFFF)]),
                 P.OFPInstructionGotoTable(7)):
        inst.serialize(buf, len(buf))
    assert E.encode_instructions(actions) == bytes(buf)


def test_delete_strict_bytes():
    flow = ir.Flow(2, 50, ir.match(proto="ip", nw_dst="10.1.2.3"))
    theirs = osken_bytes(P.OFPFlowMod(DP, table_id=2, command=ofp.OFPFC_DELETE_STRICT, priority=50,
                                      buffer_id=ofp.OFP_NO_BUFFER, out_port=ofp.OFPP_ANY, out_group=ofp.OFPG_ANY,
                                      match=osken_match(flow.match)), 9)
    assert E.flow_mod(flow, 9, 0, E.OFPFC_DELETE_STRICT) == theirs


def test_cookie_mask_delete_bytes():
    theirs = osken_bytes(P.OFPFlowMod(DP, cookie=0x5 << 48, cookie_mask=0xFFFF << 48, table_id=ofp.OFPTT_ALL,
                                      command=ofp.OFPFC_DELETE, buffer_id=ofp.OFP_NO_BUFFER, priority=0,
                                      out_port=ofp.OFPP_ANY, out_group=ofp.OFPG_ANY, match=P.OFPMatch()), 5)
    assert E.flow_delete(5, cookie=0x5 << 48, cookie_mask=0xFFFF << 48) == theirs


def test_group_mod_bytes():
    group = ir.Group(4, "select", (ir.Bucket((ir.Output(1),), weight=100), ir.Bucket((ir.Output(2),), weight=50)))
    theirs = osken_bytes(P.OFPGroupMod(DP, ofp.OFPGC_ADD, ofp.OFPGT_SELECT, 4, [
        P.OFPBucket(100, ofp.OFPP_ANY, ofp.OFPG_ANY, [P.OFPActionOutput(1, 0xFFFF)]),
        P.OFPBucket(50, ofp.OFPP_ANY, ofp.OFPG_ANY, [P.OFPActionOutput(2, 0xFFFF)])]), 8)
    assert E.group_mod(group, 8) == theirs


def test_meter_mod_bytes():
    theirs = osken_bytes(P.OFPMeterMod(DP, ofp.OFPMC_ADD, ofp.OFPMF_PKTPS, 2,
                                       [P.OFPMeterBandDrop(rate=100, burst_size=0)]), 3)
    assert E.meter_mod(ir.Meter(2, 100), 3) == theirs


def test_bundle_messages_bytes():
    inner = E.barrier_request(12)
    theirs_ctrl = osken_bytes(P.ONFBundleCtrlMsg(DP, 7, ofp.ONF_BCT_OPEN_REQUEST,
                                                 ofp.ONF_BF_ATOMIC | ofp.ONF_BF_ORDERED, []), 11)
    assert E.bundle_control(11, 7, E.BUNDLE_OPEN_REQUEST) == theirs_ctrl
    barrier = P.OFPBarrierRequest(DP)
    barrier.set_xid(12)
    theirs_add = osken_bytes(P.ONFBundleAddMsg(DP, 7, ofp.ONF_BF_ATOMIC | ofp.ONF_BF_ORDERED, barrier, []), 12)
    assert E.bundle_add(12, 7, inner) == theirs_add


def test_session_and_stats_bytes():
    assert E.barrier_request(1) == osken_bytes(P.OFPBarrierRequest(DP), 1)
    assert E.echo_request(2, b"x") == osken_bytes(P.OFPEchoRequest(DP, b"x"), 2)
    assert E.features_request(3) == osken_bytes(P.OFPFeaturesRequest(DP), 3)
    assert E.set_config(4) == osken_bytes(P.OFPSetConfig(DP, 0, 0xFFFF), 4)
    assert E.flow_stats_request(5) == osken_bytes(P.OFPFlowStatsRequest(DP), 5)
    assert E.port_stats_request(6) == osken_bytes(P.OFPPortStatsRequest(DP, 0, ofp.OFPP_ANY), 6)
    assert E.group_stats_request(7) == osken_bytes(P.OFPGroupStatsRequest(DP, 0, ofp.OFPG_ALL), 7)
    assert E.packet_out(b"\x01" * 20, (ir.Output(3),), 8) == osken_bytes(
        P.OFPPacketOut(DP, ofp.OFP_NO_BUFFER, ofp.OFPP_CONTROLLER, [P.OFPActionOutput(3, 0xFFFF)], b"\x01" * 20), 8)
