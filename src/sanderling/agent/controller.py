"""The node controller loop: connect to br-int, resync, then follow changes.

It owns one OpenFlow session at a time. When the session drops (ovs-vswitchd restarted, socket
gone) it reconnects with a short backoff and replays the whole desired state; a change that could
not be sent stays pending in the realizer and goes out with the next sync.

Readiness gate: after an agent restart the previous generation's flows still serve the node.
Until every informer the node's flows depend on has listed (`gate`), only what the agent knows
for certain goes out (its pods, the pipeline, routes to other nodes), nothing is swept, and the
objects fed by the API (Services, NetworkPolicies) stay pending; then one resync installs them
all and sweeps the previous generation in the same bundle. So a restart never refuses a live
Service connection for want of its EndpointSlices, nor opens a policy hole for want of a policy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from sanderling.agent.reject import reject_reply
from sanderling.compiler import gateway as gateway_compiler
from sanderling.compiler import nodes as node_compiler
from sanderling.compiler import pods as pod_compiler
from sanderling.model.errors import ModelError
from sanderling.model.network import NodeNetwork, PodPort
from sanderling.model.nodes import Remote
from sanderling.openflow import ir
from sanderling.openflow.connection import Connection, ConnectionLost, OpenFlowError
from sanderling.openflow.ir import Flow
from sanderling.openflow.pipeline import PIPELINE
from sanderling.openflow.realizer import Realizer

log = logging.getLogger(__name__)

STATIC_KEY = "pipeline/static"
GATEWAY_KEY = "node/gateway"
TUNNEL_KEY = "node/tunnel"
GATED_PREFIXES = ("service", "policy")  # objects fed by the API: installed only once it has been listed


def ungated(key: str) -> bool:
    return not key.startswith(GATED_PREFIXES)


class NodeController:
    def __init__(self, node: NodeNetwork, target: str, realizer: Realizer,
                 list_pods: Callable[[], list[PodPort]], poll_interval: float = 0.2, gateway: bool = False,
                 mode: str = "routed", gate: asyncio.Event | None = None) -> None:
        self.gateway = gateway
        self.gate = gate  # set once the informers have listed (None: nothing to wait for)
        self.swept = False  # the previous generation is gone: the complete desired state is installed
        self.mode = mode
        self.remotes: list[Remote] = []
        self._remote_flows: dict[Remote, list[Flow]] = {}
        self._wake = asyncio.Event()
        self.packet_in_hooks: list[Callable[[int, int, bytes], None]] = []
        self.meters: list[ir.Meter] = []  # installed after every (re)connect
        self.node = node
        self.target = target
        self.realizer = realizer
        self._list_pods = list_pods
        self.poll_interval = poll_interval
        self.conn: Connection | None = None
        self.connected = asyncio.Event()
        self.resyncs = 0
        self._stop = asyncio.Event()
        self._pod_keys: set[str] = set()
        self.pod_errors: dict[str, str] = {}
        self._compiled: dict[PodPort, list[Flow]] = {}
        self._lock = asyncio.Lock()
        self._requested = 0
        self._completed = 0

    def kick(self) -> None:
        """Objects were changed in the realizer from outside (services): sync them now."""
        self._wake.set()

    def _packet_in(self, pin: Any) -> None:
        for hook in self.packet_in_hooks:  # e.g. policy logging
            try:
                hook(pin.table_id, pin.cookie, pin.data)
            except Exception:
                log.exception("packet-in handler failed")
        if pin.table_id != PIPELINE["Reject"] or self.conn is None:
            return
        reply = reject_reply(pin.data)
        in_port = next((value for name, value, _mask in pin.match.items if name == "in_port"), None)
        if reply is None or in_port is None:
            return
        asyncio.ensure_future(self.conn.packet_out(reply, (ir.Output(ir.IN_PORT),), in_port))

    async def _install_meters(self, conn: Connection) -> None:
        from sanderling.openflow import encoder as E

        for meter in self.meters:  # delete + add: the same whether or not it existed
            conn.send(E.meter_mod(meter, conn.next_xid(), E.OFPMC_DELETE))
            conn.send(E.meter_mod(meter, conn.next_xid(), E.OFPMC_ADD))
        if self.meters:
            await conn.barrier()

    def set_remotes(self, remotes: list[Remote]) -> None:
        """Other nodes' destinations changed (from the API): recompile them at the next refresh, now."""
        self.remotes = remotes
        self._wake.set()

    def _refresh_remotes(self) -> None:
        flows = {r: self._remote_flows.get(r) or node_compiler.remote_flows(self.node, r, self.mode)
                 for r in self.remotes}
        for gone in self._remote_flows.keys() - flows.keys():
            if gone.key not in {r.key for r in flows}:
                self.realizer.remove_object(gone.key)
        for remote, remote_flows in flows.items():
            if self._remote_flows.get(remote) is not remote_flows:
                self.realizer.set_object(remote.key, remote_flows)
        self._remote_flows = flows

    def refresh_desired(self, pods: list[PodPort]) -> None:
        """Compile the node's state into the realizer (pure; the realizer drops no-op updates)."""
        self.realizer.set_object(STATIC_KEY, pod_compiler.static_flows(self.node))
        if self.gateway:
            self.realizer.set_object(GATEWAY_KEY, gateway_compiler.gateway_flows(self.node))
        if self.mode == "overlay":
            self.realizer.set_object(TUNNEL_KEY, node_compiler.tunnel_flows(self.node))
        self._refresh_remotes()
        seen = set()
        for pod in pods:
            try:
                self.node.check_pod(pod)
            except ModelError as exc:
                if self.pod_errors.get(pod.key) != str(exc):
                    log.error("%s", exc)
                self.pod_errors[pod.key] = str(exc)
                continue
            self.pod_errors.pop(pod.key, None)
            flows = self._compiled.get(pod)
            if flows is None:  # compile once per pod state: refreshes run on every poll and CNI call
                flows = self._compiled[pod] = pod_compiler.pod_flows(self.node, pod)
            self.realizer.set_object(pod.key, flows)
            seen.add(pod.key)
        for gone in self._pod_keys - seen:
            self.realizer.remove_object(gone)
        if len(self._compiled) > 2 * len(pods) + 64:
            self._compiled = {p: f for p, f in self._compiled.items() if p.key in seen}
        self._pod_keys = seen

    async def _poll_pods(self) -> None:
        # an in-memory read of the OVSDB replica: cheap enough for the event loop itself
        self.refresh_desired(self._list_pods())

    async def refresh_now(self) -> None:
        """Re-read the local pods and push any change to OVS now (the CNI server calls this).

        Serialized with the periodic loop, so the realizer is never synced twice at once, and
        coalesced: a caller whose request is covered by a refresh that started after it asked
        returns as soon as that refresh is done, so 20 concurrent ADDs cost a few syncs, not 20.
        """
        self._requested += 1
        ticket = self._requested
        async with self._lock:
            if self._completed >= ticket:
                return
            covers = self._requested
            await self._poll_pods()
            conn = self.conn
            if conn is None:
                raise ConnectionLost(f"not connected to {self.target}")
            if not self.swept and self._gate_open():
                await self._resync(conn)
            elif self.realizer.pending:
                await self.realizer.sync(conn, only=None if self.swept else ungated)
            self._completed = covers

    def _gate_open(self) -> bool:
        return self.gate is None or self.gate.is_set()

    async def _resync(self, conn: Connection) -> None:
        """The whole desired state with the previous generation swept, once the informers have
        listed; until then what the agent knows, sweeping nothing."""
        if self._gate_open():
            await self.realizer.resync(conn)
            if not self.swept:
                log.info("node %s: desired state complete, previous generation swept", self.node.name)
            self.swept = True
        else:
            log.info("node %s: waiting for the informers to list before sweeping the previous generation; "
                     "it keeps serving meanwhile", self.node.name)
            await self.realizer.resync(conn, sweep=False, only=ungated)

    async def _connect(self) -> Connection:
        delay = 0.05
        while not self._stop.is_set():
            try:
                return await Connection.open(self.target, timeout=2.0)
            except (TimeoutError, OSError, ConnectionLost) as exc:
                log.debug("connect %s failed: %s; retry in %.2fs", self.target, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
        raise asyncio.CancelledError

    async def run(self) -> None:
        while not self._stop.is_set():
            conn = await self._connect()
            self.conn = conn
            stop_task = asyncio.ensure_future(self._stop.wait())
            conn.packet_in_handlers.append(self._packet_in)
            log.info("connected to %s (datapath %016x)", self.target, conn.datapath_id)
            try:
                async with self._lock:
                    await self._poll_pods()
                    await self._install_meters(conn)  # before the flows that use them
                    await self._resync(conn)
                self.resyncs += 1
                self.connected.set()
                while not self._stop.is_set() and not conn.closed.done():
                    await self.refresh_now()
                    wake = asyncio.ensure_future(self._wake.wait())
                    waiters: set[asyncio.Future[Any]] = {conn.closed, stop_task, wake}
                    await asyncio.wait(waiters,
                                       timeout=self.poll_interval, return_when=asyncio.FIRST_COMPLETED)
                    wake.cancel()
                    self._wake.clear()
            except (ConnectionLost, OSError) as exc:
                log.warning("lost %s: %s; reconnecting", self.target, exc)
            except OpenFlowError as exc:
                log.error("switch refused the resync: %s; retrying", exc)
                await asyncio.sleep(0.5)
            except Exception:  # a bug must not take the node's network down: log, resync, go on
                log.exception("controller loop failed; reconnecting and resyncing")
                await asyncio.sleep(0.5)
            finally:
                stop_task.cancel()
                self.connected.clear()
                conn.close()
                self.conn = None

    def stop(self) -> None:
        self._stop.set()
