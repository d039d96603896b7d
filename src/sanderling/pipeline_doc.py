"""Renders docs/pipeline.md from the pipeline declaration and the real compiler output.

The example flows are compiled for an example node, exactly as the agent installs them (minus
the generation bits of the cookie); a test checks the checked-in file equals this rendering,
so the document cannot drift from the code.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from sanderling.agent.policy_agent import PolicyAgent
from sanderling.agent.sync import SyncLoop
from sanderling.compiler import node_objects, services
from sanderling.compiler.node_objects import GATEWAY_KEY, STATIC_KEY
from sanderling.model.network import NodeNetwork, PodPort
from sanderling.model.nodes import Remote
from sanderling.model.services import Endpoint, Service, ServicePort
from sanderling.openflow import cookies, ir
from sanderling.openflow.pipeline import PIPELINE, SECONDARY_PIPELINE
from sanderling.openflow.realizer import Realizer
from sanderling.openflow.registers import (
    CT_MARK_ALLOWED,
    CT_MARK_DIRECT,
    CT_MARK_MASQ,
    DNAT_ZONE,
    FIRST_NETWORK_ZONE,
    LAST_NETWORK_ZONE,
    ORIGIN_ZONE,
    POLICY_ZONE,
    REG_FIELDS,
    REG_MARKS,
    SERVICE_POLICY_ZONE,
    SNAT_ZONE,
)

EXAMPLE_NODE = NodeNetwork.build("node-1", "10.244.1.0/24")
EXAMPLE_PODS = (
    PodPort.build("default", "web-1", 3, "0a:58:0a:f4:01:0a", "10.244.1.10"),
    PodPort.build("default", "db-1", 4, "0a:58:0a:f4:01:0b", "10.244.1.11"),
)

EXAMPLE_REMOTE = Remote(ipaddress.IPv4Network("10.244.2.0/24"), ipaddress.IPv4Address("172.30.0.12"), "node-2")
EXAMPLE_PROXY = services.ProxyConfig(
    node_name="node-1", node_ips=(ipaddress.IPv4Address("172.30.0.11"),),
    node_port_ips=(ipaddress.IPv4Address("172.30.0.11"),), local_cidr=ipaddress.IPv4Network("10.244.0.0/16"),
    masq_ip=ipaddress.IPv4Address("10.244.1.254"), service_cidr=ipaddress.IPv4Network("10.96.0.0/16"),
    answer_masq_arp=True)
EXAMPLE_SERVICE = Service("default", "web", "NodePort", (ipaddress.IPv4Address("10.96.0.10"),),
                          (ServicePort("http", "TCP", 80, 30080),))
EXAMPLE_ENDPOINTS = {EXAMPLE_SERVICE.ports[0]: (Endpoint(ipaddress.IPv4Address("10.244.1.10"), 8080, "node-1"),
                                                Endpoint(ipaddress.IPv4Address("10.244.2.7"), 8080, "node-2"))}


EXAMPLE_POLICIES: tuple[dict[str, Any], ...] = (  # two policies naming the same peers: one shared flow per peer address
    {"metadata": {"namespace": "default", "name": "web-from-db"}, "spec": {
        "podSelector": {"matchLabels": {"app": "web"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "db"}}}], "ports": [{"port": 8080}]}]}},
    {"metadata": {"namespace": "default", "name": "web-ssh-from-db"}, "spec": {
        "podSelector": {"matchLabels": {"app": "web"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "db"}}}], "ports": [{"port": 22}]}]}},
)


def policy_example_flows() -> list[ir.Flow]:
    """The example policies through the agent's real path (PolicyAgent, compiler, SharedFlows)."""
    realizer = Realizer(1)
    # through the scope the agent gives it: a key outside "policy" would raise here
    agent = PolicyAgent(EXAMPLE_NODE.name, SyncLoop(EXAMPLE_NODE.name, "", realizer).scope("policy"), lambda: None)
    agent.start()
    agent.namespace_changed("default", {"metadata": {"name": "default"}})
    for pod, app in zip(EXAMPLE_PODS, ("web", "db"), strict=True):
        agent.pod_changed(f"{pod.namespace}/{pod.name}", {
            "metadata": {"namespace": pod.namespace, "name": pod.name, "labels": {"app": app}},
            "spec": {"nodeName": EXAMPLE_NODE.name}, "status": {"podIP": str(pod.ip)}})
    for policy in EXAMPLE_POLICIES:
        agent.policy_changed(f"default/{policy['metadata']['name']}", policy)
    return [f for state in realizer.desired_state().values() for f in state.flows.values()]


