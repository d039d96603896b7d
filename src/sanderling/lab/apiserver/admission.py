"""Service admission: ClusterIP, NodePort and healthCheckNodePort allocation, as the API server does.

Allocation happens when a Service is created (or gains a type that needs it) and is kept on
update: a manifest re-applied without `clusterIP` keeps the address it was given; changing an
allocated ClusterIP is refused (the field is immutable). Runs on the event loop between the
read of the existing Services and the write, so two creates cannot pick the same address.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from sanderling.lab.apiserver.store import ApiError

SERVICE_CIDR = ipaddress.IPv4Network("10.96.0.0/16")
NODE_PORTS = range(30000, 32768)
NEEDS_CLUSTER_IP = ("ClusterIP", "NodePort", "LoadBalancer")


DUAL_STACK_POLICIES = ("PreferDualStack", "RequireDualStack")


class ServiceAllocator:
    """`cidr6`: a dual-stack cluster's IPv6 Service CIDR; a Service asking for dual-stack
    (ipFamilyPolicy PreferDualStack or RequireDualStack) gets an IPv6 ClusterIP from it too.
    `cidr` None: an IPv6-only cluster, whose Services are IPv6 single-stack."""

    def __init__(self, cidr: ipaddress.IPv4Network | None = SERVICE_CIDR,
                 cidr6: ipaddress.IPv6Network | None = None) -> None:
        if cidr is None and cidr6 is None:
            raise ValueError("a Service CIDR of at least one family is needed")
        self.cidr = cidr
        self.cidr6 = cidr6

    @property
    def primary(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        """The cluster's first family's range (IPv4 unless the cluster is IPv6-only)."""
        cidr = self.cidr or self.cidr6
        assert cidr is not None
        return cidr

    def admit(self, name: str, new: dict[str, Any], current: dict[str, Any] | None,
              others: list[dict[str, Any]]) -> None:
        """Fill in and check allocations of `new` in place; `others` are every other Service."""
        spec = new.setdefault("spec", {})
        old_spec = (current or {}).get("spec") or {}
        kind = spec.get("type") or "ClusterIP"
        spec["type"] = kind
        if kind not in NEEDS_CLUSTER_IP:
            return
        taken_ips = {ip for s in others for ip in (s.get("spec") or {}).get("clusterIPs") or
                     [(s.get("spec") or {}).get("clusterIP")]}
        taken_ports = {p.get("nodePort") for s in others for p in (s.get("spec") or {}).get("ports") or []}
        taken_ports |= {(s.get("spec") or {}).get("healthCheckNodePort") for s in others}
        self._cluster_ip(name, spec, old_spec, taken_ips)
        if kind in ("NodePort", "LoadBalancer"):
            self._node_ports(name, spec, old_spec, taken_ports)
        if kind == "LoadBalancer" and spec.get("externalTrafficPolicy") == "Local":
            if not spec.get("healthCheckNodePort"):
                spec["healthCheckNodePort"] = old_spec.get("healthCheckNodePort") or self._free_port(name, taken_ports)
            taken_ports.add(spec["healthCheckNodePort"])

    def _cluster_ip(self, name: str, spec: dict[str, Any], old: dict[str, Any], taken: set[Any]) -> None:
        wanted = spec.get("clusterIP") or old.get("clusterIP") or ""
        if old.get("clusterIP") and wanted != old["clusterIP"]:
            raise ApiError(422, "Invalid", f'Service "{name}" is invalid: spec.clusterIP: Invalid value: '
                                           f'"{wanted}": field is immutable')
        if wanted == "None":
            spec["clusterIP"], spec["clusterIPs"] = "None", ["None"]
            return
        if wanted:
            if wanted != old.get("clusterIP"):
                try:
                    addr = ipaddress.ip_address(wanted)
                except ValueError:
                    raise ApiError(422, "Invalid", f'Service "{name}" is invalid: spec.clusterIP: Invalid value: '
                                                   f'"{wanted}": must be a valid IP address') from None
                if addr.version != self.primary.version or addr not in self.primary:
                    raise ApiError(422, "Invalid", f'Service "{name}" is invalid: spec.clusterIP: Invalid value: '
                                                   f'"{wanted}": provided IP is not in the valid range. The range of '
                                                   f"valid IPs is {self.primary}")
                if wanted in taken:
                    raise ApiError(422, "Invalid", f'Service "{name}" is invalid: spec.clusterIP: Invalid value: '
                                                   f'"{wanted}": provided IP is already allocated')
        else:
            wanted = self._free_ip(name, taken)
        spec["clusterIP"], spec["clusterIPs"] = wanted, [wanted]
        policy = spec.get("ipFamilyPolicy") or old.get("ipFamilyPolicy") or "SingleStack"
        spec["ipFamilyPolicy"] = policy
        if self.cidr is None:  # IPv6-only: one family to give
            if policy == "RequireDualStack":
                raise ApiError(422, "Invalid", f'Service "{name}" is invalid: spec.ipFamilyPolicy: Invalid value: '
                                               '"RequireDualStack": this cluster is IPv6-only')
            spec["ipFamilies"] = ["IPv6"]
        elif policy in DUAL_STACK_POLICIES and self.cidr6 is not None:
            had = [ip for ip in old.get("clusterIPs") or [] if ":" in ip]
            spec["clusterIPs"] = [wanted, had[0] if had else self._free_ip(name, taken, self.cidr6)]
            spec["ipFamilies"] = ["IPv4", "IPv6"]
        elif policy == "RequireDualStack":
            raise ApiError(422, "Invalid", f'Service "{name}" is invalid: spec.ipFamilyPolicy: Invalid value: '
                                           '"RequireDualStack": this cluster is not configured for dual-stack')
        else:
            spec["ipFamilies"] = ["IPv4"]

    def _free_ip(self, name: str, taken: set[Any],
                 cidr: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None) -> str:
        cidr = cidr or self.primary
        for addr in cidr.hosts():
            if addr == cidr.network_address + 1:
                continue  # the first address is kept for the `kubernetes` Service
            if str(addr) not in taken:
                return str(addr)
        raise ApiError(500, "InternalError", f'Service "{name}": no free ClusterIP in {cidr}')

    def _node_ports(self, name: str, spec: dict[str, Any], old: dict[str, Any], taken: set[Any]) -> None:
        previous = {(p.get("port"), p.get("protocol", "TCP")): p.get("nodePort") for p in old.get("ports") or []}
        for i, port in enumerate(spec.get("ports") or []):
            wanted = port.get("nodePort") or previous.get((port.get("port"), port.get("protocol", "TCP")))
            if wanted and wanted in taken and wanted not in previous.values():
                raise ApiError(422, "Invalid", f'Service "{name}" is invalid: spec.ports[{i}].nodePort: Invalid '
                                               f"value: {wanted}: provided port is already allocated")
            port["nodePort"] = wanted or self._free_port(name, taken)
            taken.add(port["nodePort"])

    @staticmethod
    def _free_port(name: str, taken: set[Any]) -> int:
        for port in NODE_PORTS:
            if port not in taken:
                return port
        raise ApiError(500, "InternalError", f'Service "{name}": no free NodePort')
