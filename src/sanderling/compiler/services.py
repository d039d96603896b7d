"""Services as OpenFlow: kube-proxy's semantics in ServiceLB, EndpointDNAT and ServiceMasq.

Per (service address, protocol, port) one flow per source class sends new connections to the
service port's select group; each bucket names an endpoint in registers and resubmits to
EndpointDNAT, which commits the connection in the DNAT zone with the translation. Established
packets never reach these flows: the Conntrack table's ct(nat) translates them.

Which endpoints and whether to masquerade, as kube-proxy decides:
- ClusterIP: internalTrafficPolicy Local -> only this node's endpoints; masquerade sources
  outside the local pod CIDR, the host itself, and everything with masqueradeAll.
- NodePort (node addresses within nodePortAddresses), externalIPs, LoadBalancer ingress IPs
  (ipMode VIP): externalTrafficPolicy Cluster -> all endpoints, always masqueraded;
  Local -> pods and the host short-circuit to all endpoints (the host masqueraded), everyone
  else only this node's endpoints with the client address kept.
- A pod reaching itself through its service (hairpin) is masqueraded.
- No usable endpoint at all -> REJECT (TCP RST / ICMP unreachable from the agent); endpoints
  exist but none where the policy needs them -> DROP; a port the ClusterIP does not serve ->
  REJECT; an unused address of the service CIDR -> DROP (static flows).
- loadBalancerSourceRanges: LoadBalancer IPs accept only those sources.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from sanderling.model.services import Endpoint, Service, ServicePort, usable
from sanderling.openflow import cookies, ir
from sanderling.openflow import fields as F
from sanderling.openflow.pipeline import PIPELINE, Pipeline
from sanderling.openflow.registers import (
    AFFINITY_HIT,
    CT_MARK_MASQ,
    DNAT_ZONE,
    ENDPOINT_IP,
    ENDPOINT_PORT,
    FROM_GATEWAY,
    MASQUERADE,
    REMEMBERED,
    SERVICE_GROUP,
    SNAT_ZONE,
)

PRIO_HOST = 220
PRIO_POD = 210
PRIO_ANY = 200
PRIO_RANGE = 230
PRIO_RANGE_DROP = 190
PRIO_UNKNOWN_PORT = 100
PRIO_SERVICE_CIDR = 10
REJECT_REASON_ACTION = 1  # OFPR_ACTION


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    node_name: str
    node_ips: tuple[ipaddress.IPv4Address, ...]
    node_port_ips: tuple[ipaddress.IPv4Address, ...]  # node addresses inside nodePortAddresses
    local_cidr: ipaddress.IPv4Network  # sources that are pods (kube-proxy's detect-local)
    masq_ip: ipaddress.IPv4Address  # what masqueraded connections come from
    service_cidr: ipaddress.IPv4Network | None = None
    masquerade_all: bool = False
    answer_masq_arp: bool = False  # the masquerade address lives on br-int: answer ARP for it
    gateway_mac: str = "0a:58:0a:f4:00:01"


GroupIds = Callable[[str], int]


def static_flows(cfg: ProxyConfig, pipeline: Pipeline = PIPELINE) -> list[ir.Flow]:
    cookie = cookies.cookie(cookies.Category.SERVICE, "static")
    masq = int(cfg.masq_ip)
    to_snat = ir.CT(commit=True, zone=SNAT_ZONE, table=pipeline["L3Forwarding"], nat=ir.Nat("src", masq, masq))
    flows = [
        ir.Flow(pipeline["UnSNAT"], 200, ir.match(proto="ip", nw_dst=masq),
                (ir.CT(zone=SNAT_ZONE, table=pipeline["Conntrack"], nat=ir.Nat()),), cookie),
        ir.Flow(pipeline["ServiceMasq"], 200, ir.match(MASQUERADE, proto="ip", ct_state="+trk"), (to_snat,), cookie),
        ir.Flow(pipeline["ServiceMasq"], 190,
                ir.match(proto="ip", ct_state="+trk-rpl", ct_mark=(CT_MARK_MASQ, CT_MARK_MASQ)), (to_snat,), cookie),
        ir.Flow(pipeline["Reject"], 10, ir.Match(), (ir.Controller(max_len=256, reason=REJECT_REASON_ACTION),),
                cookie),
        ir.Flow(pipeline["AffinitySelect"], PRIO_ANY, ir.match(REMEMBERED), (ir.Goto(pipeline["EndpointDNAT"]),),
                cookie),
    ]
    flows += [ir.Flow(pipeline["Conntrack"], PRIO_ANY, ir.match(proto="ip", nw_dst=int(ip)), _TRACK(pipeline), cookie)
              for ip in cfg.node_port_ips]
    if cfg.service_cidr is not None:
        flows.append(ir.Flow(pipeline["Conntrack"], PRIO_ANY, ir.match(proto="ip", nw_dst=str(cfg.service_cidr)),
                             _TRACK(pipeline), cookie))
        flows.append(ir.Flow(pipeline["ServiceLB"], PRIO_SERVICE_CIDR,
                             ir.match(proto="ip", ct_state="+new+trk", nw_dst=str(cfg.service_cidr)), (), cookie))
    if cfg.answer_masq_arp:
        from sanderling.compiler.pods import ARP_REQUEST, PRIO_HIGH, arp_reply_actions

        flows.append(ir.Flow(pipeline["ARPResponder"], PRIO_HIGH,
                             ir.match(proto="arp", arp_op=ARP_REQUEST, arp_tpa=masq),
                             arp_reply_actions(cfg.gateway_mac, masq), cookie))
    return flows


def _TRACK(pipeline: Pipeline) -> tuple[ir.Action, ...]:  # noqa: N802 - reads as a constant
    """Through the DNAT zone with nat, then on to ServiceLB."""
    return (ir.CT(zone=DNAT_ZONE, table=pipeline["ServiceLB"], nat=ir.Nat()),)


def endpoint_reply_flows(proto: str, ip: ipaddress.IPv4Address, port: int,
                         pipeline: Pipeline = PIPELINE) -> list[ir.Flow]:
    """Traffic from an endpoint's address and port may be a reply to a translated connection.

    Only service traffic pays for conntrack: requests are recognized by their destination
    (service CIDR, node ports, external and LoadBalancer IPs), replies by their source being
    an endpoint; pod-to-pod traffic outside services never leaves the fast path. Shared by every
    service with this endpoint, so it is its own object (see `endpoint_key`).
    """
    cookie = cookies.cookie(cookies.Category.SERVICE, endpoint_key(proto, ip, port))
    return [ir.Flow(pipeline["Conntrack"], PRIO_POD, ir.match(proto=proto.lower(), nw_src=int(ip), tp_src=port),
                    _TRACK(pipeline), cookie)]


def endpoint_key(proto: str, ip: ipaddress.IPv4Address, port: int) -> str:
    return f"service-endpoint/{proto.lower()}/{ip}/{port}"


EndpointTuple = tuple[str, ipaddress.IPv4Address, int]  # (protocol, address, port)


def service_endpoints(cfg: ProxyConfig, svc: Service,
                      endpoints: Mapping[ServicePort, tuple[Endpoint, ...]]) -> set[EndpointTuple]:
    """(protocol, ip, port) of every endpoint the service's groups may choose on this node."""
    out: set[EndpointTuple] = set()
    for port in svc.ports:
        for e in usable(endpoints.get(port, ())):
            out.add((port.protocol.lower(), e.ip, e.port))
    return out


