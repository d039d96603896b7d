"""Policy logging traced through a real OVS: which connections reach the agent, and that a logged
denial is still a denial."""

from __future__ import annotations

import asyncio
import itertools
import re

import pytest

from sanderling.agent.policy_agent import PolicyAgent
from sanderling.compiler import pods as pod_compiler
from sanderling.compiler.policy import LOG_METER
from sanderling.model.network import NodeNetwork, PodPort
from sanderling.openflow.connection import Connection
from sanderling.openflow.realizer import Realizer

from ..conftest import Bridge

NODE = NodeNetwork.build("n1", "10.244.9.0/24")
PODS = {  # name: (namespace, ofport, address, labels)
    "server": ("plain", 1, "10.244.9.10", {"app": "server"}),
    "client": ("plain", 2, "10.244.9.11", {"app": "client"}),
    "intruder": ("watched", 3, "10.244.9.12", {"app": "client"}),
    "open": ("plain", 4, "10.244.9.13", {"app": "open"}),
    "visitor": ("watched", 5, "10.244.9.14", {"app": "visitor"}),
}
SERVER_POLICY = {"metadata": {"namespace": "plain", "name": "allow-client"}, "spec": {
    "podSelector": {"matchLabels": {"app": "server"}},
    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}], "ports": [{"port": 8080}]}]}}
INTRUDER_EGRESS = {"metadata": {"namespace": "watched", "name": "only-dns"}, "spec": {
    "podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"],
    "egress": [{"ports": [{"protocol": "UDP", "port": 53}]}]}}
