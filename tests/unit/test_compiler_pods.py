"""Golden flows of the pod compiler (order-insensitive) and pipeline rules."""

from __future__ import annotations

import pytest

from sanderling.compiler import pods
from sanderling.model.errors import ModelError
from sanderling.model.network import NodeNetwork, PodPort
from sanderling.openflow import cookies, ir
from sanderling.openflow.pipeline import PIPELINE, Miss, Pipeline, PipelineError, Table

NODE = NodeNetwork.build("node-1", "10.244.1.0/24")
POD = PodPort.build("default", "web", 3, "0a:58:0a:f4:01:0a", "10.244.1.10")
ARP_REPLY = ("move:NXM_OF_ETH_SRC[]->NXM_OF_ETH_DST[],set_field:0a:58:0a:f4:00:01->dl_src,set_field:2->arp_op,"
             "move:NXM_NX_ARP_SHA[]->NXM_NX_ARP_THA[],move:NXM_OF_ARP_SPA[]->NXM_OF_ARP_TPA[],"
             "set_field:0a:58:0a:f4:00:01->arp_sha,set_field:{ip}->arp_spa,IN_PORT")


def texts(flows):
    return sorted(f.text(cookie=0) for f in flows)


def test_pod_flows_golden():
    assert texts(pods.pod_flows(NODE, POD)) == sorted([
        "table=0,priority=200,in_port=3 actions=load:0x1->NXM_NX_REG0[0..3],goto_table:1",
        "table=1,priority=200,ip,in_port=3,dl_src=0a:58:0a:f4:01:0a,nw_src=10.244.1.10 actions=goto_table:2",
        "table=1,priority=200,arp,in_port=3,dl_src=0a:58:0a:f4:01:0a,arp_spa=10.244.1.10,"
        "arp_sha=0a:58:0a:f4:01:0a actions=goto_table:2",
        "table=2,priority=200,arp,arp_op=1,arp_tpa=10.244.1.10 actions=" + ARP_REPLY.format(ip="10.244.1.10"),
        "table=17,priority=200,ip,dl_dst=0a:58:0a:f4:00:01,nw_dst=10.244.1.10 actions=set_field:0a:58:0a:f4:00:01"
        "->dl_src,set_field:0a:58:0a:f4:01:0a->dl_dst,dec_ttl,load:0x3->NXM_NX_REG1[],goto_table:18",
        "table=18,priority=210,reg1=0x3,in_port=3 actions=IN_PORT",
        # a direct request to a service target port: committed to the origin zone, marked direct
        "table=6,priority=4,ip,reg0=0x40/0x40,ct_state=+new+trk,nw_src=10.244.1.10 actions=ct(commit,zone=65523,"
        "table=11,exec(load:0x1->NXM_NX_CT_MARK[1]))",
        # later segments of a direct TCP connection are tracked there, the mark left alone
        "table=6,priority=5,tcp,reg0=0x40/0x40,ct_state=+new+trk,nw_src=10.244.1.10,tcp_flags=-syn "
        "actions=ct(commit,zone=65523,table=11)",
    ])


