"""Pod forwarding on a real ovs-vswitchd (dummy datapath), verdicts from ofproto/trace."""

from __future__ import annotations

import asyncio

from sanderling.compiler import pods
from sanderling.model.network import NodeNetwork, PodPort
from sanderling.openflow.connection import Connection
from sanderling.openflow.realizer import Realizer

NODE = NodeNetwork.build("node-1", "10.244.1.0/24")
GW_MAC = NODE.gateway_mac
A = PodPort.build("default", "a", 1, "0a:00:00:00:00:0a", "10.244.1.10")
B = PodPort.build("default", "b", 2, "0a:00:00:00:00:0b", "10.244.1.11")


def install(bridge, pod_list):
    async def go():
        conn = await Connection.open(bridge.target)
        realizer = Realizer(1)
        realizer.set_object("static", pods.static_flows(NODE))
        for pod in pod_list:
            realizer.set_object(pod.key, pods.pod_flows(NODE, pod))
        await realizer.resync(conn)
        conn.close()
    asyncio.run(go())


def ip_packet(src_pod, dst_ip, src_ip=None, src_mac=None, proto="icmp", extra=""):
    return (f"in_port={src_pod.ofport},{proto},dl_src={src_mac or src_pod.mac},dl_dst={GW_MAC},"
            f"nw_src={src_ip or src_pod.ip},nw_dst={dst_ip},nw_ttl=64{extra}")


def test_pod_to_pod_is_routed_with_mac_rewrite_and_ttl_decrement(bridge):
    install(bridge, [A, B])
    actions = bridge.datapath_actions(ip_packet(A, B.ip))
    assert f"set(eth(src={GW_MAC},dst={B.mac}))" in actions
    assert "ttl=63" in actions
    assert bridge.output_port(ip_packet(A, B.ip)) == "2"


def test_tcp_and_udp_are_delivered(bridge):
    install(bridge, [A, B])
    for proto in ("tcp", "udp"):
        assert bridge.output_port(ip_packet(A, B.ip, proto=proto, extra=f",{proto}_src=1000,{proto}_dst=80")) == "2"


def test_forged_source_ip_is_dropped(bridge):
    install(bridge, [A, B])
    assert bridge.datapath_actions(ip_packet(A, B.ip, src_ip="10.244.1.99")) == "drop"


def test_forged_source_mac_is_dropped(bridge):
    install(bridge, [A, B])
    assert bridge.datapath_actions(ip_packet(A, B.ip, src_mac="0a:00:00:00:00:ff")) == "drop"


def test_another_pods_ip_from_the_wrong_port_is_dropped(bridge):
    install(bridge, [A, B])
    packet = ip_packet(A, B.ip, src_ip=str(B.ip), src_mac=B.mac)
    assert bridge.datapath_actions(packet) == "drop"


def test_unknown_port_is_dropped(bridge):
    install(bridge, [A, B])
    packet = f"in_port=3,icmp,dl_src=0a:00:00:00:00:33,dl_dst={GW_MAC},nw_src=10.244.1.33,nw_dst={B.ip}"
    assert bridge.datapath_actions(packet) == "drop"


def test_gateway_arp_is_answered_to_the_asking_port(bridge):
    install(bridge, [A, B])
    trace = bridge.trace(f"in_port=1,arp,dl_src={A.mac},dl_dst=ff:ff:ff:ff:ff:ff,arp_op=1,"
                         f"arp_spa={A.ip},arp_tpa={NODE.gateway_ip},arp_sha={A.mac},arp_tha=00:00:00:00:00:00")
    actions = [line for line in trace.splitlines() if line.startswith("Datapath actions:")][0]
    assert f"eth(src={GW_MAC},dst={A.mac})" in actions
    assert f"arp(sip={NODE.gateway_ip},tip={A.ip},op=2,sha={GW_MAC},tha={A.mac})" in actions
    assert actions.rstrip().split(",")[-1] == bridge.dp_port(1)


def test_arp_for_a_local_pod_is_answered_with_the_gateway_mac(bridge):
    install(bridge, [A, B])
    actions = bridge.datapath_actions(
        f"in_port=1,arp,dl_src={A.mac},dl_dst=ff:ff:ff:ff:ff:ff,arp_op=1,"
        f"arp_spa={A.ip},arp_tpa={B.ip},arp_sha={A.mac},arp_tha=00:00:00:00:00:00")
    assert f"arp(sip={B.ip},tip={A.ip},op=2,sha={GW_MAC},tha={A.mac})" in actions


def test_forged_arp_is_dropped(bridge):
    install(bridge, [A, B])
    forged_spa = (f"in_port=1,arp,dl_src={A.mac},dl_dst=ff:ff:ff:ff:ff:ff,arp_op=1,"
                  f"arp_spa={B.ip},arp_tpa={NODE.gateway_ip},arp_sha={A.mac}")
    forged_sha = (f"in_port=1,arp,dl_src={A.mac},dl_dst=ff:ff:ff:ff:ff:ff,arp_op=1,"
                  f"arp_spa={A.ip},arp_tpa={NODE.gateway_ip},arp_sha=0a:00:00:00:00:ee")
    assert bridge.datapath_actions(forged_spa) == "drop"
    assert bridge.datapath_actions(forged_sha) == "drop"


def test_arp_for_an_unknown_address_gets_no_answer(bridge):
    install(bridge, [A, B])
    actions = bridge.datapath_actions(
        f"in_port=1,arp,dl_src={A.mac},dl_dst=ff:ff:ff:ff:ff:ff,arp_op=1,"
        f"arp_spa={A.ip},arp_tpa=10.244.1.200,arp_sha={A.mac}")
    assert actions == "drop"


def test_packet_for_an_unknown_destination_is_dropped(bridge):
    install(bridge, [A, B])
    assert bridge.datapath_actions(ip_packet(A, "10.244.1.200")) == "drop"
