"""NetworkPolicy on dual-stack pods, verdicts by OVS itself (ofproto/trace on a dummy-datapath
bridge): a pod peer allows all of its addresses, an IPv6 ipBlock (with an except) IPv6 sources
only, an IPv4 one IPv4 sources only; the isolated pod's IPv6 is denied by default like its IPv4;
an ICMPv6 error related to its connection passes."""

from __future__ import annotations

import asyncio

from sanderling.agent.policy_agent import PolicyAgent
from sanderling.compiler import pods as pod_compiler
from sanderling.model.network import NodeNetwork, PodPort
from sanderling.openflow.connection import Connection
from sanderling.openflow.realizer import Realizer

from ..conftest import Bridge, require_ovs

NODE = NodeNetwork.build("n1", "10.244.7.0/24,fd00:10:244:7::/64")
PODS = [{"ns": "x", "name": f"p{i}", "labels": {"app": "abc"[i]}, "ip": f"10.244.7.{10 + i}",
         "ip6": f"fd00:10:244:7::{10 + i:x}", "ofport": i + 1, "mac": f"0a:58:0a:f4:07:{10 + i:02x}"}
        for i in range(3)]
POLICY = {"metadata": {"namespace": "x", "name": "db"}, "spec": {
    "podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Ingress"],
    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "b"}}}], "ports": [{"port": 80}]},
                {"from": [{"ipBlock": {"cidr": "fd00:10:244:7::/64", "except": ["fd00:10:244:7::c/128"]}}],
                 "ports": [{"port": 81}]},
                {"from": [{"ipBlock": {"cidr": "10.244.7.12/32"}}], "ports": [{"port": 82}]}]}}


def _allowed(bridge: Bridge, src: dict, dst: dict, port: int, family: int) -> bool:
    addresses = (f"tcp,nw_src={src['ip']},nw_dst={dst['ip']}" if family == 4
                 else f"tcp6,ipv6_src={src['ip6']},ipv6_dst={dst['ip6']}")
    return bridge.allows_new(f"in_port={src['ofport']},dl_src={src['mac']},dl_dst={NODE.gateway_mac},{addresses},"
                             f"nw_ttl=64,tcp_src=40000,tcp_dst={port}")


def test_policy_verdicts_over_both_families(dummy_ovs, dummy_db):
    require_ovs()
    bridge = Bridge(dummy_ovs, dummy_db, "pd", 3)
    try:
        async def install():
            conn = await Connection.open(bridge.target)
            realizer = Realizer(1)
            realizer.set_object("static", pod_compiler.static_flows(NODE))
            for p in PODS:
                port = PodPort.build(p["ns"], p["name"], p["ofport"], p["mac"], f"{p['ip']},{p['ip6']}")
                realizer.set_object(port.key, pod_compiler.pod_flows(NODE, port))
            agent = PolicyAgent("n1", realizer, lambda: None)
            agent.start()
            agent.namespace_changed("x", {"metadata": {"name": "x", "labels": {"kubernetes.io/metadata.name": "x"}}})
            for p in PODS:
                agent.pod_changed(f"x/{p['name']}", {
                    "metadata": {"namespace": "x", "name": p["name"], "labels": p["labels"]},
                    "spec": {"nodeName": "n1"},
                    "status": {"podIP": p["ip"], "podIPs": [{"ip": p["ip"]}, {"ip": p["ip6"]}]}})
            agent.policy_changed("x/db", POLICY)
            await realizer.resync(conn)
            conn.close()
        asyncio.run(install())
        verdicts = {(s, port, family): _allowed(bridge, PODS[s], PODS[0], port, family)
                    for s in (1, 2) for port in (80, 81, 82) for family in (4, 6)}
        # the policy selects p0 only: p0 -> p1 is open over both families
        open_ = {family: _allowed(bridge, PODS[0], PODS[1], 80, family) for family in (4, 6)}
        # an ICMPv6 error to the isolated p0 (port unreachable about a connection of p0's) passes as
        # related; the same packet of no connection is denied like any new one
        p2, p0 = PODS[2], PODS[0]
        error = (f"in_port={p2['ofport']},dl_src={p2['mac']},dl_dst={NODE.gateway_mac},icmp6,"
                 f"ipv6_src={p2['ip6']},ipv6_dst={p0['ip6']},nw_ttl=64,icmpv6_type=1,icmpv6_code=4")
        related = {state: bridge.runtime.appctl("ofproto/trace", *(["--ct-next", state] * 4), bridge.name, error)
                   for state in ("trk,rel", "trk,new")}
        to_p0 = bridge.dp_port(p0["ofport"])
    finally:
        bridge.delete()
    assert verdicts == {
        (1, 80, 4): True, (1, 80, 6): True,  # the pod peer: every address of p1
        (1, 81, 4): False, (1, 81, 6): True,  # the IPv6 block holds p1's IPv6 address only
        (1, 82, 4): False, (1, 82, 6): False,
        (2, 80, 4): False, (2, 80, 6): False,
        (2, 81, 4): False, (2, 81, 6): False,  # p2's IPv6 address is the block's except
        (2, 82, 4): True, (2, 82, 6): False,  # the IPv4 block: p2's IPv4 address only
    }, verdicts
    assert open_ == {4: True, 6: True}
    last = {state: [ln for ln in trace.splitlines() if ln.startswith("Datapath actions:")][-1].split(":", 1)[1]
            for state, trace in related.items()}
    assert last["trk,rel"].strip().split(",")[-1] == to_p0, related["trk,rel"]  # delivered to p0
    assert last["trk,new"].strip() == "drop", related["trk,new"]