def test_static_flows_golden():
    assert texts(pods.static_flows(NODE)) == sorted([
        "table=0,priority=0 actions=drop",
        "table=1,priority=0 actions=drop",
        "table=2,priority=0 actions=goto_table:3",
        "table=3,priority=0 actions=goto_table:4",  # UnSNAT
        "table=4,priority=0 actions=goto_table:6",  # Conntrack: the rest skips ReplyOrigin
        "table=5,priority=0 actions=drop",  # ReplyOrigin (entered from Conntrack only)
        "table=6,priority=0 actions=goto_table:10",  # ServiceLB: the rest skips to RequestOrigin
        "table=7,priority=0 actions=drop",  # SessionAffinity (entered by resubmit only)
        "table=8,priority=0 actions=drop",  # AffinitySelect (entered by resubmit only)
        "table=9,priority=0 actions=drop",  # EndpointDNAT (entered by resubmit only)
        "table=10,priority=0 actions=goto_table:11",  # RequestOrigin
        "table=11,priority=0 actions=goto_table:16",  # PolicyConntrack: not isolated, skip to ServiceMasq
        "table=12,priority=0 actions=goto_table:13",  # PolicyState
        "table=13,priority=0 actions=goto_table:14",  # EgressRule
        "table=14,priority=0 actions=goto_table:15",  # IngressRule
        "table=15,priority=0 actions=goto_table:16",  # PolicyCommit
        "table=16,priority=0 actions=goto_table:17",  # ServiceMasq
        "table=17,priority=0 actions=drop",  # L3Forwarding
        "table=18,priority=0 actions=drop",  # Output
        "table=19,priority=0 actions=drop",  # Reject
        "table=20,priority=0 actions=drop",  # NeighborAdvert (entered by resubmit only)
        "table=2,priority=200,arp,arp_op=1,arp_tpa=10.244.1.1 actions=" + ARP_REPLY.format(ip="10.244.1.1"),
        "table=2,priority=190,arp actions=drop",
        "table=18,priority=200 actions=output:NXM_NX_REG1[]",
    ])


NODE6 = NodeNetwork.build("node-1", "10.244.1.0/24,fd00:10:244:1::/64")
POD6 = PodPort.build("default", "web", 3, "0a:58:0a:f4:01:0a", "10.244.1.10,fd00:10:244:1::a")
NA_REPLY = ("move:NXM_OF_ETH_SRC[]->NXM_OF_ETH_DST[],set_field:0a:58:0a:f4:00:01->dl_src,"
            "move:NXM_NX_IPV6_SRC[]->NXM_NX_IPV6_DST[],set_field:{ip}->ipv6_src,set_field:136->icmpv6_type,"
            "set_field:0xe0000000->nd_reserved,set_field:2->nd_options_type,resubmit(,20)")


def test_dual_stack_pod_flows_golden():
    """What a dual-stack pod adds to its IPv4 flows: its IPv6 source (and, for ICMPv6 only, its
    link-local one and DAD's ::), solicitations for its address answered, delivery with the hop limit
    decremented, its direct requests to service target ports tracked."""
    extra = set(texts(pods.pod_flows(NODE6, POD6))) - set(texts(pods.pod_flows(NODE, POD)))
    assert sorted(extra) == sorted([
        "table=1,priority=200,ipv6,in_port=3,dl_src=0a:58:0a:f4:01:0a,ipv6_src=fd00:10:244:1::a actions=goto_table:2",
        "table=1,priority=200,icmp6,in_port=3,dl_src=0a:58:0a:f4:01:0a,ipv6_src=fe80::858:aff:fef4:10a "
        "actions=goto_table:2",
        "table=1,priority=200,icmp6,in_port=3,dl_src=0a:58:0a:f4:01:0a,ipv6_src=::,icmpv6_type=135 "
        "actions=goto_table:2",
        "table=2,priority=200,icmp6,icmpv6_type=135,icmpv6_code=0,nd_target=fd00:10:244:1::a actions="
        + NA_REPLY.format(ip="fd00:10:244:1::a"),
        "table=17,priority=200,ipv6,dl_dst=0a:58:0a:f4:00:01,ipv6_dst=fd00:10:244:1::a actions=set_field:"
        "0a:58:0a:f4:00:01->dl_src,set_field:0a:58:0a:f4:01:0a->dl_dst,dec_ttl,load:0x3->NXM_NX_REG1[],"
        "goto_table:18",
        # its direct requests to service target ports, as for IPv4 (dual-stack Services)
        "table=6,priority=4,ipv6,reg0=0x40/0x40,ct_state=+new+trk,ipv6_src=fd00:10:244:1::a actions=ct(commit,"
        "zone=65523,table=11,exec(load:0x1->NXM_NX_CT_MARK[1]))",
        "table=6,priority=5,tcp6,reg0=0x40/0x40,ct_state=+new+trk,ipv6_src=fd00:10:244:1::a,tcp_flags=-syn "
        "actions=ct(commit,zone=65523,table=11)",
    ])
    static = set(texts(pods.static_flows(NODE6))) - set(texts(pods.static_flows(NODE)))
    assert "table=2,priority=200,icmp6,icmpv6_type=135,icmpv6_code=0,nd_target=fd00:10:244:1::1 actions=" \
        + NA_REPLY.format(ip="fd00:10:244:1::1") in static
    assert "table=20,priority=200,icmp6,icmpv6_type=136 actions=set_field:0a:58:0a:f4:00:01->nd_tll,IN_PORT" in static
    assert "table=2,priority=210,icmp6,ipv6_src=::,icmpv6_type=135 actions=drop" in static  # DAD: never answered
    assert "table=2,priority=190,icmp6,icmpv6_type=136 actions=drop" in static  # no advertisement forwarded
    assert "table=2,priority=189,ipv6,ipv6_dst=ff00::/8 actions=drop" in static  # no multicast flooded


