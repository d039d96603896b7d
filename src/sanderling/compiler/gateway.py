"""The node gateway: the bridge's LOCAL port carries the pod gateway address into the node.

Routed mode forwards through the node: traffic from pods to anything that is not a local pod
leaves through LOCAL (MAC = the pods' gateway MAC, IP = the gateway IP), the node's kernel routes
it over the underlay to the node owning the destination subnet, and that node sends it into its
br-int through LOCAL again. No encapsulation, no address translation.
"""

from __future__ import annotations

from sanderling.model.network import NodeNetwork
from sanderling.openflow import cookies, ir
from sanderling.openflow.pipeline import PIPELINE, Pipeline
from sanderling.openflow.registers import FROM_GATEWAY, TARGET_OFPORT

PRIO_DEFAULT_ROUTE = 10
# output:reg takes the register as OVS's internal 16-bit port number, where LOCAL is 0xfffe
# (the 32-bit OpenFlow 1.3 OFPP_LOCAL, 0xfffffffe, would name no port and silently drop).
LOCAL_PORT_16 = 0xFFFE


def gateway_flows(node: NodeNetwork, pipeline: Pipeline = PIPELINE) -> list[ir.Flow]:
    cookie = cookies.cookie(cookies.Category.NODE, f"gateway/{node.name}")
    return [
        # the node's own traffic: no spoof guard (it carries node and remote-pod sources)
        ir.Flow(pipeline["Classifier"], 200, ir.match(in_port=ir.LOCAL),
                (FROM_GATEWAY.load(), ir.Goto(pipeline.next_of("SpoofGuard"))), cookie),
        # everything routed that is not a local pod goes to the node
        *(ir.Flow(pipeline["L3Forwarding"], PRIO_DEFAULT_ROUTE, ir.match(proto=proto, dl_dst=node.gateway_mac),
                  (TARGET_OFPORT.load(LOCAL_PORT_16), ir.Goto(pipeline["Output"])), cookie)
          for proto in ("ip", *(("ipv6",) if node.pod_cidr6 is not None else ()))),
        # back to the node what came from the node (NodePorts steered in from the uplink, replies
        # to the masquerade address): OpenFlow only outputs to the ingress port as IN_PORT
        ir.Flow(pipeline["Output"], 210, ir.match(TARGET_OFPORT.equals(LOCAL_PORT_16), in_port=ir.LOCAL),
                (ir.Output(ir.IN_PORT),), cookie),
    ]
