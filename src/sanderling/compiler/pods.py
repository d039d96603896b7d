"""Local pod forwarding: classification, spoof guard, neighbour responder and L3 delivery.

Routed model: every ARP request and IPv6 neighbour solicitation a pod sends for the gateway or
another local pod is answered with the gateway MAC, so every packet between pods is routed by
L3Forwarding (MAC rewrite, TTL or hop-limit decrement), the same path it will take to pods on
other nodes. No neighbour discovery packet is forwarded: what is not answered is dropped, so a
pod's DAD probes, router solicitations and MLD reports flood nobody, and an advertisement it
forges reaches no cache.
"""

from __future__ import annotations

from sanderling.model.network import NodeNetwork, PodPort, link_local
from sanderling.openflow import cookies, ir
from sanderling.openflow.pipeline import PIPELINE, Pipeline
from sanderling.openflow.registers import CT_MARK_DIRECT, FROM_POD, ORIGIN_ZONE, TARGET_OFPORT, TO_TARGET_PORT

ARP_REQUEST = 1
ARP_REPLY = 2
ND_SOLICIT = 135
ND_ADVERT = 136
ND_OPTION_TLL = 2
# the advertisement's flags: Router (the gateway routes), Solicited, Override
ND_FLAGS_RSO = 0xE0000000
LINK_LOCAL = "fe80::/10"
MULTICAST6 = "ff00::/8"

PRIO_HIGH = 200
PRIO_DAD = 210  # above the answers: a probe for a taken address must not be answered (DAD would fail)
PRIO_ARP_DROP = 190
PRIO_DIRECT_COMMIT = 4  # in ServiceLB: below every service flow, so only what is not a service connection


def arp_reply_actions(gateway_mac: str, answer_ip: int) -> tuple[ir.Action, ...]:
    """Turn an ARP request into the reply 'answer_ip is at gateway_mac' and send it back."""
    return (
        ir.Move(ir.FieldRef("dl_src"), ir.FieldRef("dl_dst")),
        ir.set_field("dl_src", gateway_mac),
        ir.set_field("arp_op", ARP_REPLY),
        ir.Move(ir.FieldRef("arp_sha"), ir.FieldRef("arp_tha")),
        ir.Move(ir.FieldRef("arp_spa"), ir.FieldRef("arp_tpa")),
        ir.set_field("arp_sha", gateway_mac),
        ir.SetField("arp_spa", answer_ip),
        ir.Output(ir.IN_PORT),
    )


def na_reply_actions(gateway_mac: str, answer_ip: int, pipeline: Pipeline = PIPELINE) -> tuple[ir.Action, ...]:
    """Turn a neighbour solicitation into the advertisement 'answer_ip is at gateway_mac' (router,
    solicited, override): OVS rewrites the ICMPv6 type, flags and option type in place (the
    solicitation's source link-layer option becomes a target link-layer one) and fixes the
    checksum; NeighborAdvert then writes the MAC into the option and sends it back."""
    return (
        ir.Move(ir.FieldRef("dl_src"), ir.FieldRef("dl_dst")),
        ir.set_field("dl_src", gateway_mac),
        ir.Move(ir.FieldRef("ipv6_src"), ir.FieldRef("ipv6_dst")),
        ir.SetField("ipv6_src", answer_ip),
        ir.set_field("icmpv6_type", ND_ADVERT),
        ir.set_field("nd_reserved", ND_FLAGS_RSO),
        ir.set_field("nd_options_type", ND_OPTION_TLL),
        ir.Resubmit(pipeline["NeighborAdvert"]),
    )


def ns_answer(gateway_mac: str, target: int, cookie: int, pipeline: Pipeline = PIPELINE) -> ir.Flow:
    """A solicitation for `target` (the gateway, a local pod, the masquerade address) answered
    with the gateway MAC."""
    return ir.Flow(pipeline["NeighborResponder"], PRIO_HIGH,
                   ir.match(proto="icmp6", icmpv6_type=ND_SOLICIT, icmpv6_code=0, nd_target=target),
                   na_reply_actions(gateway_mac, target, pipeline), cookie)


