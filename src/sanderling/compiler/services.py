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
    CT_MARK_DIRECT,
    CT_MARK_MASQ,
    DNAT_ZONE,
    ENDPOINT_IP,
    ENDPOINT_IP6,
    ENDPOINT_PORT,
    FROM_GATEWAY,
    FROM_POD,
    MASQUERADE,
    ORIGIN_ZONE,
    REMEMBERED,
    SERVICE_GROUP,
    SERVICE_MASQ,
    SNAT_ZONE,
    TO_TARGET_PORT,
    TRANSLATED,
    RegField,
)

PRIO_DIRECT_REQUEST = 215  # Conntrack: a local pod's request to a target port (above the replies from one)
PRIO_HOST = 220
PRIO_POD = 210
PRIO_ANY = 200
PRIO_RANGE = 230
PRIO_RANGE_DROP = 190
PRIO_UNKNOWN_PORT = 100
PRIO_SERVICE_CIDR = 10
REJECT_REASON_ACTION = 1  # OFPR_ACTION
# refusals are packet-ins: one meter for all of them, so a pod flooding an unserved service port
# costs the agent at most REJECT_RATE_PPS answers a second (the rest are dropped, the client times out)
REJECT_METER = 2
REJECT_RATE_PPS = 200


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    node_name: str
    node_ips: tuple[ipaddress.IPv4Address, ...]
    node_port_ips: tuple[ipaddress.IPv4Address, ...]  # node addresses inside nodePortAddresses
    local_cidr: ipaddress.IPv4Network  # sources that are pods (kube-proxy's detect-local)
    masq_ip: ipaddress.IPv4Address | None  # what masqueraded connections come from (None: an IPv6-only node)
    service_cidr: ipaddress.IPv4Network | None = None
    masquerade_all: bool = False
    answer_masq_arp: bool = False  # the masquerade address lives on br-int: answer ARP for it
    gateway_mac: str = "0a:58:0a:f4:00:01"
    # externalIPs are honoured only inside these (none by default: anyone who may create a Service
    # could otherwise capture traffic for any address, CVE-2020-8554)
    external_ip_cidrs: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    # dual-stack or IPv6-only: a Service's IPv6 addresses are served too
    masq_ip6: ipaddress.IPv6Address | None = None
    local_cidr6: ipaddress.IPv6Network | None = None
    service_cidr6: ipaddress.IPv6Network | None = None
    node_port_ips6: tuple[ipaddress.IPv6Address, ...] = ()  # the node's IPv6 addresses for NodePorts

    def external_ip_allowed(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(ip.version == net.version and ip in net for net in self.external_ip_cidrs)


GroupIds = Callable[[str], int]


def static_flows(cfg: ProxyConfig, pipeline: Pipeline = PIPELINE) -> list[ir.Flow]:
    cookie = cookies.cookie(cookies.Category.SERVICE, "static")
    masq = int(cfg.masq_ip) if cfg.masq_ip is not None else None
    flows = [
        *(_family_flows("ip", "nw_dst", masq, False, cookie, pipeline) if masq is not None else ()),
        ir.Flow(pipeline["Reject"], 10, ir.Match(),
                (ir.Controller(max_len=256, reason=REJECT_REASON_ACTION, meter_id=REJECT_METER),), cookie),
        ir.Flow(pipeline["AffinitySelect"], PRIO_ANY, ir.match(REMEMBERED), (ir.Goto(pipeline["EndpointDNAT"]),),
                cookie),
    ]
    flows += [ir.Flow(pipeline["Conntrack"], PRIO_ANY, ir.match(proto="ip", nw_dst=int(ip)), _TRACK(pipeline), cookie)
              for ip in cfg.node_port_ips]
    families: list[tuple[str, str, ipaddress.IPv4Network | ipaddress.IPv6Network | None]] = [
        ("ip", "nw_dst", cfg.service_cidr)] if masq is not None else []
    if cfg.masq_ip6 is not None:  # dual-stack or IPv6-only: a Service's IPv6 addresses
        flows += _family_flows("ipv6", "ipv6_dst", int(cfg.masq_ip6), True, cookie, pipeline)
        families.append(("ipv6", "ipv6_dst", cfg.service_cidr6))
        flows += [ir.Flow(pipeline["Conntrack"], PRIO_ANY, ir.match(proto="ipv6", ipv6_dst=int(ip)),
                          _TRACK(pipeline), cookie) for ip in cfg.node_port_ips6]
    for proto, dst, cidr in families:
        if cidr is not None:
            flows.append(ir.Flow(pipeline["Conntrack"], PRIO_ANY, ir.match(proto=proto, **{dst: str(cidr)}),
                                 _TRACK(pipeline), cookie))
            flows.append(ir.Flow(pipeline["ServiceLB"], PRIO_SERVICE_CIDR,
                                 ir.match(proto=proto, ct_state="+new+trk", **{dst: str(cidr)}), (), cookie))
    if cfg.answer_masq_arp:
        from sanderling.compiler.pods import ARP_REQUEST, PRIO_HIGH, arp_reply_actions, ns_answer

        if masq is not None:
            flows.append(ir.Flow(pipeline["NeighborResponder"], PRIO_HIGH,
                                 ir.match(proto="arp", arp_op=ARP_REQUEST, arp_tpa=masq),
                                 arp_reply_actions(cfg.gateway_mac, masq), cookie))
        if cfg.masq_ip6 is not None:
            flows.append(ns_answer(cfg.gateway_mac, int(cfg.masq_ip6), cookie, pipeline))
    return flows


def _family_flows(proto: str, dst: str, masq: int, v6: bool, cookie: int, pipeline: Pipeline) -> list[ir.Flow]:
    """The static flows that recognize service traffic of one family (`proto` ip or ipv6)."""
    to_snat = ir.CT(commit=True, zone=SNAT_ZONE, table=pipeline["L3Forwarding"], nat=ir.Nat("src", masq, masq, v6=v6))
    return [
        ir.Flow(pipeline["UnSNAT"], 200, ir.match(proto=proto, **{dst: masq}),
                (ir.CT(zone=SNAT_ZONE, table=pipeline["Conntrack"], nat=ir.Nat()),), cookie),
        ir.Flow(pipeline["ServiceMasq"], 200, ir.match(MASQUERADE, proto=proto, ct_state="+trk"), (to_snat,), cookie),
        ir.Flow(pipeline["ServiceMasq"], 190,
                ir.match(proto=proto, ct_state="+trk-rpl", ct_mark=(CT_MARK_MASQ, CT_MARK_MASQ)), (to_snat,), cookie),
        # a reply from a target port whose tuple was last used by a local pod's direct connection
        # (see pods.direct_commit_flow) is pod-to-pod traffic: through policy like any other
        ir.Flow(pipeline["ReplyOrigin"], PRIO_ANY, ir.match(proto=proto, ct_state="+trk+rpl",
                                                            ct_mark=(CT_MARK_DIRECT, CT_MARK_DIRECT)),
                (ir.Goto(pipeline["PolicyConntrack"]),), cookie),
        # the same when conntrack finds the segment out of its window (it then clears +rpl but
        # still reports the entry's mark): a direct connection reusing the tuple of a recent
        # service connection meets the endpoint's TIME_WAIT socket of that connection, whose
        # challenge ACK OVS's conntrack takes as the first reply and sizes the window from; the
        # real SYN-ACK that follows is "invalid" and must not fall through to the DNAT zone, where
        # the old service connection's entry would rewrite it to the service address
        ir.Flow(pipeline["ReplyOrigin"], PRIO_ANY, ir.match(proto=proto, ct_state="+trk+inv",
                                                            ct_mark=(CT_MARK_DIRECT, CT_MARK_DIRECT)),
                (ir.Goto(pipeline["PolicyConntrack"]),), cookie),
        ir.Flow(pipeline["ReplyOrigin"], 1, ir.match(proto=proto), _TRACK(pipeline), cookie),
        # a local pod's new service connection, translated: the last connection started with its
        # endpoint tuple is a service's. Later packets are tracked there without touching the mark:
        # a late FIN of an earlier service connection, reordered behind a direct SYN with the same
        # tuple (OVS batches packets per flow), must not take the tuple back from the direct one
        ir.Flow(pipeline["RequestOrigin"], PRIO_ANY, ir.match(FROM_POD, proto=proto, ct_state="+new+trk+dnat-rpl"),
                (TRANSLATED.load(), ir.CT(commit=True, zone=ORIGIN_ZONE, table=pipeline["PolicyConntrack"],
                                          exec_=(ir.Load(ir.FieldRef("ct_mark", _DIRECT_BIT, _DIRECT_BIT), 0),))),
                cookie),
        ir.Flow(pipeline["RequestOrigin"], PRIO_ANY - 1, ir.match(FROM_POD, proto=proto, ct_state="+trk+dnat-rpl"),
                (TRANSLATED.load(), ir.CT(commit=True, zone=ORIGIN_ZONE, table=pipeline["PolicyConntrack"])), cookie),
        # every request this node translated, from a pod or not, is marked for policy: it is tracked
        # in a zone of its own (its replies skip policy, so those entries never see a close)
        ir.Flow(pipeline["RequestOrigin"], PRIO_ANY - 2, ir.match(proto=proto, ct_state="+trk+dnat-rpl"),
                (TRANSLATED.load(), ir.Goto(pipeline["PolicyConntrack"])), cookie),
        # replies of service connections: their request passed policy (checked after DNAT, on the
        # translated tuple, which the reply no longer has here): past policy, straight to ServiceMasq
        ir.Flow(pipeline["ServiceLB"], 6, ir.match(proto=proto, ct_state="+trk+rpl"),
                (ir.Goto(pipeline["ServiceMasq"]),), cookie),
        # later request packets of a masqueraded connection: carry its mark past the policy zone
        ir.Flow(pipeline["ServiceLB"], 5, ir.match(proto=proto, ct_state="-new+trk-rpl",
                                                   ct_mark=(CT_MARK_MASQ, CT_MARK_MASQ)),
                (MASQUERADE.load(), ir.Goto(pipeline["RequestOrigin"])), cookie),
    ]


_NEW_TRK = F.parse_ct_state("+new+trk")
_TRK_NOT_REPLY = F.parse_ct_state("+trk-rpl")


def _fast_match(*contributors: ir.MatchContributor, proto: str | None = None, **kw: object) -> ir.Match:
    """ir.match for values that are already numbers, tuples (value, mask) or networks: Services
    compile to hundreds of thousands of flows, and parsing is the slow part of ir.match."""
    items: list[ir.MatchItem] = []
    nw_proto = None
    if proto is not None:
        dl_type, nw_proto = F.PROTOCOLS[proto]
        items.append(("dl_type", dl_type, None))
        if nw_proto is not None:
            items.append(("nw_proto", nw_proto, None))
    for contributor in contributors:
        items.extend(contributor.match_items())
    for name, raw in kw.items():
        if name in ("tp_src", "tp_dst"):
            assert nw_proto is not None
            name = F.TRANSPORT_FIELDS[nw_proto][0 if name == "tp_src" else 1]
        if isinstance(raw, tuple):
            items.append((name, raw[0], raw[1]))
        elif isinstance(raw, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            full = raw.prefixlen == raw.max_prefixlen
            items.append((name, int(raw.network_address), None if full else int(raw.netmask)))
        else:
            items.append((name, int(raw), None))  # type: ignore[call-overload]
    return ir.Match.from_items(items)


_DIRECT_BIT = CT_MARK_DIRECT.bit_length() - 1


def _TRACK(pipeline: Pipeline) -> tuple[ir.Action, ...]:  # noqa: N802 - reads as a constant
    """Through the DNAT zone with nat, then on to ServiceLB."""
    return (ir.CT(zone=DNAT_ZONE, table=pipeline["ServiceLB"], nat=ir.Nat()),)


def shared_keys(cfg: ProxyConfig, svc: Service, endpoints: Mapping[ServicePort, tuple[Endpoint, ...]]) -> set[str]:
    """Objects the service needs that other services may need too (reference-counted by the caller):

    - `service-reply/<proto>/<port>`: traffic from a target port may be a reply to a translated
      connection, so it goes through conntrack. Only service traffic pays for conntrack: requests
      are recognized by their destination (service CIDR, node ports, external and LoadBalancer
      IPs), replies by their source port being a service's target port; pod-to-pod traffic on
      other ports never leaves the fast path. A local pod's request to a target port goes through
      the same zone (marked TO_TARGET_PORT): if it is not a service connection, the pod's
      direct-commit flow records it in the origin zone, which replies from the port ask first, so
      they are never mistaken for a service connection's.
    - `service-hairpin/<address>`: a local endpoint reaching itself through a service is SNATed.
    """
    keys: set[str] = set()
    for port in svc.ports:
        for e in usable(endpoints.get(port, ())):
            six = "6" if e.ip.version == 6 else ""  # tcp6, ...: an IPv6 endpoint's replies
            keys.add(f"service-reply/{port.protocol.lower()}{six}/{e.port}")
            if e.node in (cfg.node_name, ""):  # only a pod on this node can be its own client (unknown: maybe)
                keys.add(f"service-hairpin/{int(e.ip):08x}")  # (32 hex digits: an IPv6 endpoint)
    return keys


def shared_flows(cfg: ProxyConfig, key: str, pipeline: Pipeline = PIPELINE) -> list[ir.Flow]:
    """The flows of one `shared_keys` object."""
    cookie = cookies.cookie(cookies.Category.SERVICE, key)
    kind, _, rest = key.partition("/")
    if kind == "service-reply":
        proto, port = rest.split("/")
        return [ir.Flow(pipeline["Conntrack"], PRIO_POD, _fast_match(proto=proto, tp_src=int(port)),
                        (ir.CT(zone=ORIGIN_ZONE, table=pipeline["ReplyOrigin"]),), cookie),
                ir.Flow(pipeline["Conntrack"], PRIO_DIRECT_REQUEST,
                        _fast_match(FROM_POD, proto=proto, tp_dst=int(port)),
                        (TO_TARGET_PORT.load(), *_TRACK(pipeline)), cookie)]
    if kind == "service-hairpin":
        ip = int(rest, 16)
        if len(rest) > 8:  # an IPv6 endpoint
            if cfg.masq_ip6 is None:
                return []
            masq6 = int(cfg.masq_ip6)
            to_snat6 = ir.CT(commit=True, zone=SNAT_ZONE, table=pipeline["L3Forwarding"],
                             nat=ir.Nat("src", masq6, masq6, v6=True))
            return [ir.Flow(pipeline["ServiceMasq"], PRIO_POD, _fast_match(proto="ipv6", ct_state=_TRK_NOT_REPLY,
                                                                            ipv6_src=ip, ipv6_dst=ip),
                            (to_snat6,), cookie)]
        if cfg.masq_ip is None:
            return []
        masq = int(cfg.masq_ip)
        to_snat = ir.CT(commit=True, zone=SNAT_ZONE, table=pipeline["L3Forwarding"], nat=ir.Nat("src", masq, masq))
        return [ir.Flow(pipeline["ServiceMasq"], PRIO_POD, _fast_match(proto="ip", ct_state=_TRK_NOT_REPLY,
                                                                        nw_src=ip, nw_dst=ip), (to_snat,), cookie)]
    raise ValueError(f"not a shared service object: {key}")


_EP_IP, _EP_PORT, _SVC_GROUP = ENDPOINT_IP.ref, ENDPOINT_PORT.ref, SERVICE_GROUP.ref
# the connection remembers in ct_mark whether it is masqueraded (SERVICE_MASQ, decided before the commit)
_MARK_MASQ = (ir.Move(SERVICE_MASQ.ref, ir.FieldRef("ct_mark", 0, 0)),)


def _group(gid: int, endpoints: tuple[Endpoint, ...], pipeline: Pipeline, direct: bool) -> ir.Group:
    """One bucket per endpoint. Without affinity the bucket commits the DNAT itself (no flow per
    endpoint at all); with affinity it names the endpoint in registers for EndpointDNAT, which
    learns the choice before committing."""
    if not direct:
        tail = (ir.Load(_SVC_GROUP, gid), ir.Resubmit(pipeline["EndpointDNAT"]))
        return ir.Group(gid, "select", tuple(
            ir.Bucket((*_endpoint_loads(e.ip), ir.Load(_EP_PORT, e.port), *tail), weight=100)
            for e in endpoints))
    after = pipeline["RequestOrigin"]  # policy is enforced after service translation
    return ir.Group(gid, "select", tuple(
        ir.Bucket((ir.CT(commit=True, zone=DNAT_ZONE, table=after, exec_=_MARK_MASQ,
                         nat=ir.Nat("dst", int(e.ip), int(e.ip), e.port, e.port, v6=e.ip.version == 6)),),
                  weight=100) for e in endpoints))


def _endpoint_words(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> tuple[tuple[RegField, int], ...]:
    """Where the affinity registers hold the endpoint: ENDPOINT_IP, or an IPv6 one over the four
    ENDPOINT_IP6 registers, most significant word first."""
    value = int(ip)
    if ip.version == 4:
        return ((ENDPOINT_IP, value),)
    return tuple((reg, value >> (96 - 32 * i) & 0xFFFFFFFF) for i, reg in enumerate(ENDPOINT_IP6))


def _endpoint_loads(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> tuple[ir.Load, ...]:
    return tuple(reg.load(word) for reg, word in _endpoint_words(ip))


def _endpoint_matches(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> tuple[Any, ...]:
    return tuple(reg.equals(word) for reg, word in _endpoint_words(ip))


_EP_IP6 = {reg.ref: 96 - 32 * i for i, reg in enumerate(ENDPOINT_IP6)}  # register -> its shift in the address


def bucket_endpoints(group: ir.Group) -> list[str | None]:
    """The endpoint ("IP:port") each bucket of a service group picks, None for a bucket that hands
    over to a sub-group (whose own buckets name the endpoints). A bucket's packet counter is then
    the connections that chose that endpoint: groups see only a connection's first packet.
    (A metrics scrape asks this of every group changed since the last: kept to plain lookups.)"""
    out: list[str | None] = []
    for bucket in group.buckets:
        ip = port = None
        ip6: int | None = None
        for action in bucket.actions:
            if isinstance(action, ir.Load):
                if action.dst == _EP_IP:
                    ip = action.value
                elif action.dst == _EP_PORT:
                    port = action.value
                elif action.dst in _EP_IP6:
                    ip6 = (ip6 or 0) | action.value << _EP_IP6[action.dst]
            elif isinstance(action, ir.CT) and action.nat is not None and action.nat.ip_min is not None:
                ip, port = action.nat.ip_min, action.nat.port_min
                if action.nat.v6:
                    ip = None
                    out.append(f"[{ipaddress.IPv6Address(action.nat.ip_min)}]:{port}")
                    break
        else:
            if ip6 is not None:
                out.append(f"[{ipaddress.IPv6Address(ip6)}]:{port}")
                continue
            out.append(None if ip is None else f"{ip >> 24}.{ip >> 16 & 255}.{ip >> 8 & 255}.{ip & 255}:{port}")
    return out


MAX_BUCKETS = 400  # an OpenFlow message is at most 64 KiB; a DNAT bucket takes about 100 bytes


def _groups(gid: int, endpoints: tuple[Endpoint, ...], pipeline: Pipeline, direct: bool,
            sub_id: Callable[[int], int]) -> list[ir.Group]:
    """The service port's group; past MAX_BUCKETS endpoints, a group of weighted sub-groups
    (weight = endpoints in each), so any number of endpoints fits and each is equally likely."""
    if len(endpoints) <= MAX_BUCKETS:
        return [_group(gid, endpoints, pipeline, direct)]
    chunks = [endpoints[i:i + MAX_BUCKETS] for i in range(0, len(endpoints), MAX_BUCKETS)]
    subs = [_group(sub_id(i), chunk, pipeline, direct) for i, chunk in enumerate(chunks)]
    top = ir.Group(gid, "select", tuple(ir.Bucket((ir.GroupAction(sub.group_id),), weight=len(chunk))
                                         for sub, chunk in zip(subs, chunks, strict=True)))
    return [*subs, top]


def _sub_group_id(group_ids: GroupIds, base: str, index: int) -> int:
    return group_ids(f"{base}/{index}")


MAX_AFFINITY_TIMEOUT = 0xFFFF  # an OpenFlow idle timeout is 16 bits (18.2 hours)


def _learn_affinity(proto: str, timeout: int, cookie: int, pipeline: Pipeline) -> ir.Learn:
    """Remember (client, service address, port, endpoint set) -> endpoint for `timeout` idle seconds.

    Kubernetes allows timeoutSeconds up to 86400; OpenFlow's idle timeout holds at most 65535, so a
    longer affinity is remembered for 65535 idle seconds (a client idle for 18.2 hours may move)."""
    timeout = min(timeout, MAX_AFFINITY_TIMEOUT)
    dl_type, nw_proto = F.PROTOCOLS[proto]
    assert nw_proto is not None
    tp_dst = F.TRANSPORT_FIELDS[nw_proto][1]
    v6 = dl_type == 0x86DD
    src, dst = ("ipv6_src", "ipv6_dst") if v6 else ("nw_src", "nw_dst")
    endpoint = tuple(reg.ref for reg in ENDPOINT_IP6) if v6 else (ENDPOINT_IP.ref,)
    return ir.Learn(pipeline["SessionAffinity"], (
        ir.LearnMatch(ir.FieldRef("dl_type"), value=dl_type),
        ir.LearnMatch(ir.FieldRef("nw_proto"), value=nw_proto),
        ir.LearnMatch(ir.FieldRef(src)),
        ir.LearnMatch(ir.FieldRef(dst)),
        ir.LearnMatch(ir.FieldRef(tp_dst)),
        ir.LearnMatch(SERVICE_GROUP.ref),
        *(ir.LearnLoad(ref, src=ref) for ref in endpoint),
        ir.LearnLoad(ENDPOINT_PORT.ref, src=ENDPOINT_PORT.ref),
        ir.LearnLoad(AFFINITY_HIT.ref, value=1),
    ), priority=PRIO_ANY, idle_timeout=timeout, cookie=cookie, delete_learned=True)


def _dnat_flows(gid: int, proto: str, endpoints: tuple[Endpoint, ...], cookie: int, pipeline: Pipeline,
                node_name: str, affinity: int = 0) -> list[ir.Flow]:
    flows = []
    table = pipeline["EndpointDNAT"]
    # with affinity the flows learn the choice first (while nw_dst is still the service address); their
    # priorities differ, so switching affinity replaces them and delete_learned forgets what they taught
    learn: tuple[ir.Action, ...] = (_learn_affinity(proto, affinity, cookie, pipeline),) if affinity else ()
    bump = 1 if affinity else 0
    for e in endpoints:
        ip = int(e.ip)
        v6 = e.ip.version == 6
        nat = ir.Nat("dst", ip, ip, e.port, e.port, v6=v6)
        commit = ir.CT(commit=True, zone=DNAT_ZONE, table=pipeline["RequestOrigin"], nat=nat, exec_=_MARK_MASQ)
        base = (SERVICE_GROUP.equals(gid), *_endpoint_matches(e.ip), ENDPOINT_PORT.equals(e.port))
        if e.node in (node_name, ""):  # only a pod on this node can be its own client (unknown: maybe)
            # hairpin: the endpoint is the client; without SNAT its reply would skip the translation
            flows.append(ir.Flow(table, PRIO_HOST + bump, _fast_match(*base, proto=proto,
                                                                      **{"ipv6_src" if v6 else "nw_src": ip}),
                                 (*learn, MASQUERADE.load(), commit), cookie))
        flows.append(ir.Flow(table, PRIO_ANY + bump, _fast_match(*base, proto=proto), (*learn, commit), cookie))
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


@dataclass(frozen=True, slots=True)
class _Family:
    """What one address family of a Service compiles from: its addresses, the node's, the config's."""

    v6: bool
    vips: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]
    node_port_ips: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]
    external_ips: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]
    lb_ips: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]
    lb_source_ranges: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    local_cidr: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    service_cidr: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    affinity: int  # seconds (0: none)

    @property
    def ip(self) -> str:
        return "ipv6" if self.v6 else "ip"

    @property
    def src(self) -> str:
        return "ipv6_src" if self.v6 else "nw_src"

    @property
    def dst(self) -> str:
        return "ipv6_dst" if self.v6 else "nw_dst"

    def proto(self, protocol: str) -> str:
        return protocol.lower() + ("6" if self.v6 else "")

    def group_key(self, base: str) -> str:
        return base + ("/ipv6" if self.v6 else "")


def _families(cfg: ProxyConfig, svc: Service) -> list[_Family]:
    """The Service's families on this node: IPv4 unless it is an IPv6 single-stack Service (IPv6
    ClusterIPs and no IPv4 one) or the node is IPv6-only, IPv6 when it has IPv6 addresses and the
    node has IPv6 pods (dual-stack or IPv6-only)."""
    six = cfg.masq_ip6 is not None and bool(svc.cluster_ips6 or svc.external_ips6 or svc.lb_ips6)
    out = []
    if cfg.masq_ip is not None and (svc.cluster_ips or svc.external_ips or svc.lb_ips or not svc.cluster_ips6):
        out.append(_Family(False, svc.cluster_ips, cfg.node_port_ips, svc.external_ips, svc.lb_ips,
                           svc.lb_source_ranges, cfg.local_cidr, cfg.service_cidr, svc.affinity_timeout))
    if six:
        out.append(_Family(True, svc.cluster_ips6, cfg.node_port_ips6, svc.external_ips6, svc.lb_ips6,
                           svc.lb_source_ranges6, cfg.local_cidr6, cfg.service_cidr6, svc.affinity_timeout))
    return out


def service_flows(cfg: ProxyConfig, svc: Service, endpoints: Mapping[ServicePort, tuple[Endpoint, ...]],
                  group_ids: GroupIds, pipeline: Pipeline = PIPELINE) -> tuple[list[ir.Flow], list[ir.Group]]:
    """Every flow and group one Service needs on this node: per address family (a dual-stack
    Service's IPv6 addresses go to its IPv6 endpoints, its IPv4 ones to its IPv4 endpoints)."""
    if svc.headless:
        return [], []
    cookie = cookies.cookie(cookies.Category.SERVICE, svc.key)
    flows: list[ir.Flow] = []
    groups: list[ir.Group] = []
    families = _families(cfg, svc)
    for fam in families:
        mine = endpoints
        if cfg.masq_ip6 is not None:  # a dual-stack or IPv6-only node: each family its own endpoints
            version = 6 if fam.v6 else 4
            mine = {p: tuple(e for e in eps if e.ip.version == version) for p, eps in endpoints.items()}
        f, g = _family_service_flows(cfg, svc, fam, mine, group_ids, pipeline, cookie)
        flows += f
        groups += g
    return flows, groups


def _kw(field: str, value: Any) -> dict[str, Any]:
    """One keyword argument of a match, named at run time (the family's address field)."""
    return {field: value}


def _family_service_flows(cfg: ProxyConfig, svc: Service, fam: _Family,
                          endpoints: Mapping[ServicePort, tuple[Endpoint, ...]], group_ids: GroupIds,
                          pipeline: Pipeline, cookie: int) -> tuple[list[ir.Flow], list[ir.Group]]:
    lb = pipeline["ServiceLB"]
    reject = (ir.Goto(pipeline["Reject"]),)
    flows: list[ir.Flow] = []
    groups: list[ir.Group] = []
    src, dst = fam.src, fam.dst
    for port in svc.ports:
        proto = fam.proto(port.protocol)
        everyone = usable(endpoints.get(port, ()))
        local = usable(e for e in endpoints.get(port, ()) if e.node == cfg.node_name)
        ids: dict[str, int] = {}
        for name, eps in (("cluster", everyone), ("local", local)):
            if not eps:
                continue
            if name == "local" and eps == everyone:
                ids[name] = ids["cluster"]  # every endpoint is here: one group serves both
                continue
            base = fam.group_key(f"{svc.key}/{port.protocol}/{port.port}/{name}")
            gid = group_ids(base)
            ids[name] = gid
            groups += _groups(gid, eps, pipeline, not fam.affinity, partial(_sub_group_id, group_ids, base))
            if fam.affinity:
                flows += _dnat_flows(gid, proto, eps, cookie, pipeline, cfg.node_name, fam.affinity)
                flows.append(ir.Flow(pipeline["AffinitySelect"], PRIO_UNKNOWN_PORT, ir.match(SERVICE_GROUP.equals(gid)),
                                     (ir.GroupAction(gid),), cookie))

        to = partial(_target, ids, bool(everyone), reject, bool(fam.affinity), pipeline)

        internal = "local" if svc.internal_local else "cluster"
        for vip in fam.vips:
            m: dict[str, Any] = {"proto": proto, "ct_state": _NEW_TRK, dst: vip, "tp_dst": port.port}
            if cfg.masquerade_all or fam.local_cidr is None:
                flows.append(ir.Flow(lb, PRIO_ANY, _fast_match(**m), to(internal, True), cookie))
            else:
                flows += [
                    ir.Flow(lb, PRIO_HOST, _fast_match(FROM_GATEWAY, **m), to(internal, True), cookie),
                    ir.Flow(lb, PRIO_POD, _fast_match(**m, **_kw(src, fam.local_cidr)), to(internal, False), cookie),
                    ir.Flow(lb, PRIO_ANY, _fast_match(**m), to(internal, True), cookie),
                ]
        externals: list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int, bool]] = []
        if port.node_port:
            externals += [(ip, port.node_port, False) for ip in fam.node_port_ips]
        externals += [(ip, port.port, False) for ip in fam.external_ips if cfg.external_ip_allowed(ip)]
        externals += [(ip, port.port, True) for ip in fam.lb_ips]
        for ip, number, is_lb in externals:
            if ip not in fam.node_port_ips:  # node addresses are tracked by a static flow
                flows.append(ir.Flow(pipeline["Conntrack"], PRIO_ANY,
                                     _fast_match(proto=proto, tp_dst=number, **{dst: ip}), _TRACK(pipeline), cookie))
            m = {"proto": proto, "ct_state": _NEW_TRK, dst: ip, "tp_dst": number}
            if svc.external_local:
                outside = to("local", False)
                flows.append(ir.Flow(lb, PRIO_HOST, _fast_match(FROM_GATEWAY, **m), to("cluster", True), cookie))
                if fam.local_cidr is not None:
                    flows.append(ir.Flow(lb, PRIO_POD, _fast_match(**m, **_kw(src, fam.local_cidr)),
                                         to("cluster", False), cookie))
            else:
                outside = to("cluster", True)
            if is_lb and fam.lb_source_ranges:
                # as kube-proxy: a node that holds the LB address reaches it with that address as
                # source (the request loops back), whatever the source ranges say
                allowed = [*fam.lb_source_ranges, *(ipaddress.ip_network(lb_ip) for lb_ip in fam.lb_ips)]
                flows += [ir.Flow(lb, PRIO_RANGE, _fast_match(**m, **_kw(src, r)), outside, cookie)
                          for r in dict.fromkeys(allowed)]
                flows.append(ir.Flow(lb, PRIO_RANGE_DROP, _fast_match(**m), (), cookie))
            else:
                flows.append(ir.Flow(lb, PRIO_ANY, _fast_match(**m), outside, cookie))
    for vip in fam.vips:
        if fam.service_cidr is None or vip not in fam.service_cidr:
            flows.append(ir.Flow(pipeline["Conntrack"], PRIO_ANY, _fast_match(proto=fam.ip, **{dst: vip}),
                                 _TRACK(pipeline), cookie))
    for vip in fam.vips:  # a port the service does not serve
        flows.append(ir.Flow(lb, PRIO_UNKNOWN_PORT, _fast_match(proto=fam.ip, ct_state=_NEW_TRK, **{dst: vip}),
                             reject, cookie))
    return flows, groups