def _group(gid: int, endpoints: tuple[Endpoint, ...], pipeline: Pipeline) -> ir.Group:
    buckets = tuple(ir.Bucket((ENDPOINT_IP.load(int(e.ip)), ENDPOINT_PORT.load(e.port), SERVICE_GROUP.load(gid),
                               ir.Resubmit(pipeline["EndpointDNAT"])), weight=100) for e in endpoints)
    return ir.Group(gid, "select", buckets)


def _learn_affinity(proto: str, timeout: int, cookie: int, pipeline: Pipeline) -> ir.Learn:
    """Remember (client, service address, port, endpoint set) -> endpoint for `timeout` idle seconds."""
    nw_proto = F.PROTOCOLS[proto][1]
    assert nw_proto is not None
    tp_dst = F.TRANSPORT_FIELDS[nw_proto][1]
    return ir.Learn(pipeline["SessionAffinity"], (
        ir.LearnMatch(ir.FieldRef("dl_type"), value=0x0800),
        ir.LearnMatch(ir.FieldRef("nw_proto"), value=nw_proto),
        ir.LearnMatch(ir.FieldRef("nw_src")),
        ir.LearnMatch(ir.FieldRef("nw_dst")),
        ir.LearnMatch(ir.FieldRef(tp_dst)),
        ir.LearnMatch(SERVICE_GROUP.ref),
        ir.LearnLoad(ENDPOINT_IP.ref, src=ENDPOINT_IP.ref),
        ir.LearnLoad(ENDPOINT_PORT.ref, src=ENDPOINT_PORT.ref),
        ir.LearnLoad(AFFINITY_HIT.ref, value=1),
    ), priority=PRIO_ANY, idle_timeout=timeout, cookie=cookie, delete_learned=True)