def static_flows(node: NodeNetwork, pipeline: Pipeline = PIPELINE) -> list[ir.Flow]:
    """Flows that exist once per node: table misses, the gateway ARP (and NDP) answer, output by
    register."""
    cookie = cookies.cookie(cookies.Category.PIPELINE, f"node/{node.name}")
    flows = pipeline.miss_flows(cookie)
    arp = pipeline["NeighborResponder"]
    if node.gateway_ip is not None:
        gw = int(node.gateway_ip)
        flows.append(ir.Flow(arp, PRIO_HIGH, ir.match(proto="arp", arp_op=ARP_REQUEST, arp_tpa=gw),
                             arp_reply_actions(node.gateway_mac, gw), cookie))
    flows.append(ir.Flow(arp, PRIO_ARP_DROP, ir.match(proto="arp"), (), cookie))  # an IPv6-only node: all
    if node.gateway_ip6 is not None:
        flows.append(ns_answer(node.gateway_mac, int(node.gateway_ip6), cookie, pipeline))
        flows.append(ir.Flow(pipeline["NeighborAdvert"], PRIO_HIGH, ir.match(proto="icmp6", icmpv6_type=ND_ADVERT),
                             (ir.set_field("nd_tll", node.gateway_mac), ir.Output(ir.IN_PORT)), cookie))
        # duplicate address detection probes (from ::) are never answered; the rest of neighbour
        # discovery, router solicitations and MLD go nowhere; so does anything link-local or
        # multicast (nothing behind the gateway shares a link with the pod)
        flows.append(ir.Flow(arp, PRIO_DAD, ir.match(proto="icmp6", ipv6_src="::", icmpv6_type=ND_SOLICIT),
                             (), cookie))
        for icmp_type in (130, 131, 132, 133, 134, ND_SOLICIT, ND_ADVERT, 137, 143):
            flows.append(ir.Flow(arp, PRIO_ARP_DROP, ir.match(proto="icmp6", icmpv6_type=icmp_type), (), cookie))
        flows.append(ir.Flow(arp, PRIO_ARP_DROP - 1, ir.match(proto="ipv6", ipv6_src=LINK_LOCAL), (), cookie))
        flows.append(ir.Flow(arp, PRIO_ARP_DROP - 1, ir.match(proto="ipv6", ipv6_dst=LINK_LOCAL), (), cookie))
        flows.append(ir.Flow(arp, PRIO_ARP_DROP - 1, ir.match(proto="ipv6", ipv6_dst=MULTICAST6), (), cookie))
    flows.append(ir.Flow(pipeline["Output"], PRIO_HIGH, ir.Match(), (ir.OutputReg(TARGET_OFPORT.ref),), cookie))
    return flows


def pod_flows(node: NodeNetwork, pod: PodPort, pipeline: Pipeline = PIPELINE) -> list[ir.Flow]:
    """Every flow one local pod port needs."""
    cookie = cookies.cookie(cookies.Category.POD, pod.key)
    port = pod.ofport
    return [
        ir.Flow(pipeline["Classifier"], PRIO_HIGH, ir.match(in_port=port),
                (FROM_POD.load(), ir.Goto(pipeline["SpoofGuard"])), cookie),
        # hairpin (a pod reaching itself through a service): OpenFlow never outputs to the ingress
        # port unless told to with IN_PORT
        ir.Flow(pipeline["Output"], PRIO_HIGH + 10, ir.match(TARGET_OFPORT.equals(port), in_port=port),
                (ir.Output(ir.IN_PORT),), cookie),
        *pod_flows4(node, pod, cookie, pipeline),
        *pod_flows6(node, pod, cookie, pipeline),
    ]


def pod_flows4(node: NodeNetwork, pod: PodPort, cookie: int, pipeline: Pipeline = PIPELINE) -> list[ir.Flow]:
    """A pod's IPv4 (none for an IPv6-only pod): its address from its MAC, ARP for it answered,
    delivery by address with the TTL decremented."""
    if pod.ip is None:
        return []
    ip = int(pod.ip)
    port = pod.ofport
    return [
        ir.Flow(pipeline["SpoofGuard"], PRIO_HIGH, ir.match(proto="ip", in_port=port, dl_src=pod.mac, nw_src=ip),
                (ir.Goto(pipeline.next_of("SpoofGuard")),), cookie),
        ir.Flow(pipeline["SpoofGuard"], PRIO_HIGH,
                ir.match(proto="arp", in_port=port, dl_src=pod.mac, arp_spa=ip, arp_sha=pod.mac),
                (ir.Goto(pipeline.next_of("SpoofGuard")),), cookie),
        ir.Flow(pipeline["NeighborResponder"], PRIO_HIGH, ir.match(proto="arp", arp_op=ARP_REQUEST, arp_tpa=ip),
                arp_reply_actions(node.gateway_mac, ip), cookie),
        ir.Flow(pipeline["L3Forwarding"], PRIO_HIGH, ir.match(proto="ip", dl_dst=node.gateway_mac, nw_dst=ip),
                (ir.set_field("dl_src", node.gateway_mac), ir.set_field("dl_dst", pod.mac), ir.DecTTL(),
                 TARGET_OFPORT.load(port), ir.Goto(pipeline["Output"])), cookie),
        *_direct_commit("ip", "nw_src", ip, cookie, pipeline),
    ]


