"""MultiNetworkPolicy (k8s.cni.cncf.io v1beta1/v1beta2): NetworkPolicy's spec, per secondary network.

A MultiNetworkPolicy applies only to the networks its `k8s.v1.cni.cncf.io/policy-for` annotation
names (a comma list of `name` or `namespace/name`; a bare name is in the policy's namespace); one
without the annotation applies to nothing. On a network, a pod is its interface there: policy
selects pods by labels as usual, and peers resolve to the peers' addresses *on that network*, read
from their `k8s.v1.cni.cncf.io/network-status` (a pod without an interface there is no peer).
Pure: parsing and validation only.
"""

from __future__ import annotations

import json
import re
from typing import Any

from sanderling.model.attachments import ANNOTATION_STATUS
from sanderling.model.errors import ModelError
from sanderling.model.policy import PodInfo, Policy, pod_info, policy_from

POLICY_FOR = "k8s.v1.cni.cncf.io/policy-for"
KIND = "multinetworkpolicy"
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


def policy_networks(raw: dict[str, Any]) -> tuple[str, ...]:
    """The networks (`namespace/name`) a MultiNetworkPolicy applies to; ModelError when its
    annotation is malformed (the policy then applies nowhere, and says so)."""
    meta = raw.get("metadata") or {}
    namespace = meta.get("namespace", "")
    where = f"{KIND}/{namespace}/{meta.get('name', '')}"
    value = (meta.get("annotations") or {}).get(POLICY_FOR)
    if value is None:
        return ()
    if not isinstance(value, str) or not value.strip():
        raise ModelError(where, f"annotation {POLICY_FOR}", f"{value!r}: want a comma list of NAD names "
                                                            "(name or namespace/name)")
    out: list[str] = []
    for i, entry in enumerate(value.split(","), start=1):
        entry = entry.strip()
        parts = entry.split("/")
        if len(parts) == 1:
            parts = [namespace, *parts]
        if len(parts) != 2 or not all(_NAME.match(p) and len(p) <= 253 for p in parts):
            raise ModelError(where, f"annotation {POLICY_FOR}", f"entry {i} {entry!r} is not a NAD name "
                                                                "(name or namespace/name, lowercase)")
        key = "/".join(parts)
        if key not in out:
            out.append(key)
    return tuple(out)


def multi_policy_from(raw: dict[str, Any]) -> Policy:
    return policy_from(raw, KIND)


def network_address(raw: dict[str, Any], network: str) -> str | None:
    """The pod's first IPv4 address on `network` by its network-status; None without one (a
    status that cannot be read counts as none: the pod is nobody's peer there)."""
    text = ((raw.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_STATUS)
    if not text:
        return None
    try:
        entries = json.loads(text)
    except ValueError:
        return None
    if not isinstance(entries, list):
        return None
    for entry in entries:
        # by name only: "default" marks the interface with the default route, which may be this one
        if isinstance(entry, dict) and entry.get("name") == network:
            for ip in entry.get("ips") or []:
                if isinstance(ip, str) and "." in ip:
                    return ip.split("/")[0]
    return None


def pod_on_network(raw: dict[str, Any], network: str) -> PodInfo:
    """The pod as MultiNetworkPolicy on `network` sees it: its address there, or none."""
    return pod_info(raw, network_address(raw, network) or "")
