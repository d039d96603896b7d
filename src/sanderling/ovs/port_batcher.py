"""Group commit for OVSDB port changes, pipelined with ovs-vswitchd's work.

ovs-vswitchd reconfigures the whole bridge for each change it sees. Twenty pods started at once
would queue twenty reconfigurations; the changes that arrive while a commit is in flight go out
together in the next transaction. New ports are inserted by a hand-written transaction
(`ovsdb_rpc`), everything else through ovsdbapp. Commits do not wait for ovs-vswitchd (it picks
up everything committed meanwhile in its next reconfiguration); each caller then waits, told by
the IDL whenever its replica changes, for what it needs: the configuration number of its commit
applied (its port open), or its port in the replica.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from sanderling.group_commit import GroupCommit
from sanderling.ovs.ovsdb import Ovsdb, PortChange
from sanderling.ovs.ovsdb_rpc import OvsdbRpc
from sanderling.ovs.runtime import OvsError

log = logging.getLogger(__name__)
WAIT_TIMEOUT_S = 30.0


class PortBatcher:
    def __init__(self, db: Ovsdb, bridge: str, rpc: OvsdbRpc | None = None) -> None:
        self.db = db
        self.bridge = bridge
        self.rpc = rpc if rpc is not None else OvsdbRpc(db.endpoint)
        self._group: GroupCommit[PortChange, int] = GroupCommit(self._apply_batch)
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self._listening = False
        self._scheduled = False
        self.inserted_directly = 0  # ports that went through the hand-written transaction

    async def apply(self, change: PortChange) -> None:
        """Add or delete one port; returns when ovs-vswitchd has applied it."""
        await self.applied(await self.commit(change))

    async def commit(self, change: PortChange) -> int:
        """Add or delete one port; returns once ovsdb-server has it, with the configuration number
        to pass to `applied`."""
        return await self._group.submit(change)

    @property
    def batches(self) -> int:
        return self._group.batches

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
                if not self._scheduled and not loop.is_closed():
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
            try:
                ready = done()
            except Exception as exc:  # that waiter learns why; the others are still checked
                waiter.set_exception(exc)
                continue
            if ready:
                waiter.set_result(None)
            else:
                waiting.append((done, waiter))
        self._waiters = waiting

    async def _apply_batch(self, batch: list[PortChange]) -> list[int | BaseException]:
        """One configuration number per change (an exception for a change that failed)."""
        existing = self.db.port_names(self.bridge)
        fresh = [i for i, ch in enumerate(batch) if not ch.delete and ch.name not in existing]
        results: list[int | BaseException] = [0] * len(batch)
        others = [i for i in range(len(batch)) if i not in fresh]
        if fresh:
            try:
                cfg = await self.rpc.add_ports(self.bridge, [batch[i] for i in fresh])
                self.inserted_directly += len(fresh)
                for i in fresh:
                    results[i] = cfg
            except OvsError as exc:  # e.g. a port added meanwhile by someone else: ovsdbapp's may-exist
                log.info("inserting %d ports into %s directly failed (%s); through ovsdbapp", len(fresh),
                         self.bridge, exc)
                others += fresh
        if others:
            try:
                cfg = await asyncio.to_thread(self.db.commit_port_changes, self.bridge, [batch[i] for i in others])
                for i in others:
                    results[i] = cfg
            except OvsError:  # find the change at fault: each on its own
                for i in others:
                    try:
                        results[i] = await asyncio.to_thread(self.db.commit_port_changes, self.bridge, [batch[i]])
                    except OvsError as exc:
                        results[i] = OvsError(f"port {batch[i].name}: {exc}")
        return results