EXAMPLE_NETWORK_ID = 0x8001
EXAMPLE_MNP = {"metadata": {"namespace": "default", "name": "radio-from-core",
                            "annotations": {"k8s.v1.cni.cncf.io/policy-for": "fronthaul"}}, "spec": {
    "podSelector": {"matchLabels": {"app": "radio"}},
    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "core"}}}], "ports": [{"port": 2152,
                                                                                         "protocol": "UDP"}]}]}}


def secondary_example_flows() -> list[ir.Flow]:
    """A VLAN provider bridge with two pods of network default/fronthaul (VLAN 100) and one
    MultiNetworkPolicy, through the agent's real path (MultiPolicyAgents, PolicyAgent, compiler)."""
    import json

    from sanderling.agent.multi_policy import MultiPolicyAgents
    from sanderling.compiler.secondary import GuardedPort, NetworkPort, compile_bridge, on_network
    from sanderling.model.attachments import ANNOTATION_STATUS

    realizer = Realizer(1)

    class Flows:  # the bridges' window for one network, as SecondaryBridges.flows_for gives it
        def set_object(self, key: str, flows: Any, groups: Any = ()) -> None:
            realizer.set_object(key, on_network(flows, EXAMPLE_NETWORK_ID))

        def remove_object(self, key: str) -> None:
            realizer.remove_object(key)

    class Bridges:
        def flows_for(self, network: Any) -> Flows:
            return Flows()

        def network_id(self, network: str) -> int:
            return EXAMPLE_NETWORK_ID

        def clear_network(self, network: str) -> None:
            pass

        def flush_policy(self) -> None:
            pass

    agents = MultiPolicyAgents(EXAMPLE_NODE.name, lambda: None)
    agents.attach(Bridges())
    agents.nad_changed("default/fronthaul", {"metadata": {"namespace": "default", "name": "fronthaul"}, "spec": {
        "config": json.dumps({"type": "sanderling", "topology": "vlan", "vlanID": 100, "subnet": "10.100.0.0/24"})}})
    agents.namespace_changed("default", {"metadata": {"name": "default"}})
    for name, app, ip in (("ru-1", "radio", "10.100.0.10"), ("upf-1", "core", "10.100.0.11")):
        status = [{"name": "default/fronthaul", "interface": "net1", "ips": [ip]}]
        meta = {"namespace": "default", "name": name, "labels": {"app": app},
                "annotations": {ANNOTATION_STATUS: json.dumps(status)}}
        agents.pod_changed(f"default/{name}", {"metadata": meta, "spec": {"nodeName": EXAMPLE_NODE.name}})
    agents.policy_changed("default/radio-from-core", EXAMPLE_MNP)
    bridge = compile_bridge([GuardedPort(3, "02:00:0a:64:00:0a", ("10.100.0.10",), EXAMPLE_NETWORK_ID),
                             GuardedPort(4, "02:00:0a:64:00:0b", ("10.100.0.11",), EXAMPLE_NETWORK_ID)],
                            [NetworkPort(1, EXAMPLE_NETWORK_ID, 100)])
    return bridge + [f for state in realizer.desired_state().values() for f in state.flows.values()]


