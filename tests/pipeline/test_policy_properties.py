"""NetworkPolicy property test: what OVS does equals what Kubernetes says.

For random pods, namespaces and policies, the verdict of a real ovs-vswitchd (dummy datapath,
ofproto/trace with conntrack answering "new") for random (source, destination, protocol, port)
must equal an independent evaluation of the NetworkPolicy semantics written here, from the raw
objects, without the agent's model or compiler.
"""

from __future__ import annotations

import asyncio
import ipaddress
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sanderling.agent.policy_agent import PolicyAgent
from sanderling.compiler import pods as pod_compiler
from sanderling.compiler import policy as policy_compiler
from sanderling.model.network import NodeNetwork, PodPort
from sanderling.openflow import ir
from sanderling.openflow.connection import Connection
from sanderling.openflow.realizer import Realizer

from ..conftest import Bridge, require_ovs

NODE = NodeNetwork.build("n1", "10.244.7.0/24")
NAMESPACES = ("x", "y")
LABEL_VALUES = {"app": ("a", "b"), "tier": ("1", "2")}
PORTS = (("TCP", 80), ("TCP", 81), ("UDP", 80))
ONE_TIER = policy_compiler.CONJ_TIER_RULES  # the default: every conjunctive rule of a test at one priority

# ---- the reference: Kubernetes semantics from the raw objects ------------------------------


