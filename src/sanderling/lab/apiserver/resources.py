"""The API resources the lab serves: group, version, plural, kind, and whether namespaced."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    subresources: tuple[str, ...] = ()

    @property
    def group_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> str:
        return f"{self.group}/{self.plural}"


RESOURCES: tuple[Resource, ...] = (
    Resource("", "v1", "namespaces", "Namespace", False, ("status",)),
    Resource("", "v1", "nodes", "Node", False, ("status",)),
    Resource("", "v1", "pods", "Pod", True, ("status",)),
    Resource("", "v1", "services", "Service", True, ("status",)),
    Resource("", "v1", "events", "Event", True),
    Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True),
    Resource("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", True),
    Resource("k8s.cni.cncf.io", "v1", "network-attachment-definitions", "NetworkAttachmentDefinition", True),
    # one store, two served versions (their schemas are the same but for v1beta2's endPort)
    Resource("k8s.cni.cncf.io", "v1beta1", "multi-networkpolicies", "MultiNetworkPolicy", True),
    Resource("k8s.cni.cncf.io", "v1beta2", "multi-networkpolicies", "MultiNetworkPolicy", True),
    Resource("ipam.sanderling.io", "v1alpha1", "ippools", "IPPool", False, ("status",)),
)

BY_PATH: dict[tuple[str, str, str], Resource] = {(r.group, r.version, r.plural): r for r in RESOURCES}


def matches_labels(labels: dict[str, str], selector: str) -> bool:
    """Label selector string: `a=b`, `a==b`, `a!=b`, `a`, `!a`, `a in (x,y)`, `a notin (x,y)`."""
    for term in _split_terms(selector):
        term = term.strip()
        if not term:
            continue
        if " notin " in term:
            key, values = term.split(" notin ", 1)
            if labels.get(key.strip()) in _set(values):
                return False
        elif " in " in term:
            key, values = term.split(" in ", 1)
            if labels.get(key.strip()) not in _set(values):
                return False
        elif "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


def _split_terms(selector: str) -> list[str]:
    terms, depth, current = [], 0, ""
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += ch
    terms.append(current)
    return terms


def _set(text: str) -> set[str]:
    return {v.strip() for v in text.strip().strip("()").split(",")}


def field_value(obj: dict, path: str) -> str:
    cur: object = obj
    for part in path.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else None
    return "" if cur is None else str(cur)


def matches_fields(obj: dict, selector: str) -> bool:
    for term in selector.split(","):
        if not term.strip():
            continue
        if "!=" in term:
            key, value = term.split("!=", 1)
            if field_value(obj, key.strip()) == value.strip():
                return False
        else:
            key, value = term.replace("==", "=").split("=", 1)
            if field_value(obj, key.strip()) != value.strip():
                return False
    return True
