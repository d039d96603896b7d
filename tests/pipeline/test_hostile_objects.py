"""Hostile Kubernetes objects through the agent's model, compilers and realizer (issue 20).

Hypothesis builds Services, EndpointSlices and NetworkPolicies whose fields hold anything JSON
can (wrong types, huge and negative numbers, IPv6 where IPv4 is expected, junk strings) next to
one well-formed Service and one well-formed policy. Everything goes through ServiceProxy and
PolicyAgent into a realizer that syncs with a real ovs-vswitchd (dummy datapath), incrementally
and by resync. Only the project's own errors may surface (as per-object reports), and the good
objects must be installed whatever else was in the batch. `SANDERLING_FUZZ_EXAMPLES` runs longer.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sanderling.agent.policy_agent import PolicyAgent
from sanderling.agent.service_proxy import ServiceProxy
from sanderling.compiler import pods as pod_compiler
from sanderling.compiler import services as svc_compiler
from sanderling.model.network import NodeNetwork, PodPort
from sanderling.openflow.connection import Connection
from sanderling.openflow.realizer import Realizer

from ..conftest import Bridge, require_ovs

EXAMPLES = int(os.environ.get("SANDERLING_FUZZ_EXAMPLES", "25"))
NODE = NodeNetwork.build("n1", "10.244.9.0/24")
CFG = svc_compiler.ProxyConfig(
    "n1", (ipaddress.IPv4Address("172.30.0.11"),), (ipaddress.IPv4Address("172.30.0.11"),),
    ipaddress.IPv4Network("10.244.0.0/16"), ipaddress.IPv4Address("10.244.9.254"),
    service_cidr=ipaddress.IPv4Network("10.96.0.0/16"), external_ip_cidrs=(ipaddress.IPv4Network("0.0.0.0/0"),))

WORDS = ["TCP", "UDP", "SCTP", "ICMP", "10.96.0.9", "10.244.9.10", "fd00::1", "fd00::/64", "0.0.0.0/0", "ClientIP",
         "Local", "Cluster", "NodePort", "LoadBalancer", "ExternalName", "None", "", "http", "IPv4", "IPv6", "FQDN",
         "In", "NotIn", "Exists", "Bogus", "Ingress", "Egress", "n1", "VIP", "Proxy", "999.1.1.1", "10.96.0.0/33"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.integers(0, 70000),
                    st.text(max_size=12), st.sampled_from(WORDS))
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.sampled_from(WORDS + ["port", "name", "ip", "cidr"]), inner, max_size=3),
                    max_leaves=8)


def maybe(*good):
    return st.one_of(junk, *good)


ports = st.lists(st.fixed_dictionaries({}, optional={
    "name": maybe(st.just("http")), "port": maybe(st.integers(1, 65535)), "targetPort": junk,
    "nodePort": maybe(st.integers(30000, 32767)), "protocol": maybe(st.sampled_from(["TCP", "UDP", "SCTP"]))}),
    max_size=3)
services = st.fixed_dictionaries({}, optional={
    "type": maybe(st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"])),
    "clusterIP": maybe(st.just("10.96.0.77"), st.just("None")), "clusterIPs": junk, "ports": maybe(ports),
    "sessionAffinity": maybe(st.just("ClientIP")),
    "sessionAffinityConfig": maybe(st.builds(lambda t: {"clientIP": {"timeoutSeconds": t}}, st.integers(-5, 2**33))),
    "externalIPs": maybe(st.lists(st.sampled_from(["203.0.113.9", "fd00::1", "x"]), max_size=2)),
    "loadBalancerSourceRanges": junk, "externalTrafficPolicy": junk, "internalTrafficPolicy": junk,
    "healthCheckNodePort": junk})
slices = st.fixed_dictionaries({}, optional={
    "addressType": maybe(st.just("IPv4")), "ports": maybe(ports),
    "endpoints": maybe(st.lists(st.fixed_dictionaries({}, optional={
        "addresses": maybe(st.lists(st.sampled_from(["10.244.9.20", "10.244.3.4", "fd00::2", "1.2.3"]), max_size=2)),
        "conditions": junk, "nodeName": junk}), max_size=3))})
peers = st.lists(maybe(st.fixed_dictionaries({}, optional={
    "podSelector": maybe(st.just({})), "namespaceSelector": junk,
    "ipBlock": maybe(st.builds(lambda c, e: {"cidr": c, "except": e}, junk, junk))})), max_size=2)
rules = st.lists(maybe(st.fixed_dictionaries({}, optional={"from": peers, "to": peers, "ports": maybe(ports)})),
                 max_size=2)
policies = st.fixed_dictionaries({"podSelector": maybe(st.just({}))}, optional={
    "policyTypes": maybe(st.just(["Ingress", "Egress"])), "ingress": maybe(rules), "egress": maybe(rules)})

GOOD_SERVICE = {"metadata": {"namespace": "f", "name": "good"},
                "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}
GOOD_SLICE = {"metadata": {"namespace": "f", "name": "good-1", "labels": {"kubernetes.io/service-name": "good"}},
              "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
              "endpoints": [{"addresses": ["10.244.9.10"], "nodeName": "n1"}]}
GOOD_POLICY = {"metadata": {"namespace": "f", "name": "good"}, "spec": {
    "podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"ports": [{"port": 8080}]}]}}
POD = {"metadata": {"namespace": "f", "name": "web", "labels": {"app": "web"}}, "spec": {"nodeName": "n1"},
       "status": {"podIP": "10.244.9.10"}}


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                      HealthCheck.too_slow])
@given(st.lists(services, max_size=3), st.lists(slices, max_size=3), st.lists(policies, max_size=3))
def test_hostile_objects_fail_alone(dummy_ovs, dummy_db, bad_services, bad_slices, bad_policies):
    require_ovs()
    bridge = Bridge(dummy_ovs, dummy_db, "fz", 2)
    reports: list = []

    def report(*args) -> None:
        reports.append(args)

    try:
        async def go() -> None:
            conn = await Connection.open(bridge.target)
            realizer = Realizer(1)
            realizer.set_object("static", pod_compiler.static_flows(NODE))
            realizer.set_object("f/web", pod_compiler.pod_flows(
                NODE, PodPort.build("f", "web", 1, "0a:58:0a:f4:09:0a", "10.244.9.10")))
            proxy = ServiceProxy(CFG, realizer, lambda: None, report)
            proxy.start()
            agent = PolicyAgent("n1", realizer, lambda: None, report=report)
            agent.start()
            agent.namespace_changed("f", {"metadata": {"name": "f"}})
            agent.pod_changed("f/web", POD)
            await realizer.resync(conn)
            # the hostile ones first, in the same batch as the good ones
            for i, spec in enumerate(bad_services):
                proxy.service_changed(f"f/bad{i}", {"metadata": {"namespace": "f", "name": f"bad{i}"}, "spec": spec})
            for i, body in enumerate(bad_slices):
                proxy.slice_changed(f"f/bad{i}-1", {"metadata": {"namespace": "f", "name": f"bad{i}-1", "labels": {
                    "kubernetes.io/service-name": f"bad{i % max(1, len(bad_services))}"}}, **body})
            for i, spec in enumerate(bad_policies):
                agent.policy_changed(f"f/bad{i}", {"metadata": {"namespace": "f", "name": f"bad{i}"}, "spec": spec})
            proxy.service_changed("f/good", GOOD_SERVICE)
            proxy.slice_changed("f/good-1", GOOD_SLICE)
            agent.policy_changed("f/good", GOOD_POLICY)
            await realizer.sync(conn)
            await realizer.resync(conn)  # after a reconnect: the same outcome
            conn.close()
        asyncio.run(go())
        flows = bridge.dump_flows()
    finally:
        bridge.delete()
    assert any("nw_dst=10.96.0.10" in f and "tp_dst=80" in f for f in flows), "the good Service is not installed"
    assert any("tp_dst=8080" in f and "conjunction" in f for f in flows), "the good policy is not installed"
    for args in reports:  # every report names its object
        assert len(args) == 3 and args[0] == "f" and args[1].startswith("bad"), args
