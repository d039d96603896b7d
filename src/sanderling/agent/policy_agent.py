"""NetworkPolicy enforcement state: policies, pods and namespaces in, realizer objects out.

Informers feed the three kinds; a burst of changes is compiled once (scheduled on the event
loop). Each policy is one realizer object and each isolated local pod another, so the realizer
sends only what a change really alters (relabelling a pod touches the policies whose peers or
targets it enters or leaves). A policy the model refuses is reported once (log line and a
Kubernetes Event) and left out; the others keep working.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sanderling.compiler import policy as compiler
from sanderling.model.errors import ModelError
from sanderling.model.policy import PodInfo, Policy, pod_info, policy_from
from sanderling.openflow.realizer import Realizer

log = logging.getLogger(__name__)


class RuleIds:
    """Stable conjunction ids (and priorities) per rule key for the life of the agent."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}

    def __call__(self, key: str) -> int:
        rid = self._ids.get(key)
        if rid is None:
            rid = self._ids[key] = len(self._ids) + 1
        return rid


class PolicyAgent:
    def __init__(self, node_name: str, realizer: Realizer, changed: Callable[[], None],
                 schedule: Callable[[Callable[[], None]], object] | None = None,
                 report: Callable[[str, str, str], None] | None = None) -> None:
        self.node_name = node_name
        self.realizer = realizer
        self.changed = changed
        self.schedule = schedule
        self.report = report
        self.raw_policies: dict[str, dict[str, Any]] = {}
        self.pods: dict[str, PodInfo] = {}
        self.namespace_labels: dict[str, dict[str, str]] = {}
        self.errors: dict[str, str] = {}
        self.rule_ids = RuleIds()
        self._objects: set[str] = set()
        self._scheduled = False

    def start(self) -> None:
        self.realizer.set_object("policy/static", compiler.static_flows())

    # ---- informer callbacks --------------------------------------------------------------

    def policy_changed(self, key: str, obj: dict[str, Any] | None) -> None:
        if obj is None:
            self.raw_policies.pop(key, None)
        else:
            self.raw_policies[key] = obj
        self._mark()

    def pod_changed(self, key: str, obj: dict[str, Any] | None) -> None:
        if obj is None:
            self.pods.pop(key, None)
        else:
            self.pods[key] = pod_info(obj)
        self._mark()

    def namespace_changed(self, key: str, obj: dict[str, Any] | None) -> None:
        if obj is None:
            self.namespace_labels.pop(key, None)
        else:
            self.namespace_labels[key] = dict((obj.get("metadata") or {}).get("labels") or {})
        self._mark()

    def _mark(self) -> None:
        if self.schedule is None:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            self.schedule(self.flush)

    # ---- compile -------------------------------------------------------------------------

    def policies(self) -> list[Policy]:
        out = []
        for key, raw in sorted(self.raw_policies.items()):
            try:
                out.append(policy_from(raw))
                self.errors.pop(key, None)
            except ModelError as exc:
                if self.errors.get(key) != str(exc):
                    log.error("%s", exc)
                    if self.report is not None:
                        ns, _, name = key.partition("/")
                        self.report(ns, name, str(exc))
                self.errors[key] = str(exc)
        return out

    def flush(self) -> None:
        self._scheduled = False
        policies = self.policies()
        pods = tuple(p for p in self.pods.values() if p.ip is not None)
        local = [p for p in pods if p.node == self.node_name]
        cluster = compiler.ClusterPods(pods, self.namespace_labels)
        wanted: dict[str, list[Any]] = {}
        for policy in policies:
            flows = compiler.policy_flows(policy, local, cluster, self.rule_ids)
            if flows:
                wanted[f"policy/{policy.key}"] = flows
        for key, (pod, ingress, egress) in compiler.isolated(policies, local).items():
            wanted[f"policy-pod/{key}"] = compiler.isolation_flows(pod, ingress, egress)
        for gone in self._objects - wanted.keys():
            self.realizer.remove_object(gone)
        for key, flows in wanted.items():
            self.realizer.set_object(key, flows)
        self._objects = set(wanted)
        self.changed()
