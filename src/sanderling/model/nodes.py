"""Where other nodes' pods are: remote destinations built from Node and Pod objects.

Every other node with a podCIDR and an InternalIP is one destination (its subnet, via its
underlay address). A pod whose address lies outside its node's podCIDR (a fixed IP from a
cluster pool) is one more destination, a /32 via its node, so routed mode needs no overlay and
no NAT for it either. Malformed Node objects are reported per node and skipped.

Trust: these become routes and flows on every node, so only what the cluster vouches for does.
A pod address outside its node's podCIDR counts only when an IPPool allocation says that node
holds it (a pod's status alone could otherwise pull any address, another node's pods or the
internet, towards that node). A podCIDR that is too broad (shorter than /8), overlaps the
service CIDR, holds a node's own address or overlaps an older node's podCIDR is refused
(`refused_cidrs`), with a message naming the conflict.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sanderling.model.errors import ModelError

NEXT_HOP6 = "sanderling.io/ipv6-next-hop"


@dataclass(frozen=True, slots=True)
class Remote:
    """Traffic for `dst` goes to node `node` at underlay address `via`. An IPv6 `dst` (a node's
    IPv6 pod subnet) goes the same way in overlay mode (IPv6 in VXLAN over the IPv4 underlay); in
    routed mode the node's kernel routes it via `via6`, the link-local address of the other node's
    uplink that node publishes ("" while it has not: no route)."""

    dst: ipaddress.IPv4Network | ipaddress.IPv6Network
    via: ipaddress.IPv4Address
    node: str
    via6: str = ""

    def sort_key(self) -> tuple[int, int, int, str]:
        return (self.dst.version, int(self.dst.network_address), self.dst.prefixlen, self.node)

    @property
    def key(self) -> str:
        return f"remote/{self.dst}"


@dataclass(frozen=True, slots=True)
class NodeInfo:
    name: str
    pod_cidr: ipaddress.IPv4Network | None
    internal_ip: ipaddress.IPv4Address | None
    created: str = ""  # metadata.creationTimestamp (RFC 3339 sorts as text): the older of two overlaps wins
    pod_cidr6: ipaddress.IPv6Network | None = None  # a dual-stack or IPv6-only node's IPv6 podCIDR
    next_hop6: str = ""  # its uplink's link-local address (annotation NEXT_HOP6, published by its agent)


def node_info(obj: dict[str, Any]) -> NodeInfo:
    """A Node object's podCIDRs and IPv4 InternalIP (any may be absent while the node registers)."""
    meta = obj.get("metadata") or {}
    name = str(meta.get("name") or "")
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    cidr: ipaddress.IPv4Network | None = None
    cidr6: ipaddress.IPv6Network | None = None
    # spec.podCIDRs (one per family, podCIDR is its first); an IPv6-only node has only an IPv6 one
    texts = spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
    for text in texts if isinstance(texts, list) else []:
        field = "spec.podCIDRs" if spec.get("podCIDRs") else "spec.podCIDR"
        if not isinstance(text, str):
            raise ModelError(f"node/{name}", field, f"{text!r} is not a CIDR")
        try:
            net = ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            raise ModelError(f"node/{name}", field, str(exc)) from None
        if isinstance(net, ipaddress.IPv4Network) and cidr is None:
            cidr = net
        elif isinstance(net, ipaddress.IPv6Network) and cidr6 is None:
            cidr6 = net
    internal = None
    for addr in status.get("addresses") or []:
        if addr.get("type") == "InternalIP":
            try:
                found = ipaddress.ip_address(addr.get("address") or "")
            except ValueError:
                raise ModelError(f"node/{name}", "status.addresses", f"InternalIP {addr.get('address')!r} is not "
                                                                      "an IP address") from None
            if isinstance(found, ipaddress.IPv4Address):  # the underlay is IPv4 (pods of both families over it)
                internal = found
                break
    hop = str((meta.get("annotations") or {}).get(NEXT_HOP6) or "")
    try:
        next_hop6 = hop if hop and ipaddress.IPv6Address(hop).is_link_local else ""
    except ValueError:
        next_hop6 = ""
    return NodeInfo(name, cidr, internal, str(meta.get("creationTimestamp") or ""), cidr6, next_hop6)


