"""The flows of this node's pods, and the CNI side's view of them (`cni.dataplane.PodDataplane`).

One producer of the sync loop, owning the `pod/` namespace. Its source of truth is OVSDB: the
ports the CNI handler (or anything else) put on br-int with a pod's external_ids. Before every
sync it re-reads the in-memory OVSDB replica (cheap: no I/O), compiles each pod once per state and
sets what changed; a port whose pod the model refuses is logged once and left out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from sanderling.agent.sync import SyncLoop
from sanderling.compiler import node_objects
from sanderling.model.errors import ModelError
from sanderling.model.network import NodeNetwork, PodPort
from sanderling.openflow import decoder as D
from sanderling.openflow.connection import Connection, ConnectionLost
from sanderling.openflow.ir import Flow

log = logging.getLogger(__name__)


class PodFlows:
    def __init__(self, node: NodeNetwork, sync: SyncLoop, list_pods: Callable[[], list[PodPort]]) -> None:
        self.node = node
        self.sync = sync
        self.desired = sync.scope("pod/")
        self._list_pods = list_pods
        self._keys: set[str] = set()
        self._compiled: dict[PodPort, list[Flow]] = {}
        self._set: dict[str, PodPort] = {}  # key -> the pod whose flows are desired now
        self.errors: dict[str, str] = {}
        self.by_ofport: dict[int, PodPort] = {}  # the pods of the last refresh (metrics label port counters)
        self._expected: dict[str, PodPort] = {}  # pods the CNI side is plugging, not in OVSDB yet
        self._opened: dict[str, int] = {}  # port name -> ofport, as the switch added them this session
        self._port_waiters: dict[tuple[str, int], list[asyncio.Future[None]]] = {}
        sync.before_sync.append(self.refresh)
        sync.on_connect.append(self._watch_ports)

    def _watch_ports(self, conn: Connection) -> None:
        self._opened.clear()  # a new session: only what it reports counts
        conn.port_status_handlers.append(self._port_status)

    def _port_status(self, status: D.PortStatus) -> None:
        if status.reason == D.OFPPR_DELETE:
            self._opened.pop(status.name, None)
        elif status.reason == D.OFPPR_ADD:
            self._opened[status.name] = status.port_no
            for waiter in self._port_waiters.pop((status.name, status.port_no), []):
                if not waiter.done():
                    waiter.set_result(None)

    def refresh(self) -> None:
        pods = self._list_pods()
        if self._expected:
            present = {pod.key for pod in pods}
            pods += [pod for key, pod in self._expected.items() if key not in present]
        self.by_ofport = {pod.ofport: pod for pod in pods}
        seen = set()
        for pod in pods:
            if self._set.get(pod.key) is pod:  # the very pod set last time (the sources keep them)
                seen.add(pod.key)
                continue
            try:
                self.node.check_pod(pod)
            except ModelError as exc:
                if self.errors.get(pod.key) != str(exc):
                    log.error("%s", exc)
                self.errors[pod.key] = str(exc)
                continue
            self.errors.pop(pod.key, None)
            flows = self._compiled.get(pod)
            if flows is None:  # compile once per pod state: refreshes run on every sync
                flows = self._compiled[pod] = node_objects.pod_object(self.node, pod)[1]
            self.desired.set_object(pod.key, flows)
            self._set[pod.key] = pod
            seen.add(pod.key)
        for gone in self._keys - seen:
            self.desired.remove_object(gone)
            self._set.pop(gone, None)
        if len(self._compiled) > 2 * len(pods) + 64:
            self._compiled = {p: f for p, f in self._compiled.items() if p.key in seen}
        self._keys = seen

    # ---- cni.dataplane.PodDataplane ----------------------------------------------------------

    @property
    def target(self) -> str:
        return self.sync.target

    def connected(self) -> bool:
        return self.sync.conn is not None

    def expect(self, pod: PodPort) -> None:
        self._expected[pod.key] = pod

    def withdraw(self, key: str) -> None:
        self._expected.pop(key, None)

    async def converge(self) -> None:
        await self.sync.flush()

    def forget_port(self, name: str) -> None:
        self._opened.pop(name, None)

    async def port_opened(self, name: str, ofport: int) -> None:
        if self._opened.get(name) == ofport:
            return
        key = (name, ofport)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._port_waiters.setdefault(key, []).append(waiter)
        try:
            await waiter
        finally:
            waiting = [w for w in self._port_waiters.get(key, []) if w is not waiter]
            if waiting:
                self._port_waiters[key] = waiting
            else:
                self._port_waiters.pop(key, None)

    def installed(self, key: str) -> bool:
        return self.sync.installed(key)

    def problem(self, key: str) -> str | None:
        return self.sync.error(key) or self.errors.get(key)

    async def classifies(self, ofport: int) -> bool:
        conn = self.sync.conn
        if conn is None:
            raise ConnectionLost(f"not connected to {self.sync.target}")
        stats = await conn.flow_stats(table=0)
        return any(s.match.get("in_port") == (ofport, None) for s in stats)
