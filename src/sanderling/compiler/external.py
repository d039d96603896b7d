"""br-int's side of the external bridge: what leaves through the patch port, what comes in by it.

Pods reach destinations in the external CIDRs (default: everything) through the patch port to the
operator's bridge, with their own source address (no SNAT), or with `external-masquerade` the
node's masquerade address (the last usable one of its pod CIDR, which Services masquerade to as
well; the external network routes each node's pod CIDR to that node's br-ext); pod, service and node addresses stay
inside (a higher-priority exception: the pod network's routes, the node through LOCAL). A packet
leaves as the pod routed it: the pod's source MAC, the gateway's destination MAC; the external
controller sets the L2 header of its network. Traffic coming in through the patch port is outside
traffic (as from an uplink): addressed to the gateway MAC whatever its L2 header said, then
conntrack, services, policy and routing as any packet from outside.
"""

from __future__ import annotations

import ipaddress

from sanderling.compiler.gateway import LOCAL_PORT_16
from sanderling.model.network import NodeNetwork
from sanderling.openflow import cookies, ir
from sanderling.openflow.pipeline import PIPELINE, Pipeline
from sanderling.openflow.registers import FROM_UPLINK, SNAT_ZONE, TARGET_OFPORT
from sanderling.ovs.external import EXTERNAL_OFPORT

PRIO_EXTERNAL = 30      # above the default route to the node (10), below the pod network's routes (100+)
PRIO_INSIDE = 40        # pod, service and node addresses inside the external CIDRs
PRIO_UNSNAT = 210       # answers to masqueraded connections, above the Services' own un-SNAT (200)


def external_flows(node: NodeNetwork, external_cidrs: tuple[str, ...], inside: tuple[str, ...],
                   masquerade: ipaddress.IPv4Address | None = None, pipeline: Pipeline = PIPELINE) -> list[ir.Flow]:
    """`inside`: CIDRs and addresses that never leave through the patch port (the cluster's pod
    and service CIDRs, the nodes' addresses). `masquerade`: the source address pods' connections
    leave with (the node's masquerade address), or None to keep theirs."""
    cookie = cookies.cookie(cookies.Category.NODE, f"external/{node.name}")
    flows = [ir.Flow(pipeline["Classifier"], 200, ir.match(in_port=EXTERNAL_OFPORT),
                     (FROM_UPLINK.load(), ir.set_field("dl_dst", node.gateway_mac), ir.Goto(pipeline["UnSNAT"])),
                     cookie)]
    out: tuple[ir.Action, ...] = (TARGET_OFPORT.load(EXTERNAL_OFPORT), ir.Goto(pipeline["Output"]))
    if masquerade is not None:
        masq = int(masquerade)
        # committed in the SNAT zone with the node's masquerade address as source, then out; the
        # answers (to that address, through the patch port) get the pod's address back first
        out = (TARGET_OFPORT.load(EXTERNAL_OFPORT),
               ir.CT(commit=True, zone=SNAT_ZONE, table=pipeline["Output"], nat=ir.Nat("src", masq, masq)))
        answers = ir.match(proto="ip", in_port=EXTERNAL_OFPORT, nw_dst=masq)
        flows.append(ir.Flow(pipeline["UnSNAT"], PRIO_UNSNAT, answers,
                             (ir.CT(zone=SNAT_ZONE, table=pipeline["Conntrack"], nat=ir.Nat()),), cookie))
        # a connection from outside is committed there untranslated: the pod's answers are then
        # replies in that zone, and keep the pod's address (only pods' own connections masquerade)
        flows.append(ir.Flow(pipeline["UnSNAT"], PRIO_UNSNAT - 5, ir.match(proto="ip", in_port=EXTERNAL_OFPORT),
                             (ir.CT(commit=True, zone=SNAT_ZONE, table=pipeline["Conntrack"]),), cookie))
    for cidr in external_cidrs:
        net = ipaddress.IPv4Network(cidr, strict=False)
        match = ir.match(proto="ip", dl_dst=node.gateway_mac, **({} if net.prefixlen == 0 else {"nw_dst": _dst(net)}))
        flows.append(ir.Flow(pipeline["L3Forwarding"], PRIO_EXTERNAL, match, out, cookie))
    for cidr in sorted(set(inside)):
        net = ipaddress.IPv4Network(cidr, strict=False)
        flows.append(ir.Flow(pipeline["L3Forwarding"], PRIO_INSIDE,
                             ir.match(proto="ip", dl_dst=node.gateway_mac, nw_dst=_dst(net)),
                             (TARGET_OFPORT.load(LOCAL_PORT_16), ir.Goto(pipeline["Output"])), cookie))
    return flows


def _dst(net: ipaddress.IPv4Network) -> str:
    return str(net.network_address) if net.prefixlen == 32 else str(net)
