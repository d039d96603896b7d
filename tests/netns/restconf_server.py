"""A RESTCONF config datastore for the northbound tests: `python restconf_server.py PORT STATE LOG`.

It plays the part of OpenDaylight's `/restconf/config` for the four COE lists: PUT of
`{list-path}/{uid}` with `{"<list>": [entry]}` stores the entry (the body's uid must match the
path), DELETE removes it (404 when absent), GET of a list's container answers
`{"<container>": {"<list>": [...]}}` (404 when empty), as ODL does. Basic auth `admin:admin`
is required. The datastore lives in STATE (JSON, rewritten on every change, read at start: a
restarted controller that kept its data); every request is appended to LOG as `METHOD PATH
STATUS`, so tests count them. Prints `ready` once listening.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

from aiohttp import web

LISTS = {"pod:coe/pods": ("coe", "pods"), "k8s-node:k8s-nodes-info/k8s-nodes": ("k8s-nodes-info", "k8s-nodes"),
         "service:service-information/services": ("service-information", "services"),
         "service:endpoints-info/endpoints": ("endpoints-info", "endpoints")}
CONTAINERS = {path.split("/")[0]: path for path in LISTS}
AUTH = "Basic " + base64.b64encode(b"admin:admin").decode()


def main() -> None:
    port, state_file, log_file = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    tree: dict[str, dict] = json.loads(state_file.read_text()) if state_file.exists() else {}

    def record(request: web.Request, status: int) -> None:
        with open(log_file, "a") as f:
            f.write(f"{request.method} {request.match_info['path']} {status}\n")

    def save() -> None:
        tmp = state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(tree, sort_keys=True))
        tmp.replace(state_file)

    async def handle(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != AUTH:
            record(request, 401)
            return web.Response(status=401, text="unauthorized")
        path = request.match_info["path"]
        if request.method == "GET" and path in CONTAINERS:
            list_path = CONTAINERS[path]
            entries = [v for k, v in sorted(tree.items()) if k.rsplit("/", 1)[0] == list_path]
            status = 200 if entries else 404
            record(request, status)
            container, name = LISTS[list_path]
            return web.json_response({container: {name: entries}}, status=status)
        list_path, _, uid = path.rpartition("/")
        if list_path not in LISTS:
            record(request, 400)
            return web.Response(status=400, text=f"unknown path {path}")
        if request.method == "PUT":
            body = await request.json()
            entries = body.get(LISTS[list_path][1])
            if not isinstance(entries, list) or len(entries) != 1 or entries[0].get("uid") != uid:
                record(request, 400)
                return web.Response(status=400, text="want {list: [entry]} with the path's uid")
            status = 200 if path in tree else 201
            tree[path] = entries[0]
            save()
            record(request, status)
            return web.Response(status=status)
        if request.method == "DELETE":
            status = 200 if tree.pop(path, None) is not None else 404
            save()
            record(request, status)
            return web.Response(status=status)
        if request.method == "GET":
            status = 200 if path in tree else 404
            record(request, status)
            return web.json_response({LISTS[list_path][1]: [tree[path]]} if path in tree else {}, status=status)
        record(request, 405)
        return web.Response(status=405)

    app = web.Application()
    app.router.add_route("*", "/restconf/config/{path:.*}", handle)

    async def ready(_app: web.Application) -> None:
        print("ready", flush=True)
    app.on_startup.append(ready)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


if __name__ == "__main__":
    main()
