"""NetworkPolicies, pods and namespaces as the policy compiler needs them (networking.k8s.io/v1).

Selectors follow metav1.LabelSelector (matchLabels AND matchExpressions In / NotIn / Exists /
DoesNotExist; an empty selector selects everything). policyTypes default as the API server
defaults them: Ingress always, Egress when the policy has egress rules. A malformed policy is a
ModelError for that policy only.
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
    cidr: ipaddress.IPv4Network | None = None
    excepts: tuple[ipaddress.IPv4Network, ...] = ()


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

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

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
    exprs = []
    for i, e in enumerate(raw.get("matchExpressions") or []):
        op = e.get("operator")
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise ModelError(obj, f"{field}.matchExpressions[{i}].operator", f"{op!r} is not In, NotIn, Exists or "
                                                                             "DoesNotExist")
        exprs.append((str(e.get("key")), op, tuple(str(v) for v in e.get("values") or ())))
    return Selector(tuple(sorted((str(k), str(v)) for k, v in labels.items())), tuple(exprs))


def _rules(obj: str, field: str, raw: Any, peers_key: str) -> tuple[Rule, ...]:
    rules = []
    for i, r in enumerate(raw or []):
        f = f"{field}[{i}]"
        peers = []
        for j, p in enumerate(r.get(peers_key) or []):
            pf = f"{f}.{peers_key}[{j}]"
            if "ipBlock" in p:
                block = p["ipBlock"] or {}
                try:
                    cidr = ipaddress.IPv4Network(block.get("cidr"), strict=False)
                    excepts = tuple(ipaddress.IPv4Network(e, strict=False) for e in block.get("except") or [])
                except (ValueError, TypeError) as exc:
                    raise ModelError(obj, f"{pf}.ipBlock", str(exc)) from None
                peers.append(Peer(cidr=cidr, excepts=excepts))
            else:
                pods = _selector(obj, f"{pf}.podSelector", p["podSelector"]) if "podSelector" in p else None
                nss = _selector(obj, f"{pf}.namespaceSelector", p["namespaceSelector"]) \
                    if "namespaceSelector" in p else None
                peers.append(Peer(pods=pods, namespaces=nss))
        ports = []
        for j, p in enumerate(r.get("ports") or []):
            proto = p.get("protocol") or "TCP"
            if proto not in PROTOCOLS:
                raise ModelError(obj, f"{f}.ports[{j}].protocol", f"{proto!r} is not TCP, UDP or SCTP")
            ports.append(PolicyPort(proto, p.get("port"), p.get("endPort")))
        rules.append(Rule(tuple(peers), tuple(ports)))
    return tuple(rules)


def policy_from(raw: dict[str, Any]) -> Policy:
    meta = raw.get("metadata") or {}
    obj = f"networkpolicy/{meta.get('namespace', '')}/{meta.get('name', '')}"
    spec = raw.get("spec") or {}
    types = spec.get("policyTypes") or (["Ingress", "Egress"] if spec.get("egress") else ["Ingress"])
    log = str((meta.get("annotations") or {}).get(LOG_ANNOTATION, "")).lower() == "true"
    return Policy(meta.get("namespace", ""), meta.get("name", ""),
                  _selector(obj, "spec.podSelector", spec.get("podSelector")),
                  _rules(obj, "spec.ingress", spec.get("ingress"), "from") if "Ingress" in types else None,
                  _rules(obj, "spec.egress", spec.get("egress"), "to") if "Egress" in types else None, log)


def pod_info(raw: dict[str, Any]) -> PodInfo:
    meta, spec, status = raw.get("metadata") or {}, raw.get("spec") or {}, raw.get("status") or {}
    ip = None
    if status.get("podIP"):
        try:
            ip = ipaddress.IPv4Address(status["podIP"])
        except ValueError:
            ip = None
    ports = tuple((p.get("name", ""), int(p["containerPort"]), p.get("protocol") or "TCP")
                  for c in spec.get("containers") or [] for p in c.get("ports") or [] if "containerPort" in p)
    return PodInfo(meta.get("namespace", ""), meta.get("name", ""),
                   tuple(sorted((meta.get("labels") or {}).items())), ip, spec.get("nodeName") or "", ports)


def selects(policy: Policy, pod: PodInfo) -> bool:
    return pod.namespace == policy.namespace and policy.pods.matches(pod.label_map())