def pod_flows6(node: NodeNetwork, pod: PodPort, cookie: int, pipeline: Pipeline = PIPELINE) -> list[ir.Flow]:
    """A pod's IPv6 (dual-stack or IPv6-only): its address from its MAC; ICMPv6 also from its link-local address
    (the kernel solicits the gateway from it) and DAD probes from ::; solicitations for its
    address answered; delivery by address with the hop limit decremented."""
    if pod.ip6 is None:
        return []
    ip6 = int(pod.ip6)
    port = pod.ofport
    guard = pipeline["SpoofGuard"]
    on = (ir.Goto(pipeline.next_of("SpoofGuard")),)
    return [
        ir.Flow(guard, PRIO_HIGH, ir.match(proto="ipv6", in_port=port, dl_src=pod.mac, ipv6_src=ip6), on, cookie),
        ir.Flow(guard, PRIO_HIGH, ir.match(proto="icmp6", in_port=port, dl_src=pod.mac,
                                           ipv6_src=int(link_local(pod.mac))), on, cookie),
        ir.Flow(guard, PRIO_HIGH, ir.match(proto="icmp6", in_port=port, dl_src=pod.mac, ipv6_src="::",
                                           icmpv6_type=ND_SOLICIT), on, cookie),
        ns_answer(node.gateway_mac, ip6, cookie, pipeline),
        ir.Flow(pipeline["L3Forwarding"], PRIO_HIGH, ir.match(proto="ipv6", dl_dst=node.gateway_mac, ipv6_dst=ip6),
                (ir.set_field("dl_src", node.gateway_mac), ir.set_field("dl_dst", pod.mac), ir.DecTTL(),
                 TARGET_OFPORT.load(port), ir.Goto(pipeline["Output"])), cookie),
        *_direct_commit("ipv6", "ipv6_src", ip6, cookie, pipeline),
    ]


def _direct_commit(proto: str, src: str, ip: int, cookie: int, pipeline: Pipeline) -> tuple[ir.Flow, ir.Flow]:
    """Every request of this pod (from `ip`, `proto` ip or ipv6) to a service target port that
    is not a service connection is committed to the origin zone; a connection's first packet
    marks it direct.

    Why: replies from target ports may belong to service connections, which are translated back
    in the DNAT zone. A direct connection reusing the tuple of a recent service connection to the
    same endpoint had its replies taken for that connection's and rewritten to the service
    address (a pod-IP TCP path lost while the entry lived). The origin zone tracks both kinds by
    the endpoint tuple, so there is one entry per tuple and the connection started last decides
    (ReplyOrigin). Only a start sets the mark (a TCP SYN; any UDP or SCTP packet): a late segment
    of the older connection, reordered behind the new SYN, must not take the tuple back. A null
    SNAT in the DNAT zone did the same and crashed OVS 3.1's userspace conntrack
    (`conn_update_state` assertion) after a few thousand connections.
    """
    bit = CT_MARK_DIRECT.bit_length() - 1
    mark = ir.CT(commit=True, zone=ORIGIN_ZONE, table=pipeline["PolicyConntrack"],
                 exec_=(ir.Load(ir.FieldRef("ct_mark", bit, bit), 1),))
    track = ir.CT(commit=True, zone=ORIGIN_ZONE, table=pipeline["PolicyConntrack"])
    return (ir.Flow(pipeline["ServiceLB"], PRIO_DIRECT_COMMIT,
                    ir.match(TO_TARGET_PORT, proto=proto, ct_state="+new+trk", **{src: ip}), (mark,), cookie),
            ir.Flow(pipeline["ServiceLB"], PRIO_DIRECT_COMMIT + 1,
                    ir.match(TO_TARGET_PORT, proto="tcp" if proto == "ip" else "tcp6", ct_state="+new+trk",
                             tcp_flags="-syn", **{src: ip}), (track,), cookie))
