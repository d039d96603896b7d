"""NetworkPolicy as conjunctive OpenFlow matches, enforced after service translation.

Per rule, up to three clauses: the local pods the policy selects (destination for ingress,
source for egress), the peers (pod addresses, namespaces' pods, ipBlocks with their excepts
cut out) and the ports (numbers, ranges as masked blocks, named ports resolved per pod). Each
clause value is one flow carrying `conjunction(id, k/n)`, so the flow count grows with the sum
of pods, peers and ports, not their product. Conjunctive rules sit at one priority (one per
2,000 rules, see CONJ_TIER_RULES), so the flow for a value (say, a pod address as source) is
shared: it carries the conjunction actions of every rule whose clause holds it, and an address
set named by a thousand rules is still one
flow per address (SharedFlows merges what each policy contributes). A rule with one clause is
plain allow flows one priority above (OpenFlow does not mix the two kinds at one priority). The
rule key is in the cookie of its `conj_id` flow (stable ids per rule: an edit renumbers nothing).

Isolation: a pod selected by any policy for a direction is isolated for it; its traffic goes
through conntrack (policy zone). Established and related packets pass; a new connection passes
EgressRule only if some egress rule of the source allows it, IngressRule only if some ingress
rule of the destination allows it; then it is committed, so replies always pass.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property

from sanderling.model.policy import Peer, PodInfo, Policy, PolicyPort, Rule, selects
from sanderling.openflow import cookies, ir
from sanderling.openflow import fields as F
from sanderling.openflow.pipeline import PIPELINE, Pipeline
from sanderling.openflow.registers import CT_MARK_ALLOWED, POLICY_ZONE, SERVICE_POLICY_ZONE, TRANSLATED
from sanderling.portrange import port_blocks

LOG_METER = 1  # packet-ins for policy logging share one meter: rate-limited, never a flood
LOG_RATE_PPS = 100
PRIO_CONJ = 1000  # conjunctive rules: rules share clause flows, one flow per match
PRIO_DIRECT = 1001  # single-clause rules (plain flows cannot share a priority with conjunction ones)
# Rules are spread over priority tiers of this many rule ids, so a shared flow carries at most this
# many conjunction actions (16 bytes each: 32 KB, inside OpenFlow's 64 KiB message). A packet that
# completes no conjunction at one priority is looked up again at the lower ones.
CONJ_TIER_RULES = 2000
PRIO_DEFAULT_DENY = 10
PRIO_LOGGED_PEER = 11  # a denied connection whose peer's namespace asks for logging (see logged_peer_flows)
LOGGED_PEER_CONJ = {"ingress": 0xFFFFFF01, "egress": 0xFFFFFF02}  # far above the ids RuleIds hands out
PRIO_STATE = 200

RuleIds = Callable[[str], int]
IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Net = ipaddress.IPv4Network | ipaddress.IPv6Network
V6_FIELD = {"nw_src": "ipv6_src", "nw_dst": "ipv6_dst"}  # an address clause's field for IPv6 values


def addresses(pods: Iterable[PodInfo]) -> Iterator[IP]:
    """Every address of the pods (a dual-stack pod's IPv4 and IPv6 ones): a peer is all of them."""
    for pod in pods:
        yield from pod.ips
FlowKey = tuple[int, int, ir.Match]  # (table, priority, match): what OpenFlow calls the same flow


class Clause:
    """The values of one clause (canonical order), hashed once: address sets of thousands of pods
    are dictionary keys, looked up once per rule that names them."""

    __slots__ = ("matches", "_hash")

    def __init__(self, matches: Iterable[ir.Match]) -> None:
        self.matches = tuple(matches)
        self._hash = hash(self.matches)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, Clause):
            return NotImplemented
        return self._hash == other._hash and self.matches == other.matches

    def __len__(self) -> int:
        return len(self.matches)

    def __iter__(self) -> Iterator[ir.Match]:
        return iter(self.matches)


SetKey = tuple[int, int, Clause]  # (table, priority, clause): the values rules share, as one key
SHARED_COOKIE = cookies.cookie(cookies.Category.POLICY, "shared-clauses")