def _dnat_flows(gid: int, proto: str, endpoints: tuple[Endpoint, ...], cookie: int, pipeline: Pipeline,
                affinity: int = 0) -> list[ir.Flow]:
    flows = []
    table = pipeline["EndpointDNAT"]
    # with affinity the flows learn the choice first (while nw_dst is still the service address); their
    # priorities differ, so switching affinity replaces them and delete_learned forgets what they taught
    learn: tuple[ir.Action, ...] = (_learn_affinity(proto, affinity, cookie, pipeline),) if affinity else ()
    bump = 1 if affinity else 0
    for e in endpoints:
        ip = int(e.ip)
        nat = ir.Nat("dst", ip, ip, e.port, e.port)
        plain = ir.CT(commit=True, zone=DNAT_ZONE, table=pipeline["ServiceMasq"], nat=nat)
        marked = ir.CT(commit=True, zone=DNAT_ZONE, table=pipeline["ServiceMasq"], nat=nat,
                       exec_=(ir.Load(ir.FieldRef("ct_mark", 0, 0), CT_MARK_MASQ),))
        base = (SERVICE_GROUP.equals(gid), ENDPOINT_IP.equals(ip), ENDPOINT_PORT.equals(e.port))
        flows += [
            # hairpin: the endpoint is the client; without SNAT its reply would skip the translation
            ir.Flow(table, PRIO_HOST + bump, ir.match(*base, proto=proto, nw_src=ip),
                    (*learn, MASQUERADE.load(), marked), cookie),
            ir.Flow(table, PRIO_POD + bump, ir.match(*base, MASQUERADE, proto=proto), (*learn, marked), cookie),
            ir.Flow(table, PRIO_ANY + bump, ir.match(*base, proto=proto), (*learn, plain), cookie),
        ]
    return flows


def _target(ids: dict[str, int], any_endpoint: bool, reject: tuple[ir.Action, ...], affinity: bool,
            pipeline: Pipeline, name: str, masq: bool) -> tuple[ir.Action, ...]:
    """Actions sending a new connection to endpoint set `name` (cluster or local)."""
    if name not in ids:
        return reject if not any_endpoint else ()  # nothing at all: refuse; none where needed: drop
    pick: tuple[ir.Action, ...] = (ir.GroupAction(ids[name]),)
    if affinity:  # the remembered endpoint if there is one, else the group
        pick = (SERVICE_GROUP.load(ids[name]), ir.Resubmit(pipeline["SessionAffinity"]),
                ir.Resubmit(pipeline["AffinitySelect"]))
    return (*((MASQUERADE.load(),) if masq else ()), *pick)


