"""NetworkPolicy enforcement state: policies, pods and namespaces in, realizer objects out.

Informers feed the three kinds; a burst of changes is compiled once (scheduled on the event
loop). Each policy's own flows are one realizer object, each clause flow that policies share is
another (SharedFlows merges them), each isolated local pod another, so the realizer sends only
what a change really alters (an edit rewrites the shared flows whose conjunctions it changed).
A policy the model refuses is reported once (log line and a Kubernetes Event) and left out; the
others keep working. A policy the model could only partly translate is enforced fail-closed (its
pods isolated, the untranslatable rules allowing nothing) and reported the same way.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
from collections.abc import Callable
from typing import Any

from sanderling.agent.object_errors import ObjectErrors
from sanderling.agent.sync import DesiredState
from sanderling.compiler import policy as compiler
from sanderling.compiler.shared_flows import SharedFlows
from sanderling.model.policy import LOG_ANNOTATION, PodInfo, Policy, pod_info, policy_from
from sanderling.openflow import cookies
from sanderling.openflow.pipeline import PIPELINE, Pipeline
from sanderling.openflow.registers import POLICY_ZONE, SERVICE_POLICY_ZONE

log = logging.getLogger(__name__)


class RuleIds:
    """Conjunction ids (and so priority tiers) per rule key, stable while the rule exists.

    A rule that goes away (its policy deleted or edited) gives its id back; a freed id is handed
    out again only from the next compile on (`settle`), so a rule removed and another added in the
    same pass never share an id, and the smallest free id goes first, which keeps ids, and the
    priority tiers derived from them, dense under policy churn."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self._next = 1
        self._free: list[int] = []  # heap
        self._freed: list[int] = []  # released in this pass

    def __call__(self, key: str) -> int:
        rid = self._ids.get(key)
        if rid is None:
            if self._free:
                rid = heapq.heappop(self._free)
            else:
                rid, self._next = self._next, self._next + 1
            self._ids[key] = rid
        return rid

    def release(self, policy_key: str, keep: set[str] | frozenset[str] = frozenset()) -> None:
        """The rules of one policy other than `keep` are gone."""
        prefix = policy_key + "/"
        for key in [k for k in self._ids if k.startswith(prefix) and k not in keep]:
            self._freed.append(self._ids.pop(key))

    def release_all(self, prefix: str) -> None:
        """Every rule whose key starts with `prefix` is gone (a network's, when it goes away)."""
        for key in [k for k in self._ids if k.startswith(prefix)]:
            self._freed.append(self._ids.pop(key))

    def settle(self) -> None:
        for rid in self._freed:
            heapq.heappush(self._free, rid)
        self._freed = []

    def __len__(self) -> int:
        return len(self._ids)


class NetworkRuleIds:
    """One network's window on rule ids shared by every network of a bridge: conjunction ids are
    per OpenFlow table, so two networks' rules on one bridge must never share one (keys are
    prefixed with the network; ids stay dense, and so do the priority tiers)."""

    def __init__(self, shared: RuleIds, network: str) -> None:
        self.shared = shared
        self.prefix = network + "|"

    def __call__(self, key: str) -> int:
        return self.shared(self.prefix + key)

    def release(self, policy_key: str, keep: set[str] | frozenset[str] = frozenset()) -> None:
        self.shared.release(self.prefix + policy_key, {self.prefix + k for k in keep})

    def settle(self) -> None:
        self.shared.settle()


class PolicyIndex:
    """Which policies a pod of a namespace can matter to: those of its own namespace (selection,
    same-namespace peers) and those reaching across namespaces (a namespaceSelector peer, or an
    egress named port resolved on every pod). A pod change then tests only these candidates."""

    def __init__(self) -> None:
        self._by_namespace: dict[str, set[str]] = {}
        self._across: set[str] = set()

    def put(self, key: str, policy: Policy | None) -> None:
        namespace = key.split("/", 1)[0]
        self._by_namespace.setdefault(namespace, set()).discard(key)
        self._across.discard(key)
        if policy is None:
            return
        self._by_namespace[namespace].add(key)
        if _reaches_across(policy):
            self._across.add(key)

    def candidates(self, namespaces: set[str]) -> set[str]:
        out = set(self._across)
        for namespace in namespaces:
            out |= self._by_namespace.get(namespace, set())
        return out


def _reaches_across(policy: Policy) -> bool:
    for rules, egress in ((policy.ingress or (), False), (policy.egress or (), True)):
        for rule in rules:
            if any(peer.namespaces is not None for peer in rule.peers):
                return True
            if egress and not rule.peers and any(isinstance(port.port, str) for port in rule.ports):
                return True
    return False