@dataclass(frozen=True)
class ClusterPods:
    """Everything policy resolution needs from the cluster, with pods indexed by namespace (a peer
    names namespaces first, so resolving it never scans every pod) and each distinct peer resolved
    once (a thousand policies name a few dozen distinct peers)."""

    pods: tuple[PodInfo, ...]
    namespace_labels: Mapping[str, Mapping[str, str]]
    _peers: dict[tuple[Peer, str], list[PodInfo]] = dataclasses.field(default_factory=dict, compare=False)
    _clauses: dict[tuple[str, tuple[Peer, ...], str], Clause] = dataclasses.field(default_factory=dict,
                                                                                   compare=False)

    @cached_property
    def by_namespace(self) -> dict[str, list[tuple[PodInfo, dict[str, str]]]]:
        out: dict[str, list[tuple[PodInfo, dict[str, str]]]] = {}
        for pod in self.pods:
            out.setdefault(pod.namespace, []).append((pod, pod.label_map()))
        return out

    def peer_pods(self, peer: Peer, policy_namespace: str) -> list[PodInfo]:
        key = (peer, policy_namespace if peer.namespaces is None else "")
        cached = self._peers.get(key)
        if cached is not None:
            return cached
        if peer.namespaces is None:
            namespaces = [policy_namespace]
        else:
            namespaces = [ns for ns in self.by_namespace
                          if peer.namespaces.matches(self.namespace_labels.get(ns, {}))]
        out = []
        for ns in namespaces:
            pods = self.by_namespace.get(ns, [])
            out += [p for p, labels in pods if peer.pods is None or peer.pods.matches(labels)]
        self._peers[key] = out
        return out

    def peers_clause(self, field: str, peers: tuple[Peer, ...], policy_namespace: str) -> Clause:
        """The address clause of a rule's peers, built once per distinct peer list: a thousand
        rules naming the same namespaces share one tuple, hence one address set."""
        key = (field, peers, policy_namespace)
        clause = self._clauses.get(key)
        if clause is None:
            ips: list[IP] = []
            nets: list[Net] = []
            for peer in peers:
                if peer.cidr is not None:
                    nets += _nets(peer)
                else:
                    ips += addresses(self.peer_pods(peer, policy_namespace))
            clause = self._clauses[key] = _addr_matches(field, ips, nets)
        return clause


def static_flows(pipeline: Pipeline = PIPELINE, zone: int = POLICY_ZONE,
                 service_zone: int | None = SERVICE_POLICY_ZONE) -> list[ir.Flow]:
    """Policy verdicts by connection state, and the commit of allowed new connections (requests
    of service connections this node translated in `service_zone`, see isolation_flows).

    A segment conntrack calls invalid is dropped unless it belongs to a connection policy allowed
    (marked when committed; conntrack reports an entry's mark with its verdict). Those pass: OVS's
    conntrack sizes a connection's window from the first reply it sees, and when that is the
    challenge ACK of the endpoint's TIME_WAIT socket (a client port reused after a connection
    through a service), every later segment of the allowed connection is out of that window.
    Dropping them lost the connection; the endpoints' own TCP checks them anyway."""
    cookie = cookies.cookie(cookies.Category.POLICY, "static")
    after = pipeline.after("PolicyConntrack")
    state = pipeline["PolicyState"]
    bit = CT_MARK_ALLOWED.bit_length() - 1
    allowed = (ir.Load(ir.FieldRef("ct_mark", bit, bit), 1),)
    flows = [flow for proto in ("ip", "ipv6") for flow in (
        ir.Flow(state, PRIO_STATE, ir.match(proto=proto, ct_state="-new+est+trk"), (ir.Goto(after),), cookie),
        ir.Flow(state, PRIO_STATE, ir.match(proto=proto, ct_state="+rel+trk"), (ir.Goto(after),), cookie),
        # invalid: a pure SYN is dropped (a start is never let through on an older connection's
        # verdict, policy may have changed since); other segments of a connection policy allowed
        # pass (see above); anything else is dropped
        ir.Flow(state, PRIO_STATE - 4, ir.match(proto="tcp" if proto == "ip" else "tcp6", ct_state="+inv+trk",
                                                tcp_flags="+syn-ack"), (), cookie),
        ir.Flow(state, PRIO_STATE - 5, ir.match(proto=proto, ct_state="+inv+trk",
                                                ct_mark=(CT_MARK_ALLOWED, CT_MARK_ALLOWED)), (ir.Goto(after),), cookie),
        ir.Flow(state, PRIO_STATE - 10, ir.match(proto=proto, ct_state="+inv+trk"), (), cookie),
        ir.Flow(pipeline["PolicyCommit"], PRIO_STATE, ir.match(proto=proto, ct_state="+new+trk"),
                (ir.CT(commit=True, zone=zone, table=after, exec_=allowed),), cookie))]
    if service_zone is not None:
        flows += [ir.Flow(pipeline["PolicyCommit"], PRIO_STATE + 1,
                          ir.match(TRANSLATED, proto=proto, ct_state="+new+trk"),
                          (ir.CT(commit=True, zone=service_zone, table=after, exec_=allowed),), cookie)
                  for proto in ("ip", "ipv6")]
    return flows


