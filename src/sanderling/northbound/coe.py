"""The cluster in OpenDaylight COE's northbound model: pure functions, Kubernetes objects in, documents out.

An operator's SDN controller that speaks the COE models (pod.yang, k8s-node.yang, service.yang of
OpenDaylight COE) learns the cluster from RESTCONF documents under its config datastore:

- `pod:coe/pods/{uid}`: name, namespace (`network-NS`), the node's address (`host-ip-address`),
  the cluster (`cluster-id`), the MAC of the pod's primary interface (`port-mac-address`) and one
  `interface` per network attachment: its address, the network's id (a UUID derived from the
  network's name) and type: FLAT (the pod network, routed), VXLAN (the pod network in overlay
  mode, and `layer2` networks, with their VNI), VLAN (`vlan` networks, with their VLAN id);
- `k8s-node:k8s-nodes-info/k8s-nodes/{uid}`: host name, internal and external addresses, pod CIDR;
- `service:service-information/services/{uid}`: ClusterIP, external IPs, the LoadBalancer IP
  (spec, else the first ingress), ingress addresses, ports with target and node ports;
- `service:endpoints-info/endpoints/{uid of the Service}`: the ready addresses of all its
  EndpointSlices (address, host name, node) and their ports.

Every document is `(path, body)`, body the list's single entry as RESTCONF (draft-bierman-02, as
OpenDaylight's `/restconf/config`) takes it on PUT: `{"<list>": [entry]}`. Leaves Kubernetes has
no value for are left out, never sent empty. Pure: no I/O here (the pusher sends, the watcher
calls these on every change).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from sanderling.model.attachments import parse_nad
from sanderling.model.errors import ModelError

PODS = "pod:coe/pods"
NODES = "k8s-node:k8s-nodes-info/k8s-nodes"
SERVICES = "service:service-information/services"
ENDPOINTS = "service:endpoints-info/endpoints"
LISTS = {PODS: "pods", NODES: "k8s-nodes", SERVICES: "services", ENDPOINTS: "endpoints"}
NETWORK_STATUS = "k8s.v1.cni.cncf.io/network-status"
_NS = uuid.UUID("6d1f3c5e-5a0b-4c1e-9a57-0c0e5a6d2b11")  # Sanderling's namespace for derived UUIDs

Doc = tuple[str, dict[str, Any]]


@dataclass(frozen=True)
class ClusterInfo:
    """What the documents say about the cluster as a whole."""

    cluster_id: str
    mode: str = "routed"          # the pod network: routed (FLAT) or overlay (VXLAN)
    pod_network: str = "sanderling"
    overlay_vni: int = 0          # the pod network's VNI in overlay mode (0: not sent)


def derived_uuid(text: str) -> str:
    """A stable UUID for something Kubernetes gives no UID (a network, a pod's interface)."""
    return str(uuid.uuid5(_NS, text))


def _put(path: str, key: str, entry: dict[str, Any]) -> Doc:
    return f"{path}/{key}", {LISTS[path]: [{k: v for k, v in entry.items() if v not in (None, "", [])}]}


def network_kind(nad: dict[str, Any] | None) -> tuple[str, int]:
    """(network-type, segmentation-id) of a NetworkAttachmentDefinition: a Sanderling vlan network
    is VLAN with its access VLAN (0 for a trunk), layer2 is VXLAN with its VNI, a delegated one
    (macvlan, host-device, ...) FLAT; an unparsable one FLAT as well (the agent refuses it anyway)."""
    if nad is None:
        return "FLAT", 0
    try:
        network = parse_nad(nad)
    except (ModelError, ValueError, KeyError, TypeError):
        return "FLAT", 0
    if network.topology == "vlan":
        return "VLAN", network.vlan
    if network.topology == "layer2":
        return "VXLAN", network.vni
    return "FLAT", 0


def pod_doc(pod: dict[str, Any], nads: dict[str, dict[str, Any]], cluster: ClusterInfo) -> Doc | None:
    """The pod's document, once it has an address on a node; None for a host-network pod (its
    address is its node's) or one not placed yet. `nads`: namespace/name -> object."""
    meta, spec, status = pod["metadata"], pod.get("spec") or {}, pod.get("status") or {}
    if spec.get("hostNetwork") or not status.get("podIP") or not spec.get("nodeName"):
        return None
    uid = meta["uid"]
    statuses = _network_status(meta)
    primary = next((s for s in statuses if s.get("default")), None)
    default_type = ("VXLAN", cluster.overlay_vni) if cluster.mode == "overlay" else ("FLAT", 0)
    interfaces = []
    for ip in [a["ip"] for a in status.get("podIPs") or []] or [status["podIP"]]:
        interfaces.append({"uid": derived_uuid(f"{uid}/eth0/{ip}"), "ip-address": ip,
                           "network-id": derived_uuid(f"network/{cluster.pod_network}"),
                           "network-type": default_type[0], "segmentation-id": default_type[1]})
    for entry in statuses:
        if entry.get("default"):
            continue
        name = str(entry.get("name", ""))
        ns_name = name if "/" in name else f"{meta['namespace']}/{name}"
        kind, segment = network_kind(nads.get(ns_name))
        for ip in entry.get("ips") or []:
            interfaces.append({"uid": derived_uuid(f"{uid}/{entry.get('interface', '')}/{ip}"), "ip-address": ip,
                               "network-id": derived_uuid(f"network/{ns_name}"), "network-type": kind,
                               "segmentation-id": segment})
    return _put(PODS, uid, {
        "uid": uid, "name": meta["name"], "network-NS": meta["namespace"], "cluster-id": cluster.cluster_id,
        "host-ip-address": status.get("hostIP"), "port-mac-address": (primary or {}).get("mac"),
        "interface": interfaces})


def _network_status(meta: dict[str, Any]) -> list[dict[str, Any]]:
    text = (meta.get("annotations") or {}).get(NETWORK_STATUS)
    if not text:
        return []
    try:
        value = json.loads(text)
    except ValueError:
        return []
    return [e for e in value if isinstance(e, dict)] if isinstance(value, list) else []


def node_doc(node: dict[str, Any]) -> Doc:
    meta, spec, status = node["metadata"], node.get("spec") or {}, node.get("status") or {}
    addresses = {a.get("type"): a.get("address") for a in status.get("addresses") or []}
    return _put(NODES, meta["uid"], {
        "uid": meta["uid"], "host-name": addresses.get("Hostname") or meta["name"],
        "internal-ip-address": addresses.get("InternalIP"), "external-ip-address": addresses.get("ExternalIP"),
        "pod-cidr": spec.get("podCIDR")})


def service_doc(service: dict[str, Any]) -> Doc:
    meta, spec, status = service["metadata"], service.get("spec") or {}, service.get("status") or {}
    ingress = [i.get("ip") for i in ((status.get("loadBalancer") or {}).get("ingress") or []) if i.get("ip")]
    cluster_ip = spec.get("clusterIP")
    ports = [{"name": p.get("name"), "port": p.get("port"), "target-port": str(p.get("targetPort", p.get("port"))),
              "node-port": p.get("nodePort")} for p in spec.get("ports") or []]
    return _put(SERVICES, meta["uid"], {
        "uid": meta["uid"], "name": meta["name"], "network-NS": meta["namespace"],
        "cluster-ip-address": cluster_ip if cluster_ip and cluster_ip != "None" else None,
        "external-ip-address": list(spec.get("externalIPs") or []),
        "load-balancer-IP": spec.get("loadBalancerIP") or (ingress[0] if ingress else None),
        "ingress-ip-address": ingress,
        "service-ports": [{k: v for k, v in p.items() if v not in (None, "")} for p in ports]})


def endpoints_doc(service: dict[str, Any], slices: list[dict[str, Any]]) -> Doc:
    """The Service's endpoints: every ready address of its slices, and their ports (deduplicated)."""
    meta = service["metadata"]
    addresses: dict[str, dict[str, Any]] = {}
    ports: dict[tuple[str, int], dict[str, Any]] = {}
    for sl in slices:
        for ep in sl.get("endpoints") or []:
            if (ep.get("conditions") or {}).get("ready") is False:
                continue
            for ip in ep.get("addresses") or []:
                target = ep.get("targetRef") or {}
                addresses[ip] = {k: v for k, v in {"ip-address": ip, "host-name": ep.get("hostname") or
                                                   target.get("name"), "node-name": ep.get("nodeName")}.items() if v}
        for p in sl.get("ports") or []:
            if p.get("port") is not None:
                ports[(p.get("name") or "", p["port"])] = {k: v for k, v in {"name": p.get("name"),
                                                                             "port": p["port"]}.items() if v}
    return _put(ENDPOINTS, meta["uid"], {
        "uid": meta["uid"], "name": meta["name"], "network-NS": meta["namespace"],
        "endpoint-addresses": [addresses[k] for k in sorted(addresses)],
        "endpoint-ports": [ports[k] for k in sorted(ports)]})


def cluster_docs(objects: dict[str, dict[str, dict[str, Any]]], cluster: ClusterInfo) -> dict[str, dict[str, Any]]:
    """Everything the controller should hold: path -> body, from the caches of the watched kinds
    (`objects[kind][namespace/name]`, kinds Pod, Node, Service, EndpointSlice, NAD)."""
    nads = objects.get("NAD", {})
    slices_by_service: dict[str, list[dict[str, Any]]] = {}
    for sl in objects.get("EndpointSlice", {}).values():
        svc = ((sl.get("metadata") or {}).get("labels") or {}).get("kubernetes.io/service-name")
        if svc:
            slices_by_service.setdefault(f"{sl['metadata']['namespace']}/{svc}", []).append(sl)
    out: dict[str, dict[str, Any]] = {}
    for pod in objects.get("Pod", {}).values():
        doc = pod_doc(pod, nads, cluster)
        if doc is not None:
            out[doc[0]] = doc[1]
    for node in objects.get("Node", {}).values():
        path, body = node_doc(node)
        out[path] = body
    for key, svc in objects.get("Service", {}).items():
        path, body = service_doc(svc)
        out[path] = body
        path, body = endpoints_doc(svc, slices_by_service.get(key, []))
        out[path] = body
    return out
