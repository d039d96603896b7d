"""The kube-proxy replacement's state: Services and EndpointSlices in, realizer objects out.

Informers feed Service and EndpointSlice changes; each change recompiles only the Service it
concerns (its flows and groups are one realizer object, so one bundle rewrites exactly them and
established connections to endpoints that still exist keep their conntrack entries). Endpoint
reply flows are shared by every Service with that endpoint and reference-counted. A Service the
model refuses is reported once (log line and a Kubernetes Event) and left out; the rest goes on.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from sanderling.compiler import services as compiler
from sanderling.model.errors import ModelError
from sanderling.model.services import SERVICE_NAME_LABEL, Service, endpoints_from, service_from
from sanderling.openflow.realizer import Realizer

log = logging.getLogger(__name__)

EndpointTuple = compiler.EndpointTuple


class GroupIds:
    """Group ids per service port and endpoint set. Never reused within a run: a freed id taken
    by another service in the same bundle could be deleted after it was re-added."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self._next = 1

    def __call__(self, key: str) -> int:
        gid = self._ids.get(key)
        if gid is None:
            gid = self._ids[key] = self._next
            self._next += 1
        return gid

    def release_prefix(self, prefix: str, keep: set[str]) -> None:
        for key in [k for k in self._ids if k.startswith(prefix) and k not in keep]:
            del self._ids[key]


class ServiceProxy:
    def __init__(self, cfg: compiler.ProxyConfig, realizer: Realizer, changed: Callable[[], None],
                 report: Callable[[str, str, str], None] | None = None) -> None:
        self.cfg = cfg
        self.realizer = realizer
        self.changed = changed
        self.report = report  # (namespace, name, message) -> Event on the Service
        self.raw_services: dict[str, dict[str, Any]] = {}
        self.slices: dict[str, dict[str, dict[str, Any]]] = {}  # service key -> slice name -> slice
        self.slice_owner: dict[str, str] = {}  # slice key -> service key
        self.errors: dict[str, str] = {}
        self.group_ids = GroupIds()
        self.endpoint_refs: Counter[EndpointTuple] = Counter()
        self.endpoints_of: dict[str, set[EndpointTuple]] = {}

    def start(self) -> None:
        self.realizer.set_object("service/static", compiler.static_flows(self.cfg))

    # ---- informer callbacks --------------------------------------------------------------

    def service_changed(self, key: str, obj: dict[str, Any] | None) -> None:
        if obj is None:
            self.raw_services.pop(key, None)
        else:
            self.raw_services[key] = obj
        self._recompile(key)

    def slice_changed(self, key: str, obj: dict[str, Any] | None) -> None:
        old_owner = self.slice_owner.pop(key, None)
        if old_owner is not None:
            self.slices.get(old_owner, {}).pop(key, None)
        owner = None
        if obj is not None:
            meta = obj.get("metadata") or {}
            svc_name = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
            if svc_name:
                owner = f"{meta.get('namespace', '')}/{svc_name}"
                self.slices.setdefault(owner, {})[key] = obj
                self.slice_owner[key] = owner
        for svc_key in {old_owner, owner} - {None}:
            assert svc_key is not None
            self._recompile(svc_key)

    # ---- compile -------------------------------------------------------------------------

    def _recompile(self, key: str) -> None:
        svc = self._model(key)
        object_key = f"service/{key}"
        if svc is None or svc.headless:
            self.realizer.remove_object(object_key)
            self.group_ids.release_prefix(f"{key}/", set())
            self._set_endpoints(key, set())
            self.changed()
            return
        slices = list(self.slices.get(key, {}).values())
        endpoints = {port: endpoints_from(slices, port) for port in svc.ports}
        used: set[str] = set()

        def group_id(gkey: str) -> int:
            used.add(gkey)
            return self.group_ids(gkey)

        flows, groups = compiler.service_flows(self.cfg, svc, endpoints, group_id)
        total = {(e.ip, e.port) for eps in endpoints.values() for e in eps}
        log.info("service %s: %d port(s), %d endpoint(s) (%d here), %d flows, %d groups", key, len(svc.ports),
                 len(total), sum(1 for eps in endpoints.values() for e in eps if e.node == self.cfg.node_name),
                 len(flows), len(groups))
        self.group_ids.release_prefix(f"{key}/", used)
        self.realizer.set_object(object_key, flows, groups)
        self._set_endpoints(key, compiler.service_endpoints(self.cfg, svc, endpoints))
        self.changed()

    def _model(self, key: str) -> Service | None:
        raw = self.raw_services.get(key)
        if raw is None:
            self.errors.pop(key, None)
            return None
        try:
            svc = service_from(raw)
            self.errors.pop(key, None)
            return svc
        except ModelError as exc:
            if self.errors.get(key) != str(exc):
                log.error("%s", exc)
                if self.report is not None:
                    ns, _, name = key.partition("/")
                    self.report(ns, name, str(exc))
            self.errors[key] = str(exc)
            return None

    def _set_endpoints(self, key: str, now: set[EndpointTuple]) -> None:
        before = self.endpoints_of.get(key, set())
        for ep in now - before:
            self.endpoint_refs[ep] += 1
            if self.endpoint_refs[ep] == 1:
                self.realizer.set_object(compiler.endpoint_key(*ep), compiler.endpoint_reply_flows(*ep))
        for ep in before - now:
            self.endpoint_refs[ep] -= 1
            if self.endpoint_refs[ep] <= 0:
                del self.endpoint_refs[ep]
                self.realizer.remove_object(compiler.endpoint_key(*ep))
        if now:
            self.endpoints_of[key] = now
        else:
            self.endpoints_of.pop(key, None)
