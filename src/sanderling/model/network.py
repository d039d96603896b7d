"""The node's pod network and the local pod ports attached to br-int."""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass

from sanderling.model.errors import ModelError

_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def mac_for_ip(ip: str | ipaddress.IPv4Address) -> str:
    """A pod's MAC from its IPv4 address, as Kubernetes CNIs make it: 0a:58 + the four address
    bytes (stable across restarts of the same pod address). The one place it is built."""
    return "0a:58:" + ":".join(f"{b:02x}" for b in ipaddress.IPv4Address(ip).packed)


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


@dataclass(frozen=True, slots=True)
class NodeNetwork:
    """This node's pod subnet and its gateway (the address pods route through)."""

    name: str
    pod_cidr: ipaddress.IPv4Network
    gateway_ip: ipaddress.IPv4Address
    gateway_mac: str

    @staticmethod
    def build(name: str, pod_cidr: str, gateway_mac: str = "0a:58:0a:f4:00:01",
              gateway_ip: str | None = None) -> NodeNetwork:
        obj = f"node/{name}"
        try:
            cidr = ipaddress.IPv4Network(pod_cidr, strict=True)
        except ValueError as exc:
            raise ModelError(obj, "podCIDR", str(exc)) from None
        if cidr.num_addresses < 4:
            raise ModelError(obj, "podCIDR", f"{pod_cidr} is too small for a gateway and pods")
        gw = ipaddress.IPv4Address(gateway_ip) if gateway_ip else cidr.network_address + 1
        if gw not in cidr:
            raise ModelError(obj, "gateway", f"{gw} is outside {cidr}")
        return NodeNetwork(name, cidr, gw, parse_mac(obj, "gatewayMAC", gateway_mac))

    def check_pod(self, pod: PodPort) -> None:
        """A pod may not take the gateway's, the subnet's or the broadcast address."""
        obj = f"pod/{pod.namespace}/{pod.name}"
        if pod.ip == self.gateway_ip:
            raise ModelError(obj, "ip", f"{pod.ip} is the gateway address of node {self.name}")
        if pod.ip in (self.pod_cidr.network_address, self.pod_cidr.broadcast_address):
            raise ModelError(obj, "ip", f"{pod.ip} is the network or broadcast address of {self.pod_cidr}")
        if pod.mac == self.gateway_mac:
            raise ModelError(obj, "mac", f"{pod.mac} is the gateway MAC of node {self.name}")


@dataclass(frozen=True, slots=True)
class PodPort:
    """A pod interface plugged into br-int."""

    namespace: str
    name: str
    ofport: int
    mac: str
    ip: ipaddress.IPv4Address
    interface: str = "eth0"

    @property
    def key(self) -> str:
        return f"pod/{self.namespace}/{self.name}/{self.interface}"

    @staticmethod
    def build(namespace: str, name: str, ofport: int, mac: str, ip: str, interface: str = "eth0") -> PodPort:
        obj = f"pod/{namespace}/{name}"
        if not namespace or not name:
            raise ModelError(obj, "metadata", "namespace and name are required")
        if not isinstance(ofport, int) or not 1 <= ofport < 0xFF00:
            raise ModelError(obj, "ofport", f"{ofport!r} is not a usable OpenFlow port number")
        try:
            addr = ipaddress.IPv4Address(ip.split("/")[0])
        except ValueError:
            raise ModelError(obj, "ip", f"{ip!r} is not an IPv4 address") from None
        return PodPort(namespace, name, ofport, parse_mac(obj, "mac", mac), addr, interface)
