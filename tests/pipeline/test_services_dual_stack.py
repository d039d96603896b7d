"""A dual-stack Service traced through the real pipeline (dummy datapath, conntrack answering
trk,new): its IPv6 ClusterIP goes to its IPv6 endpoints (never to an IPv4 one), masqueraded to
the node's IPv6 masquerade address when the client is the host, left alone for a pod; an unserved
port or a Service without IPv6 endpoints is rejected; the IPv4 ClusterIP keeps its own endpoints."""

from __future__ import annotations

import asyncio
import ipaddress

from sanderling.compiler import node_objects
from sanderling.compiler import services as svc_compiler
from sanderling.conformance.proxy import group_endpoints, install_objects, read_verdict
from sanderling.model.network import NodeNetwork, PodPort
from sanderling.model.services import endpoints_by_port, service_from

from ..conftest import Bridge, require_ovs

NODE = NodeNetwork.build("n1", "10.244.1.0/24,fd00:10:244:1::/64")
CLIENT = PodPort.build("default", "client", 1, "0a:58:0a:f4:01:05", "10.244.1.5,fd00:10:244:1::5")
MASQ6 = "fd00:10:244:1:ffff:ffff:ffff:fffe"
CFG = svc_compiler.ProxyConfig(
    node_name="n1", node_ips=(ipaddress.IPv4Address("172.30.0.11"),), node_port_ips=(),
    local_cidr=ipaddress.IPv4Network("10.244.0.0/16"), masq_ip=ipaddress.IPv4Address("10.244.1.254"),
    service_cidr=ipaddress.IPv4Network("10.96.0.0/16"), gateway_mac=NODE.gateway_mac, answer_masq_arp=True,
    masq_ip6=ipaddress.IPv6Address(MASQ6), local_cidr6=ipaddress.IPv6Network("fd00:10:244::/56"),
    service_cidr6=ipaddress.IPv6Network("fd00:10:96::/112"))


def service(name: str, v4: str, v6: str) -> dict:
    return {"metadata": {"namespace": "prod", "name": name}, "spec": {
        "type": "ClusterIP", "clusterIP": v4, "clusterIPs": [v4, v6], "ipFamilies": ["IPv4", "IPv6"],
        "ipFamilyPolicy": "RequireDualStack", "ports": [{"name": "http", "protocol": "TCP", "port": 80}]}}


