"""Group commit for OVSDB port changes.

Every Open_vSwitch transaction waits until ovs-vswitchd has applied it (next_cfg/cur_cfg), and
ovs-vswitchd reconfigures the whole bridge for each one. Twenty pods started at once would
queue twenty reconfigurations one after the other; batching the port adds and deletes that
arrive while one transaction is in flight turns them into one.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from sanderling.ovs.ovsdb import Ovsdb, PortChange
from sanderling.ovs.runtime import OvsError

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    change: PortChange
    done: asyncio.Future[None]


class PortBatcher:
    def __init__(self, db: Ovsdb, bridge: str) -> None:
        self.db = db
        self.bridge = bridge
        self._queue: list[_Pending] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0

    async def apply(self, change: PortChange) -> None:
        """Add or delete one port; returns when ovs-vswitchd has applied it."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        pending = _Pending(change, asyncio.get_running_loop().create_future())
        self._queue.append(pending)
        self._wakeup.set()
        await pending.done

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            batch, self._queue = self._queue, []
            if not batch:
                continue
            self.batches += 1
            try:
                await asyncio.to_thread(self.db.apply_port_changes, self.bridge, [p.change for p in batch])
                for p in batch:
                    p.done.set_result(None)
            except OvsError:
                if len(batch) == 1:
                    batch[0].done.set_exception(OvsError(f"port {batch[0].change.name}: failed"))
                    continue
                # find the change at fault: each on its own
                for p in batch:
                    try:
                        await asyncio.to_thread(self.db.apply_port_changes, self.bridge, [p.change])
                        p.done.set_result(None)
                    except OvsError as exc:
                        p.done.set_exception(exc)
            except Exception as exc:  # deliver, never lose a waiter
                for p in batch:
                    if not p.done.done():
                        p.done.set_exception(exc)