class PolicyAgent:
    """NetworkPolicy on br-int by default; with another pipeline, zone, pod view and parser, the
    same enforcement on one secondary network (MultiNetworkPolicy, see agent/multi_policy.py)."""

    def __init__(self, node_name: str, realizer: DesiredState, changed: Callable[[], None],
                 schedule: Callable[[Callable[[], None]], object] | None = None,
                 report: Callable[[str, str, str], None] | None = None, *, pipeline: Pipeline = PIPELINE,
                 zone: int = POLICY_ZONE, pod_view: Callable[[dict[str, Any]], PodInfo] = pod_info,
                 parse: Callable[[dict[str, Any]], Policy] = policy_from, kind: str = "networkpolicy",
                 logging: bool = True, rule_ids: RuleIds | NetworkRuleIds | None = None,
                 service_zone: int | None = SERVICE_POLICY_ZONE) -> None:
        self.node_name = node_name
        self.pipeline = pipeline
        self.zone = zone
        self.service_zone = service_zone  # None: no service translation before policy on this pipeline
        self.pod_view = pod_view
        self.parse = parse
        self.kind = kind
        self.logging = logging  # packet-ins reach the agent; False: log annotations are ignored
        self.log_context = ""  # appended to policy-log lines (" network=ns/name" on a secondary network)
        self.realizer = realizer
        self.changed = changed
        self.schedule = schedule
        self.raw_policies: dict[str, dict[str, Any]] = {}
        self.pods: dict[str, PodInfo] = {}
        self.namespace_labels: dict[str, dict[str, str]] = {}
        self.logged_namespaces: set[str] = set()  # policy.sanderling.io/log: "true": log what is denied
        self.rules_by_cookie: dict[int, str] = {}
        self._errors = ObjectErrors(report)
        self.rule_ids = rule_ids if rule_ids is not None else RuleIds()
        self.shared = SharedFlows()
        self._scheduled = False
        self._full = True
        self._dirty: set[str] = set()
        self._cluster: compiler.ClusterPods | None = None
        self._local: dict[str, list[PodInfo]] = {}  # namespace -> this node's pods with an address
        self._selected: dict[str, dict[str, tuple[bool, bool]]] = {}  # policy -> pod -> (ingress, egress)
        self._isolated: dict[str, tuple[bool, bool]] = {}
        self._parsed: dict[str, Policy | None] = {}  # what each policy compiled from last time
        self._index = PolicyIndex()
        # pods changed since the last compile -> their state then (None: they were not known)
        self._pods_before: dict[str, PodInfo | None] = {}

    def start(self) -> None:
        self.realizer.set_object("policy/static", compiler.static_flows(self.pipeline, self.zone, self.service_zone))

    # ---- informer callbacks --------------------------------------------------------------

    def policy_changed(self, key: str, obj: dict[str, Any] | None) -> None:
        if obj is None:
            self.raw_policies.pop(key, None)
        else:
            self.raw_policies[key] = obj
        self._mark(key)

    def pod_changed(self, key: str, obj: dict[str, Any] | None) -> None:
        """A pod's labels, address, node or ports changed: recompile the policies it matters to
        (before or after the change). Anything else (status conditions, annotations: most updates
        of a running pod) changes no flow and is ignored."""
        before = self.pods.get(key)
        if obj is None:
            if before is None:
                return
            del self.pods[key]
        else:
            try:
                info = self.pod_view(obj)
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                log.error("pod/%s: unreadable for policy (%s); its previous state is kept", key, exc)
                return
            if before == info:
                return
            self.pods[key] = info
        self._pods_before.setdefault(key, before)  # its state as of the last compile
        self._schedule()

    def namespace_changed(self, key: str, obj: dict[str, Any] | None) -> None:
        """Only a namespace's labels and its logging annotation matter to policy."""
        labels: dict[str, str] | None = None
        logged = False
        if obj is not None:
            meta = obj.get("metadata") or {}
            labels = dict(meta.get("labels") or {})
            logged = self.logging and str((meta.get("annotations") or {}).get(LOG_ANNOTATION, "")).lower() == "true"
        if self.namespace_labels.get(key) == labels and (key in self.logged_namespaces) == logged:
            return
        self.logged_namespaces.discard(key)
        if labels is None:
            self.namespace_labels.pop(key, None)
        else:
            self.namespace_labels[key] = labels
            if logged:
                self.logged_namespaces.add(key)
        self._mark()

    def _mark(self, policy: str | None = None) -> None:
        """policy: only that policy changed (recompile it alone); None: namespaces (all)."""
        if policy is None:
            self._full = True
        else:
            self._dirty.add(policy)
        self._schedule()

    def _schedule(self) -> None:
        if self.schedule is None:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            self.schedule(self.flush)

    # ---- compile -------------------------------------------------------------------------

    def _policy(self, key: str) -> Policy | None:
        policy = self._errors.convert(key, self.raw_policies.get(key), self.parse)
        if policy is not None and policy.log and not self.logging:
            policy = dataclasses.replace(policy, log=False)
        notes = policy.unenforced if policy is not None else ()
        self._errors.warn(key, f"{self.kind}/{key}: not fully enforced; its pods stay isolated and only what "
                               f"could be translated is allowed: {'; '.join(notes)}" if notes else None)
        return policy

    def flush(self) -> None:
        """Recompile what changed: one policy after an edit (its flows, and the isolation of the pods
        it selected or selects), everything after a pod or namespace change."""
        self._scheduled = False
        self.rule_ids.settle()
        full, dirty, changed_pods = self._full, self._dirty, self._pods_before
        self._full, self._dirty, self._pods_before = False, set(), {}
        touched: set[str] = set()
        pods = tuple(p for p in self.pods.values() if p.addressed)
        if full or self._cluster is None or changed_pods:
            self._cluster = compiler.ClusterPods(pods, dict(self.namespace_labels))
            self._local = {}
            for pod in pods:
                if pod.node == self.node_name:
                    self._local.setdefault(pod.namespace, []).append(pod)
        if full or self._cluster is None:
            dirty = set(self.raw_policies) | set(self._selected)
        elif changed_pods:
            # only the policies the changed pods matter to, as they were or as they are now
            states = [p for key, before in changed_pods.items() for p in (before, self.pods.get(key))
                      if p is not None]
            candidates = self._index.candidates({p.namespace for p in states})
            dirty |= {key for key in candidates if (policy := self._parsed.get(key)) is not None
                      and any(self._matters(policy, p) for p in states)}
            touched |= changed_pods.keys()
        for key in sorted(dirty):
            policy = self._policy(key)
            self._parsed[key] = policy
            self._index.put(key, policy)
            before = self._selected.pop(key, {})
            touched |= before.keys()
            object_key = f"policy/{key}"
            if policy is None:
                self.realizer.remove_object(object_key)
                self.shared.remove(key)
                self._forget_rules(key)
                if key not in self.raw_policies:
                    self._parsed.pop(key, None)
                continue
            local = self._local.get(policy.namespace, [])
            selected = {p.key: (policy.ingress is not None, policy.egress is not None)
                        for p in local if policy.pods.matches(p.label_map())}
            self._selected[key] = selected
            touched |= selected.keys()
            used: set[str] = set()
            try:
                compiled = compiler.compile_policy(policy, local, self._cluster, _recording(self.rule_ids, used),
                                                   self.pipeline, rules_by_cookie=self.rules_by_cookie)
            except Exception as exc:  # a value the model let through: this policy alone, and closed
                log.exception("%s/%s: cannot be compiled", self.kind, key)
                self._errors.warn(key, f"{self.kind}/{key}: cannot be compiled ({exc}); its pods stay isolated "
                                       "and the policy allows nothing")
                self.realizer.remove_object(object_key)
                self.shared.remove(key)
                self._forget_rules(key)
                continue
            self._forget_rules(key, keep=used)
            self.realizer.set_object(object_key, compiled.flows)
            self.shared.update(key, compiled.shared)
        for fk, flow in self.shared.take_dirty().items():
            name = self.shared.object_name(fk)
            if flow is None:
                self.realizer.remove_object(name)
                self.shared.release(fk)
            else:
                self.realizer.set_object(name, (flow,))
        if full:
            touched |= set(self._isolated)
        self._update_isolation(touched)
        self.changed()

    def _forget_rules(self, policy_key: str, keep: set[str] | frozenset[str] = frozenset()) -> None:
        """Rules of the policy that no longer exist: their ids go back, their log names too."""
        self.rule_ids.release(policy_key, keep)
        prefix = policy_key + "/"
        for cookie in [c for c, rule in self.rules_by_cookie.items() if rule.startswith(prefix) and rule not in keep]:
            del self.rules_by_cookie[cookie]

    def _matters(self, policy: Policy, pod: PodInfo) -> bool:
        """Whether the policy's flows on this node depend on this pod: it selects it here, or one of
        its rules names it as a peer (or resolves a named port on every pod)."""
        labels = pod.label_map()
        if pod.node == self.node_name and pod.namespace == policy.namespace and policy.pods.matches(labels):
            return True
        for rules, egress in ((policy.ingress or (), False), (policy.egress or (), True)):
            for rule in rules:
                if not rule.peers:
                    if egress and any(isinstance(port.port, str) for port in rule.ports):
                        return True  # a named port of any destination pod
                    continue
                for peer in rule.peers:
                    if peer.cidr is not None:
                        continue
                    in_namespace = (pod.namespace == policy.namespace if peer.namespaces is None
                                    else peer.namespaces.matches(self.namespace_labels.get(pod.namespace, {})))
                    if in_namespace and (peer.pods is None or peer.pods.matches(labels)):
                        return True
        return False

    def _update_isolation(self, pod_keys: set[str]) -> None:
        local = {p.key: p for pods in self._local.values() for p in pods}
        for key in pod_keys:
            ingress = any(sel.get(key, (False, False))[0] for sel in self._selected.values())
            egress = any(sel.get(key, (False, False))[1] for sel in self._selected.values())
            pod = local.get(key)
            object_key = f"policy-pod/{key}"
            if pod is None or not (ingress or egress):
                if self._isolated.pop(key, None) is not None:
                    self.realizer.remove_object(object_key)
                continue
            self._isolated[key] = (ingress, egress)
            self.realizer.set_object(object_key, compiler.isolation_flows(
                pod, ingress, egress, self.pipeline, log_denied=pod.namespace in self.logged_namespaces,
                zone=self.zone, service_zone=self.service_zone))
        self._update_logged_peers(local)

    def _update_logged_peers(self, local: dict[str, PodInfo]) -> None:
        """Denials towards or from pods of logged namespaces, on the isolated local pods' side."""
        if not self.logged_namespaces:  # the usual case: nothing to scan on every flush
            self.realizer.remove_object("policy/logged-namespace-peers")
            return
        logged = [ip for p in self.pods.values() if p.namespace in self.logged_namespaces for ip in p.ips]
        isolated = [(local[k].ips, i, e) for k, (i, e) in self._isolated.items() if k in local]
        self.realizer.set_object("policy/logged-namespace-peers", compiler.logged_peer_flows(
            [ip for ips, i, _e in isolated if i for ip in ips],
            [ip for ips, _i, e in isolated if e for ip in ips], logged, self.pipeline))

    # ---- logging -------------------------------------------------------------------------

    def packet_in(self, table_id: int, cookie: int, data: bytes) -> None:
        """A logged connection (rate-limited by the meter): one structured line in the agent log."""
        if table_id not in (self.pipeline["EgressRule"], self.pipeline["IngressRule"]):
            return
        fields = parse_l3l4(data)
        if fields is None:
            return
        src, dst, proto, sport, dport = fields
        rule = self.rules_by_cookie.get(cookies.with_generation(cookie, 0))
        by_ip = {str(ip): p.key for p in self.pods.values() for ip in p.ips}
        verdict = "allow" if rule else "deny"
        policy, _, rule_text = (rule or "").partition("/")
        if rule:
            ns_name, _, rest = rule.partition("/")
            name, _, rule_text = rest.partition("/")
            policy = f"{ns_name}/{name}"
        log.info("policy-log verdict=%s %s=%s rule=%s src=%s(%s) dst=%s(%s) proto=%s port=%s%s", verdict, self.kind
                 if self.kind != "networkpolicy" else "policy", policy or "-", rule_text or "default-deny",
                 by_ip.get(src, "-"), src, by_ip.get(dst, "-"), dst, proto, dport, self.log_context)


