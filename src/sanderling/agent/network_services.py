"""Services on secondary networks: the Services annotated `k8s.v1.cni.cncf.io/service-network`.

Fed by the Service, Pod and NAD informers and the node list, for each such Service on a network
this node carries it:
- compiles its flows and groups for the network's bridge (`compiler.network_services`), with the
  endpoints from the selected pods' network-status (ready pods; their MAC is what the entry node
  forwards to), and hands them to the node's SecondaryBridges (one object per Service);
- writes the EndpointSlice of its own node's endpoints (`<service>-<node>`, labelled
  `endpointslice.kubernetes.io/managed-by: sanderling.io`, the network in the annotation
  `k8s.v1.cni.cncf.io/service-network`): one writer per slice, so agents never race;
- without a virtual IP in its annotation, asks for one from the network's IPPool (`allocate_vip`:
  every agent asks, the pool's compare-and-swap hands the same address to all; it is written into
  the annotation, which brings the Service back here) and gives it back when the Service goes;
- says what is wrong with a Service (a bad virtual IP, a network that does not exist or is not a
  Sanderling vlan/layer2 one, ...) as an Event on it, and leaves the others alone.

The node announcing a Service's virtual IP to the VLAN (ARP from the uplink) is one of the nodes,
the same for every agent (`announcer`), so the fabric learns its MAC in one place.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from typing import Any, Protocol

from sanderling.agent.object_errors import ObjectErrors
from sanderling.compiler import network_services as compiler
from sanderling.model.attachments import Network
from sanderling.model.errors import ModelError
from sanderling.model.network_services import (
    MANAGED_BY,
    MANAGER,
    SERVICE_NETWORK,
    NetEndpoint,
    NetService,
    endpoint_of,
    net_service_from,
    service_network,
)

log = logging.getLogger(__name__)


class Bridges(Protocol):
    """What this module needs from the node's secondary bridges."""

    def bridge_for(self, network: Network) -> str: ...

    def network_id(self, network: str) -> int: ...

    def group_id(self, bridge: str, key: str) -> int: ...

    def set_policy(self, bridge: str, network: str, key: str, flows: Any, groups: Any = ()) -> bool: ...


def announcer(service: str, nodes: list[str]) -> str:
    """The node that answers ARP from the VLAN for the Service's virtual IP."""
    ordered = sorted(nodes)
    return ordered[zlib.crc32(service.encode()) % len(ordered)] if ordered else ""


def slice_name(service: str, node: str) -> str:
    return f"{service}-{node}"[:253]


def endpoint_slice(svc: NetService, node: str, endpoints: list[NetEndpoint]) -> dict[str, Any]:
    """The EndpointSlice of `node`'s endpoints of `svc` (addresses on its network)."""
    ports = [{"name": p.name, "protocol": p.protocol,
              "port": next((e.target(p) for e in endpoints if e.target(p) is not None),
                           p.target if isinstance(p.target, int) else p.port)} for p in svc.ports]
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": slice_name(svc.name, node), "namespace": svc.namespace,
                         "labels": {"kubernetes.io/service-name": svc.name, MANAGED_BY: MANAGER},
                         "annotations": {SERVICE_NETWORK: svc.network}},
            "addressType": "IPv4", "ports": ports,
            "endpoints": [{"addresses": [str(e.ip)], "nodeName": e.node, "conditions": {"ready": e.ready},
                           "targetRef": {"kind": "Pod", "namespace": svc.namespace,
                                         "name": e.pod.split("/", 1)[1]}} for e in endpoints]}