def test_link_local_is_the_kernels_eui64():
    from sanderling.model.network import link_local

    assert str(link_local("0a:58:0a:f4:06:0a")) == "fe80::858:aff:fef4:60a"  # what `ip -6 addr` showed


def test_every_pod_flow_carries_the_pods_cookie_and_only_goes_forward():
    expected = cookies.cookie(cookies.Category.POD, POD.key)
    for flow in pods.pod_flows(NODE, POD) + pods.static_flows(NODE) + pods.pod_flows(NODE6, POD6) + \
            pods.static_flows(NODE6):
        PIPELINE.check_flow(flow)
    assert {f.cookie for f in pods.pod_flows(NODE, POD)} == {expected}
    assert cookies.category_of(expected) == cookies.Category.POD


def test_compiler_is_deterministic():
    assert pods.pod_flows(NODE, POD) == pods.pod_flows(NODE, POD)


def test_backward_goto_is_rejected():
    with pytest.raises(PipelineError, match="backward"):
        PIPELINE.check_flow(ir.Flow(3, 1, ir.Match(), (ir.Goto(1),)))
    with pytest.raises(PipelineError, match="no table"):
        PIPELINE["Nope"]
    with pytest.raises(PipelineError, match="duplicate"):
        Pipeline((Table("A", "s", Miss.DROP, ""), Table("A", "s", Miss.DROP, "")))


def test_model_rejects_bad_pods_with_the_field_named():
    with pytest.raises(ModelError, match="mac"):
        PodPort.build("ns", "p", 3, "zz:00:00:00:00:00", "10.244.1.5")
    with pytest.raises(ModelError, match="multicast"):
        PodPort.build("ns", "p", 3, "01:00:00:00:00:01", "10.244.1.5")
    with pytest.raises(ModelError, match="ip"):
        PodPort.build("ns", "p", 3, "0a:00:00:00:00:01", "10.244.1.500")
    with pytest.raises(ModelError, match="ofport"):
        PodPort.build("ns", "p", 0, "0a:00:00:00:00:01", "10.244.1.5")
    with pytest.raises(ModelError, match="gateway"):
        NODE.check_pod(PodPort.build("ns", "p", 3, "0a:00:00:00:00:01", "10.244.1.1"))
    with pytest.raises(ModelError, match="podCIDR"):
        NodeNetwork.build("n", "10.244.1.5/24")


def test_cookie_layout():
    c = cookies.with_generation(cookies.cookie(cookies.Category.SERVICE, "svc/x"), 513)
    assert cookies.generation_of(c) == 513
    assert cookies.category_of(c) == cookies.Category.SERVICE
    assert c & cookies.OBJECT_MASK == cookies.object_id("svc/x")
    assert cookies.next_generation(0xFFFF) == 1 and cookies.next_generation(0) == 1


def test_one_mac_helper():
    from sanderling.model.network import mac_for_ip

    assert mac_for_ip("10.244.1.10") == "0a:58:0a:f4:01:0a" == POD.mac


