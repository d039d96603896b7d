"""What the encoder sends is what ovs-ofctl would install from the flow's own text.

Every flow is installed twice into fresh bridges: once as bytes from our encoder through our
connection, once as `Flow.text()` through `ovs-ofctl add-flows`. OVS then prints both tables;
they must be identical. This checks the binary encoding and the canonical text together.
"""

from __future__ import annotations

import asyncio

from sanderling.compiler import pods
from sanderling.compiler import services as svc_compiler
from sanderling.model.network import NodeNetwork, PodPort
from sanderling.openflow import encoder as E
from sanderling.openflow import ir
from sanderling.openflow.connection import Connection
from sanderling.openflow.pipeline import PIPELINE

NODE = NodeNetwork.build("n", "10.244.7.0/24,fd00:10:244:7::/64")  # dual-stack: NDP and IPv6 fields too
POD = PodPort.build("ns", "p", 2, "0a:58:0a:f4:07:02", "10.244.7.2,fd00:10:244:7::2")

FLOWS = [
    *pods.static_flows(NODE),
    *pods.pod_flows(NODE, POD),
    ir.Flow(0, 300, ir.match(proto="tcp", nw_dst="10.96.0.1", tp_dst=80), (ir.CT(commit=True, nat=ir.Nat()),), 7),
    ir.Flow(0, 301, ir.match(proto="udp", nw_src="10.0.0.0/8", tp_dst=53),
            (ir.CT(commit=True, zone=ir.FieldRef("reg2", 0, 15), table=3, nat=ir.Nat("dst", 0x0A010101, 0x0A010102,
                                                                                     8080, 8090)),)),
    ir.Flow(0, 302, ir.match(proto="tcp", nw_dst="10.96.0.2"),
            (ir.CT(commit=True, exec_=(ir.Load(ir.FieldRef("ct_mark", 0, 1), 1),), nat=ir.Nat("src", 0x0A000001)),)),
    ir.Flow(1, 10, ir.match(ct_state="+trk+new-est", reg0=(1, 0xF), proto="ip"), (ir.Conjunction(5, 1, 2),)),
    ir.Flow(1, 11, ir.match(conj_id=5, proto="ip"), (ir.Resubmit(3), ir.Goto(2))),
    ir.Flow(1, 12, ir.match(ct_mark=(1, 1), ct_zone=3, proto="ip"),
            (ir.OutputReg(ir.FieldRef("reg1")), ir.Controller(max_len=200, controller_id=4))),
    ir.Flow(2, 5, ir.match(proto="tcp"), (ir.Learn(table=4, idle_timeout=30, hard_timeout=300, priority=50, specs=(
        ir.LearnMatch(ir.FieldRef("dl_type"), value=0x800), ir.LearnMatch(ir.FieldRef("nw_proto"), value=6),
        ir.LearnMatch(ir.FieldRef("nw_src")), ir.LearnMatch(ir.FieldRef("tcp_dst"), ir.FieldRef("tcp_src")),
        ir.LearnLoad(ir.FieldRef("reg2"), ir.FieldRef("nw_dst")), ir.LearnLoad(ir.FieldRef("reg3", 0, 3), value=5),
        ir.LearnOutput(ir.FieldRef("in_port")))), ir.Goto(3))),
    ir.Flow(2, 6, ir.match(proto="sctp", tp_dst=9000), (ir.GroupAction(1),)),
    ir.Flow(2, 7, ir.match(tun_id=(0x10, 0xFF), in_port=1), (ir.set_field("tun_id", 99), ir.Output(ir.LOCAL))),
    ir.Flow(2, 8, ir.match(proto="icmp", icmp_type=8), (ir.MeterAction(1), ir.Output(ir.CONTROLLER, 128))),
    ir.Flow(3, 1, ir.match(proto="arp"), (ir.Output(ir.NORMAL),)),
    ir.Flow(3, 2, ir.match(proto="tcp6", ipv6_dst="fd00:10:96::/112", tp_dst=443), (ir.Output(3),)),
    ir.Flow(3, 4, ir.match(proto="tcp6", ipv6_dst="fd00:10:96::1", tp_dst=80),
            (ir.CT(commit=True, zone=5, table=4, nat=ir.Nat("dst", 0xFD000010024400010000000000000005,
                                                            0xFD000010024400010000000000000005, 8080, 8080,
                                                            v6=True)),)),
    ir.Flow(3, 3, ir.match(proto="icmp6", icmpv6_type=136, nd_target="fd00::1", nd_tll="0a:58:00:00:00:01"), ()),
    # IPv6 session affinity: the client and service addresses learned, the endpoint over four registers
    ir.Flow(3, 5, ir.match(proto="tcp6", reg8=1, reg9=2, reg10=3, reg11=4),
            (svc_compiler._learn_affinity("tcp6", 10800, 9, PIPELINE), ir.Goto(4))),
]
GROUP = ir.Group(1, "select", (ir.Bucket((ir.Output(1),), 10), ir.Bucket((ir.Output(2),), 20)))
METER = ir.Meter(1, 100)


def test_encoder_and_text_install_identical_tables(dummy_ovs, dummy_db, tmp_path):
    dummy_db.ensure_bridge("rbA", "dummy")
    dummy_db.ensure_bridge("rbB", "dummy")
    try:
        async def install():
            conn = await Connection.open(dummy_ovs.mgmt_target("rbA"))
            await conn.send_checked([(9, E.meter_mod(METER, 9)), (10, E.group_mod(GROUP, 10))], str)
            msgs = [(100 + i, E.flow_mod(f, 100 + i, f.cookie)) for i, f in enumerate(FLOWS)]
            await conn.bundle(msgs, lambda x: FLOWS[x - 100].text())
            conn.close()
        asyncio.run(install())
        dummy_ovs.ofctl("rbB", "add-meter", METER.text())
        dummy_ovs.ofctl("rbB", "add-group", GROUP.text())
        flow_file = tmp_path / "flows.txt"
        flow_file.write_text("".join(f.text() + "\n" for f in FLOWS))
        dummy_ovs.ofctl("rbB", "add-flows", str(flow_file), options=("--bundle",))

        def dump(br):
            out = dummy_ovs.ofctl(br, "dump-flows", "--no-stats")
            return sorted(line.strip() for line in out.splitlines() if "reply" not in line and line.strip())
        a, b = dump("rbA"), dump("rbB")
        assert len(a) == len(FLOWS)
        assert a == b
        assert dummy_ovs.ofctl("rbA", "dump-groups").splitlines()[1:] == \
            dummy_ovs.ofctl("rbB", "dump-groups").splitlines()[1:]
    finally:
        dummy_db.delete_bridge("rbA")
        dummy_db.delete_bridge("rbB")