def ref_selector(sel, labels) -> bool:
    for k, v in (sel.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in sel.get("matchExpressions") or []:
        has = e["key"] in labels
        val = labels.get(e["key"])
        op = e["operator"]
        if (op == "In" and (not has or val not in e["values"])) or (op == "NotIn" and has and val in e["values"]) \
                or (op == "Exists" and not has) or (op == "DoesNotExist" and has):
            return False
    return True


def ref_peer(peer, pol_ns, other, ns_labels) -> bool:
    if "ipBlock" in peer:
        ip = ipaddress.ip_address(other["ip"])
        block = peer["ipBlock"]
        return ip in ipaddress.ip_network(block["cidr"]) and not any(
            ip in ipaddress.ip_network(e) for e in block.get("except") or [])
    if "namespaceSelector" in peer:
        if not ref_selector(peer["namespaceSelector"], ns_labels[other["ns"]]):
            return False
    elif other["ns"] != pol_ns:
        return False
    return "podSelector" not in peer or ref_selector(peer["podSelector"], other["labels"])


def ref_rule_allows(rule, key, pol_ns, other, proto, port, ns_labels) -> bool:
    peers = rule.get(key)
    if peers and not any(ref_peer(p, pol_ns, other, ns_labels) for p in peers):
        return False
    ports = rule.get("ports")
    if not ports:
        return True
    for p in ports:
        if p.get("protocol", "TCP") != proto:
            continue
        if "port" not in p or p["port"] == port or (p.get("endPort") and p["port"] <= port <= p["endPort"]):
            return True
    return False


def ref_allowed(policies, src, dst, proto, port, ns_labels) -> bool:
    for direction, subject, other, key in (("Egress", src, dst, "to"), ("Ingress", dst, src, "from")):
        field = direction.lower()
        selecting = [p for p in policies if p["metadata"]["namespace"] == subject["ns"]
                     and direction in p["spec"]["policyTypes"]
                     and ref_selector(p["spec"]["podSelector"], subject["labels"])]
        if selecting and not any(ref_rule_allows(r, key, p["metadata"]["namespace"], other, proto, port, ns_labels)
                                 for p in selecting for r in p["spec"].get(field) or []):
            return False
    return True


# ---- random worlds ----------------------------------------------------------------------------

labels = st.fixed_dictionaries({}, optional={k: st.sampled_from(v) for k, v in LABEL_VALUES.items()})
selectors = st.one_of(
    st.builds(lambda m: {"matchLabels": m}, labels),
    st.builds(lambda k, op, vals: {"matchExpressions": [
        {"key": k, "operator": op, **({"values": list(vals)} if op in ("In", "NotIn") else {})}]},
        st.sampled_from(list(LABEL_VALUES)), st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist"]),
        st.lists(st.sampled_from(["a", "b", "1", "2"]), min_size=1, max_size=2, unique=True)))
ns_selectors = st.builds(lambda m: {"matchLabels": m}, st.fixed_dictionaries({}, optional={"team": st.sampled_from(
    ["red", "blue"])}))


def peer_strategy():
    return st.one_of(
        st.builds(lambda s: {"podSelector": s}, selectors),
        st.builds(lambda n: {"namespaceSelector": n}, ns_selectors),
        st.builds(lambda s, n: {"podSelector": s, "namespaceSelector": n}, selectors, ns_selectors),
        st.builds(lambda last: {"ipBlock": {"cidr": "10.244.7.0/24", "except": [f"10.244.7.{last}/32"]}},
                  st.integers(10, 17)),
        # what this IPv4 pipeline cannot carry: must allow nothing, never lift isolation (fail closed)
        st.just({"ipBlock": {"cidr": "fd00::/64"}}),
        st.just({"ipBlock": {"cidr": "10.244.7.0/24", "except": ["fd00::1/128"]}}),
    )


port_strategy = st.one_of(
    st.builds(lambda proto, port: {"protocol": proto, "port": port}, st.sampled_from(["TCP", "UDP"]),
              st.sampled_from([80, 81])),
    st.just({"protocol": "TCP", "port": 80, "endPort": 81}),
    st.just({"protocol": "UDP"}),
)
rules = st.lists(st.fixed_dictionaries({}, optional={"peers": st.lists(peer_strategy(), min_size=1, max_size=2),
                                                     "ports": st.lists(port_strategy, min_size=1, max_size=2)}),
                 max_size=2)


@st.composite
def worlds(draw):
    ns_labels = {ns: {"kubernetes.io/metadata.name": ns, **draw(st.fixed_dictionaries(
        {}, optional={"team": st.sampled_from(["red", "blue"])}))} for ns in NAMESPACES}
    pods = [{"ns": NAMESPACES[i % 2], "name": f"p{i}", "labels": draw(labels), "ip": f"10.244.7.{10 + i}",
             "ofport": i + 1} for i in range(draw(st.integers(2, 6)))]
    policies = []
    for i in range(draw(st.integers(0, 3))):
        types = draw(st.sampled_from([["Ingress"], ["Egress"], ["Ingress", "Egress"]]))
        spec = {"podSelector": draw(selectors), "policyTypes": types}
        for t in types:
            key = "from" if t == "Ingress" else "to"
            spec[t.lower()] = [{**({key: r["peers"]} if "peers" in r else {}),
                                **({"ports": r["ports"]} if "ports" in r else {})} for r in draw(rules)]
        policies.append({"metadata": {"namespace": draw(st.sampled_from(NAMESPACES)), "name": f"np{i}"},
                         "spec": spec})
    probes = draw(st.lists(st.tuples(st.integers(0, len(pods) - 1), st.integers(0, len(pods) - 1),
                                     st.sampled_from(PORTS)), min_size=4, max_size=8))
    return ns_labels, pods, policies, probes


def ovs_allowed(bridge: Bridge, src, dst, proto: str, port: int) -> bool:
    p = proto.lower()
    return bridge.allows_new(f"in_port={src['ofport']},dl_src={mac(src)},dl_dst={NODE.gateway_mac},{p},"
                             f"nw_src={src['ip']},nw_dst={dst['ip']},nw_ttl=64,{p}_src=40000,{p}_dst={port}")


DOOMED = {"metadata": {"namespace": "x", "name": "doomed"}, "spec": {
    "podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}], "ports": [{"port": 80}]}],
    "egress": [{"to": [{"podSelector": {}}]}], "policyTypes": ["Ingress", "Egress"]}}


def reshaped(policy):
    """Another version of a policy: its rules in reverse order, ports dropped from the first."""
    spec = dict(policy["spec"])
    for direction in ("ingress", "egress"):
        if spec.get(direction):
            rules = [dict(r) for r in reversed(spec[direction])]
            rules[0].pop("ports", None)
            spec[direction] = rules
    return {**policy, "spec": spec}


def feed_cluster(agent: PolicyAgent, ns_labels, pods) -> None:
    """Start an agent and give it the namespaces and pods, as the informers would."""
    agent.start()
    for ns, lab in ns_labels.items():
        agent.namespace_changed(ns, {"metadata": {"name": ns, "labels": lab}})
    for p in pods:
        agent.pod_changed(f"{p['ns']}/{p['name']}", pod_object(p))


def pod_object(p) -> dict:
    return {"metadata": {"namespace": p["ns"], "name": p["name"], "labels": p["labels"]},
            "spec": {"nodeName": "n1"}, "status": {"podIP": p["ip"]}}


def policy_flows(realizer: Realizer, agent: PolicyAgent) -> set:
    """Every policy flow the agent wants, whatever object holds it, with conjunction ids replaced
    by the rule keys they stand for (two agents number rules in the order they meet them)."""
    rule_of = {v: k for k, v in agent.rule_ids._ids.items()}
    out = set()
    for key, state in realizer.desired_state().items():
        if not key.startswith("policy"):
            continue
        for f in state.flows.values():
            match = tuple((n, rule_of[v] if n == "conj_id" else v, m) for n, v, m in f.match.items)
            actions = tuple(sorted(((rule_of[a.conj_id], a.clause, a.n_clauses) if isinstance(a, ir.Conjunction)
                                    else (a.text(), 0, 0)) for a in f.actions))
            out.add((f.table, f.priority, match, actions, f.cookie))
    return out


def pods_realizer(pods) -> Realizer:
    """A realizer holding the node's static flows and every pod's flows."""
    realizer = Realizer(1)
    realizer.set_object("static", pod_compiler.static_flows(NODE))
    for p in pods:
        port = PodPort.build(p["ns"], p["name"], p["ofport"], mac(p), p["ip"])
        realizer.set_object(port.key, pod_compiler.pod_flows(NODE, port))
    return realizer


def mac(pod) -> str:
    return f"0a:58:0a:f4:07:{10 + int(pod['name'][1:]):02x}"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(worlds(), st.sampled_from([ONE_TIER, 2]))
def test_ovs_verdict_equals_kubernetes_semantics(dummy_ovs, dummy_db, world, tier_rules):
    """tier_rules 2: rules spread over several conjunction priorities, as past 2,000 rules."""
    require_ovs()
    ns_labels, pods, policies, probes = world
    bridge = Bridge(dummy_ovs, dummy_db, "pp", 6)
    tiers = mock.patch.object(policy_compiler, "CONJ_TIER_RULES", tier_rules)
    tiers.start()
    try:
        async def install():
            conn = await Connection.open(bridge.target)
            realizer = pods_realizer(pods)
            agent = PolicyAgent("n1", realizer, lambda: None)
            feed_cluster(agent, ns_labels, pods)
            # the incremental agent also goes through edits and a deletion: every policy first
            # arrives in another shape, plus one that is removed again
            agent.policy_changed("x/doomed", DOOMED)
            for pol in policies:
                agent.policy_changed(f"{pol['metadata']['namespace']}/{pol['metadata']['name']}", reshaped(pol))
            for pol in policies:
                agent.policy_changed(f"{pol['metadata']['namespace']}/{pol['metadata']['name']}", pol)
            agent.policy_changed("x/doomed", None)
            # then pods change under the policies (recompiled only where they matter): each one
            # relabelled and back, one more pod added and removed
            for p in pods:
                agent.pod_changed(f"{p['ns']}/{p['name']}", pod_object({**p, "labels": {"app": "other"}}))
            ghost = {"ns": "y", "name": "p9", "labels": {"app": "a", "tier": "1"}, "ip": "10.244.7.40", "ofport": 9}
            agent.pod_changed("y/p9", pod_object(ghost))
            for p in pods:
                agent.pod_changed(f"{p['ns']}/{p['name']}", pod_object(p))
            agent.pod_changed("y/p9", None)
            await realizer.resync(conn)
            conn.close()
            # incremental (one flush per event, as above) == from scratch (everything, one flush)
            batch: list = []
            scratch = Realizer(1)
            once = PolicyAgent("n1", scratch, lambda: None, schedule=batch.append)
            feed_cluster(once, ns_labels, pods)
            for pol in policies:
                once.policy_changed(f"{pol['metadata']['namespace']}/{pol['metadata']['name']}", pol)
            for fn in batch:
                fn()
            if tier_rules == ONE_TIER:  # with several tiers the numbering also decides what is shared
                assert policy_flows(realizer, agent) == policy_flows(scratch, once)
        asyncio.run(install())
        for s, d, (proto, port) in probes:
            if s == d:
                continue
            src, dst = pods[s], pods[d]
            want = ref_allowed(policies, src, dst, proto, port, ns_labels)
            got = ovs_allowed(bridge, src, dst, proto, port)
            assert got == want, (f"{src['ns']}/{src['name']} -> {dst['ns']}/{dst['name']} {proto}/{port}: OVS says "
                                 f"{got}, Kubernetes {want}\npolicies: {policies}\npods: {pods}\nns: {ns_labels}")
    finally:
        tiers.stop()
        bridge.delete()


def test_untranslatable_rules_fail_closed(dummy_ovs, dummy_db):
    """Issue 20: a policy with a rule the agent cannot translate (a port of the wrong type) keeps its
    pods isolated and allows only what it could translate; before, the whole policy was dropped and
    its pods lost isolation. (An IPv6 ipBlock is a rule like any other since dual-stack: it allows
    IPv6 sources only, none of these IPv4 pods.)"""
    require_ovs()
    ns_labels = {"x": {"kubernetes.io/metadata.name": "x"}}
    pods = [{"ns": "x", "name": f"p{i}", "labels": {"app": "a" if i == 0 else "b"}, "ip": f"10.244.7.{10 + i}",
             "ofport": i + 1} for i in range(3)]
    policy = {"metadata": {"namespace": "x", "name": "v6"}, "spec": {
        "podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"ipBlock": {"cidr": "fd00::/64"}}]},  # IPv6 only: none of these IPv4 pods
                    {"from": [{"podSelector": {"matchLabels": {"app": "b"}}}], "ports": [{"port": ["80"]}]},
                    {"from": [{"ipBlock": {"cidr": "10.244.7.12/32", "except": ["fd00::1/128"]}}],
                     "ports": [{"port": 81}]}]}}
    reports: list = []
    bridge = Bridge(dummy_ovs, dummy_db, "fc", 3)
    try:
        async def install():
            conn = await Connection.open(bridge.target)
            realizer = pods_realizer(pods)
            agent = PolicyAgent("n1", realizer, lambda: None, report=lambda *a: reports.append(a))
            feed_cluster(agent, ns_labels, pods)
            agent.policy_changed("x/v6", policy)
            await realizer.resync(conn)
            conn.close()
        asyncio.run(install())
        verdicts = {(s, proto, port): ovs_allowed(bridge, pods[s], pods[0], proto, port)
                    for s in (1, 2) for proto, port in (("TCP", 80), ("TCP", 81))}
    finally:
        bridge.delete()
    # the IPv4 ipBlock rule lets p2 in on TCP 81; everything else to p0 is denied
    assert verdicts == {(1, "TCP", 80): False, (1, "TCP", 81): False, (2, "TCP", 80): False, (2, "TCP", 81): True}
    assert len(reports) == 1 and reports[0][:2] == ("x", "v6")
    assert "fd00::/64" not in reports[0][2] and "spec.ingress[1].ports[0].port" in reports[0][2]