def log_action() -> ir.Controller:
    """A copy of the packet to the agent (rate-limited by LOG_METER) for a policy log line."""
    return ir.Controller(max_len=128, meter_id=LOG_METER)


def isolation_flows(pod: PodInfo, ingress: bool, egress: bool, pipeline: Pipeline = PIPELINE,
                    log_denied: bool = False, zone: int = POLICY_ZONE,
                    service_zone: int | None = SERVICE_POLICY_ZONE) -> list[ir.Flow]:
    """A local pod some policy isolates: its traffic is tracked, and denied unless a rule allows it
    (logged when its namespace asks for it).

    Requests of service connections this node translated are tracked in `service_zone`, apart:
    their replies are translated back before policy and skip it, so their entries see only one
    side and never a close. In the same zone, a direct connection from the client port of a
    recent service connection to the same endpoint met that entry, its SYN was invalid, and the
    pod-IP path was dropped until the entry expired (about a minute)."""
    assert pod.addressed
    cookie = cookies.cookie(cookies.Category.POLICY, f"isolated/{pod.key}")
    track = (ir.CT(zone=zone, table=pipeline["PolicyState"]),)
    service_track = (ir.CT(zone=service_zone, table=pipeline["PolicyState"]),) if service_zone is not None else ()
    # both directions are tracked whatever the isolation: replies to the pod's own connections must
    # find them committed (an ingress-isolated pod's outgoing connection, an egress-isolated pod's
    # incoming one); a dual-stack pod's IPv6 traffic alike
    flows: list[ir.Flow] = []
    deny: tuple[ir.Action, ...] = (log_action(),) if log_denied else ()
    for proto, src, dst, addr in (("ip", "nw_src", "nw_dst", pod.ip), ("ipv6", "ipv6_src", "ipv6_dst", pod.ip6)):
        if addr is None:
            continue
        value = int(addr)
        flows += [ir.Flow(pipeline["PolicyConntrack"], 200, ir.match(proto=proto, **{src: value}), track, cookie),
                  ir.Flow(pipeline["PolicyConntrack"], 190, ir.match(proto=proto, **{dst: value}), track, cookie)]
        if service_track:
            flows += [ir.Flow(pipeline["PolicyConntrack"], 205, ir.match(TRANSLATED, proto=proto, **{src: value}),
                              service_track, cookie),
                      ir.Flow(pipeline["PolicyConntrack"], 195, ir.match(TRANSLATED, proto=proto, **{dst: value}),
                              service_track, cookie)]
        if egress:
            flows.append(ir.Flow(pipeline["EgressRule"], PRIO_DEFAULT_DENY, ir.match(proto=proto, **{src: value}),
                                 deny, cookie))
        if ingress:
            flows.append(ir.Flow(pipeline["IngressRule"], PRIO_DEFAULT_DENY, ir.match(proto=proto, **{dst: value}),
                                 deny, cookie))
    return flows