def render() -> str:
    out = [
        "# The Sanderling OpenFlow pipeline",
        "",
        "Generated by `sanderling pipeline --doc` from `src/sanderling/openflow/pipeline.py`,",
        "`registers.py` and the compilers; `tests/unit/test_pipeline_doc.py` fails if this file and the code",
        "disagree. Table numbers come from the declaration order; code refers to tables by name.",
        "",
        "## Tables",
        "",
        "| id | table | stage | on miss | what it does |",
        "|---|---|---|---|---|",
    ]
    for i, t in enumerate(PIPELINE.tables):
        out.append(f"| {i} | {t.name} | {t.stage} | {t.miss.value} | {t.doc} |")
    out += ["", "## Register fields", "", "| name | bits | meaning |", "|---|---|---|"]
    for f in REG_FIELDS:
        out.append(f"| {f.name} | `{f.text()}` | {f.doc} |")
    out += ["", "## Register marks", "", "| name | field = value | meaning |", "|---|---|---|"]
    for m in REG_MARKS:
        out.append(f"| {m.name} | {m.field.name} = {m.value} | {m.doc} |")
    out += [
        "", "## Conntrack zones and marks", "",
        "| name | value | meaning |", "|---|---|---|",
        f"| DNAT zone | {DNAT_ZONE} | service connections (DNAT to the endpoint) |",
        f"| SNAT zone | {SNAT_ZONE} | masqueraded service connections |",
        f"| policy zone | {POLICY_ZONE} | connections of pods a NetworkPolicy isolates |",
        f"| service policy zone | {SERVICE_POLICY_ZONE} | the same, for requests of service connections this node "
        "translated: their replies skip policy, so these entries see one side only and never a close; kept apart, "
        "they cannot make a later direct connection with the same tuple look invalid |",
        f"| origin zone | {ORIGIN_ZONE} | local pods' connections to service target ports, by endpoint tuple: the "
        "latest one, direct or through a service, decides how replies from the target port are handled |",
        f"| ct_mark {CT_MARK_MASQ:#x} | bit | the connection is masqueraded: later request packets are SNATed too |",
        f"| ct_mark {CT_MARK_ALLOWED:#x} | bit | in a policy zone: policy allowed the connection when it started; "
        "segments conntrack calls invalid still pass |",
        f"| ct_mark {CT_MARK_DIRECT:#x} | bit | in the origin zone: the tuple's latest connection is direct, its "
        "replies are pod-to-pod traffic (through policy, no translation) |",
    ]
    out += [
        "", "## Cookies", "",
        f"`cookie = generation << {cookies.GENERATION_SHIFT} | category << {cookies.CATEGORY_SHIFT} | object id`",
        "(16, 8 and 40 bits). The generation is bumped at every agent start and stored in the bridge's",
        "`external_ids:sanderling.io/generation`; after a restart the new generation is installed and the",
        "older ones are deleted by cookie/mask in the same atomic bundle. Categories:",
        "",
        "| category | value |", "|---|---|",
    ]
    for cat in cookies.Category:
        out.append(f"| {cat.name} | {int(cat)} |")
    group_ids: dict[str, int] = {}
    svc_flows, svc_groups = services.service_flows(EXAMPLE_PROXY, EXAMPLE_SERVICE, EXAMPLE_ENDPOINTS,
                                                   lambda key: group_ids.setdefault(key, len(group_ids) + 1))
    node = node_objects.node_objects(EXAMPLE_NODE, EXAMPLE_PODS, gateway=True, remotes=[EXAMPLE_REMOTE])
    flows = ([f for key in (STATIC_KEY, GATEWAY_KEY) for f in node[key]]
             + [f for p in EXAMPLE_PODS for f in node[p.key]]
             + node[node_objects.remote_key(EXAMPLE_REMOTE)]
             + services.static_flows(EXAMPLE_PROXY) + svc_flows
             + [f for key in sorted(services.shared_keys(EXAMPLE_PROXY, EXAMPLE_SERVICE, EXAMPLE_ENDPOINTS))
                for f in services.shared_flows(EXAMPLE_PROXY, key)]
             + policy_example_flows())
    out += [
        "", "## Example flows", "",
        f"Node `{EXAMPLE_NODE.name}`, pod CIDR {EXAMPLE_NODE.pod_cidr}, gateway {EXAMPLE_NODE.gateway_ip} "
        f"({EXAMPLE_NODE.gateway_mac}); pods "
        + ", ".join(f"`{p.namespace}/{p.name}` {p.ip} {p.mac} on ofport {p.ofport}" for p in EXAMPLE_PODS) + ".",
        "Shown in `ovs-ofctl add-flow` syntax, generation 1. The NODE-category flows exist in routed mode",
        "(`sanderling-agent --gateway`): the bridge's LOCAL port (4294967294) is the node side of the pod",
        "gateway, and whatever is not a local pod is routed through the node's kernel.",
        f"Node `{EXAMPLE_REMOTE.node}` holds {EXAMPLE_REMOTE.dst} behind underlay address {EXAMPLE_REMOTE.via}.",
        f"Service `{EXAMPLE_SERVICE.key}` ({EXAMPLE_SERVICE.type}): ClusterIP "
        f"{EXAMPLE_SERVICE.cluster_ips[0]} port 80,",
        f"NodePort 30080 on {EXAMPLE_PROXY.node_ips[0]}, endpoints 10.244.1.10:8080 (this node) and",
        f"10.244.2.7:8080 (node-2); masquerade address {EXAMPLE_PROXY.masq_ip}. Its group:",
        "", "```", *(g.text() for g in svc_groups), "```", "",
        "NetworkPolicies `default/web-from-db` (pods `app: web` accept TCP 8080 from pods `app: db`) and",
        "`default/web-ssh-from-db` (the same peers, TCP 22); web-1 is `app: web`, db-1 `app: db`. Each rule is",
        "a conjunction of (selected pod, peers, ports); both rules name the same peers, so the flow for",
        "db-1's address carries both rules' `conjunction` actions (an address set shared by rules).",
    ]
    for i, t in enumerate(PIPELINE.tables):
        table_flows = sorted((f for f in flows if f.table == i), key=lambda f: (-f.priority, f.text()))
        out += ["", f"### {i}: {t.name}", "", "```"]
        out += [f.text(cookie=cookies.with_generation(f.cookie, 1)) for f in table_flows]
        out += ["```"]
    out += [
        "", "## Secondary-network bridges", "",
        "A VLAN provider bridge (`br-<physnet>`) and the layer2 bridge (`br-l2`) switch with OVS's MAC learning",
        "(NORMAL); in front of it, their own short pipeline: the spoof guard, each IPv4 packet's network in",
        "SECONDARY_NETWORK (from its pod port, the uplink's VLAN or the layer2 tunnel), and MultiNetworkPolicy",
        "with the same compiler as above, every flow matching its network; the network's number is also its",
        f"conntrack zone ({FIRST_NETWORK_ZONE:#x}-{LAST_NETWORK_ZONE:#x}). The agent installs them with",
        "`ovs-ofctl replace-flows --bundle` (atomic, only the difference) after every port or policy change.",
        "", "| id | table | stage | on miss | what it does |", "|---|---|---|---|---|",
    ]
    for i, t in enumerate(SECONDARY_PIPELINE.tables):
        out.append(f"| {i} | {t.name} | {t.stage} | {t.miss.value} | {t.doc} |")
    out += [
        "", "Example: network `default/fronthaul` (VLAN 100, number 0x8001), uplink on ofport 1, pods `ru-1`",
        "10.100.0.10 (ofport 3, `app: radio`) and `upf-1` 10.100.0.11 (ofport 4, `app: core`); the",
        "MultiNetworkPolicy `default/radio-from-core` (policy-for `fronthaul`) lets radio pods accept UDP 2152",
        "from core pods only.",
    ]
    secondary = secondary_example_flows()
    for i, t in enumerate(SECONDARY_PIPELINE.tables):
        table_flows = sorted((f for f in secondary if f.table == i), key=lambda f: (-f.priority, f.text()))
        out += ["", f"### {i}: {t.name}", "", "```"]
        out += [f.text(cookie=cookies.with_generation(f.cookie, 1)) for f in table_flows]
        out += ["```"]
    return "\n".join(out) + "\n"