def _recording(ids: RuleIds | NetworkRuleIds, used: set[str]) -> Callable[[str], int]:
    """The rule-id function for one compile, noting which rules it asked for."""
    def rule_id(rule: str) -> int:
        used.add(rule)
        return ids(rule)
    return rule_id


def parse_l3l4(frame: bytes) -> tuple[str, str, str, int, int] | None:
    """(source, destination, protocol, source port, destination port) of an Ethernet frame
    carrying IPv4 or IPv6 (addresses as text, IPv6 in its compressed form)."""
    import ipaddress
    import socket
    import struct

    if frame[12:14] == b"\x81\x00":  # 802.1Q (from a provider network's uplink): skip the tag
        frame = frame[:12] + frame[16:]
    if len(frame) >= 54 and frame[12:14] == b"\x86\xdd":
        ip6 = frame[14:]
        # the next header as sent (pods send no extension headers through policy's rules)
        proto6 = {6: "TCP", 17: "UDP", 132: "SCTP", 58: "ICMPv6"}.get(ip6[6], str(ip6[6]))
        sport = dport = 0
        if proto6 in ("TCP", "UDP", "SCTP") and len(ip6) >= 44:
            sport, dport = struct.unpack("!HH", ip6[40:44])
        return (str(ipaddress.IPv6Address(ip6[8:24])), str(ipaddress.IPv6Address(ip6[24:40])), proto6,
                sport, dport)
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return None
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    proto = {6: "TCP", 17: "UDP", 132: "SCTP", 1: "ICMP"}.get(ip[9], str(ip[9]))
    sport = dport = 0
    if proto in ("TCP", "UDP", "SCTP") and len(ip) >= ihl + 4:
        sport, dport = struct.unpack("!HH", ip[ihl:ihl + 4])
    return socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20]), proto, sport, dport
