"""Validation of the objects the lab API accepts, with Kubernetes-style messages naming the field.

A malformed manifest must be refused at the API with `Kind "name" is invalid: spec.ports[0].port:
Invalid value: 70000: must be between 1 and 65535, inclusive`, so the agents and the control
plane never see it. Only the fields Sanderling and the lab read are checked; unknown fields pass,
as with a real API server's non-strict decoding.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any

from sanderling.lab.apiserver.store import ApiError

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
PORT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
PROTOCOLS = ("TCP", "UDP", "SCTP")


class Invalid(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _value(field: str, value: Any, why: str) -> Invalid:
    return Invalid(field, f"Invalid value: {value!r}: {why}")


def _object(field: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _value(field, value, "must be an object")
    return value


def _list(field: str, value: Any) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _value(field, value, "must be a list")
    return value


def _port(field: str, value: Any, low: int = 1, high: int = 65535) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _value(field, value, f"must be between {low} and {high}, inclusive")
    return value


def _enum(field: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value is not None and value not in allowed:
        raise Invalid(field, f"Unsupported value: {value!r}: supported values: "
                             + ", ".join(f'"{a}"' for a in allowed))


def _string_map(field: str, value: Any, keys_are_labels: bool = True) -> None:
    if value is None:
        return
    for key, val in _object(field, value).items():
        if not isinstance(val, str):
            raise _value(f"{field}.{key}", val, "must be a string")
        name = key.rsplit("/", 1)[-1]
        if keys_are_labels and (not name or len(name) > 63 or not LABEL_NAME.match(name)):
            raise _value(field, key, "name part must consist of alphanumeric characters, '-', '_' or '.'")
        if keys_are_labels and (len(val) > 63 or not LABEL_NAME.match(val)):
            raise _value(f"{field}.{key}", val, "a valid label value must be 63 characters or less and consist of "
                                                "alphanumeric characters, '-', '_' or '.'")


def _selector(field: str, value: Any) -> None:
    sel = _object(field, value)
    _string_map(f"{field}.matchLabels", sel.get("matchLabels"))
    for i, expr in enumerate(_list(f"{field}.matchExpressions", sel.get("matchExpressions"))):
        f = f"{field}.matchExpressions[{i}]"
        expr = _object(f, expr)
        if not isinstance(expr.get("key"), str) or not expr["key"]:
            raise Invalid(f"{f}.key", "Required value")
        op = expr.get("operator")
        _enum(f"{f}.operator", op, ("In", "NotIn", "Exists", "DoesNotExist"))
        values = _list(f"{f}.values", expr.get("values"))
        if op in ("In", "NotIn") and not values:
            raise Invalid(f"{f}.values", "Required value: must be specified when `operator` is 'In' or 'NotIn'")
        if op in ("Exists", "DoesNotExist") and values:
            raise Invalid(f"{f}.values", "Forbidden: may not be specified when `operator` is 'Exists' or "
                                         "'DoesNotExist'")


def _metadata(body: dict[str, Any], namespaced: bool) -> None:
    meta = _object("metadata", body.get("metadata") or {})
    name = meta.get("name") or ""
    if name and (not isinstance(name, str) or len(name) > 253 or not DNS_SUBDOMAIN.match(name)):
        raise _value("metadata.name", name, "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
                                            "characters, '-' or '.', and must start and end with an alphanumeric "
                                            "character")
    _string_map("metadata.labels", meta.get("labels"))
    _string_map("metadata.annotations", meta.get("annotations"), keys_are_labels=False)


def _pod(body: dict[str, Any]) -> None:
    spec = _object("spec", body.get("spec"))
    containers = _list("spec.containers", spec.get("containers"))
    if not containers:
        raise Invalid("spec.containers", "Required value")
    for i, c in enumerate(containers):
        f = f"spec.containers[{i}]"
        c = _object(f, c)
        if not isinstance(c.get("name"), str) or not DNS_LABEL.match(c["name"]):
            raise _value(f"{f}.name", c.get("name"), "a lowercase RFC 1123 label is required")
        for j, p in enumerate(_list(f"{f}.ports", c.get("ports"))):
            pf = f"{f}.ports[{j}]"
            p = _object(pf, p)
            _port(f"{pf}.containerPort", p.get("containerPort"))
            _enum(f"{pf}.protocol", p.get("protocol"), PROTOCOLS)
            if "name" in p and (not isinstance(p["name"], str) or len(p["name"]) > 15
                                or not PORT_NAME.match(p["name"])):
                raise _value(f"{pf}.name", p["name"], "must be no more than 15 characters, lowercase alphanumeric "
                                                      "or '-'")
        for k in ("command", "args"):
            if any(not isinstance(a, str) for a in _list(f"{f}.{k}", c.get(k))):
                raise Invalid(f"{f}.{k}", "Invalid value: every element must be a string")
    if "nodeName" in spec and not isinstance(spec["nodeName"], str):
        raise _value("spec.nodeName", spec["nodeName"], "must be a string")


def _ip(field: str, value: Any) -> None:
    try:
        ipaddress.ip_address(value)
    except (ValueError, TypeError):
        raise _value(field, value, "must be a valid IP address, (e.g. 10.9.8.7)") from None


def _cidr(field: str, value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(value, strict=False)
    except (ValueError, TypeError):
        raise _value(field, value, "must be a valid CIDR, (e.g. 10.0.0.0/16)") from None


def _target_port(field: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, str):
        if not PORT_NAME.match(value) or len(value) > 15:
            raise _value(field, value, "must be a port number or an IANA_SVC_NAME")
    else:
        _port(field, value)


def _service(body: dict[str, Any]) -> None:
    spec = _object("spec", body.get("spec") or {})
    kind = spec.get("type", "ClusterIP")
    _enum("spec.type", kind, ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName"))
    if spec.get("selector") is not None:
        _string_map("spec.selector", spec["selector"])
    ports = _list("spec.ports", spec.get("ports"))
    if not ports and kind != "ExternalName" and spec.get("clusterIP") != "None":
        raise Invalid("spec.ports", "Required value")
    seen: set[tuple[int, str]] = set()
    for i, p in enumerate(ports):
        f = f"spec.ports[{i}]"
        p = _object(f, p)
        port = _port(f"{f}.port", p.get("port"))
        proto = p.get("protocol", "TCP")
        _enum(f"{f}.protocol", proto, PROTOCOLS)
        if (port, proto) in seen:
            raise Invalid(f, f"Duplicate value: {port}/{proto}")
        seen.add((port, proto))
        if len(ports) > 1 and not p.get("name"):
            raise Invalid(f"{f}.name", "Required value: when there is more than one port, every port needs a name")
        _target_port(f"{f}.targetPort", p.get("targetPort"))
        if p.get("nodePort") is not None:
            _port(f"{f}.nodePort", p["nodePort"], 30000, 32767)
    cip = spec.get("clusterIP")
    if cip not in (None, "", "None"):
        _ip("spec.clusterIP", cip)
    for i, ip in enumerate(_list("spec.externalIPs", spec.get("externalIPs"))):
        _ip(f"spec.externalIPs[{i}]", ip)
    for i, cidr in enumerate(_list("spec.loadBalancerSourceRanges", spec.get("loadBalancerSourceRanges"))):
        _cidr(f"spec.loadBalancerSourceRanges[{i}]", cidr)
    _enum("spec.sessionAffinity", spec.get("sessionAffinity"), ("None", "ClientIP"))
    _enum("spec.externalTrafficPolicy", spec.get("externalTrafficPolicy"), ("Cluster", "Local"))
    _enum("spec.internalTrafficPolicy", spec.get("internalTrafficPolicy"), ("Cluster", "Local"))
    timeout = ((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {}).get("timeoutSeconds")
    if timeout is not None:
        _port("spec.sessionAffinityConfig.clientIP.timeoutSeconds", timeout, 1, 86400)


def _netpol_ports(field: str, ports: Any) -> None:
    for i, p in enumerate(_list(field, ports)):
        f = f"{field}[{i}]"
        p = _object(f, p)
        _enum(f"{f}.protocol", p.get("protocol"), PROTOCOLS)
        port = p.get("port")
        _target_port(f"{f}.port", port)
        if p.get("endPort") is not None:
            if not isinstance(port, int):
                raise Invalid(f"{f}.endPort", "Required value: may only be set with a numeric port")
            _port(f"{f}.endPort", p["endPort"], port, 65535)


def _netpol_peers(field: str, peers: Any) -> None:
    for i, peer in enumerate(_list(field, peers)):
        f = f"{field}[{i}]"
        peer = _object(f, peer)
        if not any(k in peer for k in ("podSelector", "namespaceSelector", "ipBlock")):
            raise Invalid(f, "Required value: must specify a peer")
        if "ipBlock" in peer:
            if "podSelector" in peer or "namespaceSelector" in peer:
                raise Invalid(f, "Forbidden: may not specify more than 1 peer type")
            block = _object(f"{f}.ipBlock", peer["ipBlock"])
            net = _cidr(f"{f}.ipBlock.cidr", block.get("cidr"))
            for j, ex in enumerate(_list(f"{f}.ipBlock.except", block.get("except"))):
                sub = _cidr(f"{f}.ipBlock.except[{j}]", ex)
                if sub.version != net.version or not sub.subnet_of(net) or sub == net:  # type: ignore[arg-type]
                    raise _value(f"{f}.ipBlock.except[{j}]", ex, "must be a strict subset of `cidr`")
        for k in ("podSelector", "namespaceSelector"):
            if k in peer:
                _selector(f"{f}.{k}", peer[k])


def _network_policy(body: dict[str, Any]) -> None:
    spec = _object("spec", body.get("spec"))
    _selector("spec.podSelector", spec.get("podSelector", {}))
    for i, t in enumerate(_list("spec.policyTypes", spec.get("policyTypes"))):
        _enum(f"spec.policyTypes[{i}]", t, ("Ingress", "Egress"))
    for direction, peers in (("ingress", "from"), ("egress", "to")):
        for i, rule in enumerate(_list(f"spec.{direction}", spec.get(direction))):
            f = f"spec.{direction}[{i}]"
            rule = _object(f, rule)
            _netpol_ports(f"{f}.ports", rule.get("ports"))
            _netpol_peers(f"{f}.{peers}", rule.get(peers))


def _pod_status(body: dict[str, Any]) -> None:
    st = _object("status", body.get("status") or {})
    _enum("status.phase", st.get("phase"), ("Pending", "Running", "Succeeded", "Failed", "Unknown"))
    for field in ("podIP", "hostIP"):
        if st.get(field):
            _ip(f"status.{field}", st[field])
    for field in ("podIPs", "hostIPs"):
        for i, item in enumerate(_list(f"status.{field}", st.get(field))):
            _ip(f"status.{field}[{i}].ip", _object(f"status.{field}[{i}]", item).get("ip"))


def _service_status(body: dict[str, Any]) -> None:
    lb = _object("status.loadBalancer", (_object("status", body.get("status") or {})).get("loadBalancer") or {})
    for i, ing in enumerate(_list("status.loadBalancer.ingress", lb.get("ingress"))):
        ing = _object(f"status.loadBalancer.ingress[{i}]", ing)
        if ing.get("ip"):
            _ip(f"status.loadBalancer.ingress[{i}].ip", ing["ip"])
        _enum(f"status.loadBalancer.ingress[{i}].ipMode", ing.get("ipMode"), ("VIP", "Proxy"))


def _node_status(body: dict[str, Any]) -> None:
    st = _object("status", body.get("status") or {})
    for i, addr in enumerate(_list("status.addresses", st.get("addresses"))):
        addr = _object(f"status.addresses[{i}]", addr)
        if addr.get("type") in ("InternalIP", "ExternalIP"):
            _ip(f"status.addresses[{i}].address", addr.get("address"))


def _ippool_status(body: dict[str, Any]) -> None:
    allocations = _object("status.allocations",
                          (_object("status", body.get("status") or {})).get("allocations") or {})
    for ip, owner in allocations.items():
        _ip(f"status.allocations[{ip}]", ip)
        owner = _object(f"status.allocations[{ip}]", owner)
        if not isinstance(owner.get("node", ""), str) or not isinstance(owner.get("pod", ""), str):
            raise _value(f"status.allocations[{ip}]", owner, "node and pod must be strings")


CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {
    "Pod": _pod, "Service": _service, "NetworkPolicy": _network_policy,
}
# status is written through its own subresource (kubelets, controllers, IPAM): checked as strictly
STATUS_CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {
    "Pod": _pod_status, "Service": _service_status, "Node": _node_status, "IPPool": _ippool_status,
}


def validate(kind: str, namespaced: bool, body: dict[str, Any]) -> None:
    """Raise ApiError 422 (Invalid) naming the first bad field of the object."""
    try:
        _metadata(body, namespaced)
        for checks in (CHECKS, STATUS_CHECKS):
            check = checks.get(kind)
            if check is not None:
                check(body)
    except Invalid as exc:
        name = (body.get("metadata") or {}).get("name") if isinstance(body.get("metadata"), dict) else None
        raise ApiError(422, "Invalid", f'{kind} "{name or ""}" is invalid: {exc}') from None
