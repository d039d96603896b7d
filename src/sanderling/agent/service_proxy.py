"""The kube-proxy replacement's state: Services and EndpointSlices in, realizer objects out.

Informers feed Service and EndpointSlice changes; each change recompiles only the Service it
concerns (its flows and groups are one realizer object, so one bundle rewrites exactly them and
established connections to endpoints that still exist keep their conntrack entries). Flows
several Services need (conntrack for a target port's replies, hairpin SNAT for a local
endpoint) are objects of their own, reference-counted. A Service the
model refuses is reported once (log line and a Kubernetes Event) and left out; the rest goes on.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sanderling.agent.object_errors import ObjectErrors
from sanderling.agent.sync import DesiredState
from sanderling.compiler import services as compiler
from sanderling.model.network_services import MANAGED_BY, MANAGER
from sanderling.model.services import SERVICE_NAME_LABEL, Service, endpoints_by_port, service_from, usable

log = logging.getLogger(__name__)


def _trigger_time(obj: dict[str, Any] | None) -> float | None:
    """endpoints.kubernetes.io/last-change-trigger-time of an EndpointSlice (RFC 3339), if set."""
    value = ((obj or {}).get("metadata") or {}).get("annotations", {}).get(TRIGGER_TIME)
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


TRIGGER_TIME = "endpoints.kubernetes.io/last-change-trigger-time"


class GroupIds:
    """Group ids per service port and endpoint set. Never reused within a run: a freed id taken
    by another service in the same bundle could be deleted after it was re-added."""

    def __init__(self) -> None:
        self._ids: dict[str, dict[str, int]] = {}  # service key -> group key -> id
        self._next = 1

    def get(self, service: str, key: str) -> int:
        ids = self._ids.setdefault(service, {})
        gid = ids.get(key)
        if gid is None:
            gid = ids[key] = self._next
            self._next += 1
        return gid

    def services(self) -> list[str]:
        """The Services that have groups."""
        return list(self._ids)

    def of(self, service: str) -> dict[str, int]:
        """{group key: id} of one Service."""
        return self._ids.get(service, {})

    def release(self, service: str, keep: set[str]) -> None:
        ids = self._ids.get(service, {})
        for key in [k for k in ids if k not in keep]:
            del ids[key]
        if not ids:
            self._ids.pop(service, None)


class ServiceProxy:
    def __init__(self, cfg: compiler.ProxyConfig, realizer: DesiredState, changed: Callable[[], None],
                 report: Callable[[str, str, str], None] | None = None,
                 schedule: Callable[[Callable[[], None]], object] | None = None) -> None:
        """`changed` is called after compiled objects changed; `schedule(fn)` runs fn soon (the
        event loop's call_soon), so a burst of events compiles each Service once; without it,
        every event compiles at once."""
        self.cfg = cfg
        self.schedule = schedule
        self.health: dict[str, tuple[int, int]] = {}  # service key -> (healthCheckNodePort, local endpoints)
        self.on_health: Callable[[dict[int, tuple[str, int]]], None] | None = None
        self._dirty: set[str] = set()
        self._flush_scheduled = False
        self.realizer = realizer
        self.changed = changed
        self.raw_services: dict[str, dict[str, Any]] = {}
        self.slices: dict[str, dict[str, dict[str, Any]]] = {}  # service key -> slice name -> slice
        self.slice_owner: dict[str, str] = {}  # slice key -> service key
        self._errors = ObjectErrors(report)
        self.group_ids = GroupIds()
        self.shared_refs: Counter[str] = Counter()  # shared object key -> services needing it
        self.shared_of: dict[str, set[str]] = {}
        # metrics: seconds each flush took to compile, and when each Service's not yet programmed
        # change happened (the EndpointSlice's trigger time when the control plane sets it)
        self.flush_observers: list[Callable[[float], None]] = []
        self.changed_at: dict[str, float] = {}

    def start(self) -> None:
        self.realizer.set_object("service/static", compiler.static_flows(self.cfg))

    # ---- informer callbacks --------------------------------------------------------------

    def service_changed(self, key: str, obj: dict[str, Any] | None) -> None:
        if obj is None:
            self.raw_services.pop(key, None)
        else:
            self.raw_services[key] = obj
        self._mark(key)

    def slice_changed(self, key: str, obj: dict[str, Any] | None) -> None:
        old_owner = self.slice_owner.pop(key, None)
        if old_owner is not None:
            self.slices.get(old_owner, {}).pop(key, None)
        owner = None
        if obj is not None:
            meta = obj.get("metadata") or {}
            labels = meta.get("labels") or {}
            svc_name = labels.get(SERVICE_NAME_LABEL)
            # a secondary network's endpoints (written by the agents): never the pod network's
            if svc_name and labels.get(MANAGED_BY) != MANAGER:
                owner = f"{meta.get('namespace', '')}/{svc_name}"
                self.slices.setdefault(owner, {})[key] = obj
                self.slice_owner[key] = owner
        trigger = _trigger_time(obj)
        for svc_key in {old_owner, owner} - {None}:
            assert svc_key is not None
            self.changed_at.setdefault(svc_key, trigger or time.time())
            self._mark(svc_key)

    # ---- compile -------------------------------------------------------------------------

    def _mark(self, key: str) -> None:
        self._dirty.add(key)
        if self.schedule is None:
            self.flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self.schedule(self.flush)

    def flush(self) -> None:
        """Compile every Service changed since the last flush, then tell the controller."""
        self._flush_scheduled = False
        started = time.perf_counter()
        dirty, self._dirty = self._dirty, set()
        health_before = dict(self.health)
        for key in sorted(dirty):
            try:
                self._recompile(key)
            except Exception as exc:  # a value the model let through: this Service alone, never the batch
                log.exception("service/%s: cannot be compiled", key)
                self._errors.warn(key, f"service/{key}: cannot be compiled ({exc}); not served")
                self.health.pop(key, None)
                self.realizer.remove_object(f"service/{key}")
                self.group_ids.release(key, set())
                self._set_shared(key, set())
        if dirty:
            self.changed()
            seconds = time.perf_counter() - started
            for observer in self.flush_observers:
                observer(seconds)
        if self.health != health_before and self.on_health is not None:
            self.on_health({port: (key, local) for key, (port, local) in self.health.items()})

    def _recompile(self, key: str) -> None:
        svc = self._model(key)
        object_key = f"service/{key}"
        if svc is None or svc.headless:
            self.health.pop(key, None)
            self.realizer.remove_object(object_key)
            self.group_ids.release(key, set())
            self._set_shared(key, set())
            return
        slices = list(self.slices.get(key, {}).values())
        endpoints = endpoints_by_port(slices, svc.ports)
        if self.cfg.masq_ip6 is not None and (svc.cluster_ips6 or svc.external_ips6 or svc.lb_ips6):
            # dual-stack or IPv6-only: its IPv6 endpoints
            for port, eps in endpoints_by_port(slices, svc.ports, family=6).items():
                endpoints[port] += eps
        used: set[str] = set()

        def group_id(gkey: str) -> int:
            used.add(gkey)
            return self.group_ids.get(key, gkey)

        refused = [str(ip) for ip in svc.external_ips if not self.cfg.external_ip_allowed(ip)]
        self._errors.warn(key, f"service/{key}: spec.externalIPs {', '.join(refused)} outside the agent's "
                               "--external-ip-cidrs allow-list: ignored (externalIPs are off unless allowed, "
                               "CVE-2020-8554)" if refused else None)
        flows, groups = compiler.service_flows(self.cfg, svc, endpoints, group_id)
        total = {(e.ip, e.port) for eps in endpoints.values() for e in eps}
        log.info("service %s: %d port(s), %d endpoint(s) (%d here), %d flows, %d groups", key, len(svc.ports),
                 len(total), sum(1 for eps in endpoints.values() for e in eps if e.node == self.cfg.node_name),
                 len(flows), len(groups))
        self.group_ids.release(key, used)
        self.realizer.set_object(object_key, flows, groups)
        self._set_shared(key, compiler.shared_keys(self.cfg, svc, endpoints))
        if svc.type == "LoadBalancer" and svc.external_local and svc.health_check_node_port:
            here = {e.ip for eps in endpoints.values() for e in usable(eps) if e.node == self.cfg.node_name}
            self.health[key] = (svc.health_check_node_port, len(here))
        else:
            self.health.pop(key, None)

    def _model(self, key: str) -> Service | None:
        return self._errors.convert(key, self.raw_services.get(key), service_from)

    def _set_shared(self, key: str, now: set[str]) -> None:
        before = self.shared_of.get(key, set())
        for shared in now - before:
            self.shared_refs[shared] += 1
            if self.shared_refs[shared] == 1:
                self.realizer.set_object(shared, compiler.shared_flows(self.cfg, shared))
        for shared in before - now:
            self.shared_refs[shared] -= 1
            if self.shared_refs[shared] <= 0:
                del self.shared_refs[shared]
                self.realizer.remove_object(shared)
        if now:
            self.shared_of[key] = now
        else:
            self.shared_of.pop(key, None)
