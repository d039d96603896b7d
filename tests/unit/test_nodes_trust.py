"""Routes only from trusted sources (issue 20): what becomes a route or flow on every node."""

from __future__ import annotations

import ipaddress

from sanderling.model.nodes import NodeInfo, refused_cidrs, remotes


def node(name: str, cidr: str | None, ip: str, created: str = "2026-01-01T00:00:00Z") -> NodeInfo:
    return NodeInfo(name, ipaddress.IPv4Network(cidr) if cidr else None, ipaddress.IPv4Address(ip), created)


NODES = [node("n1", "10.244.1.0/24", "172.30.0.11"), node("n2", "10.244.2.0/24", "172.30.0.12")]


def test_pod_address_outside_its_podcidr_needs_an_ippool_allocation_of_that_node():
    pods = [("n2", "10.244.2.5"),  # inside n2's subnet: covered by the subnet route
            ("n2", "10.60.0.7"),  # a pool address n2 holds
            ("n2", "10.244.1.9"),  # n1's pod address claimed by a pod of n2
            ("n2", "8.8.8.8"),  # the internet
            ("n2", "10.60.0.8")]  # a pool address held by n1, claimed by a pod of n2
    untrusted: list[str] = []
    got = remotes("n1", NODES, pods, {"10.60.0.7": "n2", "10.60.0.8": "n1"}, None, untrusted)
    assert [str(r.dst) for r in got] == ["10.60.0.7/32", "10.244.2.0/24"]
    assert untrusted == ["10.244.1.9 on node n2", "8.8.8.8 on node n2", "10.60.0.8 on node n2"]


def test_podcidrs_that_would_capture_what_is_not_the_nodes_are_refused():
    nodes = [*NODES,
             node("wide", "0.0.0.0/0", "172.30.0.13"),
             node("svc", "10.96.0.0/24", "172.30.0.14"),
             node("underlay", "172.30.0.0/24", "172.30.0.15"),
             node("late", "10.244.2.0/25", "172.30.0.16", created="2026-02-01T00:00:00Z")]
    refused = refused_cidrs(nodes, ipaddress.IPv4Network("10.96.0.0/16"))
    assert sorted(refused) == ["late", "svc", "underlay", "wide"]
    assert "overlaps node n2's 10.244.2.0/24" in refused["late"]
    assert "broader than /8" in refused["wide"] and "service CIDR" in refused["svc"]
    assert "holds node n1's address 172.30.0.11" in refused["underlay"]
    got = remotes("n1", nodes, [("late", "10.244.2.3")], {}, refused)
    assert [str(r.dst) for r in got] == ["10.244.2.0/24"]  # n2 keeps its subnet; nothing of the refused ones
    assert got[0].node == "n2"


def test_a_dual_stack_node_is_an_ipv6_destination_too_with_its_published_next_hop():
    from sanderling.compiler.nodes import remote_flows
    from sanderling.model.network import NodeNetwork
    from sanderling.model.nodes import NEXT_HOP6, node_info

    def dual(name: str, v4: str, v6: str, ip: str, hop: str = "") -> dict:
        return {"metadata": {"name": name, "annotations": {NEXT_HOP6: hop} if hop else {}},
                "spec": {"podCIDR": v4, "podCIDRs": [v4, v6]},
                "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}

    nodes = [node_info(dual("n1", "10.244.1.0/24", "fd00:10:244:1::/64", "172.30.0.11")),
             node_info(dual("n2", "10.244.2.0/24", "fd00:10:244:2::/64", "172.30.0.12", "fe80::1")),
             node_info(dual("bad", "10.244.3.0/24", "fd00:10:244:3::/64", "172.30.0.13", "2001:db8::1"))]
    assert nodes[2].next_hop6 == ""  # only a link-local address is a next hop
    got = remotes("n1", nodes, [])
    assert [(str(r.dst), str(r.via), r.via6) for r in got] == [
        ("10.244.2.0/24", "172.30.0.12", ""), ("10.244.3.0/24", "172.30.0.13", ""),
        ("fd00:10:244:2::/64", "172.30.0.12", "fe80::1"), ("fd00:10:244:3::/64", "172.30.0.13", "")]
    local = NodeNetwork.build("n1", "10.244.1.0/24,fd00:10:244:1::/64")
    assert [f.text(cookie=0) for f in remote_flows(local, got[2], "overlay")] == [
        "table=17,priority=100,ipv6,ipv6_dst=fd00:10:244:2::/64 actions=set_field:0a:58:0a:f4:00:01->dl_dst,"
        "set_field:172.30.0.12->tun_dst,load:0xfde8->NXM_NX_REG1[],goto_table:18"]


def test_an_ipv6_only_node_is_an_ipv6_destination_over_its_ipv4_underlay():
    """spec.podCIDR is IPv6 on an IPv6-only node (it is podCIDRs[0]); the node's IPv4 InternalIP is
    still the underlay (an IPv6 InternalIP is not one); a pod inside its subnet needs no route."""
    from sanderling.model.nodes import node_info

    def v6(name: str, cidr: str, *ips: str) -> dict:
        return {"metadata": {"name": name}, "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
                "status": {"addresses": [{"type": "InternalIP", "address": ip} for ip in ips]}}

    nodes = [node_info(v6("n1", "fd00:10:244::/64", "172.30.0.11")),
             node_info(v6("n2", "fd00:10:244:1::/64", "2001:db8::12", "172.30.0.12"))]
    assert (nodes[1].pod_cidr, str(nodes[1].pod_cidr6), str(nodes[1].internal_ip)) == \
        (None, "fd00:10:244:1::/64", "172.30.0.12")
    got = remotes("n1", nodes, [("n2", "fd00:10:244:1::5")])
    assert [(str(r.dst), str(r.via)) for r in got] == [("fd00:10:244:1::/64", "172.30.0.12")]
    untrusted: list[str] = []
    remotes("n1", nodes, [("n2", "fd00:99::5")], untrusted=untrusted)
    assert untrusted == ["fd00:99::5 on node n2"]
    import pytest

    from sanderling.model.errors import ModelError

    with pytest.raises(ModelError, match="spec.podCIDRs"):
        node_info(v6("n3", "fd00:10:244:1::5/64", "172.30.0.13"))  # host bits set


def test_an_ipv6_pool_address_is_routed_via_its_nodes_next_hop():
    from sanderling.model.nodes import NEXT_HOP6, node_info

    n2 = node_info({"metadata": {"name": "n2", "annotations": {NEXT_HOP6: "fe80::2"}},
                    "spec": {"podCIDRs": ["10.244.2.0/24", "fd00:10:244:2::/64"]},
                    "status": {"addresses": [{"type": "InternalIP", "address": "172.30.0.12"}]}})
    got = remotes("n1", [n2], [("n2", "fd00:62::7")], {"fd00:62::7": "n2"})
    assert [(str(r.dst), str(r.via), r.via6) for r in got if r.dst.prefixlen == 128] == \
        [("fd00:62::7/128", "172.30.0.12", "fe80::2")]
