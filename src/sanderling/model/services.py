"""Services and their endpoints as the proxy needs them, from Service and EndpointSlice objects.

Conversion validates: a Service whose fields make no sense for the proxy raises ModelError for
that Service only. Endpoint choice follows kube-proxy: ready endpoints; when none is ready, the
serving-and-terminating ones (so connections drain instead of failing); named target ports
are resolved by the EndpointSlice controller, so slices carry numbers per port name.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sanderling.model.errors import ModelError

PROTOCOLS = ("TCP", "UDP", "SCTP")
SERVICE_NAME_LABEL = "kubernetes.io/service-name"


@dataclass(frozen=True, slots=True, order=True)
class ServicePort:
    name: str
    protocol: str
    port: int
    node_port: int = 0


@dataclass(frozen=True, slots=True)
class Endpoint:
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int
    node: str = ""
    ready: bool = True
    serving: bool = True
    terminating: bool = False


@dataclass(frozen=True, slots=True)
class Service:
    namespace: str
    name: str
    type: str
    cluster_ips: tuple[ipaddress.IPv4Address, ...]
    ports: tuple[ServicePort, ...]
    external_ips: tuple[ipaddress.IPv4Address, ...] = ()
    lb_ips: tuple[ipaddress.IPv4Address, ...] = ()
    lb_source_ranges: tuple[ipaddress.IPv4Network, ...] = ()
    external_local: bool = False
    internal_local: bool = False
    affinity_timeout: int = 0  # seconds; 0 = no session affinity
    health_check_node_port: int = 0
    cluster_ips6: tuple[ipaddress.IPv6Address, ...] = ()  # a dual-stack Service's IPv6 ClusterIP
    external_ips6: tuple[ipaddress.IPv6Address, ...] = ()  # its IPv6 externalIPs, LoadBalancer ingress
    lb_ips6: tuple[ipaddress.IPv6Address, ...] = ()  # addresses and loadBalancerSourceRanges
    lb_source_ranges6: tuple[ipaddress.IPv6Network, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def headless(self) -> bool:
        return not self.cluster_ips and not self.cluster_ips6


# a hard cap where one is the honest answer: a Service's ports compile linearly (about 0.3 s for 1,000
# ports x 10 endpoints), and one object must not hold the agent's event loop for seconds
MAX_SERVICE_PORTS = 1000


def _ip(obj: str, field: str, value: Any) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(value)
    except (ValueError, TypeError):
        raise ModelError(obj, field, f"{value!r} is not an IPv4 address") from None


def _ip6(obj: str, field: str, value: Any) -> ipaddress.IPv6Address:
    try:
        return ipaddress.IPv6Address(value)
    except (ValueError, TypeError):
        raise ModelError(obj, field, f"{value!r} is not an IP address") from None


def service_from(raw: dict[str, Any]) -> Service | None:
    """The proxy's view of a Service; None for what the proxy ignores (ExternalName)."""
    meta = raw.get("metadata") or {}
    obj = f"service/{meta.get('namespace', '')}/{meta.get('name', '')}"
    spec = raw.get("spec") or {}
    kind = spec.get("type") or "ClusterIP"
    if kind == "ExternalName":
        return None
    cluster_ips: list[ipaddress.IPv4Address] = []
    cluster_ips6: list[ipaddress.IPv6Address] = []
    for ip in spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else []):
        if ip and ip != "None" and ":" not in ip:
            cluster_ips.append(_ip(obj, "spec.clusterIPs", ip))
        elif ip and ip != "None":
            cluster_ips6.append(_ip6(obj, "spec.clusterIPs", ip))
    ports = []
    listed = spec.get("ports") or []
    if isinstance(listed, list) and len(listed) > MAX_SERVICE_PORTS:
        raise ModelError(obj, "spec.ports", f"{len(listed)} ports; Sanderling programs at most {MAX_SERVICE_PORTS} "
                                            "per Service (every port is flows and a group on every node): split it")
    for i, p in enumerate(listed):
        proto = p.get("protocol") or "TCP"
        if proto not in PROTOCOLS:
            raise ModelError(obj, f"spec.ports[{i}].protocol", f"{proto!r} is not TCP, UDP or SCTP")
        port = p.get("port")
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ModelError(obj, f"spec.ports[{i}].port", f"{port!r} is not a port number")
        ports.append(ServicePort(p.get("name") or "", proto, port, int(p.get("nodePort") or 0)
                                 if kind in ("NodePort", "LoadBalancer") else 0))
    lb_ips = []
    lb_ips6 = []
    for ing in ((raw.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []:
        if ing.get("ip") and ing.get("ipMode", "VIP") == "VIP" and ":" not in ing["ip"]:
            lb_ips.append(_ip(obj, "status.loadBalancer.ingress", ing["ip"]))
        elif ing.get("ip") and ing.get("ipMode", "VIP") == "VIP":
            lb_ips6.append(_ip6(obj, "status.loadBalancer.ingress", ing["ip"]))
    ranges: list[ipaddress.IPv4Network] = []
    ranges6: list[ipaddress.IPv6Network] = []
    for r in spec.get("loadBalancerSourceRanges") or []:
        try:
            net = ipaddress.ip_network(str(r).strip(), strict=False)
        except ValueError:
            raise ModelError(obj, "spec.loadBalancerSourceRanges", f"{r!r} is not a CIDR") from None
        if isinstance(net, ipaddress.IPv4Network):
            ranges.append(net)
        else:
            ranges6.append(net)
    timeout = 0
    if spec.get("sessionAffinity") == "ClientIP":
        timeout = int(((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {}).get("timeoutSeconds")
                      or 10800)
    return Service(
        meta.get("namespace", ""), meta.get("name", ""), kind, tuple(cluster_ips), tuple(ports),
        tuple(_ip(obj, "spec.externalIPs", ip) for ip in spec.get("externalIPs") or [] if ":" not in ip),
        tuple(lb_ips) if kind == "LoadBalancer" else (), tuple(ranges) if kind == "LoadBalancer" else (),
        spec.get("externalTrafficPolicy") == "Local" and kind in ("NodePort", "LoadBalancer")
        or (spec.get("externalTrafficPolicy") == "Local" and bool(spec.get("externalIPs"))),
        spec.get("internalTrafficPolicy") == "Local", timeout, int(spec.get("healthCheckNodePort") or 0),
        tuple(cluster_ips6),
        tuple(_ip6(obj, "spec.externalIPs", ip) for ip in spec.get("externalIPs") or [] if ":" in ip),
        tuple(lb_ips6) if kind == "LoadBalancer" else (), tuple(ranges6) if kind == "LoadBalancer" else ())


def endpoints_from(slices: Iterable[dict[str, Any]], port: ServicePort) -> tuple[Endpoint, ...]:
    """Every IPv4 endpoint of the slices for one service port (matched by name and protocol)."""
    return endpoints_by_port(slices, (port,))[port]


def endpoints_by_port(slices: Iterable[dict[str, Any]], ports: Iterable[ServicePort], family: int = 4
                      ) -> dict[ServicePort, tuple[Endpoint, ...]]:
    """endpoints_from for every port of a Service at once (the endpoints of slices of `family`'s
    addressType): each slice's ports are indexed and its endpoints parsed once, so a Service with
    thousands of ports costs ports x endpoints, not ports x (slice ports + endpoints)."""
    wanted = tuple(ports)
    out: dict[ServicePort, set[Endpoint]] = {p: set() for p in wanted}
    parse = _parse_ipv4 if family == 4 else _parse_ipv6
    for sl in slices:
        if sl.get("addressType", "IPv4") != f"IPv{family}":
            continue
        numbers: dict[tuple[str, str], Any] = {}
        for sp in sl.get("ports") or []:  # the last of a (name, protocol) wins, as before
            numbers[(sp.get("name") or "", sp.get("protocol") or "TCP")] = sp.get("port")
        parsed = []
        for ep in sl.get("endpoints") or []:
            cond = ep.get("conditions") or {}
            ready = cond.get("ready") is not False  # unset means ready
            serving = cond.get("serving") if cond.get("serving") is not None else ready
            for addr in (ep.get("addresses") or [])[:1]:
                ip = parse(addr)
                if ip is not None:
                    parsed.append((ip, ep.get("nodeName") or "", ready, bool(serving), bool(cond.get("terminating"))))
        for port in wanted:
            number = numbers.get((port.name, port.protocol))
            if isinstance(number, int) and not isinstance(number, bool):
                out[port].update(Endpoint(ip, number, node, ready, serving, terminating)
                                 for ip, node, ready, serving, terminating in parsed)
    return {p: tuple(sorted(eps, key=lambda e: (int(e.ip), e.port, e.node))) for p, eps in out.items()}


def _parse_ipv4(text: Any) -> ipaddress.IPv4Address | None:
    """Strict dotted-quad parsing, much faster than IPv4Address(str) (slices carry 100k+ of them)."""
    if not isinstance(text, str) or text.count(".") != 3:
        return None
    try:
        packed = socket.inet_pton(socket.AF_INET, text)
    except OSError:
        return None
    return ipaddress.IPv4Address(int.from_bytes(packed, "big"))


def _parse_ipv6(text: Any) -> ipaddress.IPv6Address | None:
    """As _parse_ipv4: the C parser, then an address from the number (IPv6Address(str) parses in
    Python, hextet by hextet: a third of a 100k-endpoint compile)."""
    if not isinstance(text, str) or ":" not in text or "%" in text:
        return None
    try:
        packed = socket.inet_pton(socket.AF_INET6, text)
    except OSError:
        return None
    return ipaddress.IPv6Address(int.from_bytes(packed, "big"))


def usable(endpoints: Iterable[Endpoint]) -> tuple[Endpoint, ...]:
    """Ready endpoints; if none, serving and terminating ones (kube-proxy's fallback)."""
    eps = tuple(endpoints)
    ready = tuple(e for e in eps if e.ready)
    return ready or tuple(e for e in eps if e.serving and e.terminating)
