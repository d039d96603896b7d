"""Services on a secondary network, on its bridge (SECONDARY_PIPELINE).

The node where a request enters picks the endpoint; the endpoint's node translates:
- ServiceARP answers ARP for the virtual IP with its virtual MAC: to the network's pods on every
  node, to the uplink (hosts on the VLAN) only on the node that announces the Service, so the
  fabric learns the MAC at one place;
- ServiceLB: a request to (virtual IP, port) addressed to the virtual MAC goes to the service
  port's select group, one bucket per ready endpoint, which sets the endpoint's MAC as the
  destination (and, on another node, SECONDARY_REMOTE_ENDPOINT) and continues at ServiceDNAT;
  with ClientIP affinity a learned flow per client answers first, and the bucket goes through
  ServiceAffinityLearn (OVS runs no learn inside a bucket); no endpoint: Reject;
- ServiceDNAT, on the endpoint's node: the request, still to the virtual IP, addressed to a
  local endpoint's MAC, is committed with DNAT to the endpoint's address and port in the
  network's service zone; so its replies go back through the same conntrack (ServiceUnDNAT) and
  leave from the virtual IP whoever the client is, a pod on any node or a host on the VLAN;
- Switch: a request from the uplink for another node's endpoint goes back out of the uplink, with
  the virtual MAC as source (the fabric keeps learning the client's own MAC at the client).

Pure: service, endpoints, node in; flows and groups out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from sanderling.compiler.pods import arp_reply_actions
from sanderling.model.network_services import NetEndpoint, NetPort, NetService
from sanderling.openflow import cookies, ir
from sanderling.openflow import fields as F
from sanderling.openflow.pipeline import SECONDARY_PIPELINE as P
from sanderling.openflow.registers import (
    NETWORK_SERVICE_ZONE_OFFSET,
    SECONDARY_AFFINITY_HIT,
    SECONDARY_FROM_UPLINK,
    SECONDARY_NETWORK,
    SECONDARY_REMOTE_ENDPOINT,
)

ARP_REQUEST = 1
PRIO_SERVICE = 100
PRIO_VIP_OTHER = 10
REJECT_MAX_LEN = 256
GroupIds = Callable[[str], int]


def service_zone(network_id: int) -> int:
    return network_id + NETWORK_SERVICE_ZONE_OFFSET


def static_flows(reject_meter: int) -> list[ir.Flow]:
    """What every secondary bridge has once: Reject."""
    cookie = cookies.cookie(cookies.Category.SERVICE, "secondary-static")
    return [
        ir.Flow(P["Reject"], 10, ir.Match(),
                (ir.Controller(max_len=REJECT_MAX_LEN, reason=1, meter_id=reject_meter),), cookie),
    ]


def _l4(port: NetPort) -> tuple[str, str, str]:
    proto = port.protocol.lower()
    nw_proto = F.PROTOCOLS[proto][1]
    assert nw_proto is not None
    src, dst = F.TRANSPORT_FIELDS[nw_proto]
    return proto, src, dst


def _affinity_learn(svc: NetService, port: NetPort, cookie: int) -> ir.Learn:
    _proto, _src, dst = _l4(port)
    nw_proto = F.PROTOCOLS[port.protocol.lower()][1]
    return ir.Learn(P["ServiceAffinity"], (
        ir.LearnMatch(ir.FieldRef("dl_type"), value=0x0800),
        ir.LearnMatch(ir.FieldRef("nw_proto"), value=nw_proto),
        ir.LearnMatch(SECONDARY_NETWORK.ref),
        ir.LearnMatch(ir.FieldRef("nw_src")),
        ir.LearnMatch(ir.FieldRef("nw_dst")),
        ir.LearnMatch(ir.FieldRef(dst)),
        ir.LearnLoad(ir.FieldRef("dl_dst"), src=ir.FieldRef("dl_dst")),
        ir.LearnLoad(SECONDARY_REMOTE_ENDPOINT.ref, src=SECONDARY_REMOTE_ENDPOINT.ref),
        ir.LearnLoad(SECONDARY_AFFINITY_HIT.ref, value=1),
    ), priority=PRIO_SERVICE, idle_timeout=svc.affinity_timeout, cookie=cookie, delete_learned=True)


def service_flows(svc: NetService, endpoints: Iterable[NetEndpoint], node: str, announcer: bool, network_id: int,
                  group_id: GroupIds) -> tuple[list[ir.Flow], list[ir.Group]]:
    cookie = cookies.cookie(cookies.Category.SERVICE, f"network/{svc.key}")
    assert svc.vip is not None, "a Service is compiled once its virtual IP is known"
    net = SECONDARY_NETWORK.equals(network_id)
    vip, vmac = int(svc.vip), svc.vip_mac
    ready = sorted((e for e in endpoints if e.ready), key=lambda e: (e.node, int(e.ip)))
    arp = (net,) if announcer else (net, SECONDARY_FROM_UPLINK.equals(0))
    flows = [ir.Flow(P["ServiceARP"], PRIO_SERVICE, ir.match(*arp, proto="arp", arp_op=ARP_REQUEST, arp_tpa=vip),
                     arp_reply_actions(vmac, vip), cookie),
             # anything else addressed to the virtual IP (requests forwarded to an endpoint's MAC go on)
             ir.Flow(P["ServiceLB"], PRIO_VIP_OTHER, ir.match(net, proto="ip", dl_dst=vmac, nw_dst=vip), (), cookie),
             # a request from the VLAN for another node's endpoint goes back out of the uplink, from the
             # virtual MAC: the fabric must keep learning the client's MAC where the client is
             ir.Flow(P["Switch"], PRIO_SERVICE, ir.match(net, SECONDARY_FROM_UPLINK.equals(1),
                                                         SECONDARY_REMOTE_ENDPOINT.equals(1), proto="ip", nw_dst=vip),
                     (ir.set_field("dl_src", vmac), ir.Output(ir.IN_PORT)), cookie)]
    groups = []
    zone = service_zone(network_id)
    for port in svc.ports:
        proto, _src_field, dst_field = _l4(port)
        request = ir.match(net, proto=proto, dl_dst=vmac, nw_dst=vip, **{dst_field: port.port})
        serving = [e for e in ready if e.target(port) is not None]
        if not serving:
            flows.append(ir.Flow(P["ServiceLB"], PRIO_SERVICE, request, (ir.Goto(P["Reject"]),), cookie))
            continue
        gid = group_id(f"{svc.key}/{port.protocol}/{port.port}")
        after = P["ServiceAffinityLearn" if svc.affinity_timeout else "ServiceDNAT"]
        buckets = tuple(ir.Bucket((ir.set_field("dl_dst", e.mac),
                                   SECONDARY_REMOTE_ENDPOINT.load(int(e.node != node)), ir.Resubmit(after)),
                                  weight=100) for e in serving)
        groups.append(ir.Group(gid, "select", buckets))
        if svc.affinity_timeout:
            flows.append(ir.Flow(P["ServiceLB"], PRIO_SERVICE, request,
                                 (ir.Resubmit(P["ServiceAffinity"]), ir.Goto(P["ServiceAffinitySelect"])), cookie))
            flows.append(ir.Flow(P["ServiceAffinitySelect"], PRIO_SERVICE,
                                 ir.match(net, SECONDARY_AFFINITY_HIT.equals(1), proto=proto, nw_dst=vip,
                                          **{dst_field: port.port}), (ir.Goto(P["ServiceDNAT"]),), cookie))
            flows.append(ir.Flow(P["ServiceAffinitySelect"], PRIO_SERVICE - 1,
                                 ir.match(net, proto=proto, nw_dst=vip, **{dst_field: port.port}),
                                 (ir.GroupAction(gid),), cookie))
            flows.append(ir.Flow(P["ServiceAffinityLearn"], PRIO_SERVICE,
                                 ir.match(net, proto=proto, nw_dst=vip, **{dst_field: port.port}),
                                 (_affinity_learn(svc, port, cookie), ir.Goto(P["ServiceDNAT"])), cookie))
        else:
            flows.append(ir.Flow(P["ServiceLB"], PRIO_SERVICE, request, (ir.GroupAction(gid),), cookie))
        for e in serving:
            if e.node != node:
                continue
            target = e.target(port)
            assert target is not None
            flows.append(ir.Flow(P["ServiceDNAT"], PRIO_SERVICE,
                                 ir.match(net, proto=proto, dl_dst=e.mac, nw_dst=vip, **{dst_field: port.port}),
                                 (ir.CT(commit=True, zone=zone, table=P["PolicyConntrack"],
                                        nat=ir.Nat("dst", int(e.ip), int(e.ip), target, target)),), cookie))
    return flows, groups


def network_flows(network_id: int) -> list[ir.Flow]:
    """A network with Services here: what its local pods send goes through the service zone with
    nat, so replies of translated connections leave from the virtual IP (one flow whatever the
    number of Services and endpoints; requests find nothing there and pass unchanged)."""
    cookie = cookies.cookie(cookies.Category.SERVICE, f"network-zone/{network_id}")
    return [ir.Flow(P["ServiceUnDNAT"], PRIO_SERVICE,
                    ir.match(SECONDARY_NETWORK.equals(network_id), SECONDARY_FROM_UPLINK.equals(0), proto="ip"),
                    (ir.CT(zone=service_zone(network_id), table=P["Switch"], nat=ir.Nat()),), cookie)]
