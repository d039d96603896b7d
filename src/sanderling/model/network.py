"""The node's pod network and the local pod ports attached to br-int."""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass

from sanderling.model.errors import ModelError

_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def mac_for_ip(ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """A pod's MAC from its address, as Kubernetes CNIs make it: 0a:58 + the four address bytes
    (an IPv6-only pod: its last four), stable across restarts of the same pod address. The one
    place it is built."""
    return "0a:58:" + ":".join(f"{b:02x}" for b in ipaddress.ip_address(ip).packed[-4:])


def stable_mac(container_id: str, ifname: str) -> str:
    """A locally administered unicast MAC for an interface without addresses (0a:59 + a hash of
    the attachment), stable for the life of the container."""
    digest = hashlib.blake2b(f"{container_id}/{ifname}".encode(), digest_size=4).digest()
    return "0a:59:" + ":".join(f"{b:02x}" for b in digest)


def parse_mac(obj: str, field: str, value: str) -> str:
    mac = value.strip().lower()
    if not _MAC.match(mac):
        raise ModelError(obj, field, f"{value!r} is not a MAC address (want aa:bb:cc:dd:ee:ff)")
    if int(mac[:2], 16) & 1:
        raise ModelError(obj, field, f"{value!r} is a multicast MAC; a port needs a unicast one")
    return mac


def link_local(mac: str) -> ipaddress.IPv6Address:
    """The EUI-64 link-local address Linux gives an interface with this MAC (fe80::, the MAC with
    its universal/local bit flipped and ff:fe in the middle)."""
    raw = bytearray(bytes.fromhex(mac.replace(":", "")))
    raw[0] ^= 0x02
    return ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + bytes(raw[:3]) + b"\xff\xfe" + bytes(raw[3:]))


def split_cidrs(text: str) -> tuple[str, str]:
    """'10.244.1.0/24,fd00:10:244:1::/64' (either order, either alone) -> (IPv4 CIDR, IPv6 CIDR);
    the form of a Node's spec.podCIDRs joined by commas, and of the agent's --pod-cidr."""
    v4 = v6 = ""
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if ":" in part:
            if v6:
                raise ValueError(f"{text!r} names two IPv6 CIDRs; a node has one pod subnet per family")
            v6 = part
        else:
            if v4:
                raise ValueError(f"{text!r} names two IPv4 CIDRs; a node has one pod subnet per family")
            v4 = part
    return v4, v6


