"""HTTP front of the lab API server (aiohttp): Kubernetes REST paths, Status errors, watches.

Serves list/get/create/update/merge-patch/delete and watch with resourceVersion, bookmarks and
410 Gone after compaction, label and field selectors, and enough discovery for kubectl.
With a token, every request must carry it (`Authorization: Bearer ...`, as kubeconfig's `token`
sends it; 401 otherwise); with a TLS context it speaks HTTPS only. The lab uses both.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import ssl
from typing import Any

from aiohttp import web

from sanderling.lab.apiserver import protobuf
from sanderling.lab.apiserver.admission import ServiceAllocator
from sanderling.lab.apiserver.resources import BY_PATH, RESOURCES, Resource, matches_fields, matches_labels
from sanderling.lab.apiserver.store import ApiError, Store, WatchEvent
from sanderling.lab.apiserver.validation import validate

log = logging.getLogger(__name__)


def _pb_string(field: int, text: str) -> bytes:
    data = text.encode()
    return bytes([(field << 3) | 2, len(data)]) + data


def jsonr(body: Any, status: int = 200) -> web.Response:
    """JSON with exactly `application/json`, as kube-apiserver sends it (clients compare it)."""
    return web.Response(body=json.dumps(body).encode(), status=status, headers={"Content-Type": "application/json"})


def status(code: int, reason: str, message: str) -> web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}
    return jsonr(body, status=code)


BY_KEY: dict[str, Resource] = {r.key: r for r in RESOURCES}


def admission(allocator: ServiceAllocator) -> Any:
    """The store's admission hook: validate every written object, allocate Service addresses and ports."""
    def admit(resource: str, namespace: str, new: dict[str, Any], current: dict[str, Any] | None,
              store: Store, subresource: str | None = None) -> None:
        res = BY_KEY.get(resource)
        if res is None:
            return
        validate(res.kind, res.namespaced, new)
        if res.kind == "Service" and subresource != "status":
            name = new["metadata"]["name"]
            others = [s for s in store.list_unlocked(resource, None)
                      if (s["metadata"].get("namespace"), s["metadata"]["name"]) != (namespace, name)]
            allocator.admit(name, new, current, others)
    return admit


def bearer_auth(token: str) -> Any:
    """Every request must present the token: a 401 Status (as kube-apiserver answers) otherwise."""
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Any) -> web.StreamResponse:
        if not hmac.compare_digest(request.headers.get("Authorization", "").encode(), expected):
            return status(401, "Unauthorized", "Unauthorized: a bearer token is required (see the lab's kubeconfig)")
        return await handler(request)
    return check


