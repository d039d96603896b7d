"""Local pod forwarding: classification, spoof guard, ARP responder and L3 delivery.

Routed model: every ARP request a pod sends for the gateway or another local pod is answered
with the gateway MAC, so every packet between pods is routed by L3Forwarding (MAC rewrite,
TTL decrement), the same path it will take to pods on other nodes.
"""

from __future__ import annotations

from sanderling.model.network import NodeNetwork, PodPort
from sanderling.openflow import cookies, ir
from sanderling.openflow.pipeline import PIPELINE, Pipeline
from sanderling.openflow.registers import CT_MARK_DIRECT, FROM_POD, ORIGIN_ZONE, TARGET_OFPORT, TO_TARGET_PORT

ARP_REQUEST = 1
ARP_REPLY = 2

PRIO_HIGH = 200
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


def static_flows(node: NodeNetwork, pipeline: Pipeline = PIPELINE) -> list[ir.Flow]:
    """Flows that exist once per node: table misses, the gateway ARP answer, output by register."""
    cookie = cookies.cookie(cookies.Category.PIPELINE, f"node/{node.name}")
    flows = pipeline.miss_flows(cookie)
    arp = pipeline["ARPResponder"]
    gw = int(node.gateway_ip)
    flows.append(ir.Flow(arp, PRIO_HIGH, ir.match(proto="arp", arp_op=ARP_REQUEST, arp_tpa=gw),
                         arp_reply_actions(node.gateway_mac, gw), cookie))
    flows.append(ir.Flow(arp, PRIO_ARP_DROP, ir.match(proto="arp"), (), cookie))
    flows.append(ir.Flow(pipeline["Output"], PRIO_HIGH, ir.Match(), (ir.OutputReg(TARGET_OFPORT.ref),), cookie))
    return flows


def pod_flows(node: NodeNetwork, pod: PodPort, pipeline: Pipeline = PIPELINE) -> list[ir.Flow]:
    """Every flow one local pod port needs."""
    cookie = cookies.cookie(cookies.Category.POD, pod.key)
    ip = int(pod.ip)
    port = pod.ofport
    return [
        ir.Flow(pipeline["Classifier"], PRIO_HIGH, ir.match(in_port=port),
                (FROM_POD.load(), ir.Goto(pipeline["SpoofGuard"])), cookie),
        ir.Flow(pipeline["SpoofGuard"], PRIO_HIGH, ir.match(proto="ip", in_port=port, dl_src=pod.mac, nw_src=ip),
                (ir.Goto(pipeline.next_of("SpoofGuard")),), cookie),
        ir.Flow(pipeline["SpoofGuard"], PRIO_HIGH,
                ir.match(proto="arp", in_port=port, dl_src=pod.mac, arp_spa=ip, arp_sha=pod.mac),
                (ir.Goto(pipeline.next_of("SpoofGuard")),), cookie),
        ir.Flow(pipeline["ARPResponder"], PRIO_HIGH, ir.match(proto="arp", arp_op=ARP_REQUEST, arp_tpa=ip),
                arp_reply_actions(node.gateway_mac, ip), cookie),
        ir.Flow(pipeline["L3Forwarding"], PRIO_HIGH, ir.match(proto="ip", dl_dst=node.gateway_mac, nw_dst=ip),
                (ir.set_field("dl_src", node.gateway_mac), ir.set_field("dl_dst", pod.mac), ir.DecTTL(),
                 TARGET_OFPORT.load(port), ir.Goto(pipeline["Output"])), cookie),
        # hairpin (a pod reaching itself through a service): OpenFlow never outputs to the ingress
        # port unless told to with IN_PORT
        ir.Flow(pipeline["Output"], PRIO_HIGH + 10, ir.match(TARGET_OFPORT.equals(port), in_port=port),
                (ir.Output(ir.IN_PORT),), cookie),
        *direct_commit_flows(pod, cookie, pipeline),
    ]


def direct_commit_flows(pod: PodPort, cookie: int, pipeline: Pipeline = PIPELINE) -> tuple[ir.Flow, ir.Flow]:
    """Every request of this pod to a service target port that is not a service connection is
    committed to the origin zone; a connection's first packet marks it direct.

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
    ip = int(pod.ip)
    bit = CT_MARK_DIRECT.bit_length() - 1
    mark = ir.CT(commit=True, zone=ORIGIN_ZONE, table=pipeline["PolicyConntrack"],
                 exec_=(ir.Load(ir.FieldRef("ct_mark", bit, bit), 1),))
    track = ir.CT(commit=True, zone=ORIGIN_ZONE, table=pipeline["PolicyConntrack"])
    return (ir.Flow(pipeline["ServiceLB"], PRIO_DIRECT_COMMIT,
                    ir.match(TO_TARGET_PORT, proto="ip", ct_state="+new+trk", nw_src=ip), (mark,), cookie),
            ir.Flow(pipeline["ServiceLB"], PRIO_DIRECT_COMMIT + 1,
                    ir.match(TO_TARGET_PORT, proto="tcp", ct_state="+new+trk", nw_src=ip, tcp_flags="-syn"),
                    (track,), cookie))
