"""The agent's view of the cluster from the Kubernetes API: Nodes and Pods through informers.

From them it derives the remote destinations (other nodes' pod subnets, pool addresses living
on other nodes) and reports them whenever they change, so the controller rewrites only the
flows of the destinations that changed and the route keeper only the routes. A malformed Node
is logged once per distinct problem and left out; every other node keeps working. IPPools tell
which node holds which pool address: a pod address outside its node's podCIDR is routed only
with such an allocation behind it, and a podCIDR that would capture what is not the node's
(too broad, the service CIDR, a node address, another node's pods) is refused (see model.nodes).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from lightkube import AsyncClient
from lightkube.resources.core_v1 import Node, Pod

from sanderling.kube.client import IPPoolResource
from sanderling.kube.informer import Informer
from sanderling.model.errors import ModelError
from sanderling.model.nodes import NodeInfo, Remote, node_info, refused_cidrs, remotes

log = logging.getLogger(__name__)


class ClusterView:
    def __init__(self, client: AsyncClient, node_name: str, on_remotes: Callable[[list[Remote]], None],
                 service_cidr: Any = None, report: Callable[[str, str], None] | None = None) -> None:
        """`report(node name, message)`: a refused podCIDR, as a Kubernetes Event on that Node."""
        self.node_name = node_name
        self.on_remotes = on_remotes
        self.service_cidr = service_cidr
        self.report = report
        self.nodes: dict[str, NodeInfo] = {}
        self.pod_hosts: dict[str, tuple[tuple[str, str], ...]] = {}  # pod -> (its node, one of its addresses)
        self.pool_holders: dict[str, dict[str, str]] = {}  # pool -> address -> node holding it
        self.node_errors: dict[str, str] = {}
        self.refused: dict[str, str] = {}
        self.untrusted: list[str] = []
        self.remotes: list[Remote] = []
        self.node_informer = Informer(client, Node, self._node_changed, namespaced=False)
        self.pod_informer = Informer(client, Pod, self._pod_changed)
        self.pool_informer = Informer(client, IPPoolResource, self._pool_changed, namespaced=False)
        self.informers = (self.node_informer, self.pod_informer, self.pool_informer)
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(i.run()) for i in self.informers]

    async def synced(self) -> None:
        for informer in self.informers:
            await informer.synced.wait()
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
            status = obj.get("status") or {}
            # every address of the pod (a dual-stack pod from an IPPool has a pool address per family)
            ips = tuple(str(e.get("ip") or "") for e in status.get("podIPs") or [] if isinstance(e, dict)) \
                or ((status.get("podIP") or ""),)
            # a host-network pod's address is its node's (the agent's own pod among them): not a pod route
            on_host = bool((obj.get("spec") or {}).get("hostNetwork"))
            host = (tuple((node, ip) for ip in ips if ip) if node and not on_host else ()) or None
        if host is None:
            if self.pod_hosts.pop(key, None) is None:
                return
        elif self.pod_hosts.get(key) == host:
            return
        else:
            self.pod_hosts[key] = host
        self._recompute()

    def _pool_changed(self, key: str, obj: dict[str, Any] | None) -> None:
        allocations = ((obj or {}).get("status") or {}).get("allocations") or {}
        holders = {}
        if isinstance(allocations, dict) and not ((obj or {}).get("spec") or {}).get("network"):
            # a secondary network's addresses are never routed on the pod network
            holders = {str(ip): str(a.get("node") or "") for ip, a in allocations.items() if isinstance(a, dict)}
        if holders:
            self.pool_holders[key] = holders
        elif self.pool_holders.pop(key, None) is None:
            return
        self._recompute()

    def _recompute(self) -> None:
        if not all(i.synced.is_set() for i in self.informers):
            return
        refused = refused_cidrs(self.nodes.values(), self.service_cidr)
        for name, why in refused.items():
            if self.refused.get(name) != why:
                log.error("%s", why)
                if self.report is not None:
                    self.report(name, why)
        self.refused = refused
        holders = {ip: node for pool in self.pool_holders.values() for ip, node in pool.items()}
        untrusted: list[str] = []
        current = remotes(self.node_name, self.nodes.values(), [p for pod in self.pod_hosts.values() for p in pod],
                          holders, refused, untrusted)
        for item in sorted(set(untrusted) - set(self.untrusted)):
            log.error("pod address %s: outside that node's podCIDR and not an IPPool allocation of that node: "
                      "not routed", item)
        self.untrusted = untrusted
        if current != self.remotes:
            self.remotes = current
            self.on_remotes(current)
