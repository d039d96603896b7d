"""Where the northbound feed sends: an OpenDaylight-style RESTCONF datastore, or a plain webhook.

`RestconfTarget`: PUT and DELETE of `{base}/restconf/config/{path}` with the COE documents; a
resync reads each list container (`GET .../pod:coe`, ...), PUTs every document and DELETEs
the entries the controller holds that the cluster no longer has. A 404 on DELETE is success
(already gone), and on a container GET means an empty list.

`WebhookTarget`: every change is one POST of a JSON event to one URL:
`{"type": "PUT", "path": ..., "document": {...}}`, `{"type": "DELETE", "path": ...}`, and a
resync is `{"type": "SYNC", "documents": {path: document, ...}}`: the receiver replaces what it
holds with exactly that. Any 2xx answer is success.

Both: basic auth (user, password) or a bearer token, TLS verified against a CA file when given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx2 as httpx  # lightkube bundles httpx as httpx2

from sanderling.northbound.coe import LISTS
from sanderling.northbound.feed import TargetError

CONTAINERS = {"pod:coe/pods": "pod:coe", "k8s-node:k8s-nodes-info/k8s-nodes": "k8s-node:k8s-nodes-info",
              "service:service-information/services": "service:service-information",
              "service:endpoints-info/endpoints": "service:endpoints-info"}


@dataclass
class Credentials:
    user: str = ""
    password: str = ""
    token: str = ""
    ca_file: str = ""

    def client(self, timeout: float) -> httpx.AsyncClient:
        auth = httpx.BasicAuth(self.user, self.password) if self.user else None
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return httpx.AsyncClient(auth=auth, headers=headers, verify=self.ca_file or True, timeout=timeout)


class _Http:
    def __init__(self, name: str, credentials: Credentials, timeout: float) -> None:
        self.name = name
        self.credentials = credentials
        self.timeout = timeout
        self._client: httpx.AsyncClient | None = None

    def http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = self.credentials.client(self.timeout)
        return self._client

    async def request(self, method: str, url: str, ok: tuple[int, ...] = (), **kwargs: Any) -> httpx.Response:
        try:
            response = await self.http().request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise TargetError(f"{method} {url}: {exc or type(exc).__name__}") from None
        if not (200 <= response.status_code < 300 or response.status_code in ok):
            raise TargetError(f"{method} {url}: HTTP {response.status_code} {response.text.strip()[:200]}")
        return response


class RestconfTarget(_Http):
    def __init__(self, base: str, credentials: Credentials, timeout: float = 10.0) -> None:
        super().__init__(f"RESTCONF {base}", credentials, timeout)
        self.base = base.rstrip("/") + "/restconf/config/"

    async def put(self, path: str, body: dict[str, Any]) -> None:
        await self.request("PUT", self.base + path, content=json.dumps(body),
                           headers={"Content-Type": "application/json"})

    async def delete(self, path: str) -> None:
        await self.request("DELETE", self.base + path, ok=(404,))

    async def held(self) -> set[str]:
        """Paths of every entry the controller holds in the four lists."""
        paths = set()
        for list_path, container in CONTAINERS.items():
            response = await self.request("GET", self.base + container, ok=(404,))
            if response.status_code == 404 or not response.content:
                continue
            try:
                entries = _find_list(response.json(), LISTS[list_path])
            except ValueError:
                raise TargetError(f"GET {self.base + container}: not JSON") from None
            paths |= {f"{list_path}/{e['uid']}" for e in entries if isinstance(e, dict) and e.get("uid")}
        return paths

    async def resync(self, desired: dict[str, dict[str, Any]]) -> tuple[int, int]:
        stale = await self.held() - set(desired)
        for path, body in desired.items():
            await self.put(path, body)
        for path in stale:
            await self.delete(path)
        return len(desired), len(stale)


def _find_list(data: Any, name: str) -> list[Any]:
    """The list called `name` anywhere in a RESTCONF answer (`{"coe": {"pods": [...]}}`)."""
    if isinstance(data, dict):
        for key, value in data.items():
            if key.split(":")[-1] == name and isinstance(value, list):
                return value
            found = _find_list(value, name)
            if found:
                return found
    return []


class WebhookTarget(_Http):
    def __init__(self, url: str, credentials: Credentials, timeout: float = 10.0) -> None:
        super().__init__(f"webhook {url}", credentials, timeout)
        self.url = url

    async def _post(self, event: dict[str, Any]) -> None:
        await self.request("POST", self.url, content=json.dumps(event), headers={"Content-Type": "application/json"})

    async def put(self, path: str, body: dict[str, Any]) -> None:
        await self._post({"type": "PUT", "path": path, "document": body})

    async def delete(self, path: str) -> None:
        await self._post({"type": "DELETE", "path": path})

    async def resync(self, desired: dict[str, dict[str, Any]]) -> tuple[int, int]:
        await self._post({"type": "SYNC", "documents": desired})
        return len(desired), 0
