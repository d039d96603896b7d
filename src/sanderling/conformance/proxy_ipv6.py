"""The IPv6 version of a kube-proxy conformance case, derived from the IPv4 one.

Every IPv4 address a.b.c.d of the case is mapped to fd00::a.b.c.d (the prefix fd00::/96 with the
IPv4 address in its last 32 bits) and every IPv4 CIDR /p to the same network in that prefix, /96+p,
so containment and distinctness are kept. The node becomes dual-stack (its IPv4 pod CIDR stays,
the mapped one is its IPv6 subnet; its addresses gain their mapped twins), every Service gains the
mapped address next to each of its IPv4 ones (ClusterIP, externalIPs, LoadBalancer ingress,
source ranges) and `ipFamilies: [IPv4, IPv6]`, every IPv4 EndpointSlice gains an IPv6 twin, and
every flow is sent between the mapped addresses, expecting the same verdict with the mapped
endpoints. A dual-stack Service's IPv6 family must behave as its IPv4 one does.
"""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

PREFIX = 0xFD00 << 112


def address(text: str) -> str:
    """fd00::a.b.c.d for a.b.c.d."""
    return str(ipaddress.IPv6Address(PREFIX | int(ipaddress.IPv4Address(text))))


def network(text: str) -> str:
    net = ipaddress.IPv4Network(text, strict=False)
    return f"{ipaddress.IPv6Address(PREFIX | int(net.network_address))}/{96 + net.prefixlen}"


def endpoint(text: str) -> str:
    """'a.b.c.d:port' -> '[fd00::a.b.c.d]:port' (as the runner prints an IPv6 DNAT target)."""
    host, _, port = text.rpartition(":")
    return f"[{address(host)}]:{port}"


def _service(obj: dict[str, Any]) -> dict[str, Any]:
    spec = obj.setdefault("spec", {})
    ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    if ips and ips[0] != "None":
        spec["clusterIPs"] = [*ips, *(address(ip) for ip in ips if ":" not in ip)]
        spec["ipFamilies"] = ["IPv4", "IPv6"]
        spec["ipFamilyPolicy"] = "RequireDualStack"
    if spec.get("externalIPs"):
        spec["externalIPs"] = [*spec["externalIPs"], *(address(ip) for ip in spec["externalIPs"] if ":" not in ip)]
    if spec.get("loadBalancerSourceRanges"):
        spec["loadBalancerSourceRanges"] = [*spec["loadBalancerSourceRanges"],
                                            *(network(r) for r in spec["loadBalancerSourceRanges"] if ":" not in r)]
    ingress = ((obj.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    ingress += [{**ing, "ip": address(ing["ip"])} for ing in list(ingress) if ":" not in (ing.get("ip") or ":")]
    return obj


def _slice6(obj: dict[str, Any]) -> dict[str, Any]:
    twin = copy.deepcopy(obj)
    twin["addressType"] = "IPv6"
    twin.setdefault("metadata", {})["name"] = f"{(obj.get('metadata') or {}).get('name', '')}-ipv6"
    for ep in twin.get("endpoints") or []:
        ep["addresses"] = [address(a) for a in ep.get("addresses") or []]
    return twin


def derive(raw: dict[str, Any]) -> dict[str, Any]:
    """The IPv6 case of a parsed case file (the file itself is left alone)."""
    case = copy.deepcopy(raw)
    node = case["node"]
    node["ips6"] = [address(ip) for ip in node.get("ips") or []]
    node["podCIDR6"] = network(node["podCIDR"])
    if node.get("serviceCIDR"):
        node["serviceCIDR6"] = network(node["serviceCIDR"])
    node["nodePortAddresses"] = [*(node.get("nodePortAddresses") or []),
                                 *(network(c) for c in node.get("nodePortAddresses") or [])]
    objects = []
    for obj in case.get("objects") or []:
        if obj.get("kind") == "Service":
            objects.append(_service(obj))
        elif obj.get("kind") == "EndpointSlice" and obj.get("addressType", "IPv4") == "IPv4":
            objects += [obj, _slice6(obj)]
        else:
            objects.append(obj)
    case["objects"] = objects
    flows = []
    for flow in case.get("flows") or []:
        flow = dict(flow, src=address(flow["src"]), dst=address(flow["dst"]))
        if flow.get("endpoints"):
            flow["endpoints"] = [endpoint(e) for e in flow["endpoints"]]
        flows.append(flow)
    case["flows"] = flows
    case["id"] = f"{raw.get('id', '')}-ipv6"
    return case
