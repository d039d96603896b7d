"""Forwarding to other nodes: one flow per remote destination (a node's pod subnet or a fixed /32).

Routed mode: the flow sends the packet to the node through LOCAL, and the node's kernel routes
it over the underlay (routes kept by the agent from the same Node objects): pod addresses on
the wire, no encapsulation, no NAT. Overlay mode: the flow sets the tunnel destination to the
remote node's underlay address and outputs to the VXLAN port; the receiving br-int classifies
tunnel traffic as FROM_UPLINK and delivers it with its ordinary local-pod flows (the sender
sets the destination MAC to the gateway MAC those flows match). A /32 has a higher priority
than a subnet, so a pool address living on another node wins over the subnet it falls in.
"""

from __future__ import annotations

from sanderling.compiler.gateway import LOCAL_PORT_16
from sanderling.model.network import NodeNetwork
from sanderling.model.nodes import Remote
from sanderling.openflow import cookies, ir
from sanderling.openflow.pipeline import PIPELINE, Pipeline
from sanderling.openflow.registers import FROM_UPLINK, TARGET_OFPORT

PRIO_REMOTE_SUBNET = 100
PRIO_REMOTE_HOST = 150
TUNNEL_PORT_NAME = "vxlan0"
TUNNEL_OFPORT = 65000  # requested for the VXLAN port, far above the ports pods get


def remote_flows(node: NodeNetwork, remote: Remote, mode: str, pipeline: Pipeline = PIPELINE) -> list[ir.Flow]:
    cookie = cookies.cookie(cookies.Category.NODE, remote.key)
    host = remote.dst.prefixlen == remote.dst.max_prefixlen
    prio = PRIO_REMOTE_HOST if host else PRIO_REMOTE_SUBNET
    dst = str(remote.dst.network_address) if host else str(remote.dst)
    # an IPv6 subnet: the same way (overlay: IPv6 in VXLAN over the IPv4 underlay)
    match = ir.match(proto="ip", nw_dst=dst) if remote.dst.version == 4 else ir.match(proto="ipv6", ipv6_dst=dst)
    if mode == "overlay":
        actions: tuple[ir.Action, ...] = (
            ir.set_field("dl_dst", node.gateway_mac), ir.SetField("tun_dst", int(remote.via)),
            TARGET_OFPORT.load(TUNNEL_OFPORT), ir.Goto(pipeline["Output"]))
    else:
        actions = (TARGET_OFPORT.load(LOCAL_PORT_16), ir.Goto(pipeline["Output"]))
    return [ir.Flow(pipeline["L3Forwarding"], prio, match, actions, cookie)]


def tunnel_flows(node: NodeNetwork, pipeline: Pipeline = PIPELINE) -> list[ir.Flow]:
    """Traffic arriving over VXLAN was validated by the sending node: on to conntrack (replies of
    connections this node translated come back this way) and routing."""
    cookie = cookies.cookie(cookies.Category.NODE, f"tunnel/{node.name}")
    return [ir.Flow(pipeline["Classifier"], 200, ir.match(in_port=TUNNEL_OFPORT),
                    (FROM_UPLINK.load(), ir.Goto(pipeline["UnSNAT"])), cookie)]


def uplink_flows(node: NodeNetwork, ofport: int, pipeline: Pipeline = PIPELINE) -> list[ir.Flow]:
    """An uplink on br-int (traffic from outside the cluster): conntrack, services, then routing."""
    cookie = cookies.cookie(cookies.Category.NODE, f"uplink/{node.name}")
    return [ir.Flow(pipeline["Classifier"], 200, ir.match(in_port=ofport),
                    (FROM_UPLINK.load(), ir.Goto(pipeline["UnSNAT"])), cookie)]


def steered_uplink_flows(node: NodeNetwork, uplink_mac: str, pipeline: Pipeline = PIPELINE) -> list[ir.Flow]:
    """NodePort traffic the node redirects from its uplink arrives on LOCAL still addressed to the
    uplink's MAC: it is outside traffic (FROM_UPLINK), readdressed to the gateway MAC for routing."""
    cookie = cookies.cookie(cookies.Category.NODE, f"steered-uplink/{node.name}")
    return [ir.Flow(pipeline["Classifier"], 210, ir.match(in_port=ir.LOCAL, dl_dst=uplink_mac),
                    (FROM_UPLINK.load(), ir.set_field("dl_dst", node.gateway_mac), ir.Goto(pipeline["UnSNAT"])),
                    cookie)]
