"""MultiNetworkPolicy: the policy-for annotation, pods seen by their address on a network, which
networks a policy is enforced on and what is said about the others (Events), and the secondary
bridge's classifier (golden, with table names)."""

from __future__ import annotations

import json
import re

import pytest

from sanderling.agent.multi_policy import MultiPolicyAgents
from sanderling.compiler.secondary import GuardedPort, NetworkPort, compile_bridge, on_network
from sanderling.model.attachments import ANNOTATION_STATUS, Network
from sanderling.model.errors import ModelError
from sanderling.model.multi_policy import POLICY_FOR, network_address, policy_networks
from sanderling.openflow import ir
from sanderling.openflow.pipeline import SECONDARY_PIPELINE as P


def mnp(name: str, policy_for: str | None, ns: str = "ns1") -> dict:
    meta: dict = {"namespace": ns, "name": name}
    if policy_for is not None:
        meta["annotations"] = {POLICY_FOR: policy_for}
    return {"metadata": meta, "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}


def nad(ns: str, name: str, config: dict) -> dict:
    return {"metadata": {"namespace": ns, "name": name}, "spec": {"config": json.dumps(config)}}


@pytest.mark.parametrize("value,want", [
    ("red", ("ns1/red",)),
    (" red , other/blue,red ", ("ns1/red", "other/blue")),
    ("other/blue", ("other/blue",)),
])
def test_policy_for_names_networks(value, want):
    assert policy_networks(mnp("p", value)) == want


def test_no_annotation_applies_nowhere():
    assert policy_networks(mnp("p", None)) == ()


@pytest.mark.parametrize("value,said", [
    ("", "want a comma list"),
    ("red,,blue", "entry 2"),
    ("a/b/c", "entry 1 'a/b/c'"),
    ("Red", "lowercase"),
])
def test_malformed_policy_for_is_an_error_naming_the_entry(value, said):
    with pytest.raises(ModelError, match=said):
        policy_networks(mnp("p", value))


def test_a_pod_is_its_address_on_the_network():
    status = [{"name": "ns1/pods", "ips": ["10.244.0.5"], "default": True},
              {"name": "ns1/red", "interface": "net1", "ips": ["10.1.0.5", "fd00::5"], "mac": "02:00:00:00:00:05"}]
    pod = {"metadata": {"annotations": {ANNOTATION_STATUS: json.dumps(status)}}}
    assert network_address(pod, "ns1/red") == "10.1.0.5"
    assert network_address(pod, "ns1/blue") is None
    routed = {"metadata": {"annotations": {ANNOTATION_STATUS: json.dumps(  # its default route on red
        [{"name": "ns1/pods", "ips": ["10.244.0.5"]}, {"name": "ns1/red", "ips": ["10.1.0.6"], "default": True}])}}}
    assert network_address(routed, "ns1/red") == "10.1.0.6"
    assert network_address({"metadata": {"annotations": {ANNOTATION_STATUS: "[{"}}}, "ns1/red") is None


def test_bridge_classifier_golden():
    flows = compile_bridge([GuardedPort(3, "0a:58:0a:0a:00:05", ("10.10.0.5",), 0x8001),
                            GuardedPort(2, "02:00:00:00:00:09", ())],
                           [NetworkPort(1, 0x8001, vlan=100, uplink=True), NetworkPort(4, 0x8002),
                            NetworkPort(5, 0)])

    def named(flow: ir.Flow) -> str:
        text = re.sub(r"goto_table:(\d+)", lambda m: f"goto:{P.name_of(int(m.group(1)))}", flow.text(cookie=0))
        return re.sub(r"^table=(\d+)", lambda m: P.name_of(int(m.group(1))), text)

    assert [named(f) for f in flows] == [
        "NetworkClassifier,priority=0 actions=output:NORMAL",
        "ServiceARP,priority=0 actions=output:NORMAL",
        "ServiceLB,priority=0 actions=goto:ServiceDNAT",
        "ServiceAffinity,priority=0 actions=drop",
        "ServiceAffinitySelect,priority=0 actions=drop",
        "ServiceAffinityLearn,priority=0 actions=drop",
        "ServiceDNAT,priority=0 actions=goto:PolicyConntrack",
        "PolicyConntrack,priority=0 actions=goto:ServiceUnDNAT",
        "PolicyState,priority=0 actions=goto:EgressRule",
        "EgressRule,priority=0 actions=goto:IngressRule",
        "IngressRule,priority=0 actions=goto:PolicyCommit",
        "PolicyCommit,priority=0 actions=goto:ServiceUnDNAT",
        "ServiceUnDNAT,priority=0 actions=goto:Switch",
        "Switch,priority=0 actions=output:NORMAL",
        "Reject,priority=0 actions=drop",
        # a guarded pod port: its own MAC and address only, on with its network
        "NetworkClassifier,priority=100,ip,in_port=3,dl_src=0a:58:0a:0a:00:05,nw_src=10.10.0.5 "
        "actions=load:0x8001->NXM_NX_REG5[0..15],goto:ServiceLB",
        "NetworkClassifier,priority=100,arp,in_port=3,dl_src=0a:58:0a:0a:00:05,arp_spa=10.10.0.5,"
        "arp_sha=0a:58:0a:0a:00:05 actions=load:0x8001->NXM_NX_REG5[0..15],goto:ServiceARP",
        "NetworkClassifier,priority=90,in_port=3 actions=drop",
        # the uplink, per VLAN (100 = 0x64, with the present bit), marked as from other nodes; an
        # unguarded port (or a layer2 tunnel) by port
        "NetworkClassifier,priority=50,ip,in_port=1,vlan_vid=0x1064 "
        "actions=load:0x8001->NXM_NX_REG5[0..15],load:0x1->NXM_NX_REG5[16],goto:ServiceLB",
        "NetworkClassifier,priority=50,arp,in_port=1,vlan_vid=0x1064 "
        "actions=load:0x8001->NXM_NX_REG5[0..15],load:0x1->NXM_NX_REG5[16],goto:ServiceARP",
        "NetworkClassifier,priority=50,ip,in_port=4 actions=load:0x8002->NXM_NX_REG5[0..15],goto:ServiceLB",
        "NetworkClassifier,priority=50,arp,in_port=4 actions=load:0x8002->NXM_NX_REG5[0..15],goto:ServiceARP",
    ]
    for flow in flows:
        P.check_flow(flow)


def test_policy_flows_are_put_on_their_network():
    flow = ir.Flow(P["IngressRule"], 10, ir.match(proto="ip", nw_dst="10.1.0.5"), ())
    (moved,) = on_network([flow], 0x8003)
    assert moved.match.get("reg5") == (0x8003, 0xFFFF) and moved.match.get("nw_dst") == flow.match.get("nw_dst")


class Recorder:
    """A network's desired state as the agents hand it over (what the bridges would install)."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, tuple[ir.Flow, ...]]] = {}

    def set_object(self, key: str, flows, groups=()) -> None:
        self.objects.setdefault(self.network, {})[key] = tuple(flows)

    def remove_object(self, key: str) -> None:
        self.objects.get(self.network, {}).pop(key, None)


class Bridges:
    def __init__(self) -> None:
        self.flows: dict[str, Recorder] = {}
        self.cleared: list[str] = []

    def flows_for(self, network: Network) -> Recorder:
        if network.physical_network == "elsewhere":
            raise RuntimeError("physical network elsewhere is not configured on this node")
        rec = self.flows.setdefault(network.key, Recorder())
        rec.network = network.key
        return rec

    def network_id(self, network: str) -> int:
        return 0x8000 + sorted(self.flows).index(network) if network in self.flows else 0x8000

    def clear_network(self, network: str) -> None:
        self.cleared.append(network)

    def flush_policy(self) -> None:
        pass


NADS = {
    "ns1/red": {"cniVersion": "1.0.0", "type": "sanderling", "topology": "layer2", "subnet": "10.1.0.0/24"},
    "ns1/vl": {"cniVersion": "1.0.0", "type": "sanderling", "topology": "vlan", "vlanID": 10},
    "ns1/far": {"cniVersion": "1.0.0", "type": "sanderling", "topology": "vlan", "vlanID": 10,
                "physicalNetwork": "elsewhere"},
    "ns1/mv": {"cniVersion": "1.0.0", "type": "macvlan", "master": "eth1"},
    "ns1/trunk": {"cniVersion": "1.0.0", "type": "sanderling", "topology": "vlan", "trunk": [{"id": 5}]},
}


def agents_with_nads() -> tuple[MultiPolicyAgents, Bridges, list[tuple[str, str, str]]]:
    events: list[tuple[str, str, str]] = []
    agents = MultiPolicyAgents("n1", lambda: None, report=lambda ns, name, msg: events.append((ns, name, msg)))
    bridges = Bridges()
    agents.attach(bridges)
    for key, config in NADS.items():
        ns, name = key.split("/")
        agents.nad_changed(key, nad(ns, name, config))
    return agents, bridges, events


def test_a_policy_is_enforced_on_the_networks_it_names_and_says_why_not_on_others():
    agents, bridges, events = agents_with_nads()
    agents.policy_changed("ns1/p", mnp("p", "red,vl,mv,nosuch,trunk"))
    assert agents.targets["ns1/p"] == ("ns1/red", "ns1/vl")
    assert set(bridges.flows) == {"ns1/red", "ns1/vl"}
    assert all("policy/static" in rec.objects[key] for key, rec in bridges.flows.items())
    (event,) = events
    assert event[:2] == ("ns1", "p")
    assert "ns1/mv: a delegated network (macvlan): its interfaces are outside Open vSwitch" in event[2]
    assert "ns1/nosuch: no such NetworkAttachmentDefinition" in event[2]
    assert "ns1/trunk: a VLAN trunk" in event[2]
    assert "ns1/red" not in event[2] and "ns1/vl:" not in event[2]


def test_a_network_this_node_does_not_carry_is_quietly_left_to_its_nodes():
    agents, bridges, events = agents_with_nads()
    agents.policy_changed("ns1/p", mnp("p", "far"))
    assert agents.targets["ns1/p"] == ("ns1/far",) and "ns1/far" not in agents.agents and not events


def test_malformed_or_missing_annotation_is_reported_and_applies_nowhere():
    agents, bridges, events = agents_with_nads()
    agents.policy_changed("ns1/bad", mnp("bad", "red,,vl"))
    agents.policy_changed("ns1/none", mnp("none", None))
    assert agents.targets == {"ns1/bad": (), "ns1/none": ()} and not bridges.flows
    said = {name: msg for _ns, name, msg in events}
    assert "entry 2" in said["bad"] and "no k8s.v1.cni.cncf.io/policy-for annotation" in said["none"]
    # fixed: enforced, and nothing more is said
    agents.policy_changed("ns1/bad", mnp("bad", "red"))
    assert agents.targets["ns1/bad"] == ("ns1/red",) and len(events) == 2


def test_a_nad_created_later_brings_the_policy_and_its_deletion_takes_it_away():
    agents, bridges, events = agents_with_nads()
    agents.policy_changed("ns1/p", mnp("p", "late"))
    assert agents.targets["ns1/p"] == () and "ns1/late: no such NetworkAttachmentDefinition" in events[-1][2]
    agents.nad_changed("ns1/late", nad("ns1", "late", {"cniVersion": "1.0.0", "type": "sanderling",
                                                      "topology": "layer2"}))
    assert agents.targets["ns1/p"] == ("ns1/late",) and "ns1/late" in agents.agents
    agents.nad_changed("ns1/late", None)
    assert agents.targets["ns1/p"] == () and "ns1/late" not in agents.agents and bridges.cleared == ["ns1/late"]


def test_a_policy_moved_to_another_network_leaves_the_first():
    agents, bridges, _events = agents_with_nads()
    pod = {"metadata": {"namespace": "ns1", "name": "a", "labels": {}, "annotations": {ANNOTATION_STATUS: json.dumps(
        [{"name": "ns1/red", "ips": ["10.1.0.5"]}, {"name": "ns1/vl", "ips": ["10.2.0.5"]}])}},
           "spec": {"nodeName": "n1"}}
    agents.namespace_changed("ns1", {"metadata": {"name": "ns1"}})
    agents.pod_changed("ns1/a", pod)
    agents.policy_changed("ns1/p", mnp("p", "red"))
    red = bridges.flows["ns1/red"].objects["ns1/red"]
    assert "policy-pod/ns1/a" in red  # the pod, isolated on red by its red address
    assert any(f.match.get("nw_dst") == (0x0A010005, None) for f in red["policy-pod/ns1/a"])
    agents.policy_changed("ns1/p", mnp("p", "vl"))
    assert "policy-pod/ns1/a" not in red
    vl = bridges.flows["ns1/vl"].objects["ns1/vl"]
    assert any(f.match.get("nw_dst") == (0x0A020005, None) for f in vl["policy-pod/ns1/a"])


def test_networks_of_one_node_never_share_a_conjunction_id():
    agents, bridges, _events = agents_with_nads()
    pod = {"metadata": {"namespace": "ns1", "name": "a", "labels": {}, "annotations": {ANNOTATION_STATUS: json.dumps(
        [{"name": "ns1/red", "ips": ["10.1.0.5"]}, {"name": "ns1/vl", "ips": ["10.2.0.5"]}])}},
           "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [{"containerPort": 80}]}]}}
    agents.namespace_changed("ns1", {"metadata": {"name": "ns1"}})
    agents.pod_changed("ns1/a", pod)
    policy = mnp("p", "red,vl")
    policy["spec"]["ingress"] = [{"from": [{"podSelector": {}}], "ports": [{"port": 80}]}]
    agents.policy_changed("ns1/p", policy)

    def conj_ids(network: str) -> set[int]:
        return {f.match.get("conj_id")[0] for flows in bridges.flows[network].objects[network].values()
                for f in flows if f.match.get("conj_id")}
    red, vl = conj_ids("ns1/red"), conj_ids("ns1/vl")
    assert red and vl and not red & vl
    agents.nad_changed("ns1/red", None)  # its ids go back: the next compile may hand them out again
    assert len(agents.rule_ids) == len(vl)