def test_a_pod_change_recompiles_only_the_policies_it_matters_to(monkeypatch):
    """200 policies in namespace x; a pod of namespace y that none of them selects or names changes
    labels: nothing is recompiled. A pod one policy names as a peer: that policy alone. A policy
    deleted gives its rule ids back, and the next policy reuses them."""
    compiled: list[str] = []
    real = policy_compiler.compile_policy

    def counting(policy, *args, **kwargs):
        compiled.append(policy.key)
        return real(policy, *args, **kwargs)

    monkeypatch.setattr(policy_compiler, "compile_policy", counting)
    realizer = Realizer(1)
    agent = PolicyAgent("n1", realizer, lambda: None)
    pods = [{"ns": "x", "name": f"p{i}", "labels": {"app": "a"}, "ip": f"10.244.7.{10 + i}", "ofport": i + 1}
            for i in range(3)] + [{"ns": "y", "name": "q", "labels": {"app": "q"}, "ip": "10.244.7.30", "ofport": 9}]
    feed_cluster(agent, {"x": {"kubernetes.io/metadata.name": "x"}, "y": {"kubernetes.io/metadata.name": "y"}},
                 pods)
    for i in range(200):
        peer = {"app": f"peer{i}"}
        agent.policy_changed(f"x/np{i}", {"metadata": {"namespace": "x", "name": f"np{i}"}, "spec": {
            "podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": peer}}],
                         "ports": [{"port": 80}]}]}})
    ids_before = len(agent.rule_ids)
    compiled.clear()
    agent.pod_changed("y/q", pod_object({**pods[3], "labels": {"app": "still-nobody"}}))
    assert compiled == []
    agent.pod_changed("y/q", pod_object({**pods[3], "labels": {"app": "peer7"}}))
    assert compiled == ["x/np7"]
    compiled.clear()
    agent.pod_changed("x/p1", pod_object({**pods[1], "labels": {"app": "b"}}))  # leaves every policy's selection
    assert len(compiled) == 200
    agent.policy_changed("x/np3", None)
    assert len(agent.rule_ids) == ids_before - 1
    agent.policy_changed("x/new", {"metadata": {"namespace": "x", "name": "new"}, "spec": {
        "podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "z"}}}], "ports": [{"port": 80}]}]}})
    assert len(agent.rule_ids) == ids_before and max(agent.rule_ids._ids.values()) == ids_before