def logged_peer_flows(ingress_isolated: Iterable[IP], egress_isolated: Iterable[IP], logged: Iterable[IP],
                      pipeline: Pipeline = PIPELINE) -> list[ir.Flow]:
    """Denials the *other* side's namespace asks to log: a pod of a logged namespace refused by an
    isolated local pod's ingress, or a local pod's egress refused towards it. One conjunction per
    direction (isolated local pods x logged pods), just above default deny: no rule allowed the
    connection, so it is logged (metered) and dropped."""
    cookie = cookies.cookie(cookies.Category.POLICY, "logged-namespace-peers")
    logged_ips = list(logged)
    flows: list[ir.Flow] = []
    for direction, local in (("ingress", ingress_isolated), ("egress", egress_isolated)):
        ingress = direction == "ingress"
        local_clause = _addr_matches("nw_dst" if ingress else "nw_src", local, ())
        peer_clause = _addr_matches("nw_src" if ingress else "nw_dst", logged_ips, ())
        if not local_clause or not peer_clause:
            continue
        table = pipeline["IngressRule" if ingress else "EgressRule"]
        conj_id = LOGGED_PEER_CONJ[direction]
        flows.append(ir.Flow(table, PRIO_LOGGED_PEER, ir.Match.from_items([("conj_id", conj_id, None)]),
                             (log_action(),), cookie))
        for k, clause in enumerate((local_clause, peer_clause), start=1):
            flows += [ir.Flow(table, PRIO_LOGGED_PEER, m, (ir.Conjunction(conj_id, k, 2),), cookie) for m in clause]
    return flows


def _nets(peer: Peer) -> list[Net]:
    """The ipBlock minus its excepts as CIDRs: one sweep over the sorted, merged excepts, each gap
    summarized into at most 32 (IPv6: 128) CIDRs per side, so 2,000 excepts cost milliseconds
    (n log n), not the quadratic carving of one network by each except in turn."""
    assert peer.cidr is not None
    kind = type(peer.cidr.network_address)
    lo, hi = int(peer.cidr.network_address), int(peer.cidr.broadcast_address)
    holes = ipaddress.collapse_addresses(e for e in peer.excepts if e.overlaps(peer.cidr))  # type: ignore[arg-type,type-var]
    out: list[Net] = []
    cur = lo
    for hole in holes:  # sorted and disjoint
        start, end = max(int(hole.network_address), lo), min(int(hole.broadcast_address), hi)
        if start > cur:
            out += ipaddress.summarize_address_range(kind(cur), kind(start - 1))  # type: ignore[arg-type]
        cur = max(cur, end + 1)
    if cur <= hi:
        out += ipaddress.summarize_address_range(kind(cur), kind(hi))  # type: ignore[arg-type]
    return out


@functools.lru_cache(maxsize=1 << 16)
def _addr_match(field: str, value: int, mask: int | None) -> ir.Match:
    """One address match, built once: the same pod is in the clauses of many rules, and an
    interned match makes every dictionary lookup of a shared flow an identity hit."""
    return ir.Match.from_items([("dl_type", 0x86DD if field.startswith("ipv6") else 0x0800, None),
                                (field, value, mask)])


