"""NetworkPolicies, pods and namespaces as the policy compiler needs them (networking.k8s.io/v1).

Selectors follow metav1.LabelSelector (matchLabels AND matchExpressions In / NotIn / Exists /
DoesNotExist; an empty selector selects everything). policyTypes default as the API server
defaults them: Ingress always, Egress when the policy has egress rules.

Fail closed: a rule the agent cannot fully translate (a value of the wrong type, anything
unknown) is left out, so it allows nothing, while the policy
still isolates the pods it selects; `Policy.unenforced` says what was left out and why (the agent
reports it as an Event). Only a policy whose own podSelector is unreadable is a ModelError: then
nobody can tell which pods it isolates.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sanderling.model.errors import ModelError

PROTOCOLS = ("TCP", "UDP", "SCTP")
LOG_ANNOTATION = "policy.sanderling.io/log"


@dataclass(frozen=True, slots=True)
class Selector:
    labels: tuple[tuple[str, str], ...] = ()
    expressions: tuple[tuple[str, str, tuple[str, ...]], ...] = ()  # (key, operator, values)

    def matches(self, labels: Mapping[str, str]) -> bool:
        for key, value in self.labels:
            if labels.get(key) != value:
                return False
        for key, op, values in self.expressions:
            present = key in labels
            if op == "In" and not (present and labels[key] in values):
                return False
            if op == "NotIn" and present and labels[key] in values:
                return False
            if op == "Exists" and not present:
                return False
            if op == "DoesNotExist" and present:
                return False
        return True


@dataclass(frozen=True, slots=True)
class Peer:
    pods: Selector | None = None
    namespaces: Selector | None = None
    cidr: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    excepts: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


@dataclass(frozen=True, slots=True)
class PolicyPort:
    protocol: str = "TCP"
    port: int | str | None = None  # None: every port of the protocol
    end_port: int | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    peers: tuple[Peer, ...] = ()  # empty: every peer
    ports: tuple[PolicyPort, ...] = ()  # empty: every port and protocol


@dataclass(frozen=True, slots=True)
class Policy:
    namespace: str
    name: str
    pods: Selector
    ingress: tuple[Rule, ...] | None  # None: the policy does not isolate for ingress
    egress: tuple[Rule, ...] | None
    log: bool = False
    unenforced: tuple[str, ...] = ()  # what could not be translated (left out: it allows nothing)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class PodInfo:
    namespace: str
    name: str
    labels: tuple[tuple[str, str], ...]
    ip: ipaddress.IPv4Address | None
    node: str
    ports: tuple[tuple[str, int, str], ...] = ()  # (name, containerPort, protocol)
    ip6: ipaddress.IPv6Address | None = None  # a dual-stack or IPv6-only pod's IPv6 address (status.podIPs)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def addressed(self) -> bool:
        """Whether the pod has an address yet (of either family): policy can name it."""
        return self.ip is not None or self.ip6 is not None

    @property
    def ips(self) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
        return tuple(a for a in (self.ip, self.ip6) if a is not None)

    def label_map(self) -> dict[str, str]:
        return dict(self.labels)

    def named_port(self, name: str, protocol: str) -> int | None:
        for port_name, number, proto in self.ports:
            if port_name == name and proto == protocol:
                return number
        return None


def _selector(obj: str, field: str, raw: Any) -> Selector:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ModelError(obj, field, "must be a label selector object")
    labels = raw.get("matchLabels") or {}
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise ModelError(obj, f"{field}.matchLabels", "must map label keys to string values")
    exprs = []
    for i, e in enumerate(_list(obj, f"{field}.matchExpressions", raw.get("matchExpressions"))):
        if not isinstance(e, dict) or not isinstance(e.get("values") or [], list):
            raise ModelError(obj, f"{field}.matchExpressions[{i}]", "must be an object with key, operator, values")
        op = e.get("operator")
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise ModelError(obj, f"{field}.matchExpressions[{i}].operator", f"{op!r} is not In, NotIn, Exists or "
                                                                             "DoesNotExist")
        exprs.append((str(e.get("key")), op, tuple(str(v) for v in e.get("values") or ())))
    return Selector(tuple(sorted((str(k), str(v)) for k, v in labels.items())), tuple(exprs))


def label_selector(obj: str, field: str, raw: Any) -> Selector:
    """A metav1.LabelSelector (also a Service's selector, as {"matchLabels": ...})."""
    return _selector(obj, field, raw)


def _block(obj: str, field: str, raw: Any, notes: list[str]) -> Peer | None:
    """An ipBlock peer, IPv4 or IPv6 (an except of the other family takes nothing out of it)."""
    if not isinstance(raw, dict):
        raise ModelError(obj, field, "must be an object with cidr and except")
    if not isinstance(raw.get("cidr"), str):
        raise ModelError(obj, f"{field}.cidr", f"{raw.get('cidr')!r} is not a CIDR string")
    try:
        cidr = ipaddress.ip_network(raw["cidr"], strict=False)
        excepts = [ipaddress.ip_network(str(e), strict=False) for e in _list(obj, f"{field}.except", raw.get("except"))]
    except (ValueError, TypeError) as exc:
        raise ModelError(obj, field, str(exc)) from None
    return Peer(cidr=cidr, excepts=tuple(e for e in excepts if e.version == cidr.version))


def _list(obj: str, field: str, raw: Any) -> list[Any]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ModelError(obj, field, f"must be a list, not {type(raw).__name__}")
    return raw


def _port(obj: str, field: str, raw: Any) -> PolicyPort:
    if not isinstance(raw, dict):
        raise ModelError(obj, field, "must be an object with protocol, port and endPort")
    proto = raw.get("protocol") or "TCP"
    if proto not in PROTOCOLS:
        raise ModelError(obj, f"{field}.protocol", f"{proto!r} is not TCP, UDP or SCTP")
    port, end = raw.get("port"), raw.get("endPort")
    if port is not None and not (isinstance(port, str) and port) and not (
            isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535):
        raise ModelError(obj, f"{field}.port", f"{port!r} is neither a port number (1-65535) nor a port name")
    if end is not None and not (isinstance(end, int) and not isinstance(end, bool) and isinstance(port, int)
                                and port <= end <= 65535):
        raise ModelError(obj, f"{field}.endPort", f"{end!r} needs a numeric port and must lie in port..65535")
    return PolicyPort(proto, port, end)


def _rule(obj: str, f: str, r: Any, peers_key: str, notes: list[str]) -> Rule | None:
    """One rule; None when it allows nothing this node can carry (every peer untranslatable)."""
    if not isinstance(r, dict):
        raise ModelError(obj, f, "must be an object")
    peers = []
    listed = _list(obj, f"{f}.{peers_key}", r.get(peers_key))
    for j, p in enumerate(listed):
        pf = f"{f}.{peers_key}[{j}]"
        if not isinstance(p, dict):
            raise ModelError(obj, pf, "must be an object")
        if "ipBlock" in p:
            peer = _block(obj, f"{pf}.ipBlock", p["ipBlock"], notes)
            if peer is not None:
                peers.append(peer)
        else:
            pods = _selector(obj, f"{pf}.podSelector", p["podSelector"]) if "podSelector" in p else None
            nss = _selector(obj, f"{pf}.namespaceSelector", p["namespaceSelector"]) \
                if "namespaceSelector" in p else None
            peers.append(Peer(pods=pods, namespaces=nss))
    if listed and not peers:  # never let "every peer left out" become "every peer"
        return None
    ports = tuple(_port(obj, f"{f}.ports[{j}]", p) for j, p in enumerate(_list(obj, f"{f}.ports", r.get("ports"))))
    return Rule(tuple(peers), ports)


def _rules(obj: str, field: str, raw: Any, peers_key: str, notes: list[str]) -> tuple[Rule, ...]:
    """The rules the agent can enforce; each one it cannot is left out (allows nothing) and noted."""
    rules = []
    try:
        listed = _list(obj, field, raw)
    except ModelError as exc:
        notes.append(f"{exc.field}: {exc.problem}: no rule of this direction is enforced")
        return ()
    for i, r in enumerate(listed):
        f = f"{field}[{i}]"
        try:
            rule = _rule(obj, f, r, peers_key, notes)
        except ModelError as exc:
            notes.append(f"{exc.field}: {exc.problem}: the rule is left out (allows nothing)")
            continue
        if rule is None:
            notes.append(f"{f}: no peer of this rule can be enforced: the rule allows nothing")
            continue
        rules.append(rule)
    return tuple(rules)


def policy_from(raw: dict[str, Any], kind: str = "networkpolicy") -> Policy:
    """A NetworkPolicy (or an object with the same spec: `kind` names it in errors)."""
    meta = raw.get("metadata") or {}
    obj = f"{kind}/{meta.get('namespace', '')}/{meta.get('name', '')}"
    spec = raw.get("spec") or {}
    types = spec.get("policyTypes") or (["Ingress", "Egress"] if spec.get("egress") else ["Ingress"])
    log = str((meta.get("annotations") or {}).get(LOG_ANNOTATION, "")).lower() == "true"
    pods = _selector(obj, "spec.podSelector", spec.get("podSelector"))
    if not isinstance(types, list) or not set(types) <= {"Ingress", "Egress"}:
        # unknown policy types: isolate for both directions, enforce the rules that parse
        notes = [f"spec.policyTypes: {types!r} is not a list of Ingress and Egress: both directions isolated"]
        types = ["Ingress", "Egress"]
    else:
        notes = []
    ingress = _rules(obj, "spec.ingress", spec.get("ingress"), "from", notes) if "Ingress" in types else None
    egress = _rules(obj, "spec.egress", spec.get("egress"), "to", notes) if "Egress" in types else None
    return Policy(meta.get("namespace", ""), meta.get("name", ""), pods, ingress, egress, log, tuple(notes))


def pod_info(raw: dict[str, Any], ip_text: str | None = None) -> PodInfo:
    """The pod as policy sees it; its address is status.podIP unless `ip_text` is given (its
    address on a secondary network)."""
    meta, spec, status = raw.get("metadata") or {}, raw.get("spec") or {}, raw.get("status") or {}
    ip = None
    text = status.get("podIP") if ip_text is None else ip_text
    if text:
        try:
            ip = ipaddress.IPv4Address(text)
        except ValueError:
            ip = None
    ip6 = None
    if ip_text is None:
        for entry in status.get("podIPs") or []:
            try:
                found = ipaddress.ip_address((entry or {}).get("ip") or "")
            except (ValueError, AttributeError, TypeError):
                continue
            if isinstance(found, ipaddress.IPv6Address):
                ip6 = found
                break
    ports = tuple((p.get("name", ""), int(p["containerPort"]), p.get("protocol") or "TCP")
                  for c in spec.get("containers") or [] for p in c.get("ports") or [] if "containerPort" in p)
    return PodInfo(meta.get("namespace", ""), meta.get("name", ""),
                   tuple(sorted((meta.get("labels") or {}).items())), ip, spec.get("nodeName") or "", ports, ip6)


def selects(policy: Policy, pod: PodInfo) -> bool:
    return pod.namespace == policy.namespace and policy.pods.matches(pod.label_map())