def service_flows(cfg: ProxyConfig, svc: Service, endpoints: Mapping[ServicePort, tuple[Endpoint, ...]],
                  group_ids: GroupIds, pipeline: Pipeline = PIPELINE) -> tuple[list[ir.Flow], list[ir.Group]]:
    """Every flow and group one Service needs on this node."""
    if svc.headless:
        return [], []
    cookie = cookies.cookie(cookies.Category.SERVICE, svc.key)
    lb = pipeline["ServiceLB"]
    reject = (ir.Goto(pipeline["Reject"]),)
    flows: list[ir.Flow] = []
    groups: list[ir.Group] = []
    for port in svc.ports:
        proto = port.protocol.lower()
        everyone = usable(endpoints.get(port, ()))
        local = usable(e for e in endpoints.get(port, ()) if e.node == cfg.node_name)
        ids: dict[str, int] = {}
        for name, eps in (("cluster", everyone), ("local", local)):
            if not eps:
                continue
            if name == "local" and eps == everyone:
                ids[name] = ids["cluster"]  # every endpoint is here: one group serves both
                continue
            gid = group_ids(f"{svc.key}/{port.protocol}/{port.port}/{name}")
            ids[name] = gid
            groups.append(_group(gid, eps, pipeline))
            flows += _dnat_flows(gid, proto, eps, cookie, pipeline, svc.affinity_timeout)
            if svc.affinity_timeout:
                flows.append(ir.Flow(pipeline["AffinitySelect"], PRIO_UNKNOWN_PORT, ir.match(SERVICE_GROUP.equals(gid)),
                                     (ir.GroupAction(gid),), cookie))

        to = partial(_target, ids, bool(everyone), reject, bool(svc.affinity_timeout), pipeline)

        internal = "local" if svc.internal_local else "cluster"
        for vip in svc.cluster_ips:
            m: dict[str, Any] = dict(proto=proto, ct_state="+new+trk", nw_dst=int(vip), tp_dst=port.port)
            if cfg.masquerade_all:
                flows.append(ir.Flow(lb, PRIO_ANY, ir.match(**m), to(internal, True), cookie))
            else:
                flows += [
                    ir.Flow(lb, PRIO_HOST, ir.match(FROM_GATEWAY, **m), to(internal, True), cookie),
                    ir.Flow(lb, PRIO_POD, ir.match(**m, nw_src=str(cfg.local_cidr)), to(internal, False), cookie),
                    ir.Flow(lb, PRIO_ANY, ir.match(**m), to(internal, True), cookie),
                ]
        externals: list[tuple[ipaddress.IPv4Address, int, bool]] = []
        if port.node_port:
            externals += [(ip, port.node_port, False) for ip in cfg.node_port_ips]
        externals += [(ip, port.port, False) for ip in svc.external_ips]
        externals += [(ip, port.port, True) for ip in svc.lb_ips]
        for ip, number, is_lb in externals:
            if ip not in cfg.node_port_ips:  # node addresses are tracked by a static flow
                flows.append(ir.Flow(pipeline["Conntrack"], PRIO_ANY,
                                     ir.match(proto=proto, nw_dst=int(ip), tp_dst=number), _TRACK(pipeline), cookie))
            m = dict(proto=proto, ct_state="+new+trk", nw_dst=int(ip), tp_dst=number)
            if svc.external_local:
                outside = to("local", False)
                flows += [
                    ir.Flow(lb, PRIO_HOST, ir.match(FROM_GATEWAY, **m), to("cluster", True), cookie),
                    ir.Flow(lb, PRIO_POD, ir.match(**m, nw_src=str(cfg.local_cidr)), to("cluster", False), cookie),
                ]
            else:
                outside = to("cluster", True)
            if is_lb and svc.lb_source_ranges:
                flows += [ir.Flow(lb, PRIO_RANGE, ir.match(**m, nw_src=str(r)), outside, cookie)
                          for r in svc.lb_source_ranges]
                flows.append(ir.Flow(lb, PRIO_RANGE_DROP, ir.match(**m), (), cookie))
            else:
                flows.append(ir.Flow(lb, PRIO_ANY, ir.match(**m), outside, cookie))
    for vip in svc.cluster_ips:
        if cfg.service_cidr is None or vip not in cfg.service_cidr:
            flows.append(ir.Flow(pipeline["Conntrack"], PRIO_ANY, ir.match(proto="ip", nw_dst=int(vip)),
                                 _TRACK(pipeline), cookie))
    for vip in svc.cluster_ips:  # a port the service does not serve
        flows.append(ir.Flow(lb, PRIO_UNKNOWN_PORT, ir.match(proto="ip", ct_state="+new+trk", nw_dst=int(vip)),
                             reject, cookie))
    return flows, groups
