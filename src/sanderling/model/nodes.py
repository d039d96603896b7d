"""Where other nodes' pods are: remote destinations built from Node and Pod objects.

Every other node with a podCIDR and an InternalIP is one destination (its subnet, via its
underlay address). A pod whose address lies outside its node's podCIDR (a fixed IP from a
cluster pool) is one more destination, a /32 via its node, so routed mode needs no overlay and
no NAT for it either. Malformed Node objects are reported per node and skipped.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sanderling.model.errors import ModelError


@dataclass(frozen=True, slots=True, order=True)
class Remote:
    """Traffic for `dst` goes to node `node` at underlay address `via`."""

    dst: ipaddress.IPv4Network
    via: ipaddress.IPv4Address
    node: str

    @property
    def key(self) -> str:
        return f"remote/{self.dst}"


@dataclass(frozen=True, slots=True)
class NodeInfo:
    name: str
    pod_cidr: ipaddress.IPv4Network | None
    internal_ip: ipaddress.IPv4Address | None


def node_info(obj: dict[str, Any]) -> NodeInfo:
    """A Node object's podCIDR and InternalIP (either may be absent while the node registers)."""
    meta = obj.get("metadata") or {}
    name = str(meta.get("name") or "")
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    cidr = None
    if spec.get("podCIDR"):
        try:
            cidr = ipaddress.IPv4Network(spec["podCIDR"], strict=True)
        except ValueError as exc:
            raise ModelError(f"node/{name}", "spec.podCIDR", str(exc)) from None
    internal = None
    for addr in status.get("addresses") or []:
        if addr.get("type") == "InternalIP":
            try:
                internal = ipaddress.IPv4Address(addr.get("address"))
            except ValueError:
                raise ModelError(f"node/{name}", "status.addresses", f"InternalIP {addr.get('address')!r} is not "
                                                                      "an IPv4 address") from None
            break
    return NodeInfo(name, cidr, internal)


def remotes(self_name: str, nodes: Iterable[NodeInfo], pods: Iterable[tuple[str, str]]) -> list[Remote]:
    """Destinations on other nodes; `pods` are (nodeName, podIP) of every running pod."""
    by_name = {n.name: n for n in nodes}
    out: set[Remote] = set()
    for info in by_name.values():
        if info.name != self_name and info.pod_cidr is not None and info.internal_ip is not None:
            out.add(Remote(info.pod_cidr, info.internal_ip, info.name))
    for node_name, ip_text in pods:
        host = by_name.get(node_name)
        if node_name == self_name or host is None or host.internal_ip is None or not ip_text:
            continue
        try:
            ip = ipaddress.IPv4Address(ip_text)
        except ValueError:
            continue
        if host.pod_cidr is None or ip not in host.pod_cidr:
            out.add(Remote(ipaddress.IPv4Network(f"{ip}/32"), host.internal_ip, host.name))
    return sorted(out)