@dataclass(frozen=True, slots=True)
class NodeNetwork:
    """This node's pod subnet per family and its gateway in each (the address pods route
    through; the same gateway MAC answers for both). IPv4-only, dual-stack or IPv6-only: at least
    one family is present."""

    name: str
    pod_cidr: ipaddress.IPv4Network | None
    gateway_ip: ipaddress.IPv4Address | None
    gateway_mac: str
    pod_cidr6: ipaddress.IPv6Network | None = None
    gateway_ip6: ipaddress.IPv6Address | None = None

    @property
    def pod_cidrs(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(c for c in (self.pod_cidr, self.pod_cidr6) if c is not None)

    @property
    def families(self) -> str:
        """'ipv4', 'ipv6' or 'dual': for logs and the node's status."""
        return {(True, False): "ipv4", (False, True): "ipv6"}.get(
            (self.pod_cidr is not None, self.pod_cidr6 is not None), "dual")

    @property
    def first_cidr(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        """The subnet a node's primary pool allocates from: IPv4 unless the node is IPv6-only."""
        return self.pod_cidrs[0]

    @staticmethod
    def build(name: str, pod_cidr: str, gateway_mac: str = "0a:58:0a:f4:00:01",
              gateway_ip: str | None = None) -> NodeNetwork:
        """`pod_cidr`: the IPv4 subnet, the IPv6 one, or both joined by a comma (dual-stack)."""
        obj = f"node/{name}"
        try:
            text4, text6 = split_cidrs(pod_cidr)
            if not text4 and not text6:
                raise ValueError(f"{pod_cidr!r} names no pod CIDR")
            cidr = ipaddress.IPv4Network(text4, strict=True) if text4 else None
            cidr6 = ipaddress.IPv6Network(text6, strict=True) if text6 else None
        except ValueError as exc:
            raise ModelError(obj, "podCIDR", str(exc)) from None
        if cidr is not None and cidr.num_addresses < 4:
            raise ModelError(obj, "podCIDR", f"{pod_cidr} is too small for a gateway and pods")
        if cidr6 is not None and cidr6.prefixlen > 120:
            raise ModelError(obj, "podCIDRs", f"{cidr6} is too small for a gateway and pods (at most /120)")
        gw = None
        if cidr is not None:
            gw = ipaddress.IPv4Address(gateway_ip) if gateway_ip else cidr.network_address + 1
            if gw not in cidr:
                raise ModelError(obj, "gateway", f"{gw} is outside {cidr}")
        gw6 = cidr6.network_address + 1 if cidr6 is not None else None
        return NodeNetwork(name, cidr, gw, parse_mac(obj, "gatewayMAC", gateway_mac), cidr6, gw6)

    def check_pod(self, pod: PodPort) -> None:
        """A pod may not take the gateway's, the subnet's or the broadcast address; each of its
        addresses must be of a family this node has pods in."""
        obj = f"pod/{pod.namespace}/{pod.name}"
        if pod.ip is not None:
            if self.pod_cidr is None:
                raise ModelError(obj, "ip", f"{pod.ip} is IPv4 but node {self.name} has no IPv4 pod subnet")
            if pod.ip == self.gateway_ip:
                raise ModelError(obj, "ip", f"{pod.ip} is the gateway address of node {self.name}")
            if pod.ip in (self.pod_cidr.network_address, self.pod_cidr.broadcast_address):
                raise ModelError(obj, "ip", f"{pod.ip} is the network or broadcast address of {self.pod_cidr}")
        if pod.mac == self.gateway_mac:
            raise ModelError(obj, "mac", f"{pod.mac} is the gateway MAC of node {self.name}")
        if pod.ip6 is not None:
            if self.pod_cidr6 is None:
                raise ModelError(obj, "ip", f"{pod.ip6} is IPv6 but node {self.name} has no IPv6 pod subnet")
            if pod.ip6 in (self.gateway_ip6, self.pod_cidr6.network_address):
                raise ModelError(obj, "ip", f"{pod.ip6} is the gateway or subnet address of {self.pod_cidr6}")


@dataclass(frozen=True, slots=True)
class PodPort:
    """A pod interface plugged into br-int."""

    namespace: str
    name: str
    ofport: int
    mac: str
    ip: ipaddress.IPv4Address | None  # None: an IPv6-only pod
    interface: str = "eth0"
    ip6: ipaddress.IPv6Address | None = None  # dual-stack or IPv6-only: the pod's IPv6 address

    @property
    def key(self) -> str:
        return f"pod/{self.namespace}/{self.name}/{self.interface}"

    @property
    def ips(self) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
        return tuple(a for a in (self.ip, self.ip6) if a is not None)

    @staticmethod
    def build(namespace: str, name: str, ofport: int, mac: str, ip: str, interface: str = "eth0") -> PodPort:
        """`ip`: the pod's IPv4 address, its IPv6 address, or both joined by a comma (the form of
        the port's external_ids)."""
        obj = f"pod/{namespace}/{name}"
        if not namespace or not name:
            raise ModelError(obj, "metadata", "namespace and name are required")
        if not isinstance(ofport, int) or not 1 <= ofport < 0xFF00:
            raise ModelError(obj, "ofport", f"{ofport!r} is not a usable OpenFlow port number")
        try:
            text4, text6 = split_cidrs(ip)
            if not text4 and not text6:
                raise ValueError("no address")
            addr = ipaddress.IPv4Address(text4.split("/")[0]) if text4 else None
        except ValueError:
            raise ModelError(obj, "ip", f"{ip!r} is not an IPv4 address, an IPv6 one or one of each") from None
        try:
            addr6 = ipaddress.IPv6Address(text6.split("/")[0]) if text6 else None
        except ValueError:
            raise ModelError(obj, "ip", f"{text6!r} is not an IPv6 address") from None
        if addr6 is not None and (addr6.is_link_local or addr6.is_multicast or addr6.is_unspecified):
            raise ModelError(obj, "ip", f"{addr6} is not a unicast global or unique-local IPv6 address")
        return PodPort(namespace, name, ofport, parse_mac(obj, "mac", mac), addr, interface, addr6)
