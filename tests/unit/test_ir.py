"""Flow IR: match building, canonical text, validation."""

from __future__ import annotations

import pytest

from sanderling.openflow import fields as F
from sanderling.openflow import ir
from sanderling.openflow.registers import FROM_POD, PORT_CLASS, TARGET_OFPORT


def test_protocol_shorthand_and_transport_ports():
    m = ir.match(proto="tcp", nw_dst="10.96.0.1", tp_dst=80)
    assert m.items == (("dl_type", 0x800, None), ("nw_proto", 6, None), ("nw_dst", 0x0A600001, None),
                       ("tcp_dst", 80, None))
    assert m.text() == "tcp,nw_dst=10.96.0.1,tcp_dst=80"
    assert ir.match(proto="udp", tp_src=53).text() == "udp,udp_src=53"
    assert ir.match(proto="sctp", tp_dst=9).text() == "sctp,sctp_dst=9"


def test_match_is_canonical_whatever_the_argument_order():
    a = ir.match(in_port=1, proto="ip", nw_src="10.0.0.1", dl_src="0a:00:00:00:00:01")
    b = ir.match(dl_src="0a:00:00:00:00:01", nw_src="10.0.0.1", proto="ip", in_port=1)
    assert a == b and hash(a) == hash(b) and a.text() == b.text()


def test_prefixes_and_masks():
    assert ir.match(proto="ip", nw_src="10.0.0.0/8").text() == "ip,nw_src=10.0.0.0/8"
    assert ir.match(proto="ip", nw_src="10.1.2.3/32").text() == "ip,nw_src=10.1.2.3"
    assert ir.match(reg3=(0x10, 0xF0)).text() == "reg3=0x10/0xf0"
    assert ir.match(reg3=(5, 0xFFFFFFFF)).items == (("reg3", 5, None),)  # full mask = exact


def test_ct_state_flags():
    m = ir.match(ct_state="+trk+new-est")
    assert m.items == (("ct_state", 0x21, 0x23),)
    assert m.text() == "ct_state=+new-est+trk"
    with pytest.raises(F.FieldError):
        ir.match(ct_state="+trk+bogus")


def test_tcp_flags_are_written_after_their_prerequisite():
    m = ir.match(proto="tcp", tcp_flags="+syn-ack")
    assert m.get("tcp_flags") == (0x002, 0x012)
    assert m.text() == "tcp,tcp_flags=+syn-ack"
    # OVS checks prerequisites in wire order: nw_proto must come before the NXM tcp_flags
    names = [name for name, _, _ in m.items]
    assert names.index("nw_proto") < names.index("tcp_flags")
    with pytest.raises(F.FieldError, match="tcp_flags"):
        ir.match(proto="tcp", tcp_flags="+syn+bogus")


def test_register_marks_merge_into_one_field():
    m = ir.match(FROM_POD, TARGET_OFPORT.equals(7))
    assert m.get("reg0") == (1, 0xF)
    assert m.get("reg1") == (7, None)
    combined = ir.match(FROM_POD, reg0=(0x30, 0xF0))
    assert combined.get("reg0") == (0x31, 0xFF)
    with pytest.raises(F.FieldError, match="conflicting"):
        ir.match(FROM_POD, reg0=(2, 0xF))


@pytest.mark.parametrize("kwargs,problem", [
    ({"nw_dst": "10.0.0.300"}, "IPv4"),
    ({"dl_src": "0a:00:00:00:00"}, "MAC"),
    ({"in_port": -1}, "bits"),
    ({"tcp_dst": 70000}, "bits"),
    ({"no_such_field": 1}, "unknown"),
    ({"in_port": (1, 3)}, "mask"),
])
def test_bad_values_raise_field_errors(kwargs, problem):
    with pytest.raises(ValueError):
        ir.match(**kwargs)


def test_tp_dst_without_a_transport_protocol_is_refused():
    with pytest.raises(F.FieldError, match="needs proto"):
        ir.match(proto="ip", tp_dst=80)


def test_flow_text_is_ovs_ofctl_syntax():
    flow = ir.Flow(3, 200, ir.match(proto="ip", nw_dst="10.244.1.5"),
                   (ir.set_field("dl_dst", "0a:58:0a:f4:01:05"), ir.DecTTL(), TARGET_OFPORT.load(5), ir.Goto(4)),
                   cookie=0x2000000000A)
    assert flow.text() == ("table=3,priority=200,cookie=0x2000000000a,ip,nw_dst=10.244.1.5 "
                           "actions=set_field:0a:58:0a:f4:01:05->dl_dst,dec_ttl,load:0x5->NXM_NX_REG1[],goto_table:4")
    assert ir.Flow(0, 0, ir.Match()).text() == "table=0,priority=0 actions=drop"


def test_action_texts():
    assert ir.CT(commit=True, zone=5, nat=ir.Nat("dst", 0x0A000001, 0x0A000002, 80, 81)).text() == \
        "ct(commit,zone=5,nat(dst=10.0.0.1-10.0.0.2:80-81))"
    assert ir.CT(table=4, zone=PORT_CLASS.ref).text() == "ct(zone=NXM_NX_REG0[0..3],table=4)"
    assert ir.Conjunction(3, 1, 2).text() == "conjunction(3,1/2)"
    assert ir.Resubmit(6).text() == "resubmit(,6)"
    assert ir.Output(ir.IN_PORT).text() == "IN_PORT"
    assert ir.Output(ir.CONTROLLER, 128).text() == "CONTROLLER:128"
    assert ir.Group(1, "select", (ir.Bucket((ir.Output(2),), 5),)).text() == \
        "group_id=1,type=select,bucket=weight:5,actions=output:2"
    assert ir.Meter(2, 100).text() == "meter=2,pktps,band=type=drop,rate=100"


def test_flows_are_values():
    f1 = ir.Flow(1, 5, ir.match(in_port=1), (ir.Goto(2),))
    f2 = ir.Flow(1, 5, ir.match(in_port=1), (ir.Goto(2),))
    assert f1 == f2 and len({f1, f2}) == 1
    assert f1.key == (1, 5, ir.match(in_port=1))
    with pytest.raises(AttributeError):
        f1.match.items = ()  # type: ignore[misc]