MIN_POD_PREFIX = 8  # a podCIDR shorter than this would capture a large part of the address space


def refused_cidrs(nodes: Iterable[NodeInfo], service_cidr: ipaddress.IPv4Network | None = None) -> dict[str, str]:
    """Nodes whose podCIDR must not be routed: node name -> why."""
    ordered = sorted((n for n in nodes if n.pod_cidr is not None), key=lambda n: (n.created or "~", n.name))
    node_ips = {n.internal_ip: n.name for n in ordered if n.internal_ip is not None}
    refused: dict[str, str] = {}
    accepted: list[NodeInfo] = []
    for info in ordered:
        cidr = info.pod_cidr
        assert cidr is not None
        why = ""
        if cidr.prefixlen < MIN_POD_PREFIX:
            why = f"podCIDR {cidr} is broader than /{MIN_POD_PREFIX}"
        elif service_cidr is not None and cidr.overlaps(service_cidr):
            why = f"podCIDR {cidr} overlaps the service CIDR {service_cidr}"
        elif any(ip in cidr for ip in node_ips):
            ip = next(ip for ip in node_ips if ip in cidr)
            why = f"podCIDR {cidr} holds node {node_ips[ip]}'s address {ip}"
        else:
            older = next((a for a in accepted if a.pod_cidr is not None and a.pod_cidr.overlaps(cidr)), None)
            if older is not None:
                why = f"podCIDR {cidr} overlaps node {older.name}'s {older.pod_cidr}"
        if why:
            refused[info.name] = f"node/{info.name}: spec.podCIDR: {why}: not routed"
        else:
            accepted.append(info)
    return refused


def remotes(self_name: str, nodes: Iterable[NodeInfo], pods: Iterable[tuple[str, str]],
            pool_holders: Mapping[str, str] | None = None, refused: Mapping[str, str] | None = None,
            untrusted: list[str] | None = None) -> list[Remote]:
    """Destinations on other nodes; `pods` are (nodeName, podIP) of every running pod,
    `pool_holders` IPPool allocations (address -> node holding it), `refused` the nodes whose
    podCIDR is not routed (see refused_cidrs). Pod addresses left out are appended to `untrusted`."""
    by_name = {n.name: n for n in nodes}
    holders = pool_holders or {}
    refused = refused or {}
    out: set[Remote] = set()
    for info in by_name.values():
        if info.name in refused:
            continue
        if info.name != self_name and info.internal_ip is not None:
            if info.pod_cidr is not None:
                out.add(Remote(info.pod_cidr, info.internal_ip, info.name))
            if info.pod_cidr6 is not None and not any(
                    o.pod_cidr6 is not None and o.name != info.name and o.pod_cidr6.overlaps(info.pod_cidr6)
                    and (o.created or "~", o.name) < (info.created or "~", info.name) for o in by_name.values()):
                out.add(Remote(info.pod_cidr6, info.internal_ip, info.name, info.next_hop6))
    for node_name, ip_text in pods:
        host = by_name.get(node_name)
        if node_name == self_name or host is None or host.internal_ip is None or not ip_text:
            continue
        try:
            ip = ipaddress.ip_address(ip_text)
        except ValueError:
            continue
        if host.name not in refused and any(ip in c for c in (host.pod_cidr, host.pod_cidr6)
                                            if c is not None and c.version == ip.version):
            continue  # inside its node's (routed) subnet
        if holders.get(str(ip)) == host.name:
            out.add(Remote(ipaddress.ip_network(f"{ip}/{ip.max_prefixlen}"), host.internal_ip, host.name,
                           host.next_hop6 if ip.version == 6 else ""))
        elif untrusted is not None:
            untrusted.append(f"{ip} on node {host.name}")
    return sorted(out, key=Remote.sort_key)
