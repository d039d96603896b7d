"""Group commit for OVSDB port changes, pipelined with ovs-vswitchd's work.

ovs-vswitchd reconfigures the whole bridge for each change it sees. Twenty pods started at once
would queue twenty reconfigurations; the changes that arrive while a commit is in flight go out
together in the next transaction. New ports are inserted by a hand-written transaction
(`ovsdb_rpc`), everything else through ovsdbapp. Commits do not wait for ovs-vswitchd (it picks
up everything committed meanwhile in its next reconfiguration); each caller then waits, told by
the IDL whenever its replica changes, for what it needs: its port in the replica (to compile the
pod's flows) and the configuration number of its commit applied (the port open).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from sanderling.ovs.ovsdb import Ovsdb, PortChange
from sanderling.ovs.ovsdb_rpc import OvsdbRpc
from sanderling.ovs.runtime import OvsError

log = logging.getLogger(__name__)
WAIT_TIMEOUT_S = 30.0


@dataclass
class _Pending:
    change: PortChange
    done: asyncio.Future[int]


class PortBatcher:
    def __init__(self, db: Ovsdb, bridge: str, rpc: OvsdbRpc | None = None) -> None:
        self.db = db
        self.bridge = bridge
        self.rpc = rpc if rpc is not None else OvsdbRpc(db.endpoint)
        self._queue: list[_Pending] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self._listening = False
        self._scheduled = False
        self.batches = 0
        self.inserted_directly = 0  # ports that went through the hand-written transaction

    async def apply(self, change: PortChange) -> None:
        """Add or delete one port; returns when ovs-vswitchd has applied it."""
        await self.applied(await self.commit(change))

    async def commit(self, change: PortChange) -> int:
        """Add or delete one port; returns once ovsdb-server has it, with the configuration number
        to pass to `applied`."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        pending = _Pending(change, asyncio.get_running_loop().create_future())
        self._queue.append(pending)
        self._wakeup.set()
        return await pending.done

    async def applied(self, cfg: int) -> None:
        """Return once ovs-vswitchd has applied configuration `cfg`."""
        await self._wait(lambda: self.db.cur_cfg() >= cfg,
                         lambda: f"ovs-vswitchd did not apply the port changes on {self.bridge} (configuration "
                                 f"{cfg}, applied {self.db.cur_cfg()}): is ovs-vswitchd running?")

    async def visible(self, name: str) -> None:
        """Return once the agent's replica of OVSDB has port `name` on the bridge."""
        await self._wait(lambda: name in self.db.port_names(self.bridge),
                         lambda: f"port {name} committed to OVSDB never reached the agent's replica of {self.bridge}")

    async def _wait(self, done: Callable[[], bool], why: Callable[[], str]) -> None:
        if done():
            return
        loop = asyncio.get_running_loop()
        if not self._listening:
            self._listening = True

            def changed() -> None:  # the IDL's thread: hand over, at most one call queued at a time
                if not self._scheduled:
                    self._scheduled = True
                    loop.call_soon_threadsafe(self._notify)
            self.db.on_change(changed)
        # no await between the check above and this: a change after the check is notified later
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append((done, waiter))
        try:
            await asyncio.wait_for(waiter, WAIT_TIMEOUT_S)
        except TimeoutError:
            raise OvsError(f"{why()} (waited {WAIT_TIMEOUT_S:.0f} s)") from None

    def _notify(self) -> None:
        self._scheduled = False
        waiting = []
        for done, waiter in self._waiters:
            if waiter.done():
                continue
            if done():
                waiter.set_result(None)
            else:
                waiting.append((done, waiter))
        self._waiters = waiting

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            batch, self._queue = self._queue, []
            if not batch:
                continue
            self.batches += 1
            try:
                await self._apply_batch(batch)
            except Exception as exc:  # deliver, never lose a waiter
                for p in batch:
                    if not p.done.done():
                        p.done.set_exception(exc)

    async def _apply_batch(self, batch: list[_Pending]) -> None:
        existing = self.db.port_names(self.bridge)
        fresh = [p for p in batch if not p.change.delete and p.change.name not in existing]
        others = [p for p in batch if p not in fresh]
        if fresh:
            try:
                cfg = await self.rpc.add_ports(self.bridge, [p.change for p in fresh])
                self.inserted_directly += len(fresh)
                for p in fresh:
                    p.done.set_result(cfg)
            except OvsError as exc:  # e.g. a port added meanwhile by someone else: ovsdbapp's may-exist
                log.info("inserting %d ports into %s directly failed (%s); through ovsdbapp", len(fresh),
                         self.bridge, exc)
                others += fresh
        if others:
            await self._commit(others)

    async def _commit(self, batch: list[_Pending]) -> None:
        try:
            cfg = await asyncio.to_thread(self.db.commit_port_changes, self.bridge, [p.change for p in batch])
            for p in batch:
                p.done.set_result(cfg)
        except OvsError as exc:
            if len(batch) == 1:
                batch[0].done.set_exception(OvsError(f"port {batch[0].change.name}: {exc}"))
                return
            # find the change at fault: each on its own
            for p in batch:
                try:
                    p.done.set_result(await asyncio.to_thread(self.db.commit_port_changes, self.bridge, [p.change]))
                except OvsError as one:
                    p.done.set_exception(one)
