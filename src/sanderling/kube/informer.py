"""A Kubernetes informer on lightkube: list, then watch from the list's resourceVersion.

It keeps a cache of the objects (plain dicts) and calls `on_change(key, obj_or_None)` for every
real change. Watches ask for bookmarks, so the resourceVersion to resume from stays fresh on a
quiet resource. A watch that ends (server timeout, API server restart) is resumed from the last
resourceVersion seen, with backoff while the server is unreachable; 410 Gone (the version was
compacted away) relists and diffs the new list against the cache, so consumers see only what
really changed while they were away: nothing installed is torn down and rebuilt.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx2 as httpx  # lightkube 1.x bundles httpx as httpx2
from lightkube import AsyncClient

log = logging.getLogger(__name__)

OnChange = Callable[[str, "dict[str, Any] | None"], None]


class Gone(Exception):
    """The resourceVersion to watch from is too old: relist."""


class WatchError(Exception):
    """The server ended a watch with an error other than 410: relist."""


def object_key(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{ns}/{meta.get('name')}" if ns else str(meta.get("name"))


def _status_code(exc: BaseException) -> int:
    status = getattr(exc, "status", None)
    code = getattr(status, "code", None)
    if isinstance(code, int):
        return code
    response = getattr(exc, "response", None)
    return int(getattr(response, "status_code", 0) or 0)


def _untyped(resource: Any, namespaced: bool) -> Any:
    """The same API resource decoded as plain dicts.

    Typed models insist on required fields, but a watch BOOKMARK carries only kind, apiVersion
    and metadata.resourceVersion (an EndpointSlice bookmark has no addressType); the informer
    converts to dicts anyway, so it decodes generically and never trips on one.
    """
    from lightkube.generic_resource import create_global_resource, create_namespaced_resource

    info = resource._api_info
    key = (info.resource.group, info.resource.version, info.resource.kind)
    if key not in _UNTYPED:  # lightkube registers one class per kind: make it once, share it
        make = create_namespaced_resource if namespaced else create_global_resource
        _UNTYPED[key] = make(info.resource.group, info.resource.version, info.resource.kind, info.plural)
    return _UNTYPED[key]


_UNTYPED: dict[tuple[str, str, str], Any] = {}


def _as_dict(item: Any) -> dict[str, Any]:
    return item.to_dict() if hasattr(item, "to_dict") else dict(item)


class Informer:
    def __init__(self, client: AsyncClient, resource: Any, on_change: OnChange, *, namespaced: bool = True,
                 fields: dict[str, Any] | None = None, labels: dict[str, Any] | None = None,
                 server_timeout: int = 300, max_backoff: float = 5.0) -> None:
        self.client = client
        self.resource = _untyped(resource, namespaced)
        self.on_change = on_change
        self.namespaced = namespaced
        self.fields = fields
        self.labels = labels
        self.server_timeout = server_timeout
        self.max_backoff = max_backoff
        self.objects: dict[str, dict[str, Any]] = {}
        self.synced = asyncio.Event()
        self.resource_version = ""
        self.lists = 0
        self.bookmarks = 0
        self.streams = 0  # watch streams established
        self.events = 0  # changes handed to on_change
        self.watching = False  # a watch stream is open now
        self.lost_at: float | None = None  # monotonic time the last stream broke, until one is open again
        self.name = getattr(resource, "__name__", str(resource))  # the typed name, for log lines

    def _scope(self) -> dict[str, Any]:
        scope: dict[str, Any] = {"namespace": "*"} if self.namespaced else {}
        if self.fields:
            scope["fields"] = self.fields
        if self.labels:
            scope["labels"] = self.labels
        return scope

    async def run(self) -> None:
        backoff = 0.1
        rv: str | None = None
        while True:
            streams = self.streams
            try:
                if rv is None:
                    rv = await self._relist()
                rv = await self._watch(rv)
                backoff = 0.1
            except Gone:
                log.info("%s: resourceVersion %s is gone (compacted); relisting", self.name, rv)
                rv = None
            except asyncio.CancelledError:
                raise
            except (httpx.HTTPError, OSError) as exc:
                self._lost()
                if _status_code(exc) == 410:
                    rv = None
                    continue
                if rv is not None and self.resource_version:
                    rv = self.resource_version  # resume after what the broken stream delivered
                if self.streams != streams:
                    backoff = 0.1  # it was watching: an outage starts now, not a continued one
                log.warning("%s: API unreachable (%s); retrying in %.1fs", self.name, exc or type(exc).__name__,
                            backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)
            except Exception:  # a decoding bug or a server error must not end the informer
                self._lost()
                log.exception("%s: informer failed; relisting in %.1fs", self.name, backoff)
                rv = None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)

    def _lost(self) -> None:
        if self.lost_at is None:
            self.lost_at = time.monotonic()

    async def _relist(self) -> str:
        listing = self.client.list(self.resource, **self._scope())
        fresh: dict[str, dict[str, Any]] = {}
        async for item in listing:
            obj = _as_dict(item)
            fresh[object_key(obj)] = obj
        self.lists += 1
        for key in [k for k in self.objects if k not in fresh]:
            del self.objects[key]
            self._notify(key, None)
        for key, obj in fresh.items():
            old = self.objects.get(key)
            if old is None or old["metadata"].get("resourceVersion") != obj["metadata"].get("resourceVersion"):
                self.objects[key] = obj
                self._notify(key, obj)
        self.resource_version = getattr(listing, "_resourceVersion", None) or ""
        self.synced.set()
        log.info("%s: listed %d at resourceVersion %s", self.name, len(fresh), self.resource_version)
        return self.resource_version

    async def _watch(self, rv: str) -> str:
        """Follow changes from rv until the server ends the stream; return the last version seen.

        One HTTP watch request, read here rather than through lightkube's watch(): that one
        neither asks for bookmarks nor reports 410 (it silently re-watches from "now", losing what
        happened meanwhile), re-watches on its own so a healthy stream never returns, and does not
        say when a stream is established, which readiness and the retry backoff need to know."""
        scope = self._scope()
        params: dict[str, Any] = {"resourceVersion": rv, "allowWatchBookmarks": "true",
                                  "timeoutSeconds": self.server_timeout}
        if self.labels or self.fields:
            from lightkube.core.selector import build_selector

            if self.labels:
                params["labelSelector"] = build_selector(self.labels)
            if self.fields:
                params["fieldSelector"] = build_selector(self.fields, for_fields=True)
        generic = self.client._client
        br = generic.prepare_request("list", res=self.resource, namespace=scope.get("namespace"), watch=True,
                                     params=params)
        request = generic._client.build_request(br.method, br.url, params=br.params, timeout=generic._watch_timeout)
        response = await generic.send(request, stream=True)
        try:
            if response.status_code == 410:
                raise Gone
            response.raise_for_status()
            self._established()
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise Gone
                    raise WatchError(f"{obj.get('code')} {obj.get('reason')}: {obj.get('message')}")
                new_rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                if kind == "BOOKMARK":
                    self.bookmarks += 1
                elif kind == "DELETED":
                    key = object_key(obj)
                    if self.objects.pop(key, None) is not None:
                        self._notify(key, None)
                elif kind in ("ADDED", "MODIFIED"):
                    key = object_key(obj)
                    self.objects[key] = obj
                    self._notify(key, obj)
                rv = new_rv
                self.resource_version = rv
        finally:
            self.watching = False
            await response.aclose()
        return rv

    def _established(self) -> None:
        if self.lost_at is not None:
            log.info("%s: watching again after %.1f s", self.name, time.monotonic() - self.lost_at)
        self.watching = True
        self.lost_at = None
        self.streams += 1

    def _notify(self, key: str, obj: dict[str, Any] | None) -> None:
        self.events += 1
        try:
            self.on_change(key, obj)
        except Exception:  # one consumer's bug on one object must not stop the stream
            log.exception("%s %s: handler failed", self.name, key)