def _addr_matches(field: str, ips: Iterable[IP], nets: Iterable[Net]) -> Clause:
    """Canonical (sorted) address matches, so equal sets are equal keys. IPv6 values match the
    IPv6 field: a clause may hold both families (a packet can only match the flows of its own).
    (Hot: clauses of thousands of pods; IPv4 first, without per-address attribute lookups.)"""
    four: set[tuple[int, int]] = set()
    six: set[tuple[int, int]] = set()
    for ip in ips:
        if type(ip) is ipaddress.IPv4Address:
            four.add((int(ip), 32))
        else:
            six.add((int(ip), 128))
    for net in nets:
        (four if net.version == 4 else six).add((int(net.network_address), net.prefixlen))
    out = [_addr_match(field, value, None if plen == 32 else (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF)
           for value, plen in sorted(four)]
    if six:
        full6 = (1 << 128) - 1
        field6 = V6_FIELD[field]
        out += [_addr_match(field6, value, None if plen == 128 else (full6 << (128 - plen)) & full6)
                for value, plen in sorted(six)]
    return Clause(out)


def _port_matches(protocol: str, numbers: list[tuple[int, int]]) -> Clause:
    """(first, last) port ranges of one protocol as masked tp_dst matches, over IPv4 and IPv6."""
    out = []
    for dl_type in (F.ETH_TYPE_IP, F.ETH_TYPE_IPV6):
        _, nw_proto = F.PROTOCOLS[protocol.lower()]
        assert nw_proto is not None
        tp_dst = F.TRANSPORT_FIELDS[nw_proto][1]
        base = [("dl_type", dl_type, None), ("nw_proto", nw_proto, None)]
        out += [ir.Match.from_items([*base, (tp_dst, value, None if mask == 0xFFFF else mask)])
                for first, last in numbers for value, mask in port_blocks(first, last)]
    return Clause(out)


def _proto_only(protocol: str) -> list[ir.Match]:
    _, nw_proto = F.PROTOCOLS[protocol.lower()]
    assert nw_proto is not None
    return [ir.Match.from_items([("dl_type", dl_type, None), ("nw_proto", nw_proto, None)])
            for dl_type in (F.ETH_TYPE_IP, F.ETH_TYPE_IPV6)]


@dataclass(frozen=True, slots=True)
class DirectAllow:
    """A single-clause rule's share of a shared flow: it allows on its own (no conjunction)."""

    rule: str
    cookie: int
    actions: tuple[ir.Action, ...]
    log: bool


Share = ir.Conjunction | DirectAllow


@dataclass
class CompiledPolicy:
    """A policy on this node: its own flows (one `conj_id` flow per conjunctive rule) and its shares
    of the clause flows every policy contributes to (see SharedFlows)."""

    flows: list[ir.Flow] = dataclasses.field(default_factory=list)
    shared: dict[SetKey, tuple[Share, ...]] = dataclasses.field(default_factory=dict)


def _add_shares(shared: dict[SetKey, tuple[Share, ...]], table: int, prio: int, clause: Clause,
                share: Share) -> None:
    key = (table, prio, clause)
    shared[key] = (*shared.get(key, ()), share)


def _rule(out: CompiledPolicy, table: int, rule: str, conj_id: int, clauses: list[Clause],
          allow: tuple[ir.Action, ...], log: bool) -> None:
    if any(not c for c in clauses):
        return  # a clause with no value: the rule allows nothing
    cookie = cookies.cookie(cookies.Category.POLICY, rule)
    if len(clauses) == 1:
        _add_shares(out.shared, table, PRIO_DIRECT, clauses[0], DirectAllow(rule, cookie, allow, log))
        return
    n = len(clauses)
    prio = conj_priority(conj_id)
    out.flows.append(ir.Flow(table, prio, ir.Match.from_items([("conj_id", conj_id, None)]), allow, cookie))
    for k, clause in enumerate(clauses, start=1):
        _add_shares(out.shared, table, prio, clause, ir.Conjunction(conj_id, k, n))


def conj_priority(conj_id: int) -> int:
    """The priority tier of a conjunctive rule (see CONJ_TIER_RULES), always above default deny."""
    return max(PRIO_CONJ - (conj_id - 1) // CONJ_TIER_RULES, PRIO_LOGGED_PEER + 1)


def _rule_variants(rule: Rule, targets: list[PodInfo], peers: list[PodInfo] | None, ingress: bool,
                   everyone: Iterable[PodInfo]) -> list[tuple[str, list[PodInfo], list[PodInfo] | None,
                                                                Clause | None]]:
    """Split a rule by named-port resolution: (variant, targets, pod peers, port clause or None=any)."""
    if not rule.ports:
        return [("all", targets, peers, None)]
    plain: list[ir.Match] = []
    named: dict[tuple[str, int], list[PodInfo]] = {}  # (protocol, number) -> pods it resolves on
    for port in rule.ports:
        if isinstance(port.port, str):
            # ingress: resolved on the selected pod; egress: on the destination pod (any pod if no peers)
            for pod in (targets if ingress else (peers if peers is not None else everyone)):
                number = pod.named_port(port.port, port.protocol)
                if number is not None:
                    named.setdefault((port.protocol, number), []).append(pod)
        elif port.port is None:
            plain += _proto_only(port.protocol)
        else:
            plain += _port_matches(port.protocol, [(int(port.port), int(port.end_port or port.port))])
    variants: list[tuple[str, list[PodInfo], list[PodInfo] | None, Clause | None]] = []
    if plain:
        variants.append(("ports", targets, peers, Clause(dict.fromkeys(plain))))
    for (proto, number), pods in sorted(named.items(), key=lambda kv: kv[0]):
        clause = _port_matches(proto, [(number, number)])
        if ingress:
            variants.append((f"{proto}-{number}", pods, peers, clause))
        else:
            variants.append((f"{proto}-{number}", targets, pods, clause))
    return variants


def compile_policy(policy: Policy, local: list[PodInfo], cluster: ClusterPods, rule_ids: RuleIds,
                   pipeline: Pipeline = PIPELINE, rules_by_cookie: dict[int, str] | None = None) -> CompiledPolicy:
    """What one policy needs on this node (nothing if it selects no local pod); `rules_by_cookie` is
    filled with cookie -> rule key (what a log line names)."""
    out = CompiledPolicy()
    targets = [p for p in local if p.addressed and selects(policy, p)]
    if not targets:
        return out
    for direction, rules in (("ingress", policy.ingress), ("egress", policy.egress)):
        if not rules:
            continue
        ingress = direction == "ingress"
        table = pipeline["IngressRule" if ingress else "EgressRule"]
        allow: tuple[ir.Action, ...] = (ir.Goto(pipeline["PolicyCommit"] if ingress else pipeline["IngressRule"]),)
        if policy.log:  # the annotation asks for the connections this policy allows
            allow = (log_action(), *allow)
        target_field, peer_field = ("nw_dst", "nw_src") if ingress else ("nw_src", "nw_dst")
        for i, rule in enumerate(rules):
            pod_peers: list[PodInfo] | None = None
            if rule.peers:
                pod_peers = []
                for peer in rule.peers:
                    if peer.cidr is None:
                        pod_peers += cluster.peer_pods(peer, policy.namespace)
            for variant, tgts, peers, port_clause in _rule_variants(rule, targets, pod_peers, ingress, cluster.pods):
                key = f"{policy.key}/{direction}/{i}/{variant}"
                if rules_by_cookie is not None:
                    rules_by_cookie[cookies.cookie(cookies.Category.POLICY, key)] = key
                clauses = [_addr_matches(target_field, addresses(tgts), ())]
                if not ingress and variant not in ("all", "ports"):
                    # a named port resolved on some destination pods: those pods are the peers
                    clauses.append(_addr_matches(peer_field, addresses(peers or []), ()))
                elif rule.peers:
                    clauses.append(cluster.peers_clause(peer_field, rule.peers, policy.namespace))
                if port_clause is not None:
                    clauses.append(port_clause)
                _rule(out, table, key, rule_ids(key), clauses, allow, policy.log)
    return out


def merged(priority: int, shares: Iterable[Share]) -> tuple[tuple[ir.Action, ...], int]:
    """(actions, cookie) of a flow that several rules share: all their conjunction actions, or (a
    value some rule allows on its own) one allow, naming a rule that logs if any does."""
    if priority != PRIO_DIRECT:
        conj = sorted({s for s in shares if isinstance(s, ir.Conjunction)}, key=lambda c: (c.conj_id, c.clause))
        return tuple(conj), SHARED_COOKIE
    best = min((s for s in shares if isinstance(s, DirectAllow)), key=lambda d: (not d.log, d.rule))
    return best.actions, best.cookie


def cross_product_size(policy: Policy, local: list[PodInfo], cluster: ClusterPods) -> int:
    """Flows a non-conjunctive encoding would need for this policy (targets x peers x ports)."""
    targets = [p for p in local if p.addressed and selects(policy, p)]
    total = 0
    for rules in (policy.ingress or (), policy.egress or ()):
        for rule in rules:
            peers = 0
            for peer in rule.peers:
                peers += len(_nets(peer)) if peer.cidr is not None else len(cluster.peer_pods(peer, policy.namespace))
            ports = sum(len(port_blocks(int(p.port), int(p.end_port or p.port))) if isinstance(p.port, int) else 1
                        for p in rule.ports)
            total += len(targets) * max(peers, 1 if not rule.peers else 0) * max(ports, 1)
    return total


def port_text(port: PolicyPort) -> str:
    return f"{port.protocol}/{port.port}" + (f"-{port.end_port}" if port.end_port else "")