OPEN_EGRESS = {"metadata": {"namespace": "plain", "name": "open-to-server"}, "spec": {
    "podSelector": {"matchLabels": {"app": "open"}}, "policyTypes": ["Egress"],
    "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "server"}}}]}]}}


BRIDGE_IDS = itertools.count()


def mac(ip: str) -> str:
    return "0a:58:" + ":".join(f"{int(b):02x}" for b in ip.split("."))


def install(bridge, policy_log: bool, watched_log: bool) -> PolicyAgent:
    async def go() -> PolicyAgent:
        conn = await Connection.open(bridge.target)
        realizer = Realizer(1)
        realizer.set_object("static", pod_compiler.static_flows(NODE))
        for name, (ns, ofport, ip, _labels) in PODS.items():
            realizer.set_object(name, pod_compiler.pod_flows(NODE, PodPort.build(ns, name, ofport, mac(ip), ip)))
        agent = PolicyAgent("n1", realizer, lambda: None)
        agent.start()
        for ns, logged in (("plain", False), ("watched", watched_log)):
            agent.namespace_changed(ns, {"metadata": {"name": ns, "annotations": {
                "policy.sanderling.io/log": "true"} if logged else {}}})
        for name, (ns, _ofport, ip, labels) in PODS.items():
            agent.pod_changed(f"{ns}/{name}", {"metadata": {"namespace": ns, "name": name, "labels": labels},
                                               "spec": {"nodeName": "n1"}, "status": {"podIP": ip}})
        annotations = {"policy.sanderling.io/log": "true"} if policy_log else {}
        agent.policy_changed("plain/allow-client", {**SERVER_POLICY, "metadata": {
            **SERVER_POLICY["metadata"], "annotations": annotations}})
        agent.policy_changed("watched/only-dns", INTRUDER_EGRESS)
        agent.policy_changed("plain/open-to-server", OPEN_EGRESS)
        await realizer.resync(conn)
        conn.close()
        return agent
    return asyncio.run(go())


def trace(bridge, src: str, dst: str, port: int, proto: str = "tcp") -> tuple[bool, bool]:
    """(logged, forwarded) for a new connection src -> dst."""
    _sns, ofport, sip, _ = PODS[src]
    _dns, _, dip, _ = PODS[dst]
    out = bridge.runtime.appctl(
        "ofproto/trace", *(["--ct-next", "trk,new"] * 4), bridge.name,
        f"in_port={ofport},dl_src={mac(sip)},dl_dst={NODE.gateway_mac},{proto},nw_src={sip},nw_dst={dip},"
        f"nw_ttl=64,{proto}_src=40000,{proto}_dst={port}")
    logged = f"meter_id={LOG_METER}" in out and "controller(" in out
    actions = [line for line in out.splitlines() if line.startswith("Datapath actions:")][-1].split(":", 1)[1]
    while "(" in actions:  # keep top-level actions only: a port number is an output
        actions = re.sub(r"\([^()]*\)", "", actions)
    forwarded = any(a.strip().isdigit() for a in actions.split(","))
    return logged, forwarded


@pytest.fixture
def bridge5(dummy_ovs, dummy_db):
    br = Bridge(dummy_ovs, dummy_db, f"log{next(BRIDGE_IDS)}", len(PODS))
    yield br
    br.delete()


def test_what_each_annotation_logs(bridge5):
    install(bridge5, policy_log=True, watched_log=True)
    assert trace(bridge5, "client", "server", 8080) == (True, True)  # allowed by the logged policy
    assert trace(bridge5, "server", "client", 8080) == (False, True)  # no policy isolates that way
    # denied by the intruder's own egress policy (its namespace is logged)
    assert trace(bridge5, "intruder", "server", 8080) == (True, False)
    assert trace(bridge5, "intruder", "open", 53, "udp") == (False, True)  # allowed, by a policy that does not log
    # denied at the server's ingress: the server's namespace is not logged, the visitor's is
    assert trace(bridge5, "visitor", "server", 8080) == (True, False)
    # denied at the egress of "open" (unlogged namespace) towards the visitor (logged namespace)
    assert trace(bridge5, "open", "visitor", 8080) == (True, False)
    # a denial between pods of unlogged namespaces is silent
    assert trace(bridge5, "open", "server", 8080) == (False, False)
    assert trace(bridge5, "client", "open", 8080) == (False, True)


def test_no_annotation_no_log(bridge5):
    install(bridge5, policy_log=False, watched_log=False)
    assert trace(bridge5, "client", "server", 8080) == (False, True)
    assert trace(bridge5, "intruder", "server", 8080) == (False, False)
    assert trace(bridge5, "visitor", "server", 8080) == (False, False)
    assert trace(bridge5, "open", "visitor", 8080) == (False, False)


def test_node_tracer_says_which_rule_allowed_and_whose_default_deny_refused(bridge5):
    """The agent's half of `sanderling trace` on a real ovs-vswitchd: stages named after the
    NetworkPolicy rule, the isolated pod, the spoof guard; bad requests refused with a reason."""
    from sanderling.agent.owners import owners
    from sanderling.agent.trace import BadTrace, NodeTracer

    agent = install(bridge5, policy_log=False, watched_log=False)
    ports = {ofport: PodPort.build(ns, name, ofport, mac(ip), ip) for name, (ns, ofport, ip, _) in PODS.items()}
    known = owners([p.key for p in ports.values()], agent)
    tracer = NodeTracer("n1", NODE.gateway_mac, lambda: ports, lambda: known,
                        lambda flow: bridge5.runtime.appctl("ofproto/trace", *(["--ct-next", "trk,new"] * 6),
                                                            bridge5.name, flow))

    def ask(**params: str) -> dict:
        return asyncio.run(tracer.handle({"proto": "tcp", "port": "8080", **params}))

    ok = ask(pod="plain/client", src="10.244.9.11", dst="10.244.9.10")
    details = [s[2] for s in ok["stages"]]
    assert ok["verdict"] == "delivered" and ok["delivered"] == "plain/server", details
    assert "allowed by networkpolicy plain/allow-client ingress rule 0" in details
    denied = ask(pod="plain/open", src="10.244.9.13", dst="10.244.9.10")
    assert denied["verdict"] == "dropped"
    assert denied["reason"].startswith("default deny of pod plain/server (ingress)"), denied["reason"]
    spoofed = ask(pod="plain/client", src="10.244.9.99", dst="10.244.9.10")
    assert spoofed["verdict"] == "dropped" and "spoof guard" in spoofed["reason"]
    for bad, why in (({"pod": "plain/ghost"}, "no port on node n1"), ({"port": "70000"}, "out of range"),
                     ({"dst": "nowhere"}, "IPv4"), ({"arrival": "tunnel", "tunnel_src": "n2"}, "tunnel_src")):
        with pytest.raises(BadTrace, match=why):
            ask(**{"pod": "plain/client", "src": "10.244.9.11", "dst": "10.244.9.10", **bad})
