"""The lab's EndpointSlice controller: Services with a selector and the pods they select.

What kube-controller-manager does, for what Sanderling consumes: one slice per distinct set of
resolved target ports (a named targetPort resolves per pod, against its container ports and
protocol), endpoint conditions ready / serving / terminating from the pod, nodeName and
targetRef, the `kubernetes.io/service-name` label. Services without a selector are left to
whoever manages their slices; a Service with no matching pod gets one empty slice.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

SERVICE_NAME = "kubernetes.io/service-name"
MANAGED_BY = "endpointslice.kubernetes.io/managed-by"
CONTROLLER = "endpointslice-controller.lab.sanderling.io"


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _condition(pod: dict[str, Any], kind: str) -> bool:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return bool(cond.get("status") == "True")
    return False


def _resolve(target: Any, protocol: str, pod: dict[str, Any]) -> int | None:
    if isinstance(target, int):
        return target
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == target and port.get("protocol", "TCP") == protocol:
                return int(port["containerPort"])
    return None


def desired_slices(service: dict[str, Any], pods: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The slices the Service should have (per family of its ipFamilies, as the upstream
    controller: an IPv6 slice holds the pods' IPv6 addresses); None when the controller does not
    manage it."""
    spec = service.get("spec") or {}
    if not spec.get("selector") or spec.get("type") == "ExternalName":
        return None
    out: list[dict[str, Any]] = []
    for family in spec.get("ipFamilies") or ["IPv4"]:
        if family in ("IPv4", "IPv6"):
            out += _family_slices(service, pods, family)
    return out


def _pod_address(status: dict[str, Any], family: str) -> str:
    ips = [e.get("ip") or "" for e in status.get("podIPs") or []] or [status.get("podIP") or ""]
    return next((ip for ip in ips if ip and (":" in ip) == (family == "IPv6")), "")


def _family_slices(service: dict[str, Any], pods: list[dict[str, Any]], family: str) -> list[dict[str, Any]]:
    spec = service.get("spec") or {}
    selector = spec["selector"]
    meta = service["metadata"]
    groups: dict[tuple[tuple[str, int, str], ...], list[dict[str, Any]]] = {}
    address: dict[int, str] = {}
    for pod in pods:
        status = pod.get("status") or {}
        pmeta = pod["metadata"]
        pod_ip = _pod_address(status, family)
        if not pod_ip or status.get("phase") in ("Succeeded", "Failed"):
            continue
        if not selects(selector, pmeta.get("labels") or {}):
            continue
        resolved = []
        for port in spec.get("ports") or []:
            proto = port.get("protocol", "TCP")
            number = _resolve(port.get("targetPort", port.get("port")), proto, pod)
            if number is not None:
                resolved.append((port.get("name", ""), number, proto))
        terminating = bool(pmeta.get("deletionTimestamp"))
        ready = _condition(pod, "Ready")
        endpoint: dict[str, Any] = {
            "addresses": [pod_ip],
            "conditions": {"ready": ready and not terminating, "serving": ready, "terminating": terminating},
            "nodeName": (pod.get("spec") or {}).get("nodeName", ""),
            "targetRef": {"kind": "Pod", "namespace": pmeta["namespace"], "name": pmeta["name"],
                          "uid": pmeta.get("uid", "")}}
        address[id(endpoint)] = pod_ip
        groups.setdefault(tuple(resolved), []).append(endpoint)
    if not groups:
        groups[()] = []
    slices = []
    for ports, endpoints in sorted(groups.items(), key=lambda item: item[0]):
        digest = hashlib.sha256(json.dumps(ports).encode() + (b"/6" if family == "IPv6" else b"")).hexdigest()[:5]
        slice_meta: dict[str, Any] = {
            "name": f"{meta['name']}-{digest}", "namespace": meta["namespace"],
            "labels": {SERVICE_NAME: meta["name"], MANAGED_BY: CONTROLLER},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": meta["name"],
                                 "uid": meta.get("uid", ""), "controller": True}]}
        slices.append({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": slice_meta,
            "addressType": family,
            "endpoints": sorted(endpoints, key=lambda e: address[id(e)]),
            "ports": [{"name": n, "port": p, "protocol": proto} for n, p, proto in ports]})
    return slices


def same_content(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a.get(k) == b.get(k) for k in ("endpoints", "ports", "addressType")) and \
        (a["metadata"].get("labels") == b["metadata"].get("labels"))