def test_an_isolated_dual_stack_pods_ipv6_is_isolated_like_its_ipv4():
    """Both of a dual-stack pod's addresses are tracked in the policy zone and denied by default in
    the isolated direction; a peer is every address of a pod."""
    import ipaddress

    from sanderling.compiler.policy import _addr_matches, addresses, isolation_flows
    from sanderling.model.policy import pod_info

    raw = {"metadata": {"namespace": "prod", "name": "db"}, "spec": {"nodeName": "node-1"},
           "status": {"podIP": "10.244.1.10", "podIPs": [{"ip": "10.244.1.10"}, {"ip": "fd00:10:244:1::a"}]}}
    pod = pod_info(raw)
    assert pod.ip6 == ipaddress.IPv6Address("fd00:10:244:1::a")
    ingress_only = texts(isolation_flows(pod, ingress=True, egress=False))
    assert [f for f in ingress_only if "ipv6" in f] == [
        "table=11,priority=190,ipv6,ipv6_dst=fd00:10:244:1::a actions=ct(zone=65522,table=12)",
        # requests of service connections this node translated (TRANSLATED): their own zone
        "table=11,priority=195,ipv6,reg0=0x80/0x80,ipv6_dst=fd00:10:244:1::a actions=ct(zone=65524,table=12)",
        "table=11,priority=200,ipv6,ipv6_src=fd00:10:244:1::a actions=ct(zone=65522,table=12)",
        "table=11,priority=205,ipv6,reg0=0x80/0x80,ipv6_src=fd00:10:244:1::a actions=ct(zone=65524,table=12)",
        "table=14,priority=10,ipv6,ipv6_dst=fd00:10:244:1::a actions=drop"]
    both = texts(isolation_flows(pod, ingress=True, egress=True))
    assert "table=13,priority=10,ipv6,ipv6_src=fd00:10:244:1::a actions=drop" in both, both
    assert [m.text() for m in _addr_matches("nw_src", addresses([pod]), [ipaddress.ip_network("fd00:99::/48")])] \
        == ["ip,nw_src=10.244.1.10", "ipv6,ipv6_src=fd00:10:244:1::a", "ipv6,ipv6_src=fd00:99::/48"]


def test_an_ipv6_only_node_and_pod_compile_no_ipv4_flow():
    """An IPv6-only node: no IPv4 subnet, no gateway ARP answer (every ARP packet dropped); its pod's
    flows are exactly the IPv6 ones a dual-stack pod has, plus its port's classifier and hairpin."""
    node = NodeNetwork.build("node-1", "fd00:10:244:1::/64")
    pod = PodPort.build("default", "web", 3, "0a:58:0a:f4:01:0a", "fd00:10:244:1::a")
    assert (node.pod_cidr, node.gateway_ip, node.families) == (None, None, "ipv6")
    assert (pod.ip, pod.ips) == (None, (pod.ip6,))
    node.check_pod(pod)
    flows = texts(pods.pod_flows(node, pod))
    assert not [f for f in flows if "arp" in f or ",ip," in f or "nw_" in f], flows
    dual = set(texts(pods.pod_flows(NODE6, POD6))) - set(texts(pods.pod_flows(NODE, POD)))
    assert dual < set(flows) and len(set(flows) - dual) == 2  # classifier, hairpin
    static = texts(pods.static_flows(node))
    assert "table=2,priority=190,arp actions=drop" in static
    assert not [f for f in static if "arp_op" in f], static
    with pytest.raises(ModelError, match="IPv4 but node node-1 has no IPv4 pod subnet"):
        node.check_pod(POD)
    with pytest.raises(ModelError, match="names no pod CIDR"):
        NodeNetwork.build("node-1", " , ")
    with pytest.raises(ModelError, match="not an IPv4 address, an IPv6 one or one of each"):
        PodPort.build("default", "web", 3, "0a:58:0a:f4:01:0a", "")
