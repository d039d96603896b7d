"""Address sets shared between rules: one flow per value, carrying every rule's conjunction."""

from __future__ import annotations

from sanderling.agent.policy_agent import PolicyAgent
from sanderling.compiler.policy import PRIO_CONJ, PRIO_DIRECT
from sanderling.openflow import ir
from sanderling.openflow.pipeline import PIPELINE
from sanderling.openflow.realizer import Realizer

INGRESS = PIPELINE["IngressRule"]


def pod(ns: str, name: str, ip: str, labels: dict[str, str]) -> dict:
    return {"metadata": {"namespace": ns, "name": name, "labels": labels}, "spec": {"nodeName": "n1"},
            "status": {"podIP": ip}}


def allow_from_team(ns: str, name: str, port: int) -> dict:
    return {"metadata": {"namespace": ns, "name": name}, "spec": {
        "podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "red"}}}],
                                        "ports": [{"protocol": "TCP", "port": port}]}]}}


def world() -> tuple[Realizer, PolicyAgent]:
    realizer = Realizer(1)
    agent = PolicyAgent("n1", realizer, lambda: None)
    agent.start()
    for i in range(3):
        agent.namespace_changed(f"ns{i}", {"metadata": {"name": f"ns{i}", "labels": {"team": "red"}}})
        for j in range(4):
            agent.pod_changed(f"ns{i}/p{j}", pod(f"ns{i}", f"p{j}", f"10.244.1.{10 * i + j + 1}", {"app": "x"}))
    return realizer, agent


def flows(realizer: Realizer) -> list[ir.Flow]:
    return [f for k, s in realizer.desired_state().items() if k.startswith("policy") for f in s.flows.values()]


def source_flows(realizer: Realizer) -> dict[int, ir.Flow]:
    return {f.match.get("nw_src")[0]: f for f in flows(realizer)  # type: ignore[index]
            if f.table == INGRESS and f.priority == PRIO_CONJ and f.match.get("nw_src")}


def test_rules_naming_the_same_peers_share_one_flow_per_address() -> None:
    realizer, agent = world()
    for i in range(3):
        agent.policy_changed(f"ns{i}/web", allow_from_team(f"ns{i}", "web", 80))
    sources = source_flows(realizer)
    assert len(sources) == 12  # the 12 pods of the red namespaces, once each
    for flow in sources.values():
        conj = [a for a in flow.actions if isinstance(a, ir.Conjunction)]
        assert len(conj) == 3 and {c.clause for c in conj} == {2}  # one per policy, the peers clause
        assert len({c.conj_id for c in conj}) == 3


def test_an_edit_rewrites_only_the_flows_it_changes_and_a_deletion_leaves_the_others() -> None:
    realizer, agent = world()
    for i in range(3):
        agent.policy_changed(f"ns{i}/web", allow_from_team(f"ns{i}", "web", 80))
    before = {f.key: f for f in flows(realizer)}
    realizer._dirty.clear()  # as after a sync
    agent.policy_changed("ns1/web", allow_from_team("ns1", "web", 443))
    changed = {f.key for f in flows(realizer)} ^ set(before)
    ports = {f.match.get("tcp_dst") for f in flows(realizer) if f.match.get("tcp_dst")}
    assert ports == {(80, None), (443, None)}
    assert all(k[2].get("tcp_dst") for k in changed)  # only port flows come and go
    # port 443 flows, port 80 flows (one user fewer), each for IPv4 and IPv6; nothing else
    assert len(realizer.pending) <= 6
    agent.policy_changed("ns0/web", None)
    agent.policy_changed("ns2/web", None)
    for flow in source_flows(realizer).values():
        assert len(flow.actions) == 1
    agent.policy_changed("ns1/web", None)
    assert not [f for f in flows(realizer) if f.priority in (PRIO_CONJ, PRIO_DIRECT)]