def endpoint_slice(name: str, family: str, addresses: list[str]) -> dict:
    return {"metadata": {"namespace": "prod", "name": f"{name}-{family}",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": family, "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
            "endpoints": [{"addresses": [a], "conditions": {"ready": True}, "nodeName": "n2"} for a in addresses]}


WEB = service("web", "10.96.0.10", "fd00:10:96::a")
EMPTY = service("empty", "10.96.0.11", "fd00:10:96::b")
STICKY = service("sticky", "10.96.0.12", "fd00:10:96::c")
STICKY["spec"]["sessionAffinity"] = "ClientIP"
SLICES = {"web": [endpoint_slice("web", "IPv4", ["10.244.2.10", "10.244.2.11"]),
                  endpoint_slice("web", "IPv6", ["fd00:10:244:2::10", "fd00:10:244:2::11"])],
          "empty": [endpoint_slice("empty", "IPv4", ["10.244.2.12"])],
          "sticky": [endpoint_slice("sticky", "IPv6", ["fd00:10:244:2::20", "fd00:10:244:2::21"])]}


def _objects() -> dict[str, tuple[list, list]]:
    objects = {key: (flows, []) for key, flows in node_objects.node_objects(NODE, [CLIENT], gateway=True).items()}
    objects["service/static"] = (svc_compiler.static_flows(CFG), [])
    groups: dict[str, int] = {}
    for raw in (WEB, EMPTY, STICKY):
        svc = service_from(raw)
        assert svc is not None
        slices = SLICES[svc.name]
        endpoints = endpoints_by_port(slices, svc.ports)
        for port, eps in endpoints_by_port(slices, svc.ports, family=6).items():
            endpoints[port] += eps
        flows, svc_groups = svc_compiler.service_flows(CFG, svc, endpoints,
                                                       lambda key: groups.setdefault(key, len(groups) + 1))
        objects[f"service/{svc.key}"] = (flows, svc_groups)
        for shared in svc_compiler.shared_keys(CFG, svc, endpoints):
            objects[shared] = (svc_compiler.shared_flows(CFG, shared), [])
    return objects


def test_a_dual_stack_service_over_both_families(dummy_ovs, dummy_db):
    require_ovs()
    bridge = Bridge(dummy_ovs, dummy_db, "sd", 1)
    try:
        asyncio.run(install_objects(bridge.target, _objects()))
        groups = group_endpoints(dummy_ovs, bridge.name)

        def verdict(head: str, addresses: str, port: int = 80, sport: int = 40000, dp_hash: int = 1):
            trace = dummy_ovs.appctl("ofproto/trace", *(["--ct-next", "trk,new"] * 4), bridge.name,
                                     f"{head},dp_hash={dp_hash:#x},{addresses},nw_ttl=64,tcp_src={sport},"
                                     f"tcp_dst={port}")
            return read_verdict(trace, groups)

        pod = f"in_port=1,dl_src={CLIENT.mac},dl_dst={NODE.gateway_mac}"
        host = f"in_port=LOCAL,dl_src={NODE.gateway_mac},dl_dst={NODE.gateway_mac}"
        from_pod = verdict(pod, "tcp6,ipv6_src=fd00:10:244:1::5,ipv6_dst=fd00:10:96::a")
        from_host = verdict(host, "tcp6,ipv6_src=fd00:10:244:1::1,ipv6_dst=fd00:10:96::a")
        unserved = verdict(pod, "tcp6,ipv6_src=fd00:10:244:1::5,ipv6_dst=fd00:10:96::a", port=81)
        no_endpoints = verdict(pod, "tcp6,ipv6_src=fd00:10:244:1::5,ipv6_dst=fd00:10:96::b")
        unused = verdict(pod, "tcp6,ipv6_src=fd00:10:244:1::5,ipv6_dst=fd00:10:96::99")
        ipv4 = verdict(pod, "tcp,nw_src=10.244.1.5,nw_dst=10.96.0.10")
        sticky = verdict(pod, "tcp6,ipv6_src=fd00:10:244:1::5,ipv6_dst=fd00:10:96::c")
        picked = {e for i in range(1, 9) for e in verdict(pod, "tcp6,ipv6_src=fd00:10:244:1::5,ipv6_dst=fd00:10:96::a",
                                                           sport=40000 + i, dp_hash=i).path.split()
                  if e.startswith("nat(dst=")}
    finally:
        bridge.delete()
    six = {"[fd00:10:244:2::10]:8080", "[fd00:10:244:2::11]:8080"}
    assert (from_pod.verdict, from_pod.endpoints, from_pod.masquerade) == ("DNAT", six, False), from_pod.path
    assert (from_host.verdict, from_host.endpoints, from_host.masquerade) == ("DNAT", six, True), from_host.path
    assert f"nat(src={MASQ6})" in from_host.path or f"nat(src=[{MASQ6}])" in from_host.path, from_host.path
    assert unserved.verdict == "REJECT" and no_endpoints.verdict == "REJECT", (unserved.path, no_endpoints.path)
    assert unused.verdict == "DROP", unused.path  # an address of the IPv6 service CIDR no Service holds
    assert (ipv4.verdict, ipv4.endpoints) == ("DNAT", {"10.244.2.10:8080", "10.244.2.11:8080"}), ipv4.path
    assert picked and all("fd00:10:244:2::1" in p for p in picked), picked
    # ClientIP affinity over IPv6: the group names the endpoint in the affinity registers, the
    # choice is learned from the client's and the Service's IPv6 addresses, then translated
    assert (sticky.verdict, sticky.endpoints) == ("DNAT", {"[fd00:10:244:2::20]:8080", "[fd00:10:244:2::21]:8080"}), \
        sticky.path
    learned = next(line for line in sticky.path.splitlines() if "learn(" in line)
    assert "NXM_NX_IPV6_SRC[]" in learned and "NXM_NX_IPV6_DST[]" in learned and "NXM_NX_REG11[]" in learned, learned
    assert "nat(dst=[fd00:10:244:2::2" in sticky.path or "nat(dst=fd00:10:244:2::2" in sticky.path, sticky.path
