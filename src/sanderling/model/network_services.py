"""Services on a secondary network: `k8s.v1.cni.cncf.io/service-network` on a Service.

A Service annotated `k8s.v1.cni.cncf.io/service-network: ns/net` (a bare name is in the Service's
namespace) is balanced over the addresses its selected pods have *on that network* (their
network-status), at a virtual IP of the network's subnet given in `service.sanderling.io/network-ip`
or, without it, allocated from the network's IPPool (and then written there, with
`service.sanderling.io/network-ip-pool` naming the pool it must go back to).
Its ports (TCP, UDP; targetPort a number or a container port's name), sessionAffinity ClientIP
and its timeout are read as on the pod network. Pure: parsing and validation only.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any

from sanderling.model.attachments import ANNOTATION_STATUS
from sanderling.model.errors import ModelError
from sanderling.model.policy import Selector, label_selector

SERVICE_NETWORK = "k8s.v1.cni.cncf.io/service-network"
NETWORK_IP = "service.sanderling.io/network-ip"
NETWORK_IP_POOL = "service.sanderling.io/network-ip-pool"  # set when Sanderling allocated the virtual IP
MANAGED_BY = "endpointslice.kubernetes.io/managed-by"
MANAGER = "sanderling.io"
DEFAULT_AFFINITY_S = 10800
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


@dataclass(frozen=True, slots=True)
class NetPort:
    name: str
    protocol: str  # TCP or UDP
    port: int
    target: int | str


@dataclass(frozen=True, slots=True)
class NetService:
    namespace: str
    name: str
    network: str  # namespace/name of the NAD
    vip: ipaddress.IPv4Address | None  # None: to be allocated from the network's pool
    ports: tuple[NetPort, ...]
    selector: Selector
    affinity_timeout: int = 0  # seconds; 0: no session affinity
    vip_pool: str = ""  # the IPPool the virtual IP was allocated from ("": given by the user)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def vip_mac(self) -> str:
        """The virtual IP's MAC, the same on every node (ARP answers name it)."""
        assert self.vip is not None
        return "0a:5a:" + ":".join(f"{b:02x}" for b in self.vip.packed)


@dataclass(frozen=True, slots=True)
class NetEndpoint:
    """A selected pod's interface on the network."""

    pod: str  # namespace/name
    ip: ipaddress.IPv4Address
    mac: str
    node: str
    targets: tuple[tuple[str, int], ...]  # service port name -> the pod's port for it
    ready: bool = True

    def target(self, port: NetPort) -> int | None:
        return dict(self.targets).get(port.name)


def service_network(raw: dict[str, Any]) -> str | None:
    """The network a Service is on (`namespace/name`), or None for an ordinary Service."""
    meta = raw.get("metadata") or {}
    value = (meta.get("annotations") or {}).get(SERVICE_NETWORK)
    if value is None:
        return None
    where = f"service/{meta.get('namespace', '')}/{meta.get('name', '')}"
    parts = str(value).strip().split("/")
    if len(parts) == 1:
        parts = [meta.get("namespace", ""), *parts]
    if len(parts) != 2 or not all(_NAME.match(p) for p in parts):
        raise ModelError(where, f"annotation {SERVICE_NETWORK}", f"{value!r} is not a NAD name (name or "
                                                                 "namespace/name)")
    return "/".join(parts)


def net_service_from(raw: dict[str, Any]) -> NetService:
    meta, spec = raw.get("metadata") or {}, raw.get("spec") or {}
    where = f"service/{meta.get('namespace', '')}/{meta.get('name', '')}"
    network = service_network(raw)
    if network is None:
        raise ModelError(where, f"annotation {SERVICE_NETWORK}", "missing")
    text = (meta.get("annotations") or {}).get(NETWORK_IP)
    vip = None
    if text is not None:
        try:
            vip = ipaddress.IPv4Address(str(text))
        except ValueError:
            raise ModelError(where, f"annotation {NETWORK_IP}", f"{text!r}: give the Service's virtual IPv4 address "
                                                                f"on {network} (an unused address of its subnet), or "
                                                                "remove the annotation to have one allocated") from None
    if not spec.get("selector"):
        raise ModelError(where, "spec.selector", f"a Service on {network} balances over the pods it selects: give "
                                                 "a selector")
    ports = []
    for i, p in enumerate(spec.get("ports") or []):
        proto = p.get("protocol") or "TCP"
        if proto not in ("TCP", "UDP"):
            raise ModelError(where, f"spec.ports[{i}].protocol", f"{proto!r}: TCP or UDP on a secondary network")
        port = p.get("port")
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ModelError(where, f"spec.ports[{i}].port", f"{port!r} is not a port number")
        target = p.get("targetPort", port)
        if not (isinstance(target, str) and target) and not (isinstance(target, int) and 1 <= target <= 65535):
            raise ModelError(where, f"spec.ports[{i}].targetPort", f"{target!r} is neither a port number nor a name")
        if isinstance(target, str) and target.isdigit():
            target = int(target)
        ports.append(NetPort(str(p.get("name") or ""), proto, port, target))
    if not ports:
        raise ModelError(where, "spec.ports", "no port")
    affinity = 0
    if spec.get("sessionAffinity") == "ClientIP":
        cfg = ((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {})
        affinity = int(cfg.get("timeoutSeconds") or DEFAULT_AFFINITY_S)
    selector = label_selector(where, "spec.selector", {"matchLabels": spec["selector"]})
    return NetService(meta.get("namespace", ""), meta.get("name", ""), network, vip, tuple(ports), selector, affinity,
                      str((meta.get("annotations") or {}).get(NETWORK_IP_POOL) or ""))


def endpoint_of(svc: NetService, pod: dict[str, Any]) -> NetEndpoint | None:
    """The pod as an endpoint of `svc`: selected, with an address on its network; else None."""
    meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
    if meta.get("namespace") != svc.namespace or not svc.selector.matches(meta.get("labels") or {}):
        return None
    if meta.get("deletionTimestamp") or status.get("phase") in ("Succeeded", "Failed"):
        return None
    try:
        entries = json.loads((meta.get("annotations") or {}).get(ANNOTATION_STATUS) or "[]")
    except ValueError:
        return None
    entry = next((e for e in entries if isinstance(e, dict) and e.get("name") == svc.network), None)
    if entry is None:
        return None
    ip = next((i for i in entry.get("ips") or [] if isinstance(i, str) and "." in i), None)
    if ip is None or not entry.get("mac"):
        return None
    named = {(p.get("name"), p.get("protocol") or "TCP"): p.get("containerPort")
             for c in spec.get("containers") or [] for p in c.get("ports") or []}
    targets = []
    for port in svc.ports:
        number = port.target if isinstance(port.target, int) else named.get((port.target, port.protocol))
        if isinstance(number, int):
            targets.append((port.name, number))
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    ready = status.get("phase") == "Running" and conditions.get("Ready", "True") == "True"
    return NetEndpoint(f"{svc.namespace}/{meta.get('name', '')}", ipaddress.IPv4Address(ip.split("/")[0]),
                       str(entry["mac"]).lower(), spec.get("nodeName") or "", tuple(targets), ready)
