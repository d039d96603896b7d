"""The agent's view of the cluster from the Kubernetes API: Nodes and Pods through informers.

From them it derives the remote destinations (other nodes' pod subnets, pool addresses living
on other nodes) and reports them whenever they change, so the controller rewrites only the
flows of the destinations that changed and the route keeper only the routes. A malformed Node
is logged once per distinct problem and left out; every other node keeps working.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from lightkube import AsyncClient
from lightkube.resources.core_v1 import Node, Pod

from sanderling.kube.informer import Informer
from sanderling.model.errors import ModelError
from sanderling.model.nodes import NodeInfo, Remote, node_info, remotes

log = logging.getLogger(__name__)


class ClusterView:
    def __init__(self, client: AsyncClient, node_name: str, on_remotes: Callable[[list[Remote]], None]) -> None:
        self.node_name = node_name
        self.on_remotes = on_remotes
        self.nodes: dict[str, NodeInfo] = {}
        self.pod_hosts: dict[str, tuple[str, str]] = {}
        self.node_errors: dict[str, str] = {}
        self.remotes: list[Remote] = []
        self.node_informer = Informer(client, Node, self._node_changed, namespaced=False)
        self.pod_informer = Informer(client, Pod, self._pod_changed)
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self.node_informer.run()), asyncio.create_task(self.pod_informer.run())]

    async def synced(self) -> None:
        await self.node_informer.synced.wait()
        await self.pod_informer.synced.wait()
        self._recompute()

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()

    def _node_changed(self, key: str, obj: dict[str, Any] | None) -> None:
        if obj is None:
            self.nodes.pop(key, None)
        else:
            try:
                self.nodes[key] = node_info(obj)
                self.node_errors.pop(key, None)
            except ModelError as exc:
                if self.node_errors.get(key) != str(exc):
                    log.error("%s", exc)
                self.node_errors[key] = str(exc)
                self.nodes.pop(key, None)
        self._recompute()

    def _pod_changed(self, key: str, obj: dict[str, Any] | None) -> None:
        host = None
        if obj is not None:
            node = (obj.get("spec") or {}).get("nodeName") or ""
            ip = (obj.get("status") or {}).get("podIP") or ""
            host = (node, ip) if node and ip else None
        if host is None:
            if self.pod_hosts.pop(key, None) is None:
                return
        elif self.pod_hosts.get(key) == host:
            return
        else:
            self.pod_hosts[key] = host
        self._recompute()

    def _recompute(self) -> None:
        if not (self.node_informer.synced.is_set() and self.pod_informer.synced.is_set()):
            return
        current = remotes(self.node_name, self.nodes.values(), self.pod_hosts.values())
        if current != self.remotes:
            self.remotes = current
            self.on_remotes(current)
