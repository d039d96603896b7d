"""IPPool (ipam.sanderling.io/v1alpha1): cluster-wide address pools and who may use them.

spec:
  cidrs: ["10.50.0.0/24", "fd00:50::/112"]   # where addresses come from (IPv4, IPv6 or both)
  excludes: ["10.50.0.1", "10.50.0.8/29"]
  namespaceSelector: {matchLabels: {tier: telco}}   # optional: which pods get it by default
  podSelector: {matchLabels: {app: upf}}
  network: ns/name                     # set on the pools of secondary networks (created by the agent)
status:
  allocations: {"10.50.0.7": {pod: ns/name, node: n1, containerID: ..., ifname: eth0}}
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sanderling.model.errors import ModelError

ANNOTATION_IPS = "ipam.sanderling.io/ips"
ANNOTATION_MAC = "ipam.sanderling.io/mac"
ANNOTATION_POOL = "ipam.sanderling.io/pool"


Net = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class IPPool:
    """A pod drawing from a pool gets one address of each family both the pool and its node have."""

    name: str
    cidrs: tuple[Net, ...]
    excludes: tuple[Net, ...]
    namespace_labels: tuple[tuple[str, str], ...] | None
    pod_labels: tuple[tuple[str, str], ...] | None
    network: str = ""  # "namespace/name" of the secondary network it serves; "" for the pod network

    @property
    def size(self) -> int:
        return sum(n.num_addresses for n in self.cidrs)

    @property
    def versions(self) -> tuple[int, ...]:
        """The address families (4, 6) the pool has CIDRs of, in that order."""
        return tuple(v for v in (4, 6) if any(n.version == v for n in self.cidrs))

    def contains(self, ip: Address) -> bool:
        return any(ip.version == n.version and ip in n for n in self.cidrs) and \
            not any(ip.version == e.version and ip in e for e in self.excludes)

    def _host_ranges(self, version: int | None = None) -> Iterator[tuple[int, int]]:
        """(first, last) integer ranges of the pool's usable addresses (of one family): its CIDRs'
        hosts minus the excludes, computed, never enumerated (a /8 pool is 16 million addresses).
        IPv4 leaves out network and broadcast, IPv6 the subnet's first address (its anycast one)."""
        for net in self.cidrs:
            if version is not None and net.version != version:
                continue
            holes = [(int(e.network_address), int(e.broadcast_address))
                     for e in ipaddress.collapse_addresses(x for x in self.excludes  # type: ignore[type-var]
                                                           if x.version == net.version)]
            lo, hi = int(net.network_address), int(net.broadcast_address)
            if net.version == 4 and net.prefixlen < 31:
                lo, hi = lo + 1, hi - 1
            elif net.version == 6 and net.prefixlen < 127:
                lo += 1
            cur = lo
            for start, end in holes:
                if end < cur or start > hi:
                    continue
                if start > cur:
                    yield cur, start - 1
                cur = max(cur, end + 1)
            if cur <= hi:
                yield cur, hi

    def usable(self, version: int = 4) -> Iterator[Address]:
        """Usable addresses of a family in order, lazily: allocation stops at the first free one."""
        kind = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
        for first, last in self._host_ranges(version):
            for value in range(first, last + 1):
                yield kind(value)

    def usable_count(self, version: int | None = None) -> int:
        return sum(last - first + 1 for first, last in self._host_ranges(version))

    def selects(self, namespace_labels: dict[str, str], pod_labels: dict[str, str]) -> bool:
        """A pool with no selector selects nobody by default (it is used by name only)."""
        if self.namespace_labels is None and self.pod_labels is None:
            return False
        ns_ok = self.namespace_labels is None or all(namespace_labels.get(k) == v for k, v in self.namespace_labels)
        pod_ok = self.pod_labels is None or all(pod_labels.get(k) == v for k, v in self.pod_labels)
        return ns_ok and pod_ok

    @staticmethod
    def from_object(obj: dict[str, Any]) -> IPPool:
        name = (obj.get("metadata") or {}).get("name", "")
        where = f"ippool/{name}"
        spec = obj.get("spec") or {}
        try:
            cidrs = tuple(ipaddress.ip_network(c, strict=False) for c in spec.get("cidrs") or [])
        except (ValueError, TypeError) as exc:
            raise ModelError(where, "spec.cidrs", str(exc)) from None
        if not cidrs:
            raise ModelError(where, "spec.cidrs", "at least one CIDR is required")
        try:
            excludes = tuple(ipaddress.ip_network(e, strict=False) for e in spec.get("excludes") or [])
        except (ValueError, TypeError) as exc:
            raise ModelError(where, "spec.excludes", str(exc)) from None
        network = spec.get("network") or ""
        if not isinstance(network, str):
            raise ModelError(where, "spec.network", "must be namespace/name of a NetworkAttachmentDefinition")
        return IPPool(name, cidrs, excludes, _labels(spec.get("namespaceSelector"), where, "spec.namespaceSelector"),
                      _labels(spec.get("podSelector"), where, "spec.podSelector"), network)


def _labels(selector: Any, where: str, field: str) -> tuple[tuple[str, str], ...] | None:
    if selector is None:
        return None
    if not isinstance(selector, dict) or not isinstance(selector.get("matchLabels", {}), dict):
        raise ModelError(where, field, "must be {matchLabels: {key: value}}")
    return tuple(sorted((str(k), str(v)) for k, v in (selector.get("matchLabels") or {}).items()))


def parse_ips_annotation(value: str, where: str) -> list[str]:
    """'10.1.2.3', '10.1.2.3/24', 'fd00::5', '10.1.2.3,fd00::5' or a JSON list of those: at most
    one address per family (a dual-stack pod asks for both)."""
    text = value.strip()
    items: list[Any]
    if text.startswith("["):
        import json

        try:
            items = json.loads(text)
        except ValueError:
            raise ModelError(where, f"annotation {ANNOTATION_IPS}", f"{value!r} is not a JSON list") from None
    else:
        items = [p for p in text.replace(" ", "").split(",") if p]
    out: list[str] = []
    for item in items:
        try:
            addr = ipaddress.ip_interface(str(item)).ip
        except ValueError:
            raise ModelError(where, f"annotation {ANNOTATION_IPS}", f"{item!r} is not an IP address") from None
        if any(ipaddress.ip_address(o).version == addr.version for o in out):
            raise ModelError(where, f"annotation {ANNOTATION_IPS}",
                             f"two IPv{addr.version} addresses; a pod interface has one address per family")
        out.append(str(addr))
    if not out:
        raise ModelError(where, f"annotation {ANNOTATION_IPS}", f"{value!r} names no address; remove the annotation "
                                                                "or give one address per family")
    return out