class NetworkServices:
    def __init__(self, node_name: str, changed: Callable[[], None],
                 write_slice: Callable[[str, str, dict[str, Any] | None], None] | None = None,
                 report: Callable[[str, str, str], None] | None = None,
                 allocate_vip: Callable[[NetService], None] | None = None,
                 release_vip: Callable[[NetService], None] | None = None) -> None:
        self.node_name = node_name
        self.allocate_vip = allocate_vip  # off the loop; set once the cluster IPAM exists
        self.release_vip = release_vip
        self._asked: set[str] = set()  # services whose virtual IP was asked for
        self.changed = changed  # the bridges have flows to install
        self.write_slice = write_slice  # (namespace, name, slice or None to delete), off the loop
        self._errors = ObjectErrors(report)
        self.bridges: Bridges | None = None
        self.raw_services: dict[str, dict[str, Any]] = {}
        self.services: dict[str, NetService] = {}
        self.pods: dict[str, dict[str, Any]] = {}
        self.networks: dict[str, Network | None] = {}
        self.nodes: list[str] = [node_name]
        self._installed: dict[str, tuple[str, str]] = {}  # service -> (bridge, network) its flows are on
        self._slices: dict[str, dict[str, Any]] = {}  # service -> the slice written for this node
        self._zones: set[tuple[str, str]] = set()  # (bridge, network) with the service-zone flow

    def attach(self, bridges: Bridges) -> None:
        self.bridges = bridges
        self._sync_all()

    # ---- inputs ----------------------------------------------------------------------------

    def service_changed(self, key: str, obj: dict[str, Any] | None) -> None:
        network = _network_of(obj) if obj is not None else None
        if network is None and key not in self.raw_services:
            return  # an ordinary Service: not ours
        if obj is None or network is None:
            gone = self.services.get(key)
            if gone is not None and gone.vip_pool and self.release_vip is not None:
                self.release_vip(gone)  # allocated by Sanderling: back to its pool
            self._asked.discard(key)
            self.raw_services.pop(key, None)
        else:
            self.raw_services[key] = obj
        self._sync(key)

    def pod_changed(self, key: str, obj: dict[str, Any] | None) -> None:
        if obj is None:
            before = self.pods.pop(key, None)
        else:
            before, self.pods[key] = self.pods.get(key), obj
        namespace = key.split("/", 1)[0]
        for svc_key, svc in list(self.services.items()):
            if svc.namespace == namespace and (_selected(svc, before) or _selected(svc, obj)):
                self._sync(svc_key)

    def nad_changed(self, key: str, obj: dict[str, Any] | None) -> None:
        from sanderling.model.attachments import parse_nad

        try:
            self.networks[key] = parse_nad(obj) if obj is not None else None
        except ModelError:
            self.networks[key] = None
        if obj is None:
            self.networks.pop(key, None)
        for svc_key in [k for k, raw in self.raw_services.items() if _network_of(raw) == key]:
            self._sync(svc_key)

    def nodes_changed(self, nodes: list[str]) -> None:
        nodes = sorted(set(nodes) | {self.node_name})
        if nodes != self.nodes:
            self.nodes = nodes
            self._sync_all()

    # ---- compile ---------------------------------------------------------------------------

    def _sync_all(self) -> None:
        for key in sorted(set(self.raw_services) | set(self._installed)):
            self._sync(key)

    def _sync(self, key: str) -> None:
        raw = self.raw_services.get(key)
        svc = self._errors.convert(key, raw, net_service_from) if raw is not None else None
        problem = self._unusable(svc) if svc is not None else ""
        if svc is not None and problem:
            self._errors.warn(key, f"service/{key}: not balanced on {svc.network}: {problem}")
            svc = None
        elif svc is not None:
            self._errors.warn(key, None)
        if svc is None:
            self.services.pop(key, None)
            self._remove(key)
            return
        self.services[key] = svc
        if svc.vip is None:
            self._remove(key)
            if self.allocate_vip is not None and key not in self._asked:
                self._asked.add(key)
                self.allocate_vip(svc)
            return
        if self.bridges is None:
            return
        network = self.networks[svc.network]
        assert network is not None
        try:
            bridge = self.bridges.bridge_for(network)
        except Exception:  # this node does not carry the network: nothing to install here
            self._remove(key)
            return
        endpoints = [e for pod in self.pods.values() if (e := endpoint_of(svc, pod)) is not None]
        nid = self.bridges.network_id(svc.network)
        flows, groups = compiler.service_flows(
            svc, endpoints, self.node_name, announcer(key, self.nodes) == self.node_name, nid,
            lambda port_key: self.bridges.group_id(bridge, port_key) if self.bridges else 0)
        previous = self._installed.get(key)
        if previous is not None and previous != (bridge, svc.network):
            self.bridges.set_policy(*previous, f"service/{key}", ())
        changed = self.bridges.set_policy(bridge, svc.network, f"service/{key}", flows, groups)
        self._installed[key] = (bridge, svc.network)
        if (bridge, svc.network) not in self._zones:
            self._zones.add((bridge, svc.network))
            changed = self.bridges.set_policy(bridge, svc.network, "service-zone", compiler.network_flows(nid)) \
                or changed
        if changed:
            self.changed()
        self._write_slice(key, svc, [e for e in endpoints if e.node == self.node_name])

    def _unusable(self, svc: NetService) -> str:
        if svc.network not in self.networks:
            return "no such NetworkAttachmentDefinition"
        network = self.networks[svc.network]
        if network is None:
            return "its NetworkAttachmentDefinition is invalid"
        if not network.sanderling or network.trunk:
            return "only Sanderling vlan (access) and layer2 networks carry Services"
        if svc.vip is None and network.subnet is None:
            return ("no virtual IP: give one in service.sanderling.io/network-ip (the network has no subnet to "
                    "allocate it from)")
        if network.subnet is not None and svc.vip is not None and svc.vip not in network.subnet:
            return f"virtual IP {svc.vip} is outside the network's subnet {network.subnet}"
        return ""

    def _remove(self, key: str) -> None:
        where = self._installed.pop(key, None)
        if where is not None and self.bridges is not None:
            if self.bridges.set_policy(*where, f"service/{key}", ()):
                self.changed()
        if key in self._slices:
            namespace, name = key.split("/", 1)
            del self._slices[key]
            if self.write_slice is not None:
                self.write_slice(namespace, slice_name(name, self.node_name), None)

    def _write_slice(self, key: str, svc: NetService, local: list[NetEndpoint]) -> None:
        if self.write_slice is None:
            return
        wanted = endpoint_slice(svc, self.node_name, sorted(local, key=lambda e: int(e.ip)))
        if self._slices.get(key) == wanted:
            return
        self._slices[key] = wanted
        self.write_slice(svc.namespace, wanted["metadata"]["name"], wanted)


def _network_of(raw: dict[str, Any]) -> str | None:
    try:
        return service_network(raw)
    except ModelError:
        return "?"  # malformed: kept, so the conversion reports it


def _selected(svc: NetService, pod: dict[str, Any] | None) -> bool:
    if pod is None:
        return False
    meta = pod.get("metadata") or {}
    return bool(svc.selector.matches(meta.get("labels") or {}))