class ApiServer:
    def __init__(self, store: Store, bookmark_interval: float = 5.0,
                 allocator: ServiceAllocator | None = None, token: str | None = None) -> None:
        self.store = store
        store.admission = admission(allocator or ServiceAllocator())
        self.bookmark_interval = bookmark_interval
        self.app = web.Application(client_max_size=16 << 20,
                                   middlewares=[bearer_auth(token)] if token else [])
        self._watches: set[asyncio.Task[Any]] = set()
        self.app.on_shutdown.append(self._end_watches)
        self.app.router.add_get("/version", self.version)
        self.app.router.add_post("/lab/compact", self.compact)
        self.app.router.add_get("/openapi/v2", self.openapi)
        self.app.router.add_get("/api", self.api_versions)
        self.app.router.add_get("/apis", self.api_groups)
        self.app.router.add_post("/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", self.access_review)
        self.app.router.add_get("/api/{version}", self.resource_list)
        self.app.router.add_get("/apis/{group}/{version}", self.resource_list)
        for prefix in ("/api/{version}", "/apis/{group}/{version}"):
            self.app.router.add_route("*", prefix + "/namespaces/{namespace}/{plural}", self.collection)
            self.app.router.add_route("*", prefix + "/namespaces/{namespace}/{plural}/{name}", self.item)
            self.app.router.add_route("*", prefix + "/namespaces/{namespace}/{plural}/{name}/{sub}", self.item)
            self.app.router.add_route("*", prefix + "/{plural}", self.collection)
            self.app.router.add_route("*", prefix + "/{plural}/{name}", self.item)
            self.app.router.add_route("*", prefix + "/{plural}/{name}/{sub}", self.item)

    # ---- discovery -----------------------------------------------------------------------

    async def version(self, request: web.Request) -> web.Response:
        return jsonr({"major": "1", "minor": "30", "gitVersion": "v1.30.0-sanderling-lab",
                                  "platform": "linux/amd64"})

    async def access_review(self, request: web.Request) -> web.Response:
        """SelfSubjectAccessReview: this server has one token and it may do everything; the
        answer says so (kube-apiserver judges RBAC for real in `lab up --control-plane kubernetes`)."""
        body = await request.json()
        body["status"] = {"allowed": True, "reason": "the lab's embedded API server grants its one token everything"}
        return jsonr(body, status=201)

    async def _end_watches(self, _app: web.Application) -> None:
        """Watches are endless streams: end them so a shutdown does not wait for their timeout."""
        for task in list(self._watches):
            task.cancel()

    async def compact(self, request: web.Request) -> web.Response:
        """Lab-only: drop the watch history now, as etcd compaction would, so that watchers
        resuming from an old resourceVersion get 410 Gone and must relist."""
        self.store.compact()
        return jsonr({"compactedThrough": self.store.rv})

    async def openapi(self, request: web.Request) -> web.Response:
        """An empty schema: kubectl validates against it and finds nothing to object to.
        kubectl asks for the gnostic protobuf form: swagger="2.0", info{title, version}."""
        if "protobuf" in request.headers.get("Accept", ""):
            info = _pb_string(1, "sanderling-lab") + _pb_string(2, "v1")
            body = _pb_string(1, "2.0") + bytes([0x12, len(info)]) + info
            return web.Response(body=body, headers={"Content-Type":
                                                    "application/com.github.proto-openapi.spec.v2.v1.0+protobuf"})
        return jsonr({"swagger": "2.0", "info": {"title": "sanderling-lab", "version": "v1"}, "paths": {},
                      "definitions": {}})

    async def api_versions(self, request: web.Request) -> web.Response:
        return jsonr({"kind": "APIVersions", "versions": ["v1"],
                                  "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]})

    async def api_groups(self, request: web.Request) -> web.Response:
        groups: dict[str, list[str]] = {}
        for r in RESOURCES:
            if r.group:
                groups.setdefault(r.group, [])
                if r.version not in groups[r.group]:
                    groups[r.group].append(r.version)
        return jsonr({"kind": "APIGroupList", "apiVersion": "v1", "groups": [
            {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
             "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]}} for g, vs in groups.items()]})

    async def resource_list(self, request: web.Request) -> web.Response:
        group = request.match_info.get("group", "")
        version = request.match_info["version"]
        found = [r for r in RESOURCES if r.group == group and r.version == version]
        if not found:
            return status(404, "NotFound", f"no API group version {group}/{version}")
        out = []
        for r in found:
            verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
            out.append({"name": r.plural, "singularName": r.kind.lower(), "namespaced": r.namespaced,
                        "kind": r.kind, "verbs": verbs})
            for sub in r.subresources:
                out.append({"name": f"{r.plural}/{sub}", "singularName": "", "namespaced": r.namespaced,
                            "kind": r.kind, "verbs": ["get", "patch", "update"]})
        return jsonr({"kind": "APIResourceList", "apiVersion": "v1",
                                  "groupVersion": found[0].group_version, "resources": out})

    # ---- resources -----------------------------------------------------------------------

    def _resource(self, request: web.Request) -> Resource:
        key = (request.match_info.get("group", ""), request.match_info["version"], request.match_info["plural"])
        resource = BY_PATH.get(key)
        if resource is None:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource {'/'.join(key)}")
        return resource

    def _namespace(self, request: web.Request, resource: Resource) -> str:
        ns = request.match_info.get("namespace", "")
        if resource.namespaced and not ns and request.method != "GET":
            raise ApiError(400, "BadRequest", f"{resource.plural} are namespaced: use /namespaces/NS/{resource.plural}")
        return ns if resource.namespaced else ""

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, "BadRequest", f"request body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "request body is not a JSON object")
        return body

    async def _protobuf_body(self, request: web.Request, resource: Resource, ns: str, name: str,
                             sub: str | None) -> dict[str, Any]:
        """A protobuf update of an object's metadata (Multus's pods/status write of network-status):
        the stored object with the body's labels and annotations; anything else is refused."""
        if not (resource.kind == "Pod" and sub == "status"):
            raise ApiError(415, "UnsupportedMediaType", f"{protobuf.CONTENT_TYPE} is accepted only for pods/status "
                                                        "metadata updates here; send application/json")
        try:
            _type, meta = protobuf.object_metadata(await request.read())
        except protobuf.ProtobufError as exc:
            raise ApiError(400, "BadRequest", f"protobuf body not readable: {exc}") from None
        current = self.store.get(resource.key, ns, name)
        log.info("pods/status %s/%s in protobuf: metadata applied, the body's status is not decoded (kept)", ns, name)
        return {**current, "metadata": {**current["metadata"], **meta}}

    def _validate(self, resource: Resource, body: dict[str, Any]) -> None:
        if body.get("kind") not in (None, resource.kind):
            raise ApiError(400, "BadRequest", f"kind {body.get('kind')!r} posted to {resource.plural}")
        meta = body.get("metadata")
        if meta is not None and not isinstance(meta, dict):
            raise ApiError(422, "Invalid", "metadata: must be an object")

    def _stamp(self, resource: Resource, obj: dict[str, Any]) -> dict[str, Any]:
        obj["kind"] = resource.kind
        obj["apiVersion"] = resource.group_version
        return obj

    async def collection(self, request: web.Request) -> web.StreamResponse:
        try:
            resource = self._resource(request)
            ns = self._namespace(request, resource)
            if request.method == "GET":
                if request.query.get("watch") in ("1", "true"):
                    return await self.watch(request, resource, ns or None)
                return self.list(request, resource, ns or None)
            if request.method == "POST":
                body = await self._body(request)
                self._validate(resource, body)
                created = self.store.create(resource.key, ns, self._stamp(resource, body))
                return jsonr(created, status=201)
            return status(405, "MethodNotAllowed", f"{request.method} not allowed on a collection")
        except ApiError as exc:
            return status(exc.code, exc.reason, exc.message)

    def list(self, request: web.Request, resource: Resource, ns: str | None) -> web.Response:
        items, rv = self.store.list(resource.key, ns)
        labels, fields = request.query.get("labelSelector", ""), request.query.get("fieldSelector", "")
        items = [self._stamp(resource, i) for i in items
                 if matches_labels((i.get("metadata") or {}).get("labels") or {}, labels)
                 and matches_fields(i, fields)]
        return jsonr({"kind": f"{resource.kind}List", "apiVersion": resource.group_version,
                                  "metadata": {"resourceVersion": str(rv)}, "items": items})

    async def item(self, request: web.Request) -> web.Response:
        try:
            resource = self._resource(request)
            ns = self._namespace(request, resource)
            name = request.match_info["name"]
            sub = request.match_info.get("sub")
            if sub is not None and sub not in resource.subresources:
                raise ApiError(404, "NotFound", f"{resource.plural} have no subresource {sub}")
            if request.method == "GET":
                return jsonr(self._stamp(resource, self.store.get(resource.key, ns, name)))
            if request.method == "PUT":
                if request.content_type == protobuf.CONTENT_TYPE:
                    body = await self._protobuf_body(request, resource, ns, name, sub)
                else:
                    body = await self._body(request)
                self._validate(resource, body)
                if (body.get("metadata") or {}).get("name", name) != name:
                    raise ApiError(400, "BadRequest", "metadata.name does not match the URL")
                updated = self.store.update(resource.key, ns, name, self._stamp(resource, body), sub)
                return jsonr(updated)
            if request.method == "PATCH":
                ctype = request.content_type
                if ctype not in ("application/merge-patch+json", "application/strategic-merge-patch+json",
                                 "application/json"):
                    raise ApiError(415, "UnsupportedMediaType", f"patch type {ctype} is not supported")
                patched = self.store.patch(resource.key, ns, name, await self._body(request), sub)
                return jsonr(self._stamp(resource, patched))
            if request.method == "DELETE":
                return jsonr(self._stamp(resource, self.store.delete(resource.key, ns, name)))
            return status(405, "MethodNotAllowed", f"{request.method} not allowed")
        except ApiError as exc:
            return status(exc.code, exc.reason, exc.message)

    # ---- watch ---------------------------------------------------------------------------

    async def watch(self, request: web.Request, resource: Resource, ns: str | None) -> web.StreamResponse:
        labels, fields = request.query.get("labelSelector", ""), request.query.get("fieldSelector", "")
        bookmarks = request.query.get("allowWatchBookmarks") in ("1", "true")
        timeout = float(request.query.get("timeoutSeconds", "1800"))
        since = request.query.get("resourceVersion", "")
        queue: asyncio.Queue[WatchEvent] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def listener(event: WatchEvent) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        self.store.listeners.append(listener)
        task = asyncio.current_task()
        if task is not None:
            self._watches.add(task)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)

        def wanted(body: dict[str, Any]) -> bool:
            return (matches_labels((body.get("metadata") or {}).get("labels") or {}, labels)
                    and matches_fields(body, fields))

        async def send(kind: str, obj: dict[str, Any]) -> None:
            await response.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

        last_rv = 0
        try:
            if since in ("", "0"):
                items, last_rv = self.store.list(resource.key, ns)
                for obj in items:
                    if wanted(obj):
                        await send("ADDED", self._stamp(resource, obj))
            else:
                start = int(since)
                if start < self.store.oldest_event_rv() - 1 and start < self.store.rv:
                    oldest = self.store.oldest_event_rv()
                    await send("ERROR", {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410,
                                         "reason": "Expired",
                                         "message": f"too old resource version: {start} ({oldest})"})
                    return response
                for event in self.store.events_since(resource.key, ns, start):
                    if wanted(event.body):
                        await send(event.type, self._stamp(resource, event.body))
                    last_rv = event.rv
                last_rv = max(last_rv, start)
            deadline = loop.time() + timeout
            dealt = last_rv
            while loop.time() < deadline:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=self.bookmark_interval)
                except TimeoutError:
                    if bookmarks:  # the last version this stream has dealt with: never store.rv, whose
                        # newest events may still wait in the queue (a client resuming from a bookmark
                        # ahead of them would never see them)
                        await send("BOOKMARK", {"kind": resource.kind, "apiVersion": resource.group_version,
                                                "metadata": {"resourceVersion": str(max(last_rv, dealt))}})
                    continue
                dealt = max(dealt, event.rv)
                if event.resource != resource.key or event.rv <= last_rv:
                    continue
                if ns is not None and event.namespace != ns:
                    continue
                last_rv = event.rv
                if wanted(event.body):
                    await send(event.type, self._stamp(resource, event.body))
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.store.listeners.remove(listener)
            if task is not None:
                self._watches.discard(task)
        return response


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket (bound early: it stays in the namespace it was made in)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(256)
    return sock


async def serve(store: Store, sockets: list[socket.socket], bookmark_interval: float = 5.0,
                token: str | None = None, ssl_context: ssl.SSLContext | None = None,
                allocator: ServiceAllocator | None = None) -> web.AppRunner:
    """Serve on already bound sockets (they may belong to different network namespaces)."""
    server = ApiServer(store, bookmark_interval, allocator, token=token)
    runner = web.AppRunner(server.app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    scheme = "https" if ssl_context else "http"
    for sock in sockets:
        await web.SockSite(runner, sock, ssl_context=ssl_context).start()
        log.info("lab API server on %s://%s:%d%s", scheme, *sock.getsockname()[:2],
                 " (bearer token required)" if token else "")
    return runner
